"""Quantized checkpoints (formats: shared/design/quantization.md).

- AWQ W4A16 as OpenGVLab/LMDeploy ship it (`quant_method: awq, version: gemm, bits: 4, group_size: 128,
  zero_point: true`): only the Qwen2 decoder linears are quantized; per layer `qweight` int32 [in, out/8],
  `qzeros` int32 [in/128, out/8], `scales` [in/128, out], `bias` on q/k/v; w = (q - z) * s.
- FP8 W8A8 in compressed-tensors form (`quant_method: compressed-tensors, format: float-quantized`): `weight`
  float8_e4m3fn [out, in], `weight_scale` [out, 1], activations quantized per token at run time; the `ignore`
  list is honoured.

The config block is read at the top level of config.json, under `llm_config` and under `text_config`
(config.py). The model is built dense on the meta device and its decoder linears are then swapped for the
quantized layers below (`quantize_model`), whose parameters the loader fills from the checkpoint like any other.
On the CPU (torch / cpp backends) the quantized layers dequantize and run the matmul."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import UnsupportedModelError
from ..ops.ref import awq_gemm_ref, fp8_gemm_ref

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)       # column 8c + AWQ_ORDER[i] sits in nibble i
AWQ_REVERSE = (0, 4, 1, 5, 2, 6, 3, 7)     # nibble of column j within its pack
FP8_MAX = 448.0                            # largest finite float8_e4m3fn
DECODER_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@dataclass
class QuantConfig:
    method: str                      # "awq" | "fp8"
    bits: int = 4
    group_size: int = 128
    ignore: list = field(default_factory=list)  # fp8: module names or "re:" patterns left dense

    def ignored(self, names) -> bool:
        for entry in self.ignore:
            for name in names:
                if entry.startswith("re:"):
                    if re.fullmatch(entry[3:], name) or re.match(entry[3:], name):
                        return True
                elif entry == name:
                    return True
        return False


def parse_quant_config(raw: dict | None, where: str) -> QuantConfig | None:
    """A checkpoint's quantization_config -> QuantConfig; UnsupportedModelError for anything not implemented."""
    if not raw:
        return None
    if not isinstance(raw, dict):
        raise UnsupportedModelError(f"{where}: quantization_config must be an object, got {type(raw).__name__}")
    method = str(raw.get("quant_method", "")).lower()
    if method == "awq":
        bits = raw.get("bits", raw.get("w_bit"))
        group = raw.get("group_size", raw.get("q_group_size"))
        version = str(raw.get("version", "gemm")).lower()
        zero = raw.get("zero_point", True)
        if bits != 4:
            raise UnsupportedModelError(f"{where}: AWQ bits {bits!r} is not supported (only 4)")
        if group != 128:
            raise UnsupportedModelError(f"{where}: AWQ group_size {group!r} is not supported (only 128)")
        if version != "gemm":
            raise UnsupportedModelError(f"{where}: AWQ version {version!r} is not supported (only 'gemm')")
        if zero is not True:
            raise UnsupportedModelError(f"{where}: AWQ zero_point {zero!r} is not supported (only true)")
        return QuantConfig("awq", 4, 128)
    if method == "compressed-tensors":
        fmt = raw.get("format")
        if fmt not in ("float-quantized", "naive-quantized"):
            raise UnsupportedModelError(f"{where}: compressed-tensors format {fmt!r} is not supported "
                                        "(only 'float-quantized' FP8)")
        groups = raw.get("config_groups") or {}
        if not groups:
            raise UnsupportedModelError(f"{where}: compressed-tensors config has no config_groups")
        for name, g in groups.items():
            w, a = g.get("weights") or {}, g.get("input_activations") or {}
            ok_w = (w.get("num_bits") == 8 and w.get("type") == "float" and w.get("strategy") == "channel"
                    and w.get("symmetric", True) and not w.get("dynamic", False))
            ok_a = (a.get("num_bits") == 8 and a.get("type") == "float" and a.get("strategy") == "token"
                    and a.get("dynamic") is True)
            if not (ok_w and ok_a):
                raise UnsupportedModelError(
                    f"{where}: compressed-tensors group {name!r} is not FP8 W8A8 with per-channel weight scales and "
                    "dynamic per-token activations (the only scheme supported)")
            if [t for t in g.get("targets", ["Linear"]) if t != "Linear"]:
                raise UnsupportedModelError(f"{where}: compressed-tensors group {name!r} targets "
                                            f"{g.get('targets')}; only ['Linear'] is supported")
        return QuantConfig("fp8", 8, 0, list(raw.get("ignore") or []))
    raise UnsupportedModelError(f"{where}: quant_method {raw.get('quant_method')!r} is not supported "
                                "(awq, compressed-tensors)")


# ------------------------------------------------------------------------------------------------------ AWQ
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


awq_matmul_ref = awq_gemm_ref  # the ops contract's oracle (ops/ref.py)


