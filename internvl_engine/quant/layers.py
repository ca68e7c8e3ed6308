"""The quantized linears (formats: quant/__init__.py), plain or tensor-parallel like the dense layers of
layers/linear.py:

- column-parallel (AWQLinear / Fp8Linear with `local`, q/k/v and gate/up): each rank keeps its output features of
  every packed shard, the same ranges the dense PackedLinear keeps. AWQ: `qweight[:, cols / 8]`,
  `qzeros[:, cols / 8]`, `scales[:, cols]`, `bias[cols]` (a rank's columns must fill whole int32 packs of 8);
  FP8: `weight[rows]`, `weight_scale[rows]`, `bias[rows]`. No communication.
- row-parallel (AWQRowParallelLinear / Fp8RowParallelLinear, o_proj and down_proj): each rank keeps its input
  features. AWQ: `qweight[rows]`, `qzeros[groups]`, `scales[groups]` (a rank's rows must be whole groups of 128);
  FP8: `weight[:, cols]`, `weight_scale` whole. The forward is the dense RowParallel's: partial product, one
  all-reduce, the bias once.

Every layer exposes the dense layers' hooks: `load_plan(leaf, shard)` for the loader, `full_shape(leaf)` (the
unsharded checkpoint tensor) and `from_full(leaf, full)` (this rank's part of that full quantized tensor, e.g. the
whole qweight [in, out / 8]). Which dimension of each leaf runs over output and input features is `layout(leaf)`."""
from __future__ import annotations

import torch
from torch import nn

from ..errors import UnsupportedModelError
from ..layers.linear import RowParallel, packed_ranges
from ..ops.ref import awq_gemm_ref, fp8_gemm_ref


# the float dtypes producers store scales and biases in (AWQ scales: fp16; FP8 weight_scale: the model dtype);
# they are cast on the way, exactly (scales are kept in float32)
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def _param(shape, dtype, device) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


