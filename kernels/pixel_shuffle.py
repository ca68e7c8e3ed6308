"""InternVL pixel shuffle (space-to-depth): [N, S*S, C] -> [N, (S/r)^2, C*r*r] with r = 1/scale.

out[n, i*(S/r) + j, (di*r + dj)*C + c] = F[n, (i*r + di)*S + j*r + dj, c]  (di outer, dj inner; spec section 3,
the same element order as InternVL's reshape/permute pair followed by its final transpose for scale 0.5).
A pure gather-copy: each program owns a tile of output rows x output channels, so stores are contiguous and each
run of C output channels reads one contiguous input row.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._tuning import INTERPRET, next_pow2


@triton.jit
def _pixel_shuffle_kernel(f_ptr, o_ptr, n_out_rows, S, So, C, C_out, stride_fn, stride_fr,
                          R: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    n = tl.program_id(2)
    o = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)           # output row = i*So + j
    col = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)          # output channel = (di*R + dj)*C + c
    i = o // So
    j = o % So
    q = col // C
    c = col % C
    di = q // R
    dj = q % R
    src_row = (i[:, None] * R + di[None, :]) * S + j[:, None] * R + dj[None, :]
    mask = (o[:, None] < n_out_rows) & (col[None, :] < C_out)
    src = f_ptr + n.to(tl.int64) * stride_fn + src_row.to(tl.int64) * stride_fr + c[None, :]
    vals = tl.load(src, mask=mask)
    dst = o_ptr + n.to(tl.int64) * n_out_rows * C_out + o[:, None].to(tl.int64) * C_out + col[None, :]
    tl.store(dst, vals, mask=mask)


def pixel_shuffle(features, scale=0.5):
    if features.dim() != 3:
        raise ValueError(f"pixel_shuffle: features must be [N, S*S, C], got {tuple(features.shape)}")
    if features.stride(-1) != 1:
        raise ValueError("pixel_shuffle: features.stride(-1) must be 1")
    n, hw, c = features.shape
    s = int(round(hw ** 0.5))
    r = int(round(1 / scale))
    if s * s != hw or r < 1 or abs(r * scale - 1) > 1e-6 or s % r:
        raise ValueError(f"pixel_shuffle: need a square S*S grid with S divisible by 1/scale (S*S={hw}, scale={scale})")
    so = s // r
    c_out = c * r * r
    out = torch.empty((n, so * so, c_out), dtype=features.dtype, device=features.device)
    if out.numel() == 0:
        return out
    block_c = min(next_pow2(c_out), 4096 if INTERPRET else 256)
    block_r = min(next_pow2(so * so), 64 if INTERPRET else 16)
    grid = (triton.cdiv(so * so, block_r), triton.cdiv(c_out, block_c), n)
    _pixel_shuffle_kernel[grid](features, out, so * so, s, so, c, c_out, features.stride(0), features.stride(1),
                                R=r, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4)
    return out
