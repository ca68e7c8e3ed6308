"""The `cpp` backend: the C++ extension's CPU kernels (csrc/cpu/, OpenMP), for CPU tensors."""
from __future__ import annotations

from .decode_ops import composed
from .ext_ops import ExtensionOps, load_extension

_C, _why = load_extension()


def unavailable() -> str | None:
    return _why


if _C is not None:
    _ops = ExtensionOps(_C.cpu, "cpu", "cpp")
    rms_norm, layer_norm, pixel_shuffle, rotary = _ops.rms_norm, _ops.layer_norm, _ops.pixel_shuffle, _ops.rotary
    write_kv_cache, flash_attention, paged_attention = _ops.write_kv_cache, _ops.flash_attention, _ops.paged_attention
    fused_moe = _ops.fused_moe  # csrc/cpu/fused_moe.cpp
    # the fused-decode ops over this backend's own element-wise and attention kernels (decode_ops.py)
    decode_qkv, decode_attention_o, decode_gemv_residual, decode_gate_up = composed(
        _ops.rms_norm, _ops.rotary, _ops.write_kv_cache, _ops.paged_attention)

from .quant_ops import awq_gemm, fp8_gemm  # noqa: E402,F401  no C++ kernel: dequantize, then matmul
