"""W4A16 GEMM for AWQ weights (GEMM packing, group 128, zero point): y = x @ ((q - z) * s) + b.

Packing: column n of the weight sits in int32 word n // 8 of its row, in the nibble AWQ's order [0, 2, 4, 6, 1, 3,
5, 7] put it in (shift 4 * ((n % 2) * 4 + (n % 8) // 2)). Both kernels dequantize in registers, accumulate in fp32
and write y in x's dtype (rounded to nearest even, also under the interpreter: _tuning.to_dtype).

Two paths, chosen by M (GEMV_MAX_M):
- tiled (prefill): one program per BLOCK_M x BLOCK_N tile of y walks all of K, group by group in BLOCK_K steps
  (BLOCK_K divides the group), with the zero point and scale factored out per group as below, so its dot runs on
  x's own dtype (tensor cores for bf16 / fp16; fp32 "ieee" for fp32 x and under the interpreter).
- split-K GEMV (decode, M <= 16): a program owns BLOCK_N outputs and a range of whole groups, so the grid is
  (N tiles, splits) instead of N tiles alone: at InternVL3-1B's q/k/v shape (N 1152) the tiled grid is 18 programs
  for 132 SMs. Each program reads its packed words once, as rows of BLOCK_N / 8 consecutive int32 (coalesced along
  N), and widens them to one word per column in registers. The zero point and scale are factored out of the inner
  loop, per group g:
      y[m, n] = sum_g s[g, n] * (sum_{k in g} x[m, k] q[k, n] - z[g, n] * sum_{k in g} x[m, k])
  so a weight costs a shift, a mask and a convert; q (0..15) is exact in bf16 / fp16, so the tensor-core dot (M
  padded to its minimum of 16 rows, which the weight stream dwarfs) rounds nothing but x's own dtype. Each split
  writes fp32 partials [split, M, N]; a second kernel sums them in split order (deterministic: no atomics), adds
  the bias and casts.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._tuning import INTERPRET, row_sum, to_dtype

# The GEMV path's dot tile holds 16 rows (tl.dot's minimum M), so up to 16 tokens both paths read each weight word
# once; the split-K grid has `split` times the programs. Above 16 the tiled kernel reuses a word across 64 rows.
GEMV_MAX_M = 16
_GEMV_BLOCK_M = 16
_GEMV_BLOCK_N = 128           # 16 packed words = 64 contiguous bytes per weight row and program
_H100_SMS = 132               # H100 / H200 SXM; the split count under the interpreter follows the same formula


@triton.jit
def _awq_gemm_kernel(x_ptr, qw_ptr, qz_ptr, s_ptr, b_ptr, y_ptr, M, N, K,
                     GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr, DOT_PREC: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_mask, n_mask = rm < M, rn < N
    n8 = N // 8
    shift = ((rn % 2) * 4 + (rn % 8) // 2) * 4
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g in range(0, K // GROUP):  # K % GROUP == 0 (ops/checks.py)
        xq = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)     # sum_k x q over the group, as the GEMV path
        xsum = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for kk in range(0, GROUP, BLOCK_K):
            k = g * GROUP + kk + rk
            x = tl.load(x_ptr + rm[:, None].to(tl.int64) * K + k[None, :], mask=m_mask[:, None], other=0.0)
            if DOT_F32:
                x = x.to(tl.float32)
            words = tl.load(qw_ptr + k[:, None].to(tl.int64) * n8 + (rn // 8)[None, :], mask=n_mask[None, :],
                            other=0)
            q = (words >> shift[None, :]) & 0xF
            xq = tl.dot(x, q.to(x.dtype), xq, input_precision=DOT_PREC)
            xsum += row_sum(x.to(tl.float32), 1)
        zw = tl.load(qz_ptr + g * n8 + rn // 8, mask=n_mask, other=0)
        z = ((zw >> shift) & 0xF).to(tl.float32)
        s = tl.load(s_ptr + g * N + rn, mask=n_mask, other=0.0).to(tl.float32)
        acc += s[None, :] * (xq - xsum[:, None] * z[None, :])
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y_mask = (rm[:, None] < M) & n_mask[None, :]
    tl.store(y_ptr + rm[:, None].to(tl.int64) * N + rn[None, :], to_dtype(acc, y_ptr.dtype.element_ty), mask=y_mask)


@triton.jit
def _one_word_per_column(words):
    """[..., C] packed words -> [..., 8 C], column j holding word j // 8 (register copies, no extra loads)."""
    words = tl.interleave(words, words)
    words = tl.interleave(words, words)
    return tl.interleave(words, words)


