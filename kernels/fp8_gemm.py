"""FP8 W8A8 GEMM (compressed-tensors FP8_DYNAMIC): y = (xq * sx) @ (w * ws)^T + b, as ops.fp8_gemm_ref.

Two kernels:
1. _quant_rows_kernel, one program per token: sx = max(amax|x| / 448, 1e-12), xq = e4m3(clamp(x / sx, +-448)),
   bit-exact with torch's `.to(torch.float8_e4m3fn)`: both divisions are IEEE-rounded (tl.math.div_rn; Triton's
   `/` need not round correctly on a GPU) and the fp32 -> e4m3 rounding is written out in integer arithmetic
   (_e4m3_bits). It stores the codes as uint8. Why not a cast: the interpreter's fp32 -> float8e4nv cast is wrong
   (triton 3.8, a sweep of 0.5M values: 2% of those in the normal range came out one step high or a binade low,
   16% of those in the subnormal range wrong; its float8 loads decode all 254 finite codes right), and GPUs below
   sm89 have no float8e4nv type at all.
2. _fp8_gemm_kernel, tiled like a plain GEMM over xq [M, K] and w [N, K] (K-contiguous, the layout sm90's FP8
   tensor cores read), fp32 accumulator, then y = acc * sx[m] * ws[n] (+ b) in x's dtype. With FP8_DOT (CUDA,
   capability >= 8.9) the dot takes the e4m3 operands as they are; sm90 accumulates FP8 products in reduced
   precision inside one instruction, so max_num_imprecise_acc=32 makes Triton add every 32-deep instruction into
   the fp32 accumulator (Triton's sm90 default, 2^30, never does). Otherwise, and by default under the
   interpreter (so the CPU tests run what sm80 runs), both operands arrive as uint8 and _e4m3_to_f16 decodes them
   exactly to fp16 in registers; products of e4m3 values are exact in the dot's fp32 accumulator. The tests also
   run the float8 path under the interpreter (fp8_gemm(fp8_dot=True)): its float8 loads and dot are right.
Neither kernel has been run on a GPU, nor tuned (fixed tiles below). Codes 0x7F / 0xFF (NaN) decode as +-480 in
the fp16 path; FP8_DYNAMIC weights hold no NaN.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._tuning import INTERPRET, to_dtype

@triton.jit
def _e4m3_bits(v):
    """fp32 v with |v| <= 448 -> float8_e4m3fn bit pattern (uint8), rounded to nearest even."""
    bits = v.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 0x80
    mag = bits & 0x7FFFFFFF
    a = mag.to(tl.float32, bitcast=True)
    # normal (|v| >= 2^-6): keep 3 of fp32's 23 mantissa bits, nearest even (add 0x7FFFF plus the lowest kept bit;
    # a carry moves into the exponent), and rebias the exponent from 127 to 7: (127 - 7) << 3 = 960
    normal = ((mag + 0x7FFFF + ((mag >> 20) & 1)) >> 20) - 960
    # subnormal: |v| in units of 2^-9 (0..8; 8 is 2^-6, the smallest normal's code), rounded to nearest even by the
    # fp32 add itself: next to 2^23 the fp32 spacing is exactly 1 (a * 512 is exact, so an fma changes nothing)
    sub = (a * 512.0 + 8388608.0).to(tl.int32, bitcast=True) - 0x4B000000
    return (tl.where(a < 0.015625, sub, normal) | sign).to(tl.uint8)


@triton.jit
def _e4m3_to_f16(code):
    """uint8 e4m3 codes -> fp16, exactly: the sign to bit 15, exponent and mantissa under fp16's (bits 7..14), then
    times 2^8 for the bias difference (15 - 7); e4m3 subnormals land on fp16 subnormals, so they decode too."""
    c = code.to(tl.uint16)
    h = (((c & 0x80) << 8) | ((c & 0x7F) << 7)).to(tl.uint16).to(tl.float16, bitcast=True)
    return (h * 256.0).to(tl.float16)


@triton.jit
def _quant_rows_kernel(x_ptr, q_ptr, s_ptr, K, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    rk = tl.arange(0, BLOCK_K)
    amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_ptr + row * K + k0 + rk, mask=k0 + rk < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    sx = tl.maximum(tl.math.div_rn(tl.max(amax, 0), 448.0), 1e-12)
    tl.store(s_ptr + row, sx)
    for k0 in range(0, K, BLOCK_K):
        mask = k0 + rk < K
        x = tl.load(x_ptr + row * K + k0 + rk, mask=mask, other=0.0).to(tl.float32)
        v = tl.minimum(tl.maximum(tl.math.div_rn(x, sx), -448.0), 448.0)
        tl.store(q_ptr + row * K + k0 + rk, _e4m3_bits(v), mask=mask)


@triton.jit
def _fp8_gemm_kernel(xq_ptr, sx_ptr, w_ptr, ws_ptr, b_ptr, y_ptr, M, N, K,
                     HAS_BIAS: tl.constexpr, FP8_DOT: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_mask, n_mask = rm < M, rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk
        k_mask = k < K
        a = tl.load(xq_ptr + rm[:, None].to(tl.int64) * K + k[None, :], mask=m_mask[:, None] & k_mask[None, :],
                    other=0.0)
        b = tl.load(w_ptr + rn[None, :].to(tl.int64) * K + k[:, None], mask=k_mask[:, None] & n_mask[None, :],
                    other=0.0)                                       # [BLOCK_K, BLOCK_N] of w^T
        if FP8_DOT:
            acc = tl.dot(a, b, acc, max_num_imprecise_acc=32)
        else:
            acc = tl.dot(_e4m3_to_f16(a), _e4m3_to_f16(b), acc)
    sx = tl.load(sx_ptr + rm, mask=m_mask, other=0.0)
    ws = tl.load(ws_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)
    y = acc * sx[:, None] * ws[None, :]
    if HAS_BIAS:
        y += tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None].to(tl.int64) * N + rn[None, :], to_dtype(y, y_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


def fp8_dot_supported(device: torch.device) -> bool:
    """tl.dot on float8e4nv operands: CUDA capability 8.9 (Ada) and newer; never under the interpreter."""
    return not INTERPRET and device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def path(device: torch.device) -> str:
    """Which dot the GEMM runs on this device (benchmark records name it)."""
    return "fp8 dot" if fp8_dot_supported(device) else "fp16 dot on e4m3 decoded in registers"


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3 codes [M, K] uint8, per-token scales [M] fp32), as fp8_gemm_ref quantizes x."""
    m, k = x.shape
    codes = torch.empty(m, k, device=x.device, dtype=torch.uint8)
    scales = torch.empty(m, device=x.device, dtype=torch.float32)
    if m:
        _quant_rows_kernel[(m,)](x, codes, scales, k, BLOCK_K=min(triton.next_power_of_2(k), 1024))
    return codes, scales


def fp8_gemm(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None,
             fp8_dot: bool | None = None) -> torch.Tensor:
    """x [M, K] (contiguous) -> y [M, N] in x's dtype (the op contract; checks ran before). `fp8_dot` overrides
    fp8_dot_supported() (tests: the interpreter runs float8 loads and dots too)."""
    m, k = x.shape
    n = weight.shape[0]
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    if m == 0:
        return y
    codes, sx = quantize_rows(x)
    fp8_dot = fp8_dot_supported(x.device) if fp8_dot is None else fp8_dot
    xq, w = (codes.view(torch.float8_e4m3fn), weight) if fp8_dot else (codes, weight.view(torch.uint8))
    block_m = 16 if m <= 16 else (32 if INTERPRET else 64)
    block_n, block_k = (32, 64) if INTERPRET else (128, 64)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _fp8_gemm_kernel[grid](xq, sx, w, weight_scale, bias if bias is not None else weight_scale, y, m, n, k,
                           HAS_BIAS=bias is not None, FP8_DOT=fp8_dot,
                           BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return y
