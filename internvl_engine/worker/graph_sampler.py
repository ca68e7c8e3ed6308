"""The sampler inside the decode CUDA graph (issue 3.6: one step, one graph launch and one small copy).

A captured graph replays fixed kernels on fixed shapes, so this sampler has no host reads, no data-dependent shapes
and no per-row branches: the rows' parameters sit in static [B] buffers that the step fills before the replay
(cuda_graphs.DecodeGraphs stages them with its other inputs), and every row runs every operation.

Per row it computes what sampling.Sampler computes for a row with no penalties, bias, masks, seed or logprobs:
greedy rows (temperature < GREEDY_TEMPERATURE, padding rows too) take the argmax of the raw logits; the others are
divided by their temperature, masked below min_p times their top probability, then to their top_k and top_p
(sampling._truncate over the whole sorted vocabulary, the size the eager sampler uses on a GPU whenever a top_p is
set), and drawn by the inverse CDF of one uniform a row. The masks only ever remove tokens, and an inactive filter
(min_p 0, top_k 0, top_p 1) leaves a row's values as they were, so a row's support and probabilities are those of
the eager sampler. Row i takes the i-th uniform of one draw for the whole bucket; the eager sampler gives its drawn
rows theirs in row order, so when every row draws, the same generator state gives the same tokens (tested).

The uniforms come from the default generator: on CUDA it is registered with every graph captured on its device
(CUDAGraph::capture_begin), so each replay advances its Philox offset and draws fresh numbers, as an eager step's
torch.rand would. A seeded row would need its own generator registered with the graph and its state kept per
request (CUDAGraph.register_generator_state): such rows take the eager sampler instead (fits())."""
from __future__ import annotations

import torch

from ..sampling import GREEDY_TEMPERATURE, NEG_INF, SamplingInput, _truncate


def fits(rows: SamplingInput | None, n: int) -> bool:
    """Whether the graph sampler computes exactly what sampling.Sampler would for these n rows (one per decode
    row): no seeded generator, logprobs, raw logits, min_tokens mask, penalty, logit_bias or grammar."""
    return (rows is not None and len(rows) == n and rows.allowed is None
            and not (rows.masked[0] or rows.repetition[0] or rows.counted[0] or rows.bias[0])
            and all(g is None for g in rows.generators) and all(k is None for k in rows.logprobs)
            and not any(rows.return_logits))


def needs_draw(rows: SamplingInput) -> bool:
    """Whether any row draws (else argmax alone, the cheaper graph)."""
    return max(rows.temperature, default=0.0) >= GREEDY_TEMPERATURE


def stage(rows: SamplingInput, vocab: int, temperature, top_p, min_p, top_k) -> None:
    """Rows' parameters into host staging arrays (numpy views, first len(rows) entries), normalised as the eager
    sampler normalises them: a top_k of 0, -1 or the whole vocabulary is off (0)."""
    n = len(rows)
    temperature[:n] = rows.temperature
    top_p[:n] = rows.top_p
    min_p[:n] = rows.min_p
    top_k[:n] = [k if 0 < k < vocab else 0 for k in rows.top_k]


def stage_padding(temperature, top_p, min_p, top_k, n: int) -> None:
    """Rows from n on: greedy with every filter off (their tokens are dropped)."""
    temperature[n:], top_p[n:], min_p[n:], top_k[n:] = 0.0, 1.0, 0.0, 0


def greedy(logits: torch.Tensor) -> torch.Tensor:
    return torch.argmax(logits, dim=-1)


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           min_p: torch.Tensor) -> torch.Tensor:
    """Tokens [B] (long) of fp32 logits [B, V]; temperature, top_p, min_p [B] fp32 and top_k [B] long (0 = off)
    on the logits' device. Graph-safe: fixed shapes, no host synchronisation."""
    drawn = temperature >= GREEDY_TEMPERATURE
    x = logits / torch.where(drawn, temperature, torch.ones_like(temperature))[:, None]
    probs = x.softmax(-1)
    x = x.masked_fill(probs < min_p[:, None] * probs.amax(-1, keepdim=True), NEG_INF)  # min_p 0: nothing
    x = _truncate(x, top_k, top_p, x.shape[1])[0]
    # the eager sampler's draw: the first token whose cumulative mass (float64) exceeds u * total, u an fp32 uniform
    cum = x.softmax(-1).double().cumsum(-1)
    u = torch.rand(x.shape[0], 1, device=x.device).double()
    tokens = torch.searchsorted(cum, u * cum[:, -1:], right=True)[:, 0]
    return torch.where(drawn, tokens, greedy(logits))
