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
whole qweight [in, out / 8]). Which dimension of each leaf runs over output and input features is `layout(leaf)`.

What differs by format lives in its linear method, one file each (quant/awq.py, quant/fp8.py: the parameters,
their checkpoint dtypes, the shard checks, the layout and the matmul); the classes here hold the geometry and
the slicing hooks, and delegate the rest to `quant_method`."""
from __future__ import annotations

import torch
from torch import nn

from ..layers.linear import RowParallel, packed_ranges
from .awq import AWQLinearMethod
from .common import param
from .fp8 import Fp8LinearMethod


class QuantLinear(nn.Module):
    """What the quantized linears share: the output shards (packed projections), the part of them and of the input
    this rank keeps, and the slicing hooks derived from `layout`.

    in_features: the full input size; (in_start, in_local): this rank's input features (row-parallel; else all).
    full_sizes: each packed shard's full output size; local: per shard, the (start, n) of its output features this
    rank keeps (column-parallel; else all); shard_sizes: the local n, as in PackedLinear; out_features: their sum."""

    def __init__(self, quant_method, in_features: int, shard_sizes: list[int], shard_names: list[str] | None,
                 bias: bool, dtype: torch.dtype, device, ops=None, local: list[tuple[int, int]] | None = None,
                 in_part: tuple[int, int] | None = None, where: str = "quantized layer"):
        super().__init__()
        self.quant_method = quant_method
        self.ops = ops  # an OpTable (not a module): model.use_ops rebinds it like every other layer's
        self.in_features = in_features
        self.in_start, self.in_local = in_part if in_part is not None else (0, in_features)
        self.full_sizes = list(shard_sizes)
        self.local = list(local) if local is not None else [(0, n) for n in shard_sizes]
        self.shard_sizes = [n for _, n in self.local]
        self.shard_names = list(shard_names or [])
        self.out_features = sum(self.shard_sizes)
        quant_method.check(self, where)
        quant_method.create_weights(self, dtype, device)  # the format's parameters, then the bias (random init
        self.bias = param((self.out_features,), dtype, device) if bias else None  # draws them in this order)

    @property
    def CHECKPOINT_DTYPES(self) -> dict:  # noqa: N802 - the loader's name for a layer's exact file dtypes
        return self.quant_method.CHECKPOINT_DTYPES

    def layout(self, leaf: str) -> tuple[int, int, int | None, int]:
        """(the leaf's dimension over output features, output features per index along it, its dimension over
        input features or None (bias, FP8 weight_scale: whole on every row-parallel rank), input features per
        index along that one): the method's."""
        return self.quant_method.layout(leaf)

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
        return self.quant_method.apply(self, x, None)

    def forward(self, x):
        return self.quant_method.apply(self, x, self.bias)


# ------------------------------------------------------------------------------------------------------ AWQ
class AWQLinear(QuantLinear):
    """W4A16 (quant/awq.py), whole or column-parallel. Packed projections (q/k/v, gate/up) concatenate their
    shards along the output; shard sizes are multiples of 8, so each shard's packed columns are a contiguous range.
    `local` (column-parallel): the per-shard (start, n) of the output this rank keeps, as PackedLinear's."""

    def __init__(self, in_features: int, shard_sizes: list[int], shard_names: list[str] | None, bias: bool,
                 dtype: torch.dtype, device, group_size: int = 128, ops=None,
                 local: list[tuple[int, int]] | None = None, in_part: tuple[int, int] | None = None,
                 where: str = "AWQ layer"):
        super().__init__(AWQLinearMethod(group_size), in_features, shard_sizes, shard_names, bias, dtype, device,
                         ops, local, in_part, where)
        self.group_size = group_size

    def dequantized(self, dtype) -> torch.Tensor:
        """This rank's dense weight [out, in] (nn.Linear layout)."""
        return self.quant_method.dequantized(self, dtype)


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
    """W8A8 (quant/fp8.py), whole or column-parallel; `local` as AWQLinear's."""

    def __init__(self, in_features: int, shard_sizes: list[int], shard_names: list[str] | None, bias: bool,
                 dtype: torch.dtype, device, ops=None, local: list[tuple[int, int]] | None = None,
                 in_part: tuple[int, int] | None = None, where: str = "FP8 layer"):
        super().__init__(Fp8LinearMethod(), in_features, shard_sizes, shard_names, bias, dtype, device, ops, local,
                         in_part, where)


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
