"""Marshalling for the C++ extension's launchers (csrc/ops.h): tensors become addresses, sizes and token strides.
The `cpp` backend binds it to `_C.cpu` (CPU tensors) and the `cuda` backend to `_C.cuda` (CUDA tensors, launched
on torch's current stream so that CUDA graphs capture them). Arguments were validated by ops.checks already;
what is checked here is only what differs between the two targets. The extension itself is imported here alone
(load_extension), for the whole package."""
from __future__ import annotations

import functools
import importlib

import torch

from ..errors import BackendError
from .checks import fail

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@functools.cache
def load_extension():
    """(module, None) or (None, why it is unavailable): the one place the package imports its C++ extension (the
    kernel backends here, the processor's image resize, `internvl-engine info`)."""
    try:
        return importlib.import_module("internvl_engine._C"), None
    except ImportError as e:
        return None, (f"the C++ extension internvl_engine._C is not built or does not load ({e}); "
                      "reinstall with `pip install -e .`")


class ExtensionOps:
    """The contract's ops over one launcher table. `device_type` is "cpu" or "cuda"; CUDA launchers get the
    stream as an extra last argument, and split-KV decode a workspace."""

    def __init__(self, lib, device_type: str, backend: str, head_dims=None, cuda_abi: bool | None = None,
                 num_splits: int | None = None):
        # cuda_abi: the launchers take a stream (and paged_attention a split-KV workspace). It is also set for CPU
        # tensors when `lib` is the CUDA source compiled for the host by tests/cuda_emu (stream 0).
        self.lib, self.device_type, self.backend, self.head_dims = lib, device_type, backend, head_dims
        self.cuda_abi = device_type == "cuda" if cuda_abi is None else cuda_abi
        self.num_splits = num_splits  # None: num_kv_splits decides

    def _target(self, op, t, head_dim=None):
        """The launcher's trailing arguments (the stream for the CUDA ABI); the dispatcher checked the device."""
        if head_dim is not None and self.head_dims is not None and head_dim not in self.head_dims:
            fail(op, f"backend {self.backend!r} supports head dims {sorted(self.head_dims)}, got {head_dim}")
        if not self.cuda_abi:
            return ()
        return (torch.cuda.current_stream(t.device).cuda_stream if t.device.type == "cuda" else 0,)

    def rms_norm(self, x, weight, eps, residual=None):
        stream = self._target("rms_norm", x)
        out = torch.empty_like(x)
        res_out = None if residual is None else torch.empty_like(x)
        if x.numel():
            self.lib.rms_norm(out.data_ptr(), 0 if res_out is None else res_out.data_ptr(), x.data_ptr(),
                              0 if residual is None else residual.data_ptr(), weight.data_ptr(),
                              x.numel() // x.shape[-1], x.shape[-1], float(eps), DTYPE_CODES[x.dtype], *stream)
        return out if residual is None else (out, res_out)

    def layer_norm(self, x, weight, bias, eps):
        stream = self._target("layer_norm", x)
        out = torch.empty_like(x)
        if x.numel():
            self.lib.layer_norm(out.data_ptr(), x.data_ptr(), weight.data_ptr(), 0 if bias is None else bias.data_ptr(),
                                x.numel() // x.shape[-1], x.shape[-1], float(eps), DTYPE_CODES[x.dtype], *stream)
        return out

    def pixel_shuffle(self, features, scale=0.5):
        stream = self._target("pixel_shuffle", features)
        n, hw, c = features.shape
        r, side = round(1 / scale), round(hw ** 0.5)
        out = features.new_empty(n, hw // (r * r), c * r * r)
        if features.numel():
            self.lib.pixel_shuffle(out.data_ptr(), features.data_ptr(), n, side, c, r, DTYPE_CODES[features.dtype],
                                   *stream)
        return out

    def rotary(self, q, k, positions, cos_sin):
        stream = self._target("rotary", q)
        if self.device_type == "cpu" and positions.numel() and (positions.min() < 0 or positions.max() >= cos_sin.shape[0]):
            fail("rotary", f"positions must lie in [0, {cos_sin.shape[0]}) (the rows of cos_sin)")
        if q.shape[0]:
            self.lib.rotary(q.data_ptr(), k.data_ptr(), positions.data_ptr(), cos_sin.data_ptr(), q.shape[0],
                            q.shape[1], k.shape[1], q.shape[2], q.stride(0), k.stride(0), DTYPE_CODES[q.dtype],
                            *stream)
        return q, k

    def write_kv_cache(self, k, v, k_cache, v_cache, slot_mapping):
        stream = self._target("write_kv_cache", k)
        slots = k_cache.shape[0] * k_cache.shape[1]
        if self.device_type == "cpu" and slot_mapping.numel() and slot_mapping.max() >= slots:
            fail("write_kv_cache", f"slot_mapping holds a slot >= {slots}, the cache's capacity")
        if k.shape[0]:
            self.lib.write_kv_cache(k_cache.data_ptr(), v_cache.data_ptr(), k.data_ptr(), v.data_ptr(),
                                    slot_mapping.data_ptr(), k.shape[0], k.shape[1], k.shape[2], k.stride(0),
                                    v.stride(0), k_cache.shape[1], DTYPE_CODES[k.dtype], *stream)

    def flash_attention(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale):
        stream = self._target("flash_attention", q, q.shape[2])
        if self.device_type == "cpu":
            _check_cu_seqlens(cu_seqlens_q, q.shape[0], "q")
            _check_cu_seqlens(cu_seqlens_k, k.shape[0], "k")
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        if q.shape[0]:
            self.lib.flash_attention(out.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(), cu_seqlens_q.data_ptr(),
                                     cu_seqlens_k.data_ptr(), cu_seqlens_q.shape[0] - 1, int(max_seqlen_q),
                                     int(max_seqlen_k), q.shape[1], k.shape[1], q.shape[2], q.stride(0), k.stride(0),
                                     v.stride(0), bool(causal), float(scale), DTYPE_CODES[q.dtype], *stream)
        return out

    def paged_attention(self, q, k_cache, v_cache, block_tables, seq_lens, scale):
        stream = self._target("paged_attention", q, q.shape[2])
        b, h, d = q.shape
        num_blocks, block_size = k_cache.shape[:2]
        if self.device_type == "cpu":
            _check_block_tables(block_tables, seq_lens, num_blocks, block_size)
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        if b == 0:
            return out
        args = (out.data_ptr(), q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), block_tables.data_ptr(),
                seq_lens.data_ptr(), b, h, k_cache.shape[2], d, q.stride(0), block_size, block_tables.shape[1],
                float(scale), DTYPE_CODES[q.dtype])
        if not self.cuda_abi:
            self.lib.paged_attention(*args)
            return out
        splits = self.num_splits or num_kv_splits(block_tables.shape[1] * block_size)
        work = torch.empty(b * h * splits * (d + 2), dtype=torch.float32, device=q.device) if splits > 1 else None
        self.lib.paged_attention(*args, 0 if work is None else work.data_ptr(), splits, *stream)
        return out

    def fused_moe(self, x, w13, w2, topk_weights, topk_ids):
        # CPU launcher only (csrc/cpu/fused_moe.cpp): ids out of range raise here, typed, as the torch backend's do
        self._target("fused_moe", x)
        e = w13.shape[0]
        if topk_ids.numel() and (topk_ids.min() < 0 or topk_ids.max() >= e):
            fail("fused_moe", f"topk_ids must lie in [0, {e}) (the experts of w13)")
        y = torch.empty_like(x)
        if x.shape[0]:
            self.lib.fused_moe(y.data_ptr(), x.data_ptr(), w13.data_ptr(), w2.data_ptr(), topk_weights.data_ptr(),
                               topk_ids.data_ptr(), x.shape[0], x.shape[1], w2.shape[2], e, topk_ids.shape[1],
                               topk_ids.dtype == torch.int64, DTYPE_CODES[x.dtype])
        return y


def num_kv_splits(capacity: int) -> int:
    """Split-KV decode: one split per PAGED_SPLIT_TOKENS (csrc/ops.h) of block-table capacity. The
    partition depends on neither the batch nor seq_lens (that would need a sync), so a sequence's output is the
    same in any batch; splits past a sequence's length exit at once."""
    return max(1, -(-capacity // paged_split_tokens()))


def paged_split_tokens() -> int:
    """Tokens of block-table capacity per split of split-KV decode: PAGED_SPLIT_TOKENS of csrc/ops.h, which the
    extension exports; the CUDA kernel and the Triton one (handed it by triton_ops) split alike."""
    ext, why = load_extension()
    if ext is None:
        raise BackendError(why)
    return ext.PAGED_SPLIT_TOKENS


def _check_cu_seqlens(cu, total, name):
    c = cu.tolist()
    if c[0] != 0 or c[-1] != total or any(b < a for a, b in zip(c, c[1:])):
        fail("flash_attention", f"cu_seqlens_{name} must rise from 0 to the {total} packed tokens, got {c}")


def _check_block_tables(block_tables, seq_lens, num_blocks, block_size):
    op = "paged_attention"
    if seq_lens.numel() == 0:
        return
    if seq_lens.min() < 0 or seq_lens.max() > block_tables.shape[1] * block_size:
        fail(op, f"seq_lens must lie in [0, {block_tables.shape[1] * block_size}] (block table capacity)")
    used = torch.arange(block_tables.shape[1])[None, :] < (seq_lens[:, None] + block_size - 1) // block_size
    bad = used & ((block_tables < 0) | (block_tables >= num_blocks))
    if bad.any():
        fail(op, f"block_tables reference blocks outside [0, {num_blocks}) within seq_lens")
