"""The `cuda` backend: the C++ extension's CUDA kernels (csrc/cuda/), for CUDA tensors, launched on torch's
current stream."""
from __future__ import annotations

import torch

from .decode_ops import composed
from .ext_ops import ExtensionOps, load_extension

_C, _why = load_extension()
HEAD_DIMS = (16, 32, 64, 128)  # the head dims csrc/cuda instantiates


def unavailable() -> str | None:
    if _C is None:
        return _why
    if not getattr(_C, "CUDA_KERNELS", False):
        return ("internvl_engine._C was built without CUDA kernels (nvcc was not found or INTERNVL_ENGINE_CUDA=0); "
                "rebuild with nvcc on PATH")
    if not torch.cuda.is_available():
        return "no CUDA device is visible to torch"
    return None


if _C is not None and getattr(_C, "CUDA_KERNELS", False):
    _ops = ExtensionOps(_C.cuda, "cuda", "cuda", head_dims=HEAD_DIMS)
    rms_norm, layer_norm, pixel_shuffle, rotary = _ops.rms_norm, _ops.layer_norm, _ops.pixel_shuffle, _ops.rotary
    write_kv_cache, flash_attention, paged_attention = _ops.write_kv_cache, _ops.flash_attention, _ops.paged_attention
    # the fused-decode ops over this backend's own element-wise and attention kernels (decode_ops.py)
    decode_qkv, decode_attention_o, decode_gemv_residual, decode_gate_up = composed(
        _ops.rms_norm, _ops.rotary, _ops.write_kv_cache, _ops.paged_attention)

from .quant_ops import awq_gemm, fp8_gemm  # noqa: E402,F401  no CUDA kernel yet: dequantize, then matmul (FP8: _scaled_mm)
from .moe_ops import fused_moe  # noqa: E402,F401  no CUDA kernel: torch's ops grouped by expert (host sync)
