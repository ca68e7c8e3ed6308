"""The kernel contract: the one place that knows kernels exist (docs/ARCHITECTURE.md, "The kernel contract").

Every op is bound to a backend once per engine, in an OpTable that the engine hands to the model it builds
(models call `self.ops.<name>`), never chosen per call inside the models and never by rebinding module globals.
Each bound op validates its arguments (ops.checks) before the kernel runs. `ops.<name>` at module level calls the
current table of the thread (torch unless use()/use_backend() chose another), for tests and scripts;
`ops.<name>_ref` is the plain-torch oracle.

Backends: "torch" (torch's own ops, always available), "cpp" (csrc/cpu, CPU tensors), "triton" (kernels/, CUDA
tensors, or CPU tensors under TRITON_INTERPRET=1) and "cuda" (csrc/cuda, CUDA tensors). "auto" binds each op to
the default of the device (AUTO): whichever backend the committed kernel benchmarks of that device show faster
(benchmarks/results/), torch where the chosen backend is unavailable.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import os

import torch

from ..errors import BackendError
from . import checks
from .checks import fail
from .ext_ops import load_extension, paged_split_tokens
from .ref import (awq_gemm_ref, decode_attention_o_ref, decode_gate_up_ref, decode_gemv_residual_ref,
                  decode_qkv_ref, flash_attention_ref, fp8_gemm_ref, fused_moe_ref, layer_norm_ref, paged_attention_ref,
                  pixel_shuffle_ref, reduce_partials_ref, rms_norm_ref, rotary_ref, write_kv_cache_ref)

OPS = ("rms_norm", "layer_norm", "pixel_shuffle", "rotary", "write_kv_cache", "flash_attention", "paged_attention",
       "awq_gemm", "fp8_gemm", "fused_moe", "decode_qkv", "decode_attention_o", "decode_gate_up",
       "decode_gemv_residual")
BACKENDS = ("torch", "cpp", "triton", "cuda")
_MODULES = {"torch": ".torch_ops", "cpp": ".cpp_ops", "triton": ".triton_ops", "cuda": ".cuda_ops"}
# the device types each backend's kernels accept ("cpu" for triton only under the interpreter)
_DEVICE_TYPES = {"torch": ("cpu", "cuda"), "cpp": ("cpu",), "cuda": ("cuda",)}
# Per-op defaults from the committed kernel benchmarks (benchmarks/results/*-kernels.json): on the CPU the C++
# kernels win except LayerNorm (torch's vectorised kernel) and attention prefill (torch's SDPA vs a scalar loop).
# fused_moe at 30B-A3B's layer shape: cpp 1.8-22x over torch's per-expert loop at T = 1..512, fp32 and bf16
# (benchmarks/results/2026-12-07-cpu-*-kernels-fused-moe-*.json, a loaded 2-core machine).
# The fused-decode ops (decode_qkv, decode_attention_o, decode_gate_up, decode_gemv_residual) on cpp and cuda are
# those backends' own element-wise and paged-attention kernels around torch's matmuls (decode_ops.py):
# decode_path="fused" computes what the default path does there; their Triton kernels are opt-in (backend="triton")
# until a device run measures them.
AUTO = {"cpu": dict.fromkeys(OPS, "cpp") | {"layer_norm": "torch", "flash_attention": "torch"},
        # benchmarks/results/2026-11-26-h100-2be9dbb-kernels.json: the CUDA kernels win every element-wise op
        # (1.2-5.5x over torch); Triton's tensor-core attention is within 0.89-1.04x of torch's SDPA on prefill
        # without its per-layer host sync. Paged decode per call: CUDA leads at the 1B shape, Triton at the 2B
        # shape's batch 64; both mostly launch cost, which decode's CUDA graphs remove: Triton's tensor-core kernel
        "cuda": dict.fromkeys(OPS, "cuda") | {"flash_attention": "triton", "paged_attention": "triton",
                                              # W4A16 and FP8: no device run has exercised the Triton W4A16
                                              # kernel yet, so CUDA dequantizes then multiplies (backend="triton"
                                              # opts in)
                                              "awq_gemm": "torch", "fp8_gemm": "torch",
                                              # the Triton MoE kernel is opt-in until a device run shows it
                                              # equal to the oracle and faster than torch's grouped experts
                                              "fused_moe": "torch"}}


def _module(name: str):
    if name not in _MODULES:
        raise BackendError(f"unknown kernel backend {name!r}; choose one of {BACKENDS} or 'auto'")
    return importlib.import_module(_MODULES[name], __name__)


def unavailable_reason(name: str) -> str | None:
    """None when backend `name` can run here, else what is missing."""
    mod = _module(name)
    return mod.unavailable() if hasattr(mod, "unavailable") else None


def available_backends() -> list[str]:
    return [b for b in BACKENDS if unavailable_reason(b) is None]


def _device_types(backend: str) -> tuple[str, ...]:
    if backend == "triton":
        return ("cuda", "cpu") if os.environ.get("TRITON_INTERPRET") == "1" else ("cuda",)
    return _DEVICE_TYPES[backend]


@functools.lru_cache(maxsize=None)
def _bind(op: str, backend: str):
    impl = getattr(_module(backend), op)
    check = getattr(checks, op)
    devices = _device_types(backend)

    @functools.wraps(impl)
    def run(*args, **kwargs):
        check(*args, **kwargs)
        first = args[0] if args else next(iter(kwargs.values()))
        if first.device.type not in devices:
            fail(op, f"backend {backend!r} runs on {' or '.join(devices)} tensors, got {first.device}")
        return impl(*args, **kwargs)

    run.backend = backend
    return run


def resolve(name: str, device="cpu") -> dict[str, str]:
    """op -> backend for `name` ("auto" picks the device's defaults, falling back to torch where a default backend
    is unavailable)."""
    if name == "auto":
        device_type = torch.device(device).type
        table = AUTO.get(device_type)
        if table is None:
            raise BackendError(f"no kernel defaults for device type {device_type!r}")
        return {op: b if unavailable_reason(b) is None else "torch" for op, b in table.items()}
    why = unavailable_reason(name)
    if why is not None:
        raise BackendError(f"kernel backend {name!r} is not available: {why}")
    return dict.fromkeys(OPS, name)


class OpTable:
    """Each op bound to one backend: resolved once from a backend choice and handed to the model an engine builds,
    so engines on different backends share a process (and threads) without rebinding anything per step."""

    def __init__(self, binding: dict[str, str], name: str | None = None):
        self.binding = {op: binding[op] for op in OPS}
        self.name = name or (next(iter(self.binding.values())) if len(set(self.binding.values())) == 1 else "mixed")
        self.rms_norm = _bind("rms_norm", self.binding["rms_norm"])
        self.layer_norm = _bind("layer_norm", self.binding["layer_norm"])
        self.pixel_shuffle = _bind("pixel_shuffle", self.binding["pixel_shuffle"])
        self.rotary = _bind("rotary", self.binding["rotary"])
        self.write_kv_cache = _bind("write_kv_cache", self.binding["write_kv_cache"])
        self.flash_attention = _bind("flash_attention", self.binding["flash_attention"])
        self.paged_attention = _bind("paged_attention", self.binding["paged_attention"])
        self.awq_gemm = _bind("awq_gemm", self.binding["awq_gemm"])
        self.fp8_gemm = _bind("fp8_gemm", self.binding["fp8_gemm"])
        self.fused_moe = _bind("fused_moe", self.binding["fused_moe"])
        self.decode_qkv = _bind("decode_qkv", self.binding["decode_qkv"])
        self.decode_attention_o = _bind("decode_attention_o", self.binding["decode_attention_o"])
        self.decode_gemv_residual = _bind("decode_gemv_residual", self.binding["decode_gemv_residual"])
        self.decode_gate_up = _bind("decode_gate_up", self.binding["decode_gate_up"])

    @classmethod
    def resolve(cls, name: str, device="cpu") -> "OpTable":
        return cls(resolve(name, device), name)

    def __repr__(self) -> str:
        return f"OpTable({self.name}: {self.binding})"


# The table behind the module-level ops.<name> calls (kernel tests, benchmarks, scripts): per thread and per asyncio
# task, torch until use()/use_backend() says otherwise. Models never read it; they call the table they were given.
_current: contextvars.ContextVar[OpTable] = contextvars.ContextVar("internvl_engine_ops")
_TORCH = OpTable(dict.fromkeys(OPS, "torch"), "torch")


def current_table() -> OpTable:
    return _current.get(_TORCH)


class _Dispatch:
    """ops.<name>(...): the op of current_table()."""

    def __init__(self, op: str):
        self.op = op
        self.__name__ = self.__qualname__ = op

    def __call__(self, *args, **kwargs):
        return getattr(current_table(), self.op)(*args, **kwargs)

    @property
    def backend(self) -> str:
        return current_table().binding[self.op]


rms_norm = _Dispatch("rms_norm")
layer_norm = _Dispatch("layer_norm")
pixel_shuffle = _Dispatch("pixel_shuffle")
rotary = _Dispatch("rotary")
write_kv_cache = _Dispatch("write_kv_cache")
flash_attention = _Dispatch("flash_attention")
paged_attention = _Dispatch("paged_attention")
awq_gemm = _Dispatch("awq_gemm")
fp8_gemm = _Dispatch("fp8_gemm")
fused_moe = _Dispatch("fused_moe")
decode_qkv = _Dispatch("decode_qkv")
decode_attention_o = _Dispatch("decode_attention_o")
decode_gemv_residual = _Dispatch("decode_gemv_residual")
decode_gate_up = _Dispatch("decode_gate_up")


def use(name: str, device="cpu") -> None:
    """Make backend `name` (or the device's defaults with "auto") the current table of this thread / task."""
    _current.set(OpTable.resolve(name, device))


def current_backend() -> str:
    return current_table().name


def current_binding() -> dict[str, str]:
    """op -> backend actually bound (what "auto" resolved to)."""
    return dict(current_table().binding)


@contextlib.contextmanager
def use_backend(name: str, device="cpu"):
    token = _current.set(OpTable.resolve(name, device))
    try:
        yield current_table()
    finally:
        _current.reset(token)



__all__ = (list(OPS) + [f"{op}_ref" for op in OPS]
           + ["OpTable", "use", "use_backend", "current_table", "current_backend", "current_binding",
              "available_backends", "unavailable_reason", "resolve", "BACKENDS", "load_extension",
              "paged_split_tokens", "reduce_partials_ref"])
