"""Decode attention over the paged KV cache, split-KV ("flash-decoding") for small batches.

Grid: (sequence, KV head, split). A program handles the whole GQA group of query heads that share one KV head
(BLOCK_H >= 16 rows, padded and masked) so K/V tiles are read once per group and QK^T / PV are tensor-core dots.
It streams BLOCK_N cached tokens per step, gathering their blocks through the block table
(token t -> block_tables[b, t // block_size], offset t % block_size), so BLOCK_N need not equal block_size.
Only tokens t < seq_lens[b] are touched: block-table entries past that may be garbage and cache slots may hold
NaN, so every load is masked with other=0 and every masked score is -inf before the softmax.

With one split the program normalises and writes the output directly. With several, split s covers a fixed token
range [s*TOK_PER_SPLIT, (s+1)*TOK_PER_SPLIT) and stores its unnormalised accumulator acc_s, running max m_s and
sum l_s (base-2 domain) in an fp32 workspace; _paged_attention_merge_kernel then combines
    M = max_s m_s,   w_s = 2^(m_s - M),   out = sum_s w_s * acc_s / sum_s w_s * l_s.
TOK_PER_SPLIT is split_tokens rounded up to BLOCK_N: PAGED_SPLIT_TOKENS = 256 (csrc/ops.h), which ops/triton_ops.py
hands over, so the split count follows the block-table capacity only, never the batch or seq_lens (that would need
a device->host sync): a sequence gets the same result in any batch and any table width (batch invariance). Splits
past a sequence's length exit after writing an empty partial (l = 0, which the merge weights by exactly 0).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._tuning import INTERPRET, LOG2E, autotune, dot_operand, next_pow2, row_max, row_sum, to_dtype

_BLOCK_N = 64                       # tokens per inner step

_CONFIGS = [
    triton.Config({}, num_warps=4, num_stages=2),
    triton.Config({}, num_warps=4, num_stages=3),
    triton.Config({}, num_warps=8, num_stages=2),
    triton.Config({}, num_warps=2, num_stages=3),
]


def token_step(block_size: int) -> int:
    """Cached tokens per inner step (BLOCK_N). The interpreter pays per step, so it takes bigger ones."""
    return max(128 if INTERPRET else _BLOCK_N, block_size)


@autotune(configs=_CONFIGS, key=["BLOCK_D", "BLOCK_H", "BLOCK_SIZE", "SPLIT"])
@triton.jit
def _paged_attention_kernel(q_ptr, kc_ptr, vc_ptr, bt_ptr, sl_ptr, o_ptr, ws_o_ptr, ws_ml_ptr, qk_scale,
                            H, GROUP, max_blocks, num_splits, tok_per_split,
                            stride_qb, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                            stride_btb, stride_ob, stride_oh,
                            D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
                            BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr,
                            DOT_PREC: tl.constexpr):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    sp = tl.program_id(2)
    seq_len = tl.load(sl_ptr + b)

    offs_g = tl.arange(0, BLOCK_H)
    gmask = offs_g < GROUP
    heads = kvh * GROUP + offs_g
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    offs_n = tl.arange(0, BLOCK_N)
    q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=gmask[:, None] & dmask[None, :], other=0.0)

    m_i = tl.full([BLOCK_H], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)

    tok_lo = sp * tok_per_split
    tok_hi = tl.minimum(tok_lo + tok_per_split, seq_len)
    bt_row = bt_ptr + b.to(tl.int64) * stride_btb
    for start in range(tok_lo, tok_hi, BLOCK_N):
        toks = start + offs_n
        nmask = toks < tok_hi
        blk = tl.load(bt_row + toks // BLOCK_SIZE, mask=nmask & (toks // BLOCK_SIZE < max_blocks), other=0)
        blk = blk.to(tl.int64)
        off = toks % BLOCK_SIZE
        kt = tl.load(kc_ptr + (blk * stride_kb + off * stride_ks + kvh * stride_kh)[None, :] + offs_d[:, None],
                     mask=nmask[None, :] & dmask[:, None], other=0.0)
        s = tl.dot(dot_operand(q), dot_operand(kt), input_precision=DOT_PREC) * qk_scale
        s = tl.where(nmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, row_max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + row_sum(p, axis=1)
        v = tl.load(vc_ptr + (blk * stride_vb + off * stride_vs + kvh * stride_vh)[:, None] + offs_d[None, :],
                    mask=nmask[:, None] & dmask[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(dot_operand(to_dtype(p, v.dtype)), dot_operand(v), input_precision=DOT_PREC)
        m_i = m_new

    if SPLIT:
        # workspace rows are (b, h, split); ws_ml holds (m, l) pairs
        row = (b * H + heads).to(tl.int64) * num_splits + sp
        tl.store(ws_o_ptr + row[:, None] * D + offs_d[None, :], acc, mask=gmask[:, None] & dmask[None, :])
        tl.store(ws_ml_ptr + row * 2, m_i, mask=gmask)
        tl.store(ws_ml_ptr + row * 2 + 1, l_i, mask=gmask)
    else:
        l_i = tl.where(l_i == 0.0, 1.0, l_i)
        out = acc / l_i[:, None]
        tl.store(o_ptr + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                 to_dtype(out, o_ptr.dtype.element_ty), mask=gmask[:, None] & dmask[None, :])


@triton.jit
def _paged_attention_merge_kernel(ws_o_ptr, ws_ml_ptr, o_ptr, H, num_splits, stride_ob, stride_oh,
                                  D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    smask = offs_s < num_splits
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    row = (b * H + h).to(tl.int64) * num_splits + offs_s
    m = tl.load(ws_ml_ptr + row * 2, mask=smask, other=-1.0e30)
    l = tl.load(ws_ml_ptr + row * 2 + 1, mask=smask, other=0.0)
    # Empty splits carry m = -1e30, l = 0, acc = 0: they get weight ~0 and contribute nothing.
    w = tl.exp2(m - row_max(m, axis=0))
    w = tl.where(smask, w, 0.0)
    acc = tl.load(ws_o_ptr + row[:, None] * D + offs_d[None, :], mask=smask[:, None] & dmask[None, :], other=0.0)
    num = row_sum(acc * w[:, None], axis=0)
    den = row_sum(l * w, axis=0)
    den = tl.where(den == 0.0, 1.0, den)
    tl.store(o_ptr + b.to(tl.int64) * stride_ob + h * stride_oh + offs_d, to_dtype(num / den, o_ptr.dtype.element_ty),
             mask=dmask)


def paged_attention(q, k_cache, v_cache, block_tables, seq_lens, scale, *, split_tokens: int):
    if q.dim() != 3:
        raise ValueError(f"paged_attention: q must be [B, H, D], got {tuple(q.shape)}")
    B, H, D = q.shape
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape or k_cache.shape[3] != D:
        raise ValueError(f"paged_attention: caches must be [num_blocks, block_size, Hk, {D}] of equal shape, got "
                         f"{tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("paged_attention: caches must be contiguous")
    block_size, Hk = k_cache.shape[1], k_cache.shape[2]
    if block_size < 1 or block_size & (block_size - 1):
        raise ValueError(f"paged_attention: block_size must be a power of two, got {block_size}")
    if D > 256:
        raise ValueError(f"paged_attention: head dim {D} not supported (max 256)")
    if Hk == 0 or H % Hk:
        raise ValueError(f"paged_attention: H={H} is not a multiple of Hk={Hk}")
    if not (q.dtype == k_cache.dtype == v_cache.dtype) or q.dtype not in (torch.float32, torch.float16,
                                                                           torch.bfloat16):
        raise ValueError(f"paged_attention: dtypes {q.dtype}/{k_cache.dtype}/{v_cache.dtype} unsupported or different")
    if q.stride(2) != 1:
        raise ValueError("paged_attention: q must have stride(-1) == 1")
    if block_tables.dtype != torch.int32 or block_tables.dim() != 2 or block_tables.shape[0] != B \
            or block_tables.stride(1) != 1:
        raise ValueError("paged_attention: block_tables must be int32 [B, max_blocks] with unit column stride")
    if seq_lens.dtype != torch.int32 or seq_lens.shape != (B,):
        raise ValueError("paged_attention: seq_lens must be int32 [B]")
    out = torch.empty((B, H, D), dtype=q.dtype, device=q.device)
    max_blocks = block_tables.shape[1]
    if B == 0 or max_blocks == 0:
        return out.zero_()
    group = H // Hk
    block_h = max(16, next_pow2(group))
    block_d = max(16, next_pow2(D))
    block_n = token_step(block_size)
    capacity = max_blocks * block_size
    tok_per_split = triton.cdiv(split_tokens, block_n) * block_n
    splits = triton.cdiv(capacity, tok_per_split)
    dot_prec = "ieee" if q.dtype == torch.float32 else None
    if splits > 1:
        ws_o = torch.empty((B, H, splits, D), dtype=torch.float32, device=q.device)
        ws_ml = torch.empty((B, H, splits, 2), dtype=torch.float32, device=q.device)
    else:
        ws_o = ws_ml = out
    _paged_attention_kernel[(B, Hk, splits)](
        q, k_cache, v_cache, block_tables, seq_lens, out, ws_o, ws_ml, float(scale) * LOG2E,
        H, group, max_blocks, splits, tok_per_split,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0), out.stride(0), out.stride(1),
        D=D, BLOCK_D=block_d, BLOCK_H=block_h, BLOCK_SIZE=block_size, BLOCK_N=block_n, SPLIT=splits > 1,
        DOT_PREC=dot_prec)
    if splits > 1:
        _paged_attention_merge_kernel[(B, H)](ws_o, ws_ml, out, H, splits, out.stride(0), out.stride(1),
                                              D=D, BLOCK_D=block_d, BLOCK_S=max(2, next_pow2(splits)), num_warps=4)
    return out
