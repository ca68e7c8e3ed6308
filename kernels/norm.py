"""RMSNorm (with optional fused residual add) and LayerNorm.

One program normalises BLOCK_R rows of C channels held whole in registers (BLOCK_C = next_pow2(C), tail masked):
the row reductions need every channel anyway and C <= 8192 for every InternVL3 size. Several rows per program
amortise launch/loop overhead for small C (vision tower C=1024, tiny test models C of a few hundred).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._tuning import INTERPRET, next_pow2, to_dtype

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, y_ptr, xo_ptr, n_rows, C, eps,
                     HAS_RES: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < C)
    offs = rows[:, None].to(tl.int64) * C + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    if HAS_RES:
        # Qwen2 decoder: hidden = (hidden + residual) in the activation dtype, and that rounded sum is both the
        # new residual stream and the norm's input.
        r = tl.load(res_ptr + offs, mask=mask, other=0.0)
        x = to_dtype(x.to(tl.float32) + r.to(tl.float32), x.dtype)
        tl.store(xo_ptr + offs, x, mask=mask)
    xf = x.to(tl.float32)
    inv = tl.rsqrt(tl.sum(xf * xf, axis=1) / C + eps)
    # transformers' Qwen2RMSNorm rounds the normalised value to the activation dtype before the weight multiply;
    # the product is then rounded again (torch low-precision elementwise = fp32 compute, one rounding).
    yn = to_dtype(xf * inv[:, None], x.dtype)
    w = tl.load(w_ptr + cols, mask=cols < C, other=0.0)
    y = to_dtype(w.to(tl.float32)[None, :] * yn.to(tl.float32), x.dtype)
    tl.store(y_ptr + offs, y, mask=mask)


@triton.jit
def _layer_norm_kernel(x_ptr, w_ptr, b_ptr, y_ptr, n_rows, C, eps,
                       HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    mask = (rows[:, None] < n_rows) & cmask[None, :]
    offs = rows[:, None].to(tl.int64) * C + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / C
    # Two-pass (centred) variance, biased like torch.nn.functional.layer_norm; padded lanes must not contribute.
    xc = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / C
    y = xc * tl.rsqrt(var + eps)[:, None]
    y = y * tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y = y + tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs, to_dtype(y, y_ptr.dtype.element_ty), mask=mask)


def _row_blocks(n_rows, C):
    block_c = next_pow2(C)
    # ~4K elements per program on a GPU keeps registers in check; the interpreter prefers few, large programs.
    budget = 65536 if INTERPRET else 4096
    block_r = max(1, min(next_pow2(max(n_rows, 1)), budget // block_c))
    num_warps = 4 if block_c * block_r <= 4096 else 8
    return block_r, block_c, num_warps


def _check(x, weight, name):
    if x.dtype not in _DTYPES:
        raise ValueError(f"{name}: unsupported dtype {x.dtype}")
    if x.dim() < 1 or not x.is_contiguous():
        raise ValueError(f"{name}: x must be a contiguous [..., C] tensor")
    if weight.shape != x.shape[-1:]:
        raise ValueError(f"{name}: weight shape {tuple(weight.shape)} != ({x.shape[-1]},)")
    if not weight.is_contiguous():
        raise ValueError(f"{name}: weight must be contiguous")


def rms_norm(x, weight, eps, residual=None):
    _check(x, weight, "rms_norm")
    if weight.dtype != x.dtype:
        raise ValueError(f"rms_norm: weight dtype {weight.dtype} != x dtype {x.dtype}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype
                                 or not residual.is_contiguous()):
        raise ValueError("rms_norm: residual must be a contiguous tensor with x's shape and dtype")
    C = x.shape[-1]
    n_rows = x.numel() // C if C else 0
    y = torch.empty_like(x)
    xo = torch.empty_like(x) if residual is not None else y
    if n_rows and C:
        br, bc, nw = _row_blocks(n_rows, C)
        _rms_norm_kernel[(triton.cdiv(n_rows, br),)](
            x, residual if residual is not None else x, weight, y, xo, n_rows, C, float(eps),
            HAS_RES=residual is not None, BLOCK_R=br, BLOCK_C=bc, num_warps=nw)
    return y if residual is None else (y, xo)


def layer_norm(x, weight, bias, eps):
    _check(x, weight, "layer_norm")
    if bias is not None and (bias.shape != weight.shape or not bias.is_contiguous()):
        raise ValueError(f"layer_norm: bias shape {tuple(bias.shape)} != ({x.shape[-1]},)")
    C = x.shape[-1]
    n_rows = x.numel() // C if C else 0
    y = torch.empty_like(x)
    if n_rows and C:
        br, bc, nw = _row_blocks(n_rows, C)
        _layer_norm_kernel[(triton.cdiv(n_rows, br),)](
            x, weight, bias if bias is not None else weight, y, n_rows, C, float(eps),
            HAS_BIAS=bias is not None, BLOCK_R=br, BLOCK_C=bc, num_warps=nw)
    return y
