"""The sparse MLP of a Qwen3-MoE decoder layer (InternVL3.5-30B-A3B, -241B-A28B): a router picks each token's
num_experts_per_tok experts of num_experts, and the op table's fused_moe runs their SwiGLU MLPs and sums them,
weighted. Numerics follow transformers' Qwen3MoeTopKRouter and Qwen3MoeSparseMoeBlock (5.x): router logits in the
hidden dtype, softmax in fp32, top-k, renormalised to sum 1 when norm_topk_prob, then cast to the hidden dtype
(transformers hands the weights to its experts in that dtype; fused_moe takes them as fp32 holding those values).

Weights: the router `gate.weight` [E, Hd] (whole on every rank) and, per layer, two 3-D parameters holding every
expert, `experts.gate_up_proj.weight` [E, 2F, Hd] (each expert's gate_proj rows, then its up_proj rows) and
`experts.down_proj.weight` [E, Hd, F], in the layout fused_moe takes. Checkpoints store one tensor per expert and
projection (`mlp.experts.{e}.{gate,up,down}_proj.weight`: the -HF files transformers' save_pretrained writes and the
original OpenGVLab ones alike); each fills its expert's slot (ExpertWeights.load_plan), and a 3-D
`mlp.experts.gate_up_proj` / `down_proj` tensor (transformers' in-memory form) fills the whole parameter.

Tensor parallelism splits every expert's width F over the ranks as the dense MLP's (layers/linear.py): a rank holds
rows [r F/N, (r+1) F/N) of each expert's gate and up, the same columns of its down, computes its partial sum over
those features and one all-reduce per layer adds the ranks' parts. The router is replicated, so every rank routes a
token to the same experts. Expert parallelism (whole experts per rank) is not implemented."""
from __future__ import annotations

import torch
from torch import nn

from ..config import TextConfig
from ..layers.linear import packed_ranges

# fused_moe backends that never read device data on the host, so that a decode step calling them can be captured in
# a CUDA graph: the Triton kernel sorts and pads on the device. The torch implementation (the torch and cuda
# backends) reads each expert's token count on the host (ops/moe_ops.py); cpp runs on the CPU only.
GRAPH_SAFE_FUSED_MOE = ("triton",)


