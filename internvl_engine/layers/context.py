"""Per-step metadata for the language model, set by the runner before each forward and read by the attention
layers, so that forward signatures stay (input_ids, positions)."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class StepContext:
    is_prefill: bool
    slot_mapping: torch.Tensor                 # [T] int64, cache slot of each new token (-1: do not cache)
    kv_caches: list                            # per layer (k_cache, v_cache), each [num_blocks, block_size, Hk, D]
    cu_seqlens_q: torch.Tensor | None = None   # prefill: [B+1] int32 over the new tokens
    cu_seqlens_k: torch.Tensor | None = None
    max_seqlen_q: int = 0
    max_seqlen_k: int = 0
    block_tables: torch.Tensor | None = None   # decode: [B, max_blocks] int32
    seq_lens: torch.Tensor | None = None       # decode: [B] int32, tokens in the cache including this one
    rope_seq_lens: torch.Tensor | None = None  # [T], only for dynamic-NTK RoPE past max_position_embeddings
    kv_gather_slots: torch.Tensor | None = None  # prefill with a cached prefix / earlier chunk: [sum of end] int64,
                                                 # cache slots of positions [0, end) of every sequence, in order


_context: StepContext | None = None


def set_context(ctx: StepContext | None) -> None:
    global _context
    _context = ctx


def get_context() -> StepContext:
    if _context is None:
        raise RuntimeError("language-model forward called without a step context")
    return _context
