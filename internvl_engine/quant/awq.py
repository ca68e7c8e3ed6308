"""AWQ W4A16 (LMDeploy / AutoAWQ GEMM layout) as a linear method: the parameters a layer holds for its shard,
how each maps onto the checkpoint tensor, the shard checks and the matmul (ops.awq_gemm). The layer that holds
it (layers/linear.py) derives its load plan and its part of a full tensor from `layout`.

Per layer: qweight int32 [in, out / 8], qzeros int32 [in / G, out / 8], scales [in / G, out] (G = 128), optional
bias [out]; w = (q - z) * s per group of G input rows. Column-parallel ranks keep whole int32 packs of 8 output
columns; row-parallel ranks keep whole groups of G input rows (qzeros and scales hold one row per group)."""
from __future__ import annotations

import torch

from ..errors import UnsupportedModelError
from ..ops.ref import awq_gemm_ref
from ..parallel import TensorParallel
from .common import FLOATS, param

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)       # column 8c + AWQ_ORDER[i] sits in nibble i
AWQ_REVERSE = (0, 4, 1, 5, 2, 6, 3, 7)     # nibble of column j within its pack


def awq_pack(q: torch.Tensor) -> torch.Tensor:
    """4-bit values [rows, cols] (cols % 8 == 0) -> int32 [rows, cols / 8] in the AWQ GEMM order."""
    q = q.to(torch.int64).reshape(q.shape[0], -1, 8)
    word = torch.zeros(q.shape[:2], dtype=torch.int64, device=q.device)
    for i, j in enumerate(AWQ_ORDER):
        word |= (q[..., j] & 0xF) << (4 * i)
    return ((word + 2 ** 31) % 2 ** 32 - 2 ** 31).to(torch.int32)


def awq_unpack(packed: torch.Tensor) -> torch.Tensor:
    """int32 [rows, cols / 8] -> the 4-bit values [rows, cols] as uint8 (the inverse of awq_pack, bit-exact)."""
    shifts = torch.tensor([4 * n for n in AWQ_REVERSE], dtype=torch.int32, device=packed.device)
    out = (packed.unsqueeze(-1) >> shifts) & 0xF
    return out.reshape(packed.shape[0], -1).to(torch.uint8)


def awq_dequantize(qweight, qzeros, scales, group_size: int = 128) -> torch.Tensor:
    """w [in, out] in float32: (q - z) * s per group of `group_size` input rows (the plain-torch oracle)."""
    q = awq_unpack(qweight).float()
    z = awq_unpack(qzeros).float().repeat_interleave(group_size, 0)[: q.shape[0]]
    s = scales.float().repeat_interleave(group_size, 0)[: q.shape[0]]
    return (q - z) * s


class AWQLinearMethod:
    """W4A16 for any linear layer of layers/linear.py (which holds the geometry: in_features, in_start / in_local,
    full_sizes, local, shard_names, out_features)."""

    name = "awq"
    # The dtype of each leaf in the files, exactly (the loader refuses others): LMDeploy and AutoAWQ write qweight
    # and qzeros as int32; a uint8 or int64 tensor of the same shape holds other bits and would load as garbage.
    CHECKPOINT_DTYPES = {"qweight": ((torch.int32,), "AWQ qweight: eight 4-bit values packed per int32"),
                         "qzeros": ((torch.int32,), "AWQ qzeros: eight 4-bit zero points packed per int32"),
                         "scales": (FLOATS, "AWQ scales"), "bias": (FLOATS, "AWQ bias")}
    keeps_dtypes = True  # scales stay float32 in a bf16 / fp16 model

    def __init__(self, group_size: int = 128):
        self.group_size = group_size

    def check(self, layer) -> None:
        """UnsupportedModelError when this rank's shard of the layer cannot hold whole packs and groups."""
        g, where = self.group_size, layer.prefix or "AWQ layer"
        if layer.in_features % g or any(n % 8 for n in layer.full_sizes):
            raise UnsupportedModelError(f"{where} [{layer.in_features} -> {layer.full_sizes}]: the input size must "
                                        f"be a multiple of the group size {g} and each output a multiple of 8")
        names = layer.shard_names or ["output"]
        for name, (start, n), full in zip(names, layer.local, layer.full_sizes):
            if start % 8 or n % 8:
                raise UnsupportedModelError(
                    f"{where}: {name} keeps output columns [{start}, {start + n}) of {full} on this rank: {n} is not "
                    "a multiple of 8 (each rank must keep whole int32 packs of 8 columns)")
        if layer.in_start % g or layer.in_local % g:
            raise UnsupportedModelError(
                f"{where}: this rank keeps input rows [{layer.in_start}, {layer.in_start + layer.in_local}) of "
                f"{layer.in_features}: {layer.in_local} is not a multiple of the group size {g} (each rank must keep "
                f"whole groups: qzeros and scales hold one row per {g} inputs)")

    def tensor_parallel_problem(self, text, n: int) -> str | None:
        """Why the decoder linears of a model (`text`, a TextConfig that parallel.check_shardable accepts for n)
        cannot be split over n ranks in this format; None when they can. The per-rank sizes are TensorParallel's,
        as the layers build them: q/k/v and gate/up keep output columns (whole packs of 8), o_proj and down_proj
        input rows (whole groups)."""
        split = TensorParallel(0, n)
        h, d, f, g = text.num_attention_heads, text.head_dim, text.intermediate_size, self.group_size
        kv, kv_per = text.num_key_value_heads * d, split.kv_heads(text.num_key_value_heads)[1] * d
        columns = [("self_attn.q_proj", h * d, split.part(h)[1] * d), ("self_attn.k_proj", kv, kv_per),
                   ("self_attn.v_proj", kv, kv_per), ("mlp.gate_proj", f, split.part(f)[1]),
                   ("mlp.up_proj", f, split.part(f)[1])]
        for sub, full, per in columns:
            if per % 8:
                return (f"AWQ {sub} (every decoder layer) has {full} output columns, {per} per rank, not a multiple "
                        "of 8 (each rank must keep whole int32 packs of 8 columns)")
        for sub, full in (("self_attn.o_proj", h * d), ("mlp.down_proj", f)):
            per = split.part(full)[1]
            if per % g:
                return (f"AWQ {sub} (every decoder layer) has input size {full}, {per} per rank, not a multiple of "
                        f"the group size {g} (each rank must keep whole groups: qzeros and scales hold one row per "
                        f"{g} inputs)")
        return None

    def create_weights(self, layer) -> None:
        out, groups = layer.out_features, layer.in_local // self.group_size
        layer.qweight = param((layer.in_local, out // 8), torch.int32)
        layer.qzeros = param((groups, out // 8), torch.int32)
        layer.scales = param((groups, out), torch.float32)  # fp16 / bf16 in the files: kept exactly

    def layout(self, leaf: str) -> tuple[int, int, int | None, int]:
        """As DenseLinearMethod.layout: qweight packs 8 columns per int32, qzeros / scales one row per group."""
        g = self.group_size
        return {"qweight": (1, 8, 0, 1), "qzeros": (1, 8, 0, g), "scales": (1, 1, 0, g), "bias": (0, 1, None, 1)}[leaf]

    def apply(self, layer, x: torch.Tensor, bias) -> torch.Tensor:
        x2 = x.reshape(-1, layer.in_local).contiguous()
        fn = awq_gemm_ref if layer.ops is None else layer.ops.awq_gemm
        y = fn(x2, layer.qweight, layer.qzeros, layer.scales, bias, self.group_size)
        return y.reshape(*x.shape[:-1], layer.out_features)