class ExpertWeights(nn.Module):
    """weight [E, out, in]: one linear projection (or several, packed along out: gate and up) of every expert, this
    rank's part of it. shard_sizes: each packed projection's full output size; proj_names: their checkpoint names;
    local: per projection the (start, n) of its output rows this rank keeps (column-parallel; default all);
    in_part: (start, n) of the input features it keeps (row-parallel; default all). The loader fills one expert's
    projection per checkpoint tensor, named by the shard "<expert>.<projection>" (shard_names)."""

    def __init__(self, num_experts: int, in_features: int, shard_sizes: list[int], proj_names: list[str],
                 local: list[tuple[int, int]] | None = None, in_part: tuple[int, int] | None = None):
        super().__init__()
        self.num_experts, self.in_features = num_experts, in_features
        self.in_start, self.in_local = in_part if in_part is not None else (0, in_features)
        self.full_sizes = list(shard_sizes)
        self.local = list(local) if local is not None else [(0, n) for n in shard_sizes]
        self.sizes = [n for _, n in self.local]
        self.proj_names = list(proj_names)
        self.shard_names = [f"{e}.{p}" for e in range(num_experts) for p in proj_names]
        self.weight = nn.Parameter(torch.empty(num_experts, sum(self.sizes), self.in_local))

    @property
    def column_sharded(self) -> bool:
        return any(part != (0, n) for part, n in zip(self.local, self.full_sizes))

    def _in_index(self):
        if self.in_local == self.in_features:
            return slice(None)
        return slice(self.in_start, self.in_start + self.in_local)

    def full_shape(self, leaf: str) -> tuple[int, int, int]:
        return self.num_experts, sum(self.full_sizes), self.in_features

    def from_full(self, leaf: str, full: torch.Tensor) -> torch.Tensor:
        """This rank's part of the unsharded [E, out, in] tensor (random weights)."""
        if tuple(full.shape) != self.full_shape(leaf):
            raise ValueError(f"ExpertWeights.from_full: expected {self.full_shape(leaf)}, got {tuple(full.shape)}")
        full = full[:, :, self._in_index()]
        if self.column_sharded:
            full = torch.cat([full.narrow(1, s, n) for s, n in packed_ranges(self.full_sizes, self.local)], dim=1)
        return full

    def load_plan(self, leaf: str, shard: str | None):
        """(part of the parameter to fill, index into the checkpoint tensor or None, its full shape, what reorders
        the part read or None). shard "<e>.<projection>": one expert's [out, in] tensor into its slot; None: the
        whole [E, out, in] tensor (this rank's rows of each packed projection are read as one run and regrouped)."""
        param, in_index = self.weight.data, self._in_index()
        if shard is None:
            ranges = packed_ranges(self.full_sizes, self.local)
            lo, hi = ranges[0][0], ranges[-1][0] + ranges[-1][1]
            out_index = slice(None) if (lo, hi) == (0, sum(self.full_sizes)) else slice(lo, hi)
            gaps = hi - lo != sum(self.sizes)
            regroup = (lambda t: torch.cat([t.narrow(1, s - lo, n) for s, n in ranges], dim=1)) if gaps else None
            index = (slice(None), out_index, in_index)
            return param, None if index == (slice(None),) * 3 else index, self.full_shape(leaf), regroup
        expert, _, proj = shard.partition(".")
        i = self.proj_names.index(proj)
        start, n = self.local[i]
        out_index = slice(None) if (start, n) == (0, self.full_sizes[i]) else slice(start, start + n)
        index = (out_index, in_index)
        target = param[int(expert)].narrow(0, sum(self.sizes[:i]), n)
        return target, None if index == (slice(None),) * 2 else index, (self.full_sizes[i], self.in_features), None

    def checkpoint_tensors(self, prefix: str):
        """(key, tensor) of each expert's projection in the checkpoints' per-expert form (N = 1: whole tensors)."""
        for shard in self.shard_names:
            expert, _, proj = shard.partition(".")
            yield f"{prefix}.{expert}.{proj}.weight", self.load_plan("weight", shard)[0]


class MoeExperts(nn.Module):
    """Every expert of one layer: gate_up_proj [E, 2F, Hd] and down_proj [E, Hd, F] (this rank's F under tensor
    parallelism), as fused_moe takes them."""

    def __init__(self, cfg: TextConfig, tp):
        super().__init__()
        e, f, hd = cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size
        part = tp.part(f)
        self.gate_up_proj = ExpertWeights(e, hd, [f, f], ["gate_proj", "up_proj"],
                                          None if tp.size == 1 else [part, part])
        self.down_proj = ExpertWeights(e, f, [hd], ["down_proj"], None, None if tp.size == 1 else part)


class SparseMoeBlock(nn.Module):
    """Router + experts; `gate` and `experts` are the checkpoints' module names (mlp.gate, mlp.experts)."""

    def __init__(self, cfg: TextConfig, ops, tp):
        super().__init__()
        self.top_k, self.norm_topk_prob = cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.experts = MoeExperts(cfg, tp)
        self.ops, self.tp = ops, tp

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(topk_weights [T, k] fp32, topk_ids [T, k] int64) of x [T, Hd]."""
        logits = self.gate(x)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(logits.dtype).float(), ids

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.route(x)
        y = self.ops.fused_moe(x, self.experts.gate_up_proj.weight, self.experts.down_proj.weight, weights, ids)
        return self.tp.all_reduce(y)


def decode_graph_problem(cfg: TextConfig, binding: dict[str, str]) -> str | None:
    """Why decode steps of this decoder cannot be captured in CUDA graphs with the op table `binding`; None when
    they can."""
    if not cfg.moe_layers or binding.get("fused_moe") in GRAPH_SAFE_FUSED_MOE:
        return None
    return (f"fused_moe on the {binding.get('fused_moe')!r} backend reads each expert's token count on the host; "
            f"decode runs eagerly (backends without that sync: {', '.join(GRAPH_SAFE_FUSED_MOE)})")