class QuantLinear(nn.Module):
    """What the quantized linears share: the output shards (packed projections), the part of them and of the input
    this rank keeps, and the slicing hooks derived from `layout`.

    in_features: the full input size; (in_start, in_local): this rank's input features (row-parallel; else all).
    full_sizes: each packed shard's full output size; local: per shard, the (start, n) of its output features this
    rank keeps (column-parallel; else all); shard_sizes: the local n, as in PackedLinear; out_features: their sum."""

    def __init__(self, in_features: int, shard_sizes: list[int], shard_names: list[str] | None, ops=None,
                 local: list[tuple[int, int]] | None = None, in_part: tuple[int, int] | None = None):
        super().__init__()
        self.ops = ops  # an OpTable (not a module): model.use_ops rebinds it like every other layer's
        self.in_features = in_features
        self.in_start, self.in_local = in_part if in_part is not None else (0, in_features)
        self.full_sizes = list(shard_sizes)
        self.local = list(local) if local is not None else [(0, n) for n in shard_sizes]
        self.shard_sizes = [n for _, n in self.local]
        self.shard_names = list(shard_names or [])
        self.out_features = sum(self.shard_sizes)

    def layout(self, leaf: str) -> tuple[int, int, int | None, int]:
        """(the leaf's dimension over output features, output features per index along it, its dimension over
        input features or None (bias, FP8 weight_scale: whole on every row-parallel rank), input features per
        index along that one)."""
        raise NotImplementedError

    @property
    def column_sharded(self) -> bool:
        return any(part != (0, n) for part, n in zip(self.local, self.full_sizes))

    @property
    def row_sharded(self) -> bool:
        return self.in_local != self.in_features

    def shard_range(self, name: str) -> tuple[int, int]:
        i = self.shard_names.index(name)
        return sum(self.shard_sizes[:i]), self.shard_sizes[i]

    def split(self, y):
        return y.split(self.shard_sizes, dim=-1)

    # ------------------------------------------------------------------ where each leaf comes from
    def full_shape(self, leaf: str) -> tuple[int, ...]:
        """The shape of the unsharded tensor of `leaf` (every packed shard, every input feature)."""
        out_dim, out_per, in_dim, in_per = self.layout(leaf)
        shape = list(getattr(self, leaf).shape)
        shape[out_dim] = sum(self.full_sizes) // out_per
        if in_dim is not None:
            shape[in_dim] = self.in_features // in_per
        return tuple(shape)

    def from_full(self, leaf: str, full: torch.Tensor) -> torch.Tensor:
        """This rank's part of `leaf` out of the unsharded quantized tensor (full_shape(leaf)), as the loader would
        read it from a checkpoint."""
        if tuple(full.shape) != self.full_shape(leaf):
            raise ValueError(f"{type(self).__name__}.from_full({leaf!r}): expected the full tensor "
                             f"{self.full_shape(leaf)}, got {tuple(full.shape)}")
        out_dim, out_per, in_dim, in_per = self.layout(leaf)
        if in_dim is not None and self.row_sharded:
            full = full.narrow(in_dim, self.in_start // in_per, self.in_local // in_per)
        if self.column_sharded:
            full = torch.cat([full.narrow(out_dim, start // out_per, n // out_per)
                              for start, n in packed_ranges(self.full_sizes, self.local)], dim=out_dim)
        return full

    def load_plan(self, leaf: str, shard: str | None):
        """(view of the parameter to fill, index into the checkpoint tensor or None for all of it, its full shape).
        shard None: one checkpoint tensor for the whole layer (o_proj, down_proj)."""
        param = getattr(self, leaf).data
        out_dim, out_per, in_dim, in_per = self.layout(leaf)
        if shard is None:
            if len(self.full_sizes) > 1 and self.column_sharded:
                raise NotImplementedError("a fused checkpoint tensor for a sharded packed quantized layer")
            full_n, (start, n), offset = sum(self.full_sizes), (self.local[0] if self.column_sharded else
                                                                (0, sum(self.full_sizes))), 0
        else:
            i = self.shard_names.index(shard)
            full_n, (start, n), offset = self.full_sizes[i], self.local[i], sum(self.shard_sizes[:i])
        shape, index = list(param.shape), [slice(None)] * param.dim()
        shape[out_dim] = full_n // out_per
        if (start, n) != (0, full_n):
            index[out_dim] = slice(start // out_per, (start + n) // out_per)
        if in_dim is not None:
            shape[in_dim] = self.in_features // in_per
            if self.row_sharded:
                index[in_dim] = slice(self.in_start // in_per, (self.in_start + self.in_local) // in_per)
        sliced = any(s != slice(None) for s in index)
        return param.narrow(out_dim, offset // out_per, n // out_per), tuple(index) if sliced else None, tuple(shape)

    def partial(self, x):
        """The local matmul without the bias (RowParallel adds it once, after the all-reduce)."""
        return self._gemm(x, None)

    def forward(self, x):
        return self._gemm(x, self.bias)


# ------------------------------------------------------------------------------------------------------ AWQ
class AWQLinear(QuantLinear):
    """W4A16 linear: qweight int32 [in, out / 8], qzeros int32 [in / G, out / 8], scales [in / G, out] (G = 128),
    w = (q - z) * s per group of G input rows. Packed projections (q/k/v, gate/up) concatenate their shards along
    the output; shard sizes are multiples of 8, so each shard's packed columns are a contiguous range.
    `local` (column-parallel): the per-shard (start, n) of the output this rank keeps, as PackedLinear's."""

    # The dtype of each leaf in the files, exactly (the loader refuses others): LMDeploy and AutoAWQ write qweight
    # and qzeros as int32; a uint8 or int64 tensor of the same shape holds other bits and would load as garbage.
    CHECKPOINT_DTYPES = {"qweight": ((torch.int32,), "AWQ qweight: eight 4-bit values packed per int32"),
                         "qzeros": ((torch.int32,), "AWQ qzeros: eight 4-bit zero points packed per int32"),
                         "scales": (_FLOATS, "AWQ scales"), "bias": (_FLOATS, "AWQ bias")}

    def __init__(self, in_features: int, shard_sizes: list[int], shard_names: list[str] | None, bias: bool,
                 dtype: torch.dtype, device, group_size: int = 128, ops=None,
                 local: list[tuple[int, int]] | None = None, in_part: tuple[int, int] | None = None,
                 where: str = "AWQ layer"):
        super().__init__(in_features, shard_sizes, shard_names, ops, local, in_part)
        self.group_size = group_size
        self._check(where)
        out, groups = self.out_features, self.in_local // group_size
        self.qweight = _param((self.in_local, out // 8), torch.int32, device)
        self.qzeros = _param((groups, out // 8), torch.int32, device)
        self.scales = _param((groups, out), torch.float32, device)  # fp16 / bf16 in the files: kept exactly
        self.bias = _param((out,), dtype, device) if bias else None

    def layout(self, leaf: str):
        g = self.group_size
        return {"qweight": (1, 8, 0, 1), "qzeros": (1, 8, 0, g), "scales": (1, 1, 0, g), "bias": (0, 1, None, 1)}[leaf]

    def _check(self, where: str) -> None:
        g = self.group_size
        if self.in_features % g or any(n % 8 for n in self.full_sizes):
            raise UnsupportedModelError(f"{where} [{self.in_features} -> {self.full_sizes}]: the input size must be "
                                        f"a multiple of the group size {g} and each output a multiple of 8")
        names = self.shard_names or ["output"]
        for name, (start, n), full in zip(names, self.local, self.full_sizes):
            if start % 8 or n % 8:
                raise UnsupportedModelError(
                    f"{where}: {name} keeps output columns [{start}, {start + n}) of {full} on this rank: {n} is not "
                    "a multiple of 8 (each rank must keep whole int32 packs of 8 columns)")
        if self.in_start % g or self.in_local % g:
            raise UnsupportedModelError(
                f"{where}: this rank keeps input rows [{self.in_start}, {self.in_start + self.in_local}) of "
                f"{self.in_features}: {self.in_local} is not a multiple of the group size {g} (each rank must keep "
                f"whole groups: qzeros and scales hold one row per {g} inputs)")

    def dequantized(self, dtype) -> torch.Tensor:
        """This rank's dense weight [out, in] (nn.Linear layout)."""
        from . import awq_dequantize
        return awq_dequantize(self.qweight, self.qzeros, self.scales, self.group_size).t().to(dtype)

    def _gemm(self, x, bias):
        ops = self.ops
        x2 = x.reshape(-1, self.in_local).contiguous()
        fn = awq_gemm_ref if ops is None else ops.awq_gemm
        y = fn(x2, self.qweight, self.qzeros, self.scales, bias, self.group_size)
        return y.reshape(*x.shape[:-1], self.out_features)


class AWQRowParallelLinear(RowParallel, AWQLinear):
    """o_proj / down_proj under tensor parallelism: this rank's input rows (whole groups), then RowParallel's
    forward (all-reduce of the partial products, the bias once)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, device, tp,
                 group_size: int = 128, ops=None, where: str = "AWQ layer"):
        AWQLinear.__init__(self, in_features, [out_features], None, bias, dtype, device, group_size, ops,
                           in_part=tp.part(in_features), where=where)
        self.tp = tp


# ------------------------------------------------------------------------------------------------------ FP8
class Fp8Linear(QuantLinear):
    """W8A8: weight float8_e4m3fn [out, in], weight_scale [out, 1]; activations quantized per token at run time
    (ops.fp8_gemm). `local` (column-parallel) as AWQLinear's."""

    # compressed-tensors' float-quantized format stores float8_e4m3fn weights; an e5m2 tensor would be clipped
    # into e4m3's range on the cast, so the loader refuses it (exact dtypes, as AWQLinear's).
    CHECKPOINT_DTYPES = {"weight": ((torch.float8_e4m3fn,), "FP8 weight: compressed-tensors float-quantized"),
                         "weight_scale": (_FLOATS, "FP8 weight_scale"), "bias": (_FLOATS, "FP8 bias")}

    def __init__(self, in_features: int, shard_sizes: list[int], shard_names: list[str] | None, bias: bool,
                 dtype: torch.dtype, device, ops=None, local: list[tuple[int, int]] | None = None,
                 in_part: tuple[int, int] | None = None, where: str = "FP8 layer"):
        super().__init__(in_features, shard_sizes, shard_names, ops, local, in_part)
        out = self.out_features
        self.weight = _param((out, self.in_local), torch.float8_e4m3fn, device)
        self.weight_scale = _param((out, 1), torch.float32, device)
        self.bias = _param((out,), dtype, device) if bias else None

    def layout(self, leaf: str):
        return {"weight": (0, 1, 1, 1), "weight_scale": (0, 1, None, 1), "bias": (0, 1, None, 1)}[leaf]

    def _gemm(self, x, bias):
        ops = self.ops
        x2 = x.reshape(-1, self.in_local).contiguous()
        fn = fp8_gemm_ref if ops is None else ops.fp8_gemm
        return fn(x2, self.weight, self.weight_scale, bias).reshape(*x.shape[:-1], self.out_features)


class Fp8RowParallelLinear(RowParallel, Fp8Linear):
    """o_proj / down_proj under tensor parallelism: this rank's input columns of weight, weight_scale whole, then
    RowParallel's forward. Each rank quantizes its slice of the activations with its own per-token scale, amax
    over its in / N features / 448 (as vLLM's row-parallel FP8 does): ops.fp8_gemm quantizes the input it is
    given, and one scale over all in features would cost one more collective per layer. So the rounding of these
    activations differs from one rank's (whose scale is the amax over every feature: a grid at least as coarse):
    FP8 at N ranks is close to, not bit-equal to, FP8 at one rank."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, device, tp, ops=None,
                 where: str = "FP8 layer"):
        Fp8Linear.__init__(self, in_features, [out_features], None, bias, dtype, device, ops,
                           in_part=tp.part(in_features), where=where)
        self.tp = tp
