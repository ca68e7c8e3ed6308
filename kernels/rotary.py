"""NeoX-style (rotate-half) rotary embedding, applied in place to q and k.

With half = D/2, cos/sin = cos_sin[pos, :half], cos_sin[pos, half:]:
    out[:half] = x1*cos - x2*sin,   out[half:] = x2*cos + x1*sin      (x1 = x[:half], x2 = x[half:])
computed in fp32, rounded once. q/k are usually column slices of the fused qkv projection output, so the token
stride is arbitrary and results are written through the view. Each program owns BLOCK_T tokens x BLOCK_C of the
flattened (head, half-dim) columns, so cos/sin rows are loaded once per token for all heads.
Not autotuned: the kernel reads and writes the same memory, which autotuning benchmarks would corrupt.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._tuning import to_dtype, token_col_tiles


@triton.jit
def _rotary_kernel(x_ptr, pos_ptr, cs_ptr, T, n_cols, stride_t, stride_h, stride_cs,
                   HALF: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    col = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)          # col = head * HALF + d
    h = col // HALF
    d = col % HALF
    tmask = t < T
    mask = tmask[:, None] & (col[None, :] < n_cols)
    pos = tl.load(pos_ptr + t, mask=tmask, other=0).to(tl.int64)
    cs = cs_ptr + pos[:, None] * stride_cs + d[None, :]
    cos = tl.load(cs, mask=mask, other=0.0).to(tl.float32)
    sin = tl.load(cs + HALF, mask=mask, other=0.0).to(tl.float32)
    p1 = x_ptr + t[:, None].to(tl.int64) * stride_t + h[None, :] * stride_h + d[None, :]
    x1 = tl.load(p1, mask=mask, other=0.0)
    x2 = tl.load(p1 + HALF, mask=mask, other=0.0)
    x1f = x1.to(tl.float32)
    x2f = x2.to(tl.float32)
    tl.store(p1, to_dtype(x1f * cos - x2f * sin, x1.dtype), mask=mask)
    tl.store(p1 + HALF, to_dtype(x2f * cos + x1f * sin, x1.dtype), mask=mask)


def _launch(x, positions, cos_sin):
    T, H, D = x.shape
    half = D // 2
    n_cols = H * half
    if T == 0 or n_cols == 0:
        return
    block_t, block_c, grid = token_col_tiles(T, n_cols, 256)
    _rotary_kernel[grid](x, positions, cos_sin, T, n_cols, x.stride(0), x.stride(1), cos_sin.stride(0),
                         HALF=half, BLOCK_T=block_t, BLOCK_C=block_c, num_warps=4)


def rotary(q, k, positions, cos_sin):
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"rotary: q [T, H, D] and k [T, Hk, D] mismatch: {tuple(q.shape)} vs {tuple(k.shape)}")
    T, _, D = q.shape
    if D % 2 or D > 256:
        raise ValueError(f"rotary: head dim must be even and <= 256, got {D}")
    if q.dtype != k.dtype or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"rotary: q/k dtypes {q.dtype}/{k.dtype} unsupported or different")
    for name, x in (("q", q), ("k", k)):
        if x.stride(2) != 1:
            raise ValueError(f"rotary: {name} must have stride(-1) == 1, got strides {x.stride()}")
    if positions.dtype not in (torch.int64, torch.int32) or positions.shape != (T,):
        raise ValueError(f"rotary: positions must be int64 [T], got {positions.dtype} {tuple(positions.shape)}")
    if cos_sin.dim() != 2 or cos_sin.shape[1] != D or cos_sin.stride(1) != 1 or cos_sin.dtype != torch.float32:
        raise ValueError(f"rotary: cos_sin must be fp32 [P, {D}] with unit column stride")
    _launch(q, positions, cos_sin)
    _launch(k, positions, cos_sin)
    return q, k
