"""W4A16 GEMM for AWQ weights (GEMM packing, group 128, zero point): y = x @ ((q - z) * s) + b.

One program computes a BLOCK_M x BLOCK_N tile of y, walking K in BLOCK_K steps (BLOCK_K divides the group size,
so a step reads one row of zeros / scales). The 4-bit weights are dequantized in registers: column n of the tile
reads int32 word n // 8 of its row and takes the nibble AWQ's order [0, 2, 4, 6, 1, 3, 5, 7] put it in
(shift 4 * ((n % 2) * 4 + (n % 8) // 2)). Accumulation in fp32; y in x's dtype. Decode (M small) uses the same
tiles with BLOCK_M 16; a split-K GEMV path is not written yet.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._tuning import INTERPRET


@triton.jit
def _awq_gemm_kernel(x_ptr, qw_ptr, qz_ptr, s_ptr, b_ptr, y_ptr, M, N, K,
                     GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    n_mask = rn < N
    n8 = N // 8
    shift = ((rn % 2) * 4 + (rn % 8) // 2) * 4
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk
        k_mask = k < K
        x = tl.load(x_ptr + rm[:, None].to(tl.int64) * K + k[None, :],
                    mask=(rm[:, None] < M) & k_mask[None, :], other=0.0).to(tl.float32)
        wmask = k_mask[:, None] & n_mask[None, :]
        words = tl.load(qw_ptr + k[:, None].to(tl.int64) * n8 + (rn // 8)[None, :], mask=wmask, other=0)
        q = (words >> shift[None, :]) & 0xF
        g = k0 // GROUP
        zw = tl.load(qz_ptr + g * n8 + rn // 8, mask=n_mask, other=0)
        z = (zw >> shift) & 0xF
        s = tl.load(s_ptr + g * N + rn, mask=n_mask, other=0.0).to(tl.float32)
        w = (q - z[None, :]).to(tl.float32) * s[None, :]
        acc += tl.dot(x, w, input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y_mask = (rm[:, None] < M) & n_mask[None, :]
    tl.store(y_ptr + rm[:, None].to(tl.int64) * N + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=y_mask)


def awq_gemm(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
             bias: torch.Tensor | None = None, group_size: int = 128) -> torch.Tensor:
    """x [M, K] (contiguous) -> y [M, N] in x's dtype (the op contract; checks ran before)."""
    m, k = x.shape
    n = scales.shape[1]
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    if m == 0:
        return y
    block_m = 16 if m <= 16 else (32 if INTERPRET else 64)
    block_n = 32 if INTERPRET else 64
    block_k = 32
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _awq_gemm_kernel[grid](x, qweight, qzeros, scales, bias if bias is not None else scales, y, m, n, k,
                           GROUP=group_size, HAS_BIAS=bias is not None,
                           BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return y
