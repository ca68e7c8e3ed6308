"""Linear layers: packed projections, and the tensor-parallel layers of the language model (Megatron-style).

Every linear layer holds its geometry and a linear method (`quant_method`) that owns its weights. The layer says
which features this rank keeps; the method creates the parameters for that shard (`create_weights`), checks that
the shard fits its format (`check`), names how each parameter's dimensions run over output and input features
(`layout`, from which the layer derives its load plan) and computes the product (`apply`). Dense weights use
`DenseLinearMethod` below; quantized checkpoints hand the layers a method of their format (quant/awq.py,
quant/fp8.py), chosen by the model for each layer's checkpoint names. So any model built from these layers gets
every format and every split.

Under tensor parallelism (parallel.py) each rank holds a slice of a layer's weight:
- column-parallel (QKVParallelLinear, MergedColumnParallelLinear, or PackedLinear with `local`): its rows of every
  packed shard (q heads H/N, k/v heads Hk/N or the one KV head its query heads read, gate/up I/N); no
  communication, the output stays split by heads / columns.
- RowParallelLinear (o_proj, down_proj): its columns; partial products, then one all-reduce, then the bias.
- VocabParallelEmbedding: its rows of the vocabulary (padded to ceil(V/N)); ids outside them look up zeros, then
  one all-reduce. ParallelLMHead: its vocabulary rows; the logits are gathered on the driver only.
With N=1 every split is the whole layer and nothing communicates.

Every layer says where its parameters come from in the unsharded tensor: `load_plan(leaf, shard)` gives (the part
of the parameter to fill, the index into the checkpoint tensor, that tensor's full shape, what reorders the part read
or None), which the loader reads with safetensors' get_slice, `full_shape(leaf)` is the unsharded tensor's shape
and `from_full(leaf, full)` cuts this rank's part out of it (random weights)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DenseLinearMethod:
    """Plain weights: weight [out, in] (this rank's rows / columns), y = x W^T + b, as nn.Linear computes it."""

    name = None  # the checkpoint's quantization format; dense weights have none
    CHECKPOINT_DTYPES = None  # any float, cast on the way (the loader's rule for dense parameters)
    keeps_dtypes = False  # the model's dtype applies to the weight

    def check(self, layer) -> None:
        """Every split of the dense geometry fits."""

    def create_weights(self, layer) -> None:
        layer.weight = nn.Parameter(torch.empty(layer.out_features, layer.in_local))

    def layout(self, leaf: str) -> tuple[int, int, int | None, int]:
        """(the leaf's dimension over output features, output features per index along it, its dimension over
        input features or None, input features per index along that one)."""
        return {"weight": (0, 1, 1, 1), "bias": (0, 1, None, 1)}[leaf]

    def apply(self, layer, x: torch.Tensor, bias) -> torch.Tensor:
        return F.linear(x, layer.weight, bias)


DENSE = DenseLinearMethod()


def packed_ranges(full_sizes: list[int], local: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """(start, length) of each shard's local part inside the unsharded packed output: shard i's local (start, n)
    shifted by the full sizes of the shards packed before it."""
    out, offset = [], 0
    for (start, n), full in zip(local, full_sizes):
        out.append((offset + start, n))
        offset += full
    return out


class PackedLinear(nn.Module):
    """One matmul for one or several projections that read the same input (q/k/v, gate/up). The checkpoint keeps
    them apart; the loader writes each into its row range, named by `shard_names` (see loader.PACKED).

    in_features: the full input size; in_part (start, n): this rank's input features (row-parallel; else all).
    shard_sizes: each packed shard's full output size; local: per shard, the (start, n) of its output features this
    rank keeps (column-parallel; else all); `shard_sizes` afterwards are the local n, `out_features` their sum.
    method: the linear method (default dense); prefix: the layer's name, for error messages; ops: the kernel table
    a quantized method calls (model.use_ops rebinds it like every other layer's)."""

    def __init__(self, in_features: int, shard_sizes: list[int], shard_names: list[str] | None, bias: bool,
                 local: list[tuple[int, int]] | None = None, in_part: tuple[int, int] | None = None,
                 method=None, prefix: str = "", ops=None):
        super().__init__()
        self.quant_method = method or DENSE
        self.prefix, self.ops = prefix, ops
        self.in_features = in_features
        self.in_start, self.in_local = in_part if in_part is not None else (0, in_features)
        self.full_sizes = list(shard_sizes)
        self.local = list(local) if local is not None else [(0, n) for n in shard_sizes]
        self.shard_sizes = [n for _, n in self.local]
        self.shard_names = list(shard_names or [])
        self.out_features = sum(self.shard_sizes)
        self.quant_method.check(self)
        self.quant_method.create_weights(self)  # the method's parameters, then the bias (random init draws them
        self.bias = nn.Parameter(torch.empty(self.out_features)) if bias else None  # in this order)

    @property
    def CHECKPOINT_DTYPES(self) -> dict | None:  # noqa: N802 - the loader's name for a layer's exact file dtypes
        return self.quant_method.CHECKPOINT_DTYPES

    @property
    def column_sharded(self) -> bool:
        return any(part != (0, n) for part, n in zip(self.local, self.full_sizes))

    @property
    def row_sharded(self) -> bool:
        return self.in_local != self.in_features

    def split(self, y):
        return y.split(self.shard_sizes, dim=-1)

    def forward(self, x):
        return self.quant_method.apply(self, x, self.bias)

    def _apply(self, fn, recurse=True):
        """The loader builds the model on the meta device and casts it to the engine's dtype as a whole
        (Module.to casts every floating tensor). A quantized format's own tensors (FP8 e4m3 weights, float32
        scales) keep their dtypes there: they follow a move to another device, never a cast."""
        if not self.quant_method.keeps_dtypes:
            return super()._apply(fn, recurse)
        bias = self.bias

        def move_only(t):
            if t is bias:
                return fn(t)
            target = fn(t.new_empty(0))  # where fn sends a tensor of t's dtype, and in which dtype
            return fn(t) if target.dtype == t.dtype else t.to(device=target.device)
        return super()._apply(move_only, recurse)

    # ------------------------------------------------------------------ where the parameters come from
    def full_shape(self, leaf: str) -> tuple[int, ...]:
        """The shape of the unsharded tensor of `leaf` (every packed shard, every input feature)."""
        out_dim, out_per, in_dim, in_per = self.quant_method.layout(leaf)
        shape = list(getattr(self, leaf).shape)
        shape[out_dim] = sum(self.full_sizes) // out_per
        if in_dim is not None:
            shape[in_dim] = self.in_features // in_per
        return tuple(shape)

    def from_full(self, leaf: str, full: torch.Tensor) -> torch.Tensor:
        """This rank's part of `leaf` out of the unsharded tensor (full_shape(leaf)), as the loader would read it
        from a checkpoint."""
        if tuple(full.shape) != self.full_shape(leaf):
            raise ValueError(f"{type(self).__name__}.from_full({leaf!r}): expected the full tensor "
                             f"{self.full_shape(leaf)}, got {tuple(full.shape)}")
        out_dim, out_per, in_dim, in_per = self.quant_method.layout(leaf)
        if in_dim is not None and self.row_sharded:
            full = full.narrow(in_dim, self.in_start // in_per, self.in_local // in_per)
        if self.column_sharded:
            full = torch.cat([full.narrow(out_dim, start // out_per, n // out_per)
                              for start, n in packed_ranges(self.full_sizes, self.local)], dim=out_dim)
        return full

    def load_plan(self, leaf: str, shard: str | None):
        """(view of the parameter to fill, index into the checkpoint tensor or None for all of it, its full shape,
        None: nothing to reorder). shard None: one checkpoint tensor for the whole layer (o_proj, down_proj; the
        original layout's fused vision attn.qkv)."""
        param = getattr(self, leaf).data
        out_dim, out_per, in_dim, in_per = self.quant_method.layout(leaf)
        if shard is None:
            if len(self.full_sizes) > 1 and self.column_sharded:
                raise NotImplementedError("a fused checkpoint tensor for a sharded packed layer")
            full_n, offset = sum(self.full_sizes), 0
            start, n = self.local[0] if self.column_sharded else (0, full_n)
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
        return param.narrow(out_dim, offset // out_per, n // out_per), tuple(index) if sliced else None, tuple(shape), \
            None


class MergedColumnParallelLinear(PackedLinear):
    """Column-parallel packed projections of equal split (gate/up): each rank keeps its part of every shard."""

    def __init__(self, in_features: int, shard_sizes: list[int], shard_names: list[str], bias: bool, tp,
                 method=None, prefix: str = "", ops=None):
        local = None if tp.size == 1 else [tp.part(n) for n in shard_sizes]
        super().__init__(in_features, shard_sizes, shard_names, bias, local, None, method, prefix, ops)


# The shard name of a checkpoint tensor that holds q, k and v together, grouped by KV head (see
# QKVParallelLinear.grouped_load_plan): it fills all three shards of the layer at once.
QKV_GROUPED = "qkv_grouped"


class QKVParallelLinear(PackedLinear):
    """q/k/v packed, column-parallel by heads: this rank's query heads and the KV heads they read
    (TensorParallel.kv_heads)."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool, tp,
                 method=None, prefix: str = "", ops=None):
        d = head_dim
        (q0, hq), (k0, hkv) = tp.part(num_heads), tp.kv_heads(num_kv_heads)
        local = None if tp.size == 1 else [(q0 * d, hq * d), (k0 * d, hkv * d), (k0 * d, hkv * d)]
        super().__init__(hidden_size, [num_heads * d, num_kv_heads * d, num_kv_heads * d],
                         ["q_proj", "k_proj", "v_proj"], bias, local, None, method, prefix, ops)
        self.head_dim, self.num_heads, self.num_kv_heads = d, num_heads, num_kv_heads
        self.q_heads, self.kv_heads = (q0, hq), (k0, hkv)

    def grouped_load_plan(self, leaf: str):
        """The load plan of one checkpoint tensor holding q, k and v grouped by KV head (QKV_GROUPED): for each KV
        head h, its g = H / Hk query heads, then its key head, then its value head, head_dim rows each (InternLM2's
        `wqkv`; transformers' convert_internvl_weights_to_hf.py splits it with
        rearrange("(h gs d) z -> h gs d z", gs=g + 2)). This rank's heads are whole groups, or part of one group
        when KV heads are replicated: one contiguous run of groups is read, and `regroup` reorders it into this
        rank's [q; k; v]. Returns (the parameter, index into the checkpoint tensor or None, its full shape,
        regroup)."""
        param = getattr(self, leaf).data
        out_dim, out_per, in_dim, in_per = self.quant_method.layout(leaf)
        d, g = self.head_dim, self.num_heads // self.num_kv_heads
        if d % out_per:
            raise NotImplementedError(f"{self.prefix}.{leaf}: grouped q/k/v with head_dim {d} not a multiple of "
                                      f"the {out_per} output features its format packs per element")
        unit = d // out_per  # elements along out_dim per head
        (q0, hq), (k0, hkv) = self.q_heads, self.kv_heads
        shape, index = list(param.shape), [slice(None)] * param.dim()
        shape[out_dim] = (self.num_heads + 2 * self.num_kv_heads) * unit
        if (k0, hkv) != (0, self.num_kv_heads):
            index[out_dim] = slice(k0 * (g + 2) * unit, (k0 + hkv) * (g + 2) * unit)
        if in_dim is not None:
            shape[in_dim] = self.in_features // in_per
        j0 = q0 - k0 * g  # this rank's first query head inside the groups read

        def regroup(t: torch.Tensor) -> torch.Tensor:
            t = t.movedim(out_dim, 0)
            rest = t.shape[1:]
            groups = t.reshape(hkv, g + 2, unit, *rest)
            q = groups[:, :g].reshape(hkv * g, unit, *rest)[j0:j0 + hq].reshape(hq * unit, *rest)
            k, v = groups[:, g].reshape(hkv * unit, *rest), groups[:, g + 1].reshape(hkv * unit, *rest)
            return torch.cat([q, k, v]).movedim(0, out_dim)

        sliced = any(s != slice(None) for s in index)
        return param, tuple(index) if sliced else None, tuple(shape), regroup


class RowParallelLinear(PackedLinear):
    """y = sum over ranks of x[:, K_r] @ W[:, K_r]^T, then the bias: each rank computes its partial product
    (without the bias) over its input slice K_r, one all-reduce sums them, and the bias, held whole on every rank,
    is added once after the sum (inside the partial products it would count N times). With one rank: the plain
    product, bias included, as nn.Linear computes it."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp, method=None, prefix: str = "",
                 ops=None):
        super().__init__(in_features, [out_features], None, bias, None, tp.part(in_features), method, prefix, ops)
        self.tp = tp

    def forward(self, x):
        if self.tp.size == 1:
            return self.quant_method.apply(self, x, self.bias)
        y = self.tp.all_reduce(self.quant_method.apply(self, x, None))
        return y if self.bias is None else y + self.bias


class _VocabParallel(nn.Module):
    """Rows [start, start + rows) of a [V, C] table, padded with zero rows to ceil(V / N) on every rank."""

    def __init__(self, vocab_size: int, hidden_size: int, tp):
        super().__init__()
        self.tp, self.vocab_size, self.hidden_size = tp, vocab_size, hidden_size
        self.vocab_start, self.vocab_rows, padded = tp.vocab_part(vocab_size)
        self.weight = nn.Parameter(torch.empty(padded, hidden_size))

    def load_plan(self, leaf: str, shard=None):
        self.weight.data[self.vocab_rows:].zero_()  # padding rows: never looked up, their logits are dropped
        return self.weight.data[:self.vocab_rows], (slice(self.vocab_start, self.vocab_start + self.vocab_rows),), \
            (self.vocab_size, self.hidden_size), None

    def full_shape(self, leaf: str) -> tuple[int, ...]:
        return (self.vocab_size, self.hidden_size)

    def from_full(self, leaf: str, full: torch.Tensor) -> torch.Tensor:
        out = full.new_zeros(self.weight.shape)
        out[:self.vocab_rows] = full[self.vocab_start:self.vocab_start + self.vocab_rows]
        return out


class VocabParallelEmbedding(_VocabParallel):
    def forward(self, ids):
        inside = (ids >= self.vocab_start) & (ids < self.vocab_start + self.vocab_rows)
        x = F.embedding(torch.where(inside, ids - self.vocab_start, 0), self.weight)
        return self.tp.all_reduce(x.masked_fill(~inside.unsqueeze(-1), 0))


class ParallelLMHead(_VocabParallel):
    def forward(self, hidden):
        """Full-vocabulary logits on the driver (gathered from every rank's rows); None on the other ranks."""
        logits = self.tp.gather_last_dim(F.linear(hidden, self.weight))
        return None if logits is None else logits[..., :self.vocab_size]


# -------------------------------------------------------------------------------------------------- factories
def vocab_embedding(vocab_size: int, hidden_size: int, tp) -> nn.Module:
    return nn.Embedding(vocab_size, hidden_size) if tp.size == 1 else VocabParallelEmbedding(vocab_size, hidden_size, tp)


def lm_head(hidden_size: int, vocab_size: int, tp) -> nn.Module:
    return nn.Linear(hidden_size, vocab_size, bias=False) if tp.size == 1 else ParallelLMHead(vocab_size, hidden_size, tp)
