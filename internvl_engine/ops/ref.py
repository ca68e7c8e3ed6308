"""Plain-torch reference of every op in the kernel contract (docs/ARCHITECTURE.md, "The kernel contract").

These are the oracles of the kernel tests: simple, loop-based where that is clearest, fp32 accumulation, the
result cast back to the input dtype (the attention oracles keep fp64 inputs in fp64: the attention tests measure
every backend against them on fp64 copies). Shapes: T tokens, H query heads, Hk KV heads, D head dim, C channels.
"""
from __future__ import annotations

import torch


def rms_norm_ref(x, weight, eps, residual=None):
    # Numerics of transformers' Qwen2RMSNorm (Llama's and Qwen3's are the same): normalise in fp32, cast back, then
    # scale.
    if residual is not None:
        x = (x.float() + residual.float()).to(x.dtype)
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    y = weight * y.to(x.dtype)
    return y if residual is None else (y, x)


def layer_norm_ref(x, weight, bias, eps):
    y = torch.nn.functional.layer_norm(x.float(), x.shape[-1:], weight.float(),
                                       None if bias is None else bias.float(), eps)
    return y.to(x.dtype)


def pixel_shuffle_ref(features, scale=0.5):
    """[N, S*S, C] -> [N, (S*scale)^2, C/scale^2]; out[i, j] = concat(F[2i,2j], F[2i,2j+1], F[2i+1,2j], F[2i+1,2j+1])
    for scale 0.5 (spec section 3), generalised to any 1/scale integer factor r."""
    n, hw, c = features.shape
    s = int(round(hw ** 0.5))
    r = int(round(1 / scale))
    f = features.reshape(n, s // r, r, s // r, r, c)          # [n, i, di, j, dj, c]
    return f.permute(0, 1, 3, 2, 4, 5).reshape(n, (s // r) ** 2, c * r * r)


def rotary_ref(q, k, positions, cos_sin):
    """NeoX rotate-half RoPE, in place. q [T, H, D], k [T, Hk, D]; cos_sin [P, D] fp32 with cos in the first D/2
    columns and sin in the last D/2; row `positions[t]` rotates token t."""
    cs = cos_sin[positions.long()].float()
    half = cs.shape[-1] // 2
    cos, sin = cs[:, None, :half], cs[:, None, half:]
    for x in (q, k):
        xf = x.float()
        x1, x2 = xf[..., :half], xf[..., half:]
        x.copy_(torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype))
    return q, k


def write_kv_cache_ref(k, v, k_cache, v_cache, slot_mapping):
    """k, v [T, Hk, D] into caches [num_blocks, block_size, Hk, D] at slot = block * block_size + offset; slot < 0 skips."""
    bs = k_cache.shape[1]
    for t, slot in enumerate(slot_mapping.tolist()):
        if slot < 0:
            continue
        k_cache[slot // bs, slot % bs] = k[t]
        v_cache[slot // bs, slot % bs] = v[t]


def _attend(q, k, v, scale, causal):
    """q [Lq, H, D], k/v [Lk, Hk, D] -> [Lq, H, D] in fp32 (fp64 for fp64 inputs); causal masks are aligned
    bottom-right (query i sees keys up to Lk - Lq + i), the convention for a chunk of new tokens appended to a
    cached prefix."""
    lq, h, _ = q.shape
    lk, hk, _ = k.shape
    acc = torch.promote_types(q.dtype, torch.float32)
    kf = k.to(acc).repeat_interleave(h // hk, dim=1)
    vf = v.to(acc).repeat_interleave(h // hk, dim=1)
    s = torch.einsum("qhd,khd->hqk", q.to(acc), kf) * scale
    if causal:
        keep = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(lk - lq)
        s = s.masked_fill(~keep, float("-inf"))
    p = torch.softmax(s, dim=-1)
    return torch.einsum("hqk,khd->qhd", p, vf)


def flash_attention_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale):
    """Varlen attention over packed sequences: q [Tq, H, D], k/v [Tk, Hk, D]; sequence b owns rows
    cu_seqlens[b]:cu_seqlens[b+1]. GQA: query head g reads KV head g // (H / Hk)."""
    out = torch.empty_like(q)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(cq) - 1):
        qs, ks = slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])
        out[qs] = _attend(q[qs], k[ks], v[ks], scale, causal).to(q.dtype)
    return out


def paged_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, scale):
    """Decode attention: q [B, H, D] attends to the first seq_lens[b] cached tokens of sequence b, whose token t lives
    in block block_tables[b, t // block_size] at offset t % block_size."""
    bs = k_cache.shape[1]
    out = torch.empty_like(q)
    for b, n in enumerate(seq_lens.tolist()):
        idx = torch.arange(n, device=q.device)
        blocks = block_tables[b].long()[idx // bs]
        k = k_cache[blocks, idx % bs]
        v = v_cache[blocks, idx % bs]
        out[b] = _attend(q[b:b + 1], k, v, scale, causal=False)[0].to(q.dtype)
    return out


# ------------------------------------------------------------------------------ quantized matmuls (issue 18)
_AWQ_NIBBLE = (0, 4, 1, 5, 2, 6, 3, 7)  # AWQ GEMM order [0, 2, 4, 6, 1, 3, 5, 7]: column j of a pack sits in this nibble


def _awq_unpack_ref(packed):
    cols = [(packed >> (4 * _AWQ_NIBBLE[j])) & 0xF for j in range(8)]
    return torch.stack(cols, -1).reshape(packed.shape[0], -1)


def awq_gemm_ref(x, qweight, qzeros, scales, bias=None, group_size=128):
    """x [M, K] @ w [K, N] (+ bias), w[k, n] = (q[k, n] - z[k // G, n]) * s[k // G, n]; fp32, cast to x's dtype."""
    q = _awq_unpack_ref(qweight).float()
    z = _awq_unpack_ref(qzeros).float().repeat_interleave(group_size, 0)
    s = scales.float().repeat_interleave(group_size, 0)
    y = x.float() @ ((q - z) * s)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def fp8_token_scale(xf: torch.Tensor) -> torch.Tensor:
    """Per-token FP8 activation scale of fp32 rows: amax / 448, at least 1e-12, correctly rounded. The divisor is a
    tensor on x's device on purpose: CUDA torch divides by a Python scalar through its reciprocal (a * fl(1/448),
    which differs from a / 448 in the last bit for about half of all amax values), and the Triton kernel and the
    CPU divide exactly."""
    return (xf.abs().amax(-1, keepdim=True) / xf.new_tensor(448.0)).clamp(min=1e-12)


def fp8_quantize_tokens(xf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 rows -> (float8_e4m3fn values, their per-token scales [..., 1]): clamp(x / scale, +-448) rounded."""
    sx = fp8_token_scale(xf)
    return (xf / sx).clamp(-448.0, 448.0).to(torch.float8_e4m3fn), sx


def fp8_gemm_ref(x, weight, weight_scale, bias=None):
    """x [M, K] quantized per token to float8_e4m3fn (scale = amax / 448), times weight [N, K] float8_e4m3fn with
    per-output-channel weight_scale [N, 1]; emulated in fp32, cast to x's dtype."""
    xf = x.float()
    xq, sx = fp8_quantize_tokens(xf)
    xq = xq.float() * sx
    y = xq @ (weight.float() * weight_scale.float().reshape(-1, 1)).t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


# ------------------------------------------------------------------------------ mixture of experts (issue 27)
def fused_moe_ref(x, w13, w2, topk_weights, topk_ids):
    """Routed SwiGLU experts: x [T, Hd], w13 [E, 2F, Hd] (gate rows then up rows), w2 [E, Hd, F], topk_weights
    [T, k] fp32, topk_ids [T, k] -> y [T, Hd],
        y[t] = sum_j topk_weights[t, j] * w2[e] @ (silu(gate_e x[t]) * (up_e x[t])),  e = topk_ids[t, j],
    summed in j order, all in fp32, cast to x's dtype once."""
    f = w2.shape[2]
    xf, w13f, w2f = x.float(), w13.float(), w2.float()
    y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for t, ids in enumerate(topk_ids.tolist()):
        for j, e in enumerate(ids):
            gate_up = w13f[e] @ xf[t]
            h = torch.nn.functional.silu(gate_up[:f]) * gate_up[f:]
            y[t] += topk_weights[t, j].float() * (w2f[e] @ h)
    return y.to(x.dtype)


# ------------------------------------------------------------------------------ fused decode (issue 3.6)
# One decoder layer's decode step in four ops (docs/ARCHITECTURE.md, "The kernel contract"),
# each composed from the oracles above with the roundings of the default path: every product, sum and activation is
# rounded to the activation dtype where the unfused layer stores it.
def _linear_ref(x, weight, bias):
    y = x.float() @ weight.float().t()
    return (y if bias is None else y + bias.float()).to(x.dtype)


def decode_qkv_ref(x, norm_weight, eps, qkv_weight, qkv_bias, q_norm_weight, k_norm_weight, positions, cos_sin,
                   k_cache, v_cache, slot_mapping):
    """x [B, C] (the residual stream) -> q [B, H, D]: RMSNorm(x), the packed q/k/v projection [(H + 2 Hk) D, C]
    (+ bias), per-head RMSNorm of q and k when q_norm_weight / k_norm_weight [D] are given (Qwen3), NeoX rotary at
    `positions`, k and v written into the caches at slot_mapping (slot < 0: not written). Hk and D are the caches'."""
    b, (hk, d) = x.shape[0], k_cache.shape[2:]
    h = qkv_weight.shape[0] // d - 2 * hk
    qkv = _linear_ref(rms_norm_ref(x, norm_weight, eps), qkv_weight, qkv_bias)
    q, k, v = qkv.split([h * d, hk * d, hk * d], dim=-1)
    q, k, v = q.reshape(b, h, d), k.reshape(b, hk, d), v.reshape(b, hk, d)
    if q_norm_weight is not None:
        q, k = rms_norm_ref(q, q_norm_weight, eps), rms_norm_ref(k, k_norm_weight, eps)
    q, k = q.contiguous(), k.contiguous()
    rotary_ref(q, k, positions, cos_sin)
    write_kv_cache_ref(k, v, k_cache, v_cache, slot_mapping)
    return q


def decode_gemv_residual_ref(x, weight, bias, residual):
    """residual + (x W^T + b): x [B, K], weight [N, K], residual [B, N]; the product rounded to x's dtype, then the
    sum rounded (o_proj and down_proj with the residual add of the norm that follows them)."""
    return (_linear_ref(x, weight, bias).float() + residual.float()).to(x.dtype)


def decode_attention_o_ref(q, k_cache, v_cache, block_tables, seq_lens, scale, o_weight, o_bias):
    """Paged decode attention fused with o_proj: q [B, H, D] -> partials [G, B, C] whose sum over g (in fp32, g in
    order: reduce_partials_ref) is o_proj(attention(q)) [B, C]. A backend chooses G >= 1 (the Triton kernel: one
    partial per query head, the bias in partial 0; the compositions: G = 1, the default layer's o_proj output in q's
    dtype). The oracle is G = 1: paged_attention_ref's output (rounded to q's dtype, as the default layer stores it),
    then the projection rounded. o_weight [C, H D], o_bias [C] or None."""
    o = paged_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, scale)
    return _linear_ref(o.reshape(q.shape[0], -1), o_weight, o_bias)[None]


def reduce_partials_ref(partials, dtype):
    """sum_g partials[g], accumulated in fp32 in g order, rounded once to `dtype` (the o_proj output)."""
    acc = partials[0].float()
    for p in partials[1:]:
        acc = acc + p.float()
    return acc.to(dtype)


def decode_gate_up_ref(partials, residual, norm_weight, eps, weight, bias):
    """The post-attention half's prologue and first GEMV: residual' = residual + sum_g partials[g] (the o_proj output
    rounded to residual's dtype, then the fp32 add rounded once, as rms_norm_ref's residual add), then silu(gate) * up
    of RMSNorm(residual'). partials [G, B, C], residual [B, C], weight [2F, C] (gate rows, then up rows) ->
    (h [B, F], residual' [B, C])."""
    x, res = rms_norm_ref(reduce_partials_ref(partials, residual.dtype), norm_weight, eps, residual=residual)
    gate, up = _linear_ref(x, weight, bias).chunk(2, dim=-1)
    h = (torch.nn.functional.silu(gate.float()).to(x.dtype).float() * up.float()).to(x.dtype)
    return h, res
