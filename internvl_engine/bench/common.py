"""Shared by the benchmark scripts: run metadata (device, versions, commit, command), the device peaks measured at
start (copy bandwidth, matmul rate) that every figure is divided by, and a timer."""
from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import json

import torch

ROOT = Path(__file__).resolve().parents[2]  # the checkout, for `git rev-parse`


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU x{torch.get_num_threads()} threads"


def metadata(device: torch.device) -> dict:
    commit = os.environ.get("INTERNVL_ENGINE_COMMIT") or subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip() or None
    versions = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    try:
        import triton
        versions["triton"] = triton.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        versions["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True).stdout.strip() or None
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": device_name(device),
            "commit": commit, "command": " ".join([Path(sys.executable).name, *sys.argv]), "versions": versions}


def time_fn(fn, device: torch.device, repeat: int = 20, warmup: int = 3, min_time: float = 0.0) -> float:
    """Median seconds per call. On CUDA each call is bracketed by events (no host gaps counted); on the CPU by
    perf_counter."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    start_all = time.perf_counter()
    while len(times) < repeat or time.perf_counter() - start_all < min_time:
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_peaks(device: torch.device) -> dict:
    """Copy bandwidth (read + write bytes of a large device-to-device copy) and dense matmul rate (8192^3 bf16 on
    CUDA, 1024^3 fp32 on the CPU), measured now: every ratio in a record is to these, from the same run."""
    if device.type == "cuda":
        n_bytes, mm, dtype = 2 << 30, 8192, torch.bfloat16
    else:
        n_bytes, mm, dtype = 256 << 20, 1024, torch.float32
    t_copy = _time_copy(n_bytes, device)
    t_mm = _time_matmul(mm, dtype, device)
    return {"copy_bytes_per_s": 2 * n_bytes / t_copy, "matmul_flop_per_s": 2 * mm ** 3 / t_mm,
            "matmul": f"{mm}^3 {str(dtype).replace('torch.', '')}", "copy_bytes": n_bytes}


def backends_to_run(spec: str | None, device: torch.device, with_auto: bool = False) -> list[str]:
    """The kernel backends a benchmark compares: those named in `spec` (comma-separated), else every one available
    here (triton on the CPU only when named: the interpreter is far too slow to time), plus "auto" if asked."""
    from .. import ops
    if spec:
        return [b for b in spec.split(",") if b == "auto" or ops.unavailable_reason(b) is None]
    names = [b for b in ops.BACKENDS if ops.unavailable_reason(b) is None and (b != "triton" or device.type == "cuda")
             and device.type in ops._device_types(b)]  # cpp is CPU-only, cuda CUDA-only
    return names + (["auto"] if with_auto else [])


def write_record(path: str | None, record: dict) -> None:
    if path:
        Path(path).write_text(json.dumps(record, indent=2))
        print(f"# wrote {path}")


def _time_copy(n_bytes: int, device: torch.device) -> float:
    src = torch.empty(n_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return time_fn(lambda: dst.copy_(src), device, repeat=10)


def _time_matmul(n: int, dtype: torch.dtype, device: torch.device) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return time_fn(lambda: a @ b, device, repeat=10)
