"""The fused-decode ops (decode_qkv, decode_gemv_residual, decode_gate_up) composed from a backend's own element-wise
kernels and torch's matmuls: the torch, cpp and cuda backends bind `composed(<their rms_norm, rotary,
write_kv_cache>)`, so on each of them the fused path runs the very kernels and roundings of the default decoder
layer (models/decoder.py) and its tokens are equal by construction. Only the Triton backend has kernels of its own
for them (kernels/decode_fused.py)."""
from __future__ import annotations

import torch.nn.functional as F


def composed(rms_norm, rotary, write_kv_cache):
    """(decode_qkv, decode_gemv_residual, decode_gate_up) over these element-wise kernels (unchecked backend
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

    def decode_gemv_residual(x, weight, bias, residual):
        # torch adds low-precision tensors in fp32 and rounds once: the rounding of the norm kernels' residual add
        return F.linear(x, weight, bias) + residual

    def decode_gate_up(x, norm_weight, eps, weight, bias):
        gate, up = F.linear(rms_norm(x, norm_weight, eps), weight, bias).chunk(2, dim=-1)
        return F.silu(gate) * up

    return decode_qkv, decode_gemv_residual, decode_gate_up
