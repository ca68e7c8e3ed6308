"""Attention over the paged KV cache, and the per-step metadata it reads.

AttentionMetadata travels as an argument of the language model's forward (`forward(ids, positions, meta)`); the
runner builds it from a plain-data StepInput. The Attention layer owns what a decoder layer's attention does with
the cache: write this step's keys and values, then pick prefill (packed varlen), chunked prefill (keys [0, end) read
back from the cache) or decode (paged)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class AttentionMetadata:
    is_prefill: bool
    slot_mapping: torch.Tensor                 # [T] int64, cache slot of each new token (-1: do not cache)
    kv_caches: list | None                     # per layer (k_cache, v_cache) [num_blocks, block_size, Hk, D]; None:
                                               # a forward that writes no cache (prompt logits)
    cu_seqlens_q: torch.Tensor | None = None   # prefill: [B+1] int32 over the new tokens
    cu_seqlens_k: torch.Tensor | None = None
    max_seqlen_q: int = 0
    max_seqlen_k: int = 0
    block_tables: torch.Tensor | None = None   # decode: [B, max_blocks] int32
    seq_lens: torch.Tensor | None = None       # decode: [B] int32, tokens in the cache including this one
    rope_seq_lens: torch.Tensor | None = None  # [T], only for dynamic-NTK RoPE past max_position_embeddings
    kv_gather_slots: torch.Tensor | None = None  # prefill after a cached prefix / earlier chunk: [sum of end] int64,
                                                 # cache slots of positions [0, end) of every sequence, in order


class Attention(nn.Module):
    """Causal GQA attention of one decoder layer over q [T, H, D], k and v [T, Hk, D] (already rotated)."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, layer_idx: int, ops):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.layer_idx, self.scale, self.ops = layer_idx, head_dim ** -0.5, ops

    def forward(self, q, k, v, meta: AttentionMetadata):
        ops = self.ops
        if meta.kv_caches is not None:
            k_cache, v_cache = meta.kv_caches[self.layer_idx]
            ops.write_kv_cache(k, v, k_cache, v_cache, meta.slot_mapping)
        if not meta.is_prefill:
            return ops.paged_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, self.scale)
        if meta.kv_gather_slots is not None:
            # the causal mask is bottom-right aligned, so query i of a chunk sees keys up to start + i
            k = k_cache.view(-1, self.num_kv_heads, self.head_dim)[meta.kv_gather_slots]
            v = v_cache.view(-1, self.num_kv_heads, self.head_dim)[meta.kv_gather_slots]
        return ops.flash_attention(q, k, v, meta.cu_seqlens_q, meta.cu_seqlens_k, meta.max_seqlen_q,
                                   meta.max_seqlen_k, causal=True, scale=self.scale)
