"""The `triton` backend: the Triton kernels of kernels/ (internvl_engine.kernels). Runs on CUDA tensors, or on CPU
tensors under the Triton interpreter (TRITON_INTERPRET=1, set before the first import), which is how the CPU tests
check it."""
from __future__ import annotations

import functools
import importlib
import os

import torch

from .ext_ops import paged_split_tokens


def unavailable() -> str | None:
    try:
        importlib.import_module("triton")
    except ImportError:
        return "triton is not installed (pip install triton)"
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return "no CUDA device is visible to torch (on the CPU, set TRITON_INTERPRET=1 before starting Python)"
    return None


def __getattr__(name):
    # the kernels are imported on first use: importing triton costs a second, and most processes never need it
    family = {"rms_norm": "norm", "layer_norm": "norm", "pixel_shuffle": "pixel_shuffle", "rotary": "rotary",
              "write_kv_cache": "kv_cache", "flash_attention": "flash_attention",
              "paged_attention": "paged_attention", "awq_gemm": "awq_gemm", "fp8_gemm": "fp8_gemm",
              "fused_moe": "fused_moe",
              "decode_qkv": "decode_fused", "decode_attention_o": "decode_fused",
              "decode_gemv_residual": "decode_fused", "decode_gate_up": "decode_fused"}.get(name)
    if family is None:
        raise AttributeError(name)
    kernel = getattr(importlib.import_module(f"internvl_engine.kernels.{family}"), name)
    if name == "paged_attention":  # the kernels import nothing of the package: the split size comes from here
        return functools.partial(kernel, split_tokens=paged_split_tokens())
    return kernel
