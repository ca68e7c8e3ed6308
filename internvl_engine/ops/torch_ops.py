"""The `torch` backend: the contract implemented with torch's own fused ops (scaled_dot_product_attention, native
layer_norm). It is the CPU fallback and, numerically, the closest to transformers (same op sequence and dtypes),
which is why the model-parity tests run on it by default."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .ref import pixel_shuffle_ref as pixel_shuffle  # a pure layout change: the reference is already optimal
from .ref import rms_norm_ref as rms_norm            # same arithmetic as transformers' RMSNorm


def layer_norm(x, weight, bias, eps):
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps)


def rotary(q, k, positions, cos_sin):
    # transformers casts the fp32 tables to the activation dtype and rotates in that dtype; do the same.
    cs = cos_sin[positions.long()]
    half = cs.shape[-1] // 2
    cos = torch.cat((cs[:, :half], cs[:, :half]), -1)[:, None].to(q.dtype)
    sin = torch.cat((cs[:, half:], cs[:, half:]), -1)[:, None].to(q.dtype)
    for x in (q, k):
        rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        x.copy_(x * cos + rot * sin)
    return q, k


def write_kv_cache(k, v, k_cache, v_cache, slot_mapping):
    # Without a host sync (boolean or 0-d tensor indexing would cost one per layer): a skipped token (slot < 0)
    # rewrites the first kept token's slot with that token's own values, so duplicate indices always carry
    # identical data; with nothing kept, slot 0 is rewritten with what it already holds.
    keep = slot_mapping >= 0
    first = torch.argmax(keep.to(torch.int32)).view(1)
    any_kept = keep.any()
    zero = torch.zeros_like(first)
    idx = torch.where(keep, slot_mapping, torch.where(any_kept, slot_mapping.index_select(0, first), zero)).long()
    for x, cache in ((k, k_cache), (v, v_cache)):
        flat = cache.view(-1, *cache.shape[2:])
        filler = torch.where(any_kept, x.index_select(0, first), flat.index_select(0, zero))
        flat.index_copy_(0, idx, torch.where(keep[:, None, None], x, filler))


def _sdpa(q, k, v, scale, causal, mask=None):
    """q [B, Lq, H, D], k/v [B, Lk, Hk, D] -> [B, Lq, H, D]."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    lq, lk = q.shape[-2], k.shape[-2]
    if causal and lq != lk:  # bottom-right aligned causal mask (new tokens after a cached prefix)
        mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(lk - lq)
        causal = False
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and lq > 1, scale=scale,
                                       enable_gqa=q.shape[1] != k.shape[1])
    return o.transpose(1, 2)


def flash_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale):
    n = cu_seqlens_q.shape[0] - 1
    # n sequences of at most max_seqlen tokens filling n * max_seqlen rows all have max_seqlen tokens: equal lengths
    # (vision tiles) are known from shapes alone, so that path reads no device value (it runs inside CUDA graphs)
    if max_seqlen_q == max_seqlen_k and q.shape[0] == n * max_seqlen_q and k.shape[0] == n * max_seqlen_k:
        shape = (n, max_seqlen_q)
        # contiguous: the contract's output is dense, and CUDA's fp32 SDPA kernel hands back a [B, H, L, D] layout
        # whose transpose the reshape would only view (seen on the H100, benchmarks/results/*-2be9dbb-pytest-gpu.log)
        return _sdpa(q.view(*shape, *q.shape[1:]), k.view(*shape, *k.shape[1:]), v.view(*shape, *v.shape[1:]),
                     scale, causal).reshape(q.shape).contiguous()
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    out = torch.empty_like(q)
    for b in range(n):
        qs, ks = slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])
        out[qs] = _sdpa(q[None, qs], k[None, ks], v[None, ks], scale, causal)[0]
    return out


def paged_attention(q, k_cache, v_cache, block_tables, seq_lens, scale):
    k = k_cache[block_tables.long()].flatten(1, 2)  # [B, max_blocks * bs, Hk, D]
    v = v_cache[block_tables.long()].flatten(1, 2)
    valid = torch.arange(k.shape[1], device=q.device)[None, :] < seq_lens[:, None]
    # slots past seq_len may hold stale or non-finite values, and a masked NaN score still poisons the softmax
    k = k.masked_fill(~valid[:, :, None, None], 0)
    v = v.masked_fill(~valid[:, :, None, None], 0)
    return _sdpa(q[:, None], k, v, scale, causal=False, mask=valid[:, None, None, :])[:, 0]

from .quant_ops import awq_gemm, fp8_gemm  # noqa: E402,F401  dequantize, then matmul
from .moe_ops import fused_moe  # noqa: E402,F401  transformers' op sequence, grouped by expert
from .decode_ops import composed  # noqa: E402

decode_qkv, decode_attention_o, decode_gemv_residual, decode_gate_up = composed(rms_norm, rotary, write_kv_cache,
                                                                                paged_attention)
