"""fused_moe with torch's own ops (the `torch` backend; `cuda` binds it too until csrc/cuda has a kernel).

Token-slots are grouped by expert and each expert that any slot routes to runs once, on its rows only: at batch 1
only the k routed experts' weights are read. The op sequence and dtypes are those of transformers'
Qwen3MoeExperts.forward (models/qwen3_moe/modeling_qwen3_moe.py), so that the model-parity tests compare like with
like: gate/up in one linear, silu(gate) * up, the down linear, the routing weight cast to x's dtype (transformers'
router hands its weights over in the hidden dtype) and multiplied in, index_add_ into a zero y in x's dtype, experts
in ascending order. In fp32 that is the oracle up to summation order; in bf16 / fp16 every step rounds to x's dtype
as transformers' does (the oracle keeps fp32 throughout and rounds once).

Host synchronisation: the per-expert row counts are read on the host (one .tolist() per call), so this path cannot
run inside a CUDA graph (models/moe.py GRAPH_SAFE_FUSED_MOE leaves this backend out, so the runner decodes such a
model eagerly). The same read checks the ids' range for free: an id
outside [0, E) raises KernelInputError instead of indexing out of bounds.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .checks import fail


def expert_groups(topk_ids: torch.Tensor, num_experts: int):
    """(order, counts): the flat slot indices (t * k + j) sorted by expert, stably (token order within an
    expert), and each expert's slot count as a host list (the one sync). Out-of-range ids raise."""
    flat = topk_ids.reshape(-1).long()
    valid = (flat >= 0) & (flat < num_experts)
    hist = torch.bincount(torch.where(valid, flat, num_experts), minlength=num_experts + 1).tolist()
    if hist[num_experts]:
        fail("fused_moe", f"topk_ids holds {hist[num_experts]} id(s) outside [0, {num_experts}) (the experts of "
                          "w13)")
    return torch.argsort(flat, stable=True), hist[:num_experts]


def fused_moe(x, w13, w2, topk_weights, topk_ids):
    k = topk_ids.shape[1]
    y = torch.zeros_like(x)
    order, counts = expert_groups(topk_ids, w13.shape[0])
    tokens = order // k
    weights = topk_weights.reshape(-1)[order].to(x.dtype)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        rows = slice(start, start + n)
        start += n
        idx = tokens[rows]
        gate, up = F.linear(x[idx], w13[e]).chunk(2, dim=-1)
        h = F.linear(F.silu(gate) * up, w2[e]) * weights[rows, None]
        y.index_add_(0, idx, h)
    return y