class AWQLinear(nn.Module):
    """W4A16 linear; packed projections (q/k/v, gate/up) concatenate their shards along the output (shard sizes
    are multiples of 8, so each shard's packed columns are a contiguous range)."""

    def __init__(self, in_features: int, shard_sizes: list[int], shard_names: list[str] | None, bias: bool,
                 dtype: torch.dtype, device, group_size: int = 128, ops=None):
        super().__init__()
        self.ops = [ops]  # a list keeps the table out of the module tree
        out = sum(shard_sizes)
        if in_features % group_size or any(n % 8 for n in shard_sizes):
            raise UnsupportedModelError(f"AWQ layer [{in_features} -> {shard_sizes}]: the input size must be a "
                                        f"multiple of the group size {group_size} and each output a multiple of 8")
        self.in_features, self.out_features, self.group_size = in_features, out, group_size
        self.shard_sizes, self.shard_names = list(shard_sizes), list(shard_names or [])
        g = in_features // group_size

        def p(*shape, dt):
            return nn.Parameter(torch.empty(*shape, dtype=dt, device=device), requires_grad=False)
        self.qweight = p(in_features, out // 8, dt=torch.int32)
        self.qzeros = p(g, out // 8, dt=torch.int32)
        self.scales = p(g, out, dt=torch.float32)  # fp16 / bf16 in the files: kept exactly
        self.bias = p(out, dt=dtype) if bias else None

    def shard_range(self, name: str) -> tuple[int, int]:
        i = self.shard_names.index(name)
        return sum(self.shard_sizes[:i]), self.shard_sizes[i]

    def split(self, y):
        return y.split(self.shard_sizes, dim=-1)

    def load_plan(self, leaf: str, shard: str | None):
        param = getattr(self, leaf).data
        if shard is None:
            return param, None, tuple(param.shape)
        start, n = self.shard_range(shard)
        if leaf == "bias":
            return param.narrow(0, start, n), None, (n,)
        if leaf == "scales":
            return param.narrow(1, start, n), None, (param.shape[0], n)
        return param.narrow(1, start // 8, n // 8), None, (param.shape[0], n // 8)

    def dequantized(self, dtype) -> torch.Tensor:
        """The dense weight [out, in] (nn.Linear layout)."""
        return awq_dequantize(self.qweight, self.qzeros, self.scales, self.group_size).t().to(dtype)

    def forward(self, x):
        ops = self.ops[0]
        x2 = x.reshape(-1, self.in_features).contiguous()
        if ops is None:
            y = awq_gemm_ref(x2, self.qweight, self.qzeros, self.scales, self.bias, self.group_size)
        else:
            y = ops.awq_gemm(x2, self.qweight, self.qzeros, self.scales, self.bias, self.group_size)
        return y.reshape(*x.shape[:-1], self.out_features)


# ------------------------------------------------------------------------------------------------------ FP8
def fp8_quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (float8_e4m3fn values, float32 scales [..., 1]) with scale = amax / 448 per row."""
    xf = x.float()
    scale = (xf.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=1e-12)
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


fp8_matmul_ref = fp8_gemm_ref


class Fp8Linear(nn.Module):
    def __init__(self, in_features: int, shard_sizes: list[int], shard_names: list[str] | None, bias: bool,
                 dtype: torch.dtype, device, ops=None):
        super().__init__()
        self.ops = [ops]
        out = sum(shard_sizes)
        self.in_features, self.out_features = in_features, out
        self.shard_sizes, self.shard_names = list(shard_sizes), list(shard_names or [])
        self.weight = nn.Parameter(torch.empty(out, in_features, dtype=torch.float8_e4m3fn, device=device),
                                   requires_grad=False)
        self.weight_scale = nn.Parameter(torch.empty(out, 1, dtype=torch.float32, device=device), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out, dtype=dtype, device=device), requires_grad=False) if bias else None

    shard_range, split = AWQLinear.shard_range, AWQLinear.split

    def load_plan(self, leaf: str, shard: str | None):
        param = getattr(self, leaf).data
        if shard is None:
            return param, None, tuple(param.shape)
        start, n = self.shard_range(shard)
        return param.narrow(0, start, n), None, (n,) + tuple(param.shape[1:])

    def forward(self, x):
        ops = self.ops[0]
        x2 = x.reshape(-1, self.in_features).contiguous()
        fn = fp8_gemm_ref if ops is None else ops.fp8_gemm
        return fn(x2, self.weight, self.weight_scale, self.bias).reshape(*x.shape[:-1], self.out_features)


# ------------------------------------------------------------------------------------------------ the model
def _checkpoint_names(layer: int, sub: str) -> list[str]:
    """The names a decoder linear has in the checkpoint layouts the loader reads (for `ignore` lists)."""
    return [f"language_model.model.layers.{layer}.{sub}", f"model.language_model.layers.{layer}.{sub}",
            f"model.layers.{layer}.{sub}", f"language_model.layers.{layer}.{sub}"]


def quantize_model(model: nn.Module, quant: QuantConfig, dtype: torch.dtype, device, tp=None, ops=None) -> None:
    """Swap the Qwen2 decoder linears of `model` (built dense) for quantized layers, in place."""
    if tp is not None and getattr(tp, "size", 1) > 1:
        raise NotImplementedError("quantized checkpoints under tensor parallelism are not implemented yet")
    layers = model.language_model.layers
    for i, layer in enumerate(layers):
        groups = [(layer.self_attn, "qkv_proj", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]),
                  (layer.self_attn, "o_proj", ["self_attn.o_proj"]),
                  (layer.mlp, "gate_up_proj", ["mlp.gate_proj", "mlp.up_proj"]),
                  (layer.mlp, "down_proj", ["mlp.down_proj"])]
        for parent, attr, subs in groups:
            dense = getattr(parent, attr)
            if quant.method == "fp8":
                flags = [quant.ignored(_checkpoint_names(i, s)) for s in subs]
                if all(flags):
                    continue
                if any(flags):
                    raise UnsupportedModelError(f"layer {i}: the ignore list leaves only some of {subs} dense; "
                                                "they share one matmul here")
            sizes = list(getattr(dense, "shard_sizes", [dense.out_features]))
            names = getattr(dense, "shard_names", None)
            cls = AWQLinear if quant.method == "awq" else Fp8Linear
            setattr(parent, attr, cls(dense.in_features, sizes, names, dense.bias is not None, dtype, device,
                                      ops=ops))


def quantized_weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter, quantized tensors at their stored size."""
    return sum(p.numel() * p.element_size() for p in model.parameters())
