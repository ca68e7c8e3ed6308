"""The quantized matmuls on backends without a kernel of their own (torch, cpp, cuda): dequantize, then one
matmul. AWQ: the dense weight in x's dtype (fp32 for fp32 activations, exactly the oracle). FP8: per-token dynamic
activation quantization, then the fp32 emulation (torch._scaled_mm on sm89+ GPUs is opt-in until a device run has
exercised it)."""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .ref import _awq_unpack_ref, fp8_gemm_ref, fp8_quantize_tokens


def awq_gemm(x, qweight, qzeros, scales, bias=None, group_size=128):
    q = _awq_unpack_ref(qweight)
    z = _awq_unpack_ref(qzeros).repeat_interleave(group_size, 0)
    dt = torch.float32 if x.dtype == torch.float32 else x.dtype
    w = (q - z).to(torch.float32).mul_(scales.float().repeat_interleave(group_size, 0)).to(dt)
    return F.linear(x, w.t(), None if bias is None else bias.to(dt))


def _scaled_mm_ok(x) -> bool:
    # opt-in (INTERNVL_ENGINE_FP8_SCALED_MM=1) until a device run has exercised it: no GPU has run this path yet
    return (os.environ.get("INTERNVL_ENGINE_FP8_SCALED_MM") == "1" and x.is_cuda and hasattr(torch, "_scaled_mm")
            and torch.cuda.get_device_capability(x.device) >= (8, 9))


def fp8_gemm(x, weight, weight_scale, bias=None):
    # bf16 only: row-wise scaling through CUTLASS (sm89, sm100+, sm90 with cuBLAS < 12.9) outputs bf16 alone
    if not _scaled_mm_ok(x) or x.dtype != torch.bfloat16 or x.shape[1] % 16 or weight.shape[0] % 16:
        return fp8_gemm_ref(x, weight, weight_scale, bias)
    xq, sx = fp8_quantize_tokens(x.float())
    y = torch._scaled_mm(xq, weight.t(), scale_a=sx, scale_b=weight_scale.float().reshape(1, -1),
                         out_dtype=x.dtype)
    return y if bias is None else y + bias.to(x.dtype)