@triton.jit
def _awq_gemv_kernel(x_ptr, qw_ptr, qz_ptr, s_ptr, part_ptr, M, N, K, GROUPS_PER_SPLIT,
                     GROUP: tl.constexpr, DOT_F32: tl.constexpr, DOT_PREC: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n, split = tl.program_id(0), tl.program_id(1)
    n8 = N // 8
    rm = tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rc = pid_n * (BLOCK_N // 8) + tl.arange(0, BLOCK_N // 8)   # this tile's packed words along a row
    rk = tl.arange(0, BLOCK_K)
    m_mask, n_mask, c_mask = rm < M, rn < N, rc < n8            # N % 8 == 0: a word is all in or all out
    shift = ((rn % 2) * 4 + (rn % 8) // 2) * 4
    g_start = split * GROUPS_PER_SPLIT
    g_end = tl.minimum(g_start + GROUPS_PER_SPLIT, K // GROUP)
    part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g in range(g_start, g_end):
        xq = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)     # sum_k x q over the group
        xsum = tl.zeros((BLOCK_M,), dtype=tl.float32)           # sum_k x over the group
        for kk in range(0, GROUP, BLOCK_K):
            k = g * GROUP + kk + rk
            x = tl.load(x_ptr + rm[:, None] * K + k[None, :], mask=m_mask[:, None], other=0.0)
            if DOT_F32:
                x = x.to(tl.float32)
            words = tl.load(qw_ptr + k[:, None].to(tl.int64) * n8 + rc[None, :], mask=c_mask[None, :], other=0)
            q = (_one_word_per_column(words) >> shift[None, :]) & 0xF
            xq = tl.dot(x, q.to(x.dtype), xq, input_precision=DOT_PREC)
            xsum += row_sum(x.to(tl.float32), 1)
        zw = tl.load(qz_ptr + g * n8 + rc, mask=c_mask, other=0)
        z = ((_one_word_per_column(zw) >> shift) & 0xF).to(tl.float32)
        s = tl.load(s_ptr + g * N + rn, mask=n_mask, other=0.0).to(tl.float32)
        part += s[None, :] * (xq - xsum[:, None] * z[None, :])
    offs = (split * M + rm)[:, None].to(tl.int64) * N + rn[None, :]
    tl.store(part_ptr + offs, part, mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _split_sum_kernel(part_ptr, b_ptr, y_ptr, MN, N, SPLITS, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, SPLITS):
        acc += tl.load(part_ptr + s * MN + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, to_dtype(acc, y_ptr.dtype.element_ty), mask=mask)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return _H100_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def split_k(k: int, n: int, device: torch.device, group_size: int = 128) -> tuple[int, int]:
    """(splits, groups per split) of the GEMV path, from K and N only (never M, so a token's result does not depend
    on how many share its batch within the path):
        splits = clamp(ceil(2 * SMs / ceil(N / 128)), 1, groups // 2), then rounded so no split is empty.
    Two programs per SM (264 on an H100 / H200) hide load latency; at least two groups (256 rows of K) per split
    keep each program's loop long enough to pipeline and bound the fp32 partials, written and read back once, at
    16 M / K of the weight bytes per split, i.e. M / 16 of them at most (decode-sized partials stay in L2).
    InternVL3-1B: q/k/v (K 896, N 1152) 3 splits, gate/up (896, 9728) 3, down (4864, 896) 19."""
    groups = k // group_size
    n_tiles = triton.cdiv(n, _GEMV_BLOCK_N)
    splits = max(1, min(triton.cdiv(2 * _sm_count(device), n_tiles), groups // 2))
    per = triton.cdiv(groups, splits)
    return triton.cdiv(groups, per), per


def path(m: int, k: int, n: int, device: torch.device) -> str:
    """Which kernel awq_gemm runs for an [m, k] x [k, n] problem (benchmark records name it)."""
    if m > GEMV_MAX_M:
        return "tiled"
    return "gemv split_k={}".format(split_k(k, n, device)[0])


def awq_gemv(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
             bias: torch.Tensor | None = None, group_size: int = 128, splits: int | None = None) -> torch.Tensor:
    """The split-K path for any M <= GEMV_MAX_M; `splits` overrides split_k() (tests)."""
    m, k = x.shape
    n = scales.shape[1]
    if m > GEMV_MAX_M:
        raise ValueError(f"awq_gemv: M {m} > {GEMV_MAX_M} rows (one dot tile)")
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    if m == 0:
        return y
    groups = k // group_size
    if splits is None:
        splits, per = split_k(k, n, x.device, group_size)
    else:
        per = triton.cdiv(groups, splits)
        splits = triton.cdiv(groups, per)
    part = torch.empty(splits, m, n, device=x.device, dtype=torch.float32)
    # fp32 operands for fp32 x and under the interpreter (its bf16 dot multiplies raw bits: _tuning.py)
    dot_f32 = INTERPRET or x.dtype == torch.float32
    _awq_gemv_kernel[(triton.cdiv(n, _GEMV_BLOCK_N), splits)](
        x, qweight, qzeros, scales, part, m, n, k, per, GROUP=group_size, DOT_F32=dot_f32,
        DOT_PREC="ieee" if dot_f32 else None, BLOCK_M=_GEMV_BLOCK_M, BLOCK_N=_GEMV_BLOCK_N,
        BLOCK_K=64)
    block = 1024
    _split_sum_kernel[(triton.cdiv(m * n, block),)](part, bias if bias is not None else part, y, m * n, n, splits,
                                                    HAS_BIAS=bias is not None, BLOCK=block)
    return y


def awq_tiled(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
              bias: torch.Tensor | None = None, group_size: int = 128) -> torch.Tensor:
    """The tiled path for any M (benchmarks time it against the GEMV path below GEMV_MAX_M)."""
    m, k = x.shape
    n = scales.shape[1]
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    if m == 0:
        return y
    block_m = 16 if m <= 16 else (32 if INTERPRET else 64)
    block_n = 32 if INTERPRET else 64
    block_k = 32 if INTERPRET else 64
    dot_f32 = INTERPRET or x.dtype == torch.float32  # as the GEMV path: tensor cores on bf16 / fp16 x
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _awq_gemm_kernel[grid](x, qweight, qzeros, scales, bias if bias is not None else scales, y, m, n, k,
                           GROUP=group_size, HAS_BIAS=bias is not None, DOT_F32=dot_f32,
                           DOT_PREC="ieee" if dot_f32 else None,
                           BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return y


def awq_gemm(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
             bias: torch.Tensor | None = None, group_size: int = 128) -> torch.Tensor:
    """x [M, K] (contiguous) -> y [M, N] in x's dtype (the op contract; checks ran before)."""
    run = awq_gemv if 0 < x.shape[0] <= GEMV_MAX_M else awq_tiled
    return run(x, qweight, qzeros, scales, bias, group_size)
