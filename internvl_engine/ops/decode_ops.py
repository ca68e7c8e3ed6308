"""The fused-decode ops (decode_qkv, decode_attention_o, decode_gate_up, decode_gemv_residual) composed from a
backend's own element-wise and attention kernels and torch's matmuls: the torch, cpp and cuda backends bind
`composed(<their rms_norm, rotary, write_kv_cache, paged_attention>)`, so on each of them the fused path runs the very
kernels and roundings of the default decoder layer (models/decoder.py) and its tokens are equal by construction. Only
the Triton backend has kernels of its own for them (kernels/decode_fused.py)."""
from __future__ import annotations

import torch.nn.functional as F

from .ref import reduce_partials_ref


def composed(rms_norm, rotary, write_kv_cache, paged_attention):
    """(decode_qkv, decode_attention_o, decode_gemv_residual, decode_gate_up) over these kernels (unchecked backend
    functions: the bound op has checked its arguments already)."""

    def decode_qkv(x, norm_weight, eps, qkv_weight, qkv_bias, q_norm_weight, k_norm_weight, positions, cos_sin,
                   k_cache, v_cache, slot_mapping):
        b, (hk, d) = x.shape[0], k_cache.shape[2:]
        h = qkv_weight.shape[0] // d - 2 * hk
        qkv = F.linear(rms_norm(x, norm_weight, eps), qkv_weight, qkv_bias)
        q, k, v = qkv.split([h * d, hk * d, hk * d], dim=-1)
        q, k, v = q.reshape(b, h, d), k.reshape(b, hk, d), v.reshape(b, hk, d)
        if q_norm_weight is not None:  # the norm kernels take contiguous rows (as DecoderAttention copies them)
            q, k = rms_norm(q.contiguous(), q_norm_weight, eps), rms_norm(k.contiguous(), k_norm_weight, eps)
        rotary(q, k, positions, cos_sin)
        write_kv_cache(k, v, k_cache, v_cache, slot_mapping)
        return q

    def decode_attention_o(q, k_cache, v_cache, block_tables, seq_lens, scale, o_weight, o_bias):
        # G = 1 partial: the default layer's o_proj output itself, in q's dtype
        o = paged_attention(q, k_cache, v_cache, block_tables, seq_lens, scale)
        return F.linear(o.reshape(q.shape[0], -1), o_weight, o_bias)[None]

    def decode_gemv_residual(x, weight, bias, residual):
        # torch adds low-precision tensors in fp32 and rounds once: the rounding of the norm kernels' residual add
        return F.linear(x, weight, bias) + residual

    def decode_gate_up(partials, residual, norm_weight, eps, weight, bias):
        # the norm kernel's residual add is the default layer's post-attention add (fp32, rounded once); partials
        # another backend produced (G > 1) are summed as the contract says (fp32, g order), rounded as the o_proj
        # output first: the oracle's own reduction, which is all this step is (G = 1: partials[0] unchanged)
        o = reduce_partials_ref(partials, residual.dtype)
        x, residual = rms_norm(o, norm_weight, eps, residual)
        gate, up = F.linear(x, weight, bias).chunk(2, dim=-1)
        return F.silu(gate) * up, residual

    return decode_qkv, decode_attention_o, decode_gemv_residual, decode_gate_up
