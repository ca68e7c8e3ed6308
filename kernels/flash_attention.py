"""Varlen (packed) multi-head attention for prefill and the vision tower, FlashAttention-2 style.

Grid: (query blocks of BLOCK_M rows, sequence x query head). Each program keeps its Q tile resident and streams the
sequence's K/V in BLOCK_N-row tiles with the online softmax (Dao 2023, "FlashAttention-2", Alg. 1):
    s = (q . k) * scale * log2(e)             # base-2 domain so exp becomes exp2
    m_new = max(m, rowmax(s));  alpha = 2^(m - m_new);  p = 2^(s - m_new)
    l = l * alpha + rowsum(p);  acc = acc * alpha + p @ v;   out = acc / l  (one division at the end)
Causal masking is bottom-right aligned (query i of Lq sees keys j <= Lk - Lq + i, a chunk appended to a cached
prefix), and the K loop stops at the last tile any row of the Q tile can see. GQA: query head h reads KV head
h // (H // Hk). m starts at a large finite negative instead of -inf so fully masked rows (Lq > Lk under causal, or
Lk = 0) give p = 0 rather than inf - inf = NaN, and their output is 0.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._tuning import LOG2E, autotune, dot_operand, next_pow2, row_max, row_sum, to_dtype


_CONFIGS = [
    # configs[0] is what the interpreter runs: valid for every head dim up to 256, few programs.
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=3),
]


@autotune(configs=_CONFIGS, key=["BLOCK_D", "CAUSAL", "SEQ_BUCKET"])
@triton.jit
def _flash_attention_kernel(q_ptr, k_ptr, v_ptr, o_ptr, cu_q_ptr, cu_k_ptr, qk_scale, H, GROUP,
                            stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
                            SEQ_BUCKET, D: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
                            DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    kvh = h // GROUP
    q_start = tl.load(cu_q_ptr + b)
    Lq = tl.load(cu_q_ptr + b + 1) - q_start
    k_start = tl.load(cu_k_ptr + b)
    Lk = tl.load(cu_k_ptr + b + 1) - k_start
    start_m = pid_m * BLOCK_M
    if start_m >= Lq:           # the grid is sized by max_seqlen_q; shorter sequences have idle tail programs
        return

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    mmask = offs_m < Lq
    q = tl.load(q_ptr + (q_start + offs_m)[:, None].to(tl.int64) * stride_qt + h * stride_qh + offs_d[None, :],
                mask=mmask[:, None] & dmask[None, :], other=0.0)
    k_base = k_ptr + k_start.to(tl.int64) * stride_kt + kvh * stride_kh
    v_base = v_ptr + k_start.to(tl.int64) * stride_vt + kvh * stride_vh

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    end_n = Lk
    if CAUSAL:
        # Last row of this tile sees keys < Lk - Lq + start_m + BLOCK_M; later K tiles are fully masked.
        end_n = tl.minimum(Lk, tl.maximum(Lk - Lq + start_m + BLOCK_M, 0))
    for start_n in range(0, end_n, BLOCK_N):
        cols = start_n + offs_n
        nmask = cols < Lk
        kt = tl.load(k_base + cols[None, :].to(tl.int64) * stride_kt + offs_d[:, None],
                     mask=nmask[None, :] & dmask[:, None], other=0.0)
        s = tl.dot(dot_operand(q), dot_operand(kt), input_precision=DOT_PREC) * qk_scale
        keep = nmask[None, :]
        if CAUSAL:
            keep = keep & (cols[None, :] <= offs_m[:, None] + (Lk - Lq))
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, row_max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + row_sum(p, axis=1)
        v = tl.load(v_base + cols[:, None].to(tl.int64) * stride_vt + offs_d[None, :],
                    mask=nmask[:, None] & dmask[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(dot_operand(to_dtype(p, v.dtype)), dot_operand(v), input_precision=DOT_PREC)
        m_i = m_new

    l_i = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_i[:, None]
    tl.store(o_ptr + (q_start + offs_m)[:, None].to(tl.int64) * stride_ot + h * stride_oh + offs_d[None, :],
             to_dtype(out, o_ptr.dtype.element_ty), mask=mmask[:, None] & dmask[None, :])


def flash_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale):
    if q.dim() != 3 or k.dim() != 3 or v.shape != k.shape:
        raise ValueError(f"flash_attention: q [Tq, H, D], k/v [Tk, Hk, D] expected, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    Tq, H, D = q.shape
    Hk = k.shape[1]
    if k.shape[2] != D:
        raise ValueError(f"flash_attention: head dims differ: q {D}, k {k.shape[2]}")
    if D > 256 or D < 1:
        raise ValueError(f"flash_attention: head dim {D} not supported (max 256)")
    if Hk == 0 or H % Hk:
        raise ValueError(f"flash_attention: H={H} is not a multiple of Hk={Hk}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"flash_attention: dtypes {q.dtype}/{k.dtype}/{v.dtype} unsupported or different")
    if q.stride(2) != 1 or k.stride(2) != 1 or v.stride(2) != 1:
        raise ValueError("flash_attention: q/k/v must have stride(-1) == 1")
    if cu_seqlens_q.dtype != torch.int32 or cu_seqlens_k.dtype != torch.int32 \
            or cu_seqlens_q.shape != cu_seqlens_k.shape or cu_seqlens_q.dim() != 1:
        raise ValueError("flash_attention: cu_seqlens_q/k must be int32 [B+1] of equal length")
    out = torch.empty((Tq, H, D), dtype=q.dtype, device=q.device)
    B = cu_seqlens_q.shape[0] - 1
    max_seqlen_q = int(max_seqlen_q)
    if Tq == 0 or B <= 0 or max_seqlen_q <= 0:
        return out
    # Tuning bucket: re-tune per power-of-two query length only, not for every prefill length.
    bucket = next_pow2(max_seqlen_q)
    grid = lambda meta: (triton.cdiv(max_seqlen_q, meta["BLOCK_M"]), B * H)
    _flash_attention_kernel[grid](
        q, k, v, out, cu_seqlens_q, cu_seqlens_k, float(scale) * LOG2E, H, H // Hk,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        bucket, D=D, BLOCK_D=max(16, next_pow2(D)), CAUSAL=bool(causal),
        DOT_PREC="ieee" if q.dtype == torch.float32 else None)
    return out
