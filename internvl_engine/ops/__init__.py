"""The kernel contract: the one place that knows kernels exist.

Every op is bound to a backend once (at engine start or explicitly in tests), never chosen per call inside the
models. `ops.<name>` calls the bound implementation; `ops.<name>_ref` is the plain-torch oracle.
Backends: "torch" (always available). The kernel-library issue adds "cpp", "triton" and "cuda".
"""
from __future__ import annotations

import contextlib
import importlib

from ..errors import BackendError
from .ref import (flash_attention_ref, layer_norm_ref, paged_attention_ref, pixel_shuffle_ref, rms_norm_ref,
                  rotary_ref, write_kv_cache_ref)

OPS = ("rms_norm", "layer_norm", "pixel_shuffle", "rotary", "write_kv_cache", "flash_attention", "paged_attention")
_BACKEND_MODULES = {"torch": ".torch_ops"}
_active = {"name": None}


def available_backends() -> list[str]:
    return list(_BACKEND_MODULES)


def use(name: str) -> None:
    """Bind every op to backend `name` (process-wide)."""
    if name not in _BACKEND_MODULES:
        raise BackendError(f"kernel backend {name!r} is not available; available: {available_backends()}")
    mod = importlib.import_module(_BACKEND_MODULES[name], __name__)
    g = globals()
    for op in OPS:
        g[op] = getattr(mod, op)
    _active["name"] = name


def current_backend() -> str:
    return _active["name"]


@contextlib.contextmanager
def use_backend(name: str):
    previous = _active["name"]
    use(name)
    try:
        yield
    finally:
        use(previous)


use("torch")

__all__ = list(OPS) + [f"{op}_ref" for op in OPS] + ["use", "use_backend", "current_backend", "available_backends"]
