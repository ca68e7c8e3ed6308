"""Scatter new K/V rows into the paged cache.

Token t goes to slot_mapping[t] = block * block_size + offset; caches are contiguous [num_blocks, block_size, Hk, D]
so that slot addresses row slot * Hk * D directly (int64: caches can exceed 2^31 elements). slot < 0 marks padding
tokens that must not be written. Each program copies BLOCK_T tokens x BLOCK_C of the flattened (head, dim) columns.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._tuning import token_col_tiles


@triton.jit
def _write_kv_cache_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, T, n_cols,
                           stride_kt, stride_kh, stride_vt, stride_vh,
                           D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    col = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)          # col = head * D + d
    h = col // D
    d = col % D
    slot = tl.load(slot_ptr + t, mask=t < T, other=-1).to(tl.int64)
    mask = ((t < T) & (slot >= 0))[:, None] & (col[None, :] < n_cols)
    t64 = t[:, None].to(tl.int64)
    kv = tl.load(k_ptr + t64 * stride_kt + h[None, :] * stride_kh + d[None, :], mask=mask)
    vv = tl.load(v_ptr + t64 * stride_vt + h[None, :] * stride_vh + d[None, :], mask=mask)
    dst = slot[:, None] * n_cols + col[None, :]
    tl.store(kc_ptr + dst, kv, mask=mask)
    tl.store(vc_ptr + dst, vv, mask=mask)


def write_kv_cache(k, v, k_cache, v_cache, slot_mapping):
    if k.dim() != 3 or k.shape != v.shape:
        raise ValueError(f"write_kv_cache: k/v must be [T, Hk, D] of equal shape, got {tuple(k.shape)}, {tuple(v.shape)}")
    T, Hk, D = k.shape
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape or tuple(k_cache.shape[2:]) != (Hk, D):
        raise ValueError(f"write_kv_cache: caches must be [num_blocks, block_size, {Hk}, {D}], "
                         f"got {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("write_kv_cache: caches must be contiguous")
    if not (k.dtype == v.dtype == k_cache.dtype == v_cache.dtype):
        raise ValueError(f"write_kv_cache: dtype mismatch {k.dtype}/{v.dtype}/{k_cache.dtype}/{v_cache.dtype}")
    if k.stride(2) != 1 or v.stride(2) != 1:
        raise ValueError("write_kv_cache: k/v must have stride(-1) == 1")
    if slot_mapping.dtype not in (torch.int64, torch.int32) or slot_mapping.shape != (T,):
        raise ValueError(f"write_kv_cache: slot_mapping must be int64 [T], got {slot_mapping.dtype} "
                         f"{tuple(slot_mapping.shape)}")
    n_cols = Hk * D
    if T == 0 or n_cols == 0:
        return
    block_t, block_c, grid = token_col_tiles(T, n_cols, 512)
    _write_kv_cache_kernel[grid](k, v, k_cache, v_cache, slot_mapping, T, n_cols,
                                 k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                                 D=D, BLOCK_T=block_t, BLOCK_C=block_c, num_warps=4)
