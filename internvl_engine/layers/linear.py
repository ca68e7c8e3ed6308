"""Linear layers: packed projections, and the tensor-parallel layers of the language model (Megatron-style).

Under tensor parallelism (distributed/) each rank holds a slice of a layer's weight:
- column-parallel (PackedLinear with `local`): its rows of every packed shard (q heads H/N, k/v heads Hk/N or
  the one KV head its query heads read, gate/up I/N); no communication, the output stays split by heads / columns.
- RowParallelLinear (o_proj, down_proj): its columns; partial products, then one all-reduce.
- VocabParallelEmbedding: its rows of the vocabulary (padded to ceil(V/N)); ids outside them look up zeros, then
  one all-reduce. ParallelLMHead: its vocabulary rows; the logits are gathered on the driver only.
With N=1 the model builds plain nn.Linear / nn.Embedding through the factories at the bottom: no communication.

Every sharded layer says where its parameters come from in the unsharded tensor: `load_plan(leaf, shard)` gives
(the part of the parameter to fill, the index into the checkpoint tensor, that tensor's full shape), which the
loader reads with safetensors' get_slice, `full_shape(leaf)` is the unsharded tensor's shape and
`from_full(leaf, full)` cuts this rank's part out of it (random weights). The quantized layers (quant/layers.py)
keep the same three hooks and reuse RowParallel's forward and packed_ranges."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _full_index(shape) -> tuple:
    return tuple(slice(None) for _ in shape)


class PackedLinear(nn.Linear):
    """One matmul for several projections that read the same input (q/k/v, gate/up). The checkpoint keeps them
    apart; the loader writes each into its row range, named by `shard_names` (see loader.PACKED).

    `local` (tensor parallelism): for each shard, the (start, rows) of that shard's rows this rank holds; the
    parameter then packs only those slices, and `shard_sizes` are the local sizes."""

    def __init__(self, in_features: int, shard_sizes: list[int], shard_names: list[str], bias: bool,
                 local: list[tuple[int, int]] | None = None):
        local = list(local) if local is not None else [(0, n) for n in shard_sizes]
        super().__init__(in_features, sum(n for _, n in local), bias=bias)
        self.full_sizes, self.local = list(shard_sizes), local
        self.shard_sizes = [n for _, n in local]
        self.shard_names = list(shard_names)

    @property
    def is_sharded(self) -> bool:
        return any(local != (0, n) for local, n in zip(self.local, self.full_sizes))

    def shard_range(self, name: str) -> tuple[int, int]:
        i = self.shard_names.index(name)
        start = sum(self.shard_sizes[:i])
        return start, self.shard_sizes[i]

    def split(self, y):
        return y.split(self.shard_sizes, dim=-1)

    def load_plan(self, leaf: str, shard: str | None):
        """(view of the parameter to fill, index into the checkpoint tensor or None for all of it, its full shape).
        shard None: a fused checkpoint tensor holding every shard (the original layout's vision attn.qkv)."""
        param = getattr(self, leaf).data
        tail = tuple(param.shape[1:])
        if shard is None:
            if self.is_sharded:
                raise NotImplementedError("a fused checkpoint tensor for a sharded packed layer")
            return param, None, (sum(self.full_sizes),) + tail
        i = self.shard_names.index(shard)
        start, rows = self.local[i]
        index = None if (start, rows) == (0, self.full_sizes[i]) else (slice(start, start + rows),)
        return param.narrow(0, *self.shard_range(shard)), index, (self.full_sizes[i],) + tail

    def full_shape(self, leaf: str) -> tuple[int, ...]:
        return (sum(self.full_sizes),) + tuple(getattr(self, leaf).shape[1:])

    def from_full(self, leaf: str, full: torch.Tensor) -> torch.Tensor:
        """This rank's rows of the packed parameter, out of the unsharded packed tensor."""
        return torch.cat([full[start:start + rows] for start, rows in packed_ranges(self.full_sizes, self.local)])


def packed_ranges(full_sizes: list[int], local: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """(start, length) of each shard's local part inside the unsharded packed output: shard i's local (start, n)
    shifted by the full sizes of the shards packed before it."""
    out, offset = [], 0
    for (start, n), full in zip(local, full_sizes):
        out.append((offset + start, n))
        offset += full
    return out


class RowParallel(nn.Module):
    """The forward every row-parallel layer shares, dense (RowParallelLinear) or quantized (quant/layers.py).
    x @ W = sum_r x[:, K_r] @ W[K_r, :] over the ranks' input slices K_r: each rank computes its partial product
    (`partial`, without the bias), one all-reduce sums them, and the bias, held whole on every rank, is added once
    after the sum (inside `partial` it would count N times). Subclasses set tp, in_start / in_local (tp.part of the
    input size), bias, and define partial(x): this rank's product without the bias."""

    def forward(self, x):
        y = self.tp.all_reduce(self.partial(x))
        return y if self.bias is None else y + self.bias


class RowParallelLinear(RowParallel):
    """y = x_local @ W[:, cols]^T summed over ranks (one all-reduce), then the bias."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp):
        super().__init__()
        self.tp = tp
        self.in_start, self.in_local = tp.part(in_features)
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, self.in_local))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def partial(self, x):
        return F.linear(x, self.weight)

    def load_plan(self, leaf: str, shard=None):
        if leaf == "bias":
            return self.bias.data, None, (self.out_features,)
        return self.weight.data, (slice(None), slice(self.in_start, self.in_start + self.in_local)), \
            (self.out_features, self.in_features)

    def full_shape(self, leaf: str) -> tuple[int, ...]:
        return (self.out_features,) if leaf == "bias" else (self.out_features, self.in_features)

    def from_full(self, leaf: str, full: torch.Tensor) -> torch.Tensor:
        return full if leaf == "bias" else full[:, self.in_start:self.in_start + self.in_local]


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
            (self.vocab_size, self.hidden_size)

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
def row_parallel(in_features: int, out_features: int, bias: bool, tp) -> nn.Module:
    return nn.Linear(in_features, out_features, bias=bias) if tp.size == 1 else \
        RowParallelLinear(in_features, out_features, bias, tp)


def vocab_embedding(vocab_size: int, hidden_size: int, tp) -> nn.Module:
    return nn.Embedding(vocab_size, hidden_size) if tp.size == 1 else VocabParallelEmbedding(vocab_size, hidden_size, tp)


def lm_head(hidden_size: int, vocab_size: int, tp) -> nn.Module:
    return nn.Linear(hidden_size, vocab_size, bias=False) if tp.size == 1 else ParallelLMHead(vocab_size, hidden_size, tp)
