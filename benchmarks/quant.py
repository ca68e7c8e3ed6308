"""Quantized matmul benchmarks (issue 18): the awq_gemm and fp8_gemm ops on each backend against the
dequantize-then-matmul baseline (dequantize the whole weight with the oracle's unpacking, then one dense matmul)
and the dense matmul itself, at InternVL3-1B's decoder shapes (hidden 896, intermediate 4864: q/k/v 896 -> 1152,
gate/up 896 -> 9728, down 4864 -> 896), for decode (1 token) and a prefill chunk.

  python benchmarks/quant.py --device cpu --json benchmarks/results/<date>-cpu-<commit>-quant.json
  python benchmarks/quant.py --device cuda --backends torch,triton --json ...      (GPU: only from a device run)

On the CPU the triton backend runs under the interpreter (TRITON_INTERPRET=1): its times measure the interpreter,
not the kernel, so it is off unless asked for (--backends torch,triton; --layers qkv --repeat 1 keeps such a smoke
run short), and the record says "interpreter": true. Each row names the path every timed column took ("paths"):
the Triton W4A16 kernel's split-K GEMV (with its split count) or tiled GEMM, and below its GEMV threshold the tiled
kernel is timed as well ("awq_gemm[triton tiled]") to check that threshold; the FP8 kernel's dot (on e4m3 operands,
sm89+, or on fp16 decoded in registers)."""
from __future__ import annotations

import argparse
import os

import torch

from internvl_engine import ops
from internvl_engine.bench.common import metadata, time_fn, write_record
from internvl_engine.ops.quant_ops import _scaled_mm_ok
from internvl_engine.ops.ref import _awq_unpack_ref

SHAPES = {"qkv": (896, 1152), "gate_up": (896, 9728), "down": (4864, 896)}


def awq_weights(k, n, device):
    g = torch.Generator().manual_seed(0)
    qw = torch.randint(-2 ** 31, 2 ** 31, (k, n // 8), generator=g, dtype=torch.int64).to(torch.int32)
    qz = torch.randint(-2 ** 31, 2 ** 31, (k // 128, n // 8), generator=g, dtype=torch.int64).to(torch.int32)
    s = torch.rand(k // 128, n, generator=g) * 0.01
    return qw.to(device), qz.to(device), s.to(device)


def dequant_then_matmul(x, qw, qz, s):
    q = _awq_unpack_ref(qw)
    z = _awq_unpack_ref(qz).repeat_interleave(128, 0)
    w = ((q - z).to(x.dtype) * s.to(x.dtype).repeat_interleave(128, 0))
    return x @ w


def triton_paths(m, k, n, device) -> dict:
    from internvl_engine.kernels import awq_gemm, fp8_gemm
    paths = {"awq_gemm[triton]": awq_gemm.path(m, k, n, device), "fp8_gemm[triton]": fp8_gemm.path(device)}
    if m <= awq_gemm.GEMV_MAX_M:
        paths["awq_gemm[triton tiled]"] = "tiled"
    return paths


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="activation dtype (default: fp32 on cpu, bf16 on cuda)")
    p.add_argument("--backends", default=None, help="comma list (default: torch on cpu; torch,triton on cuda)")
    p.add_argument("--tokens", default="1,16,64", help="comma list of M")
    p.add_argument("--layers", default=",".join(SHAPES), help="comma list of " + ", ".join(SHAPES))
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float32 if device.type == "cpu" else torch.bfloat16)
    backends = (args.backends or ("torch" if device.type == "cpu" else "torch,triton")).split(",")
    interpreted = device.type == "cpu" and "triton" in backends and os.environ.get("TRITON_INTERPRET") == "1"
    rows = []
    for name in args.layers.split(","):
        k, n = SHAPES[name]
        qw, qz, s = awq_weights(k, n, device)
        dense = dequant_then_matmul(torch.eye(k, device=device, dtype=dtype), qw, qz, s)  # [K, N]
        w8 = (dense.t().float() / 0.01).clamp(-448, 448).to(torch.float8_e4m3fn).contiguous()
        ws = torch.full((n, 1), 0.01, device=device)
        for m in (int(t) for t in args.tokens.split(",")):
            x = torch.randn(m, k, device=device, dtype=dtype)
            base = {
                "dense_matmul": time_fn(lambda: x @ dense, device, args.repeat),
                "awq_dequant_then_matmul": time_fn(lambda: dequant_then_matmul(x, qw, qz, s), device, args.repeat),
            }
            paths = {}
            for b in backends:
                if b == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
                    continue
                with ops.use_backend(b, device):
                    base[f"awq_gemm[{b}]"] = time_fn(lambda: ops.awq_gemm(x, qw, qz, s), device, args.repeat)
                    base[f"fp8_gemm[{b}]"] = time_fn(lambda: ops.fp8_gemm(x, w8, ws), device, args.repeat)
                if b == "triton":
                    paths.update(triton_paths(m, k, n, device))
                    if "awq_gemm[triton tiled]" in paths:
                        from internvl_engine.kernels.awq_gemm import awq_tiled
                        base["awq_gemm[triton tiled]"] = time_fn(lambda: awq_tiled(x, qw, qz, s), device,
                                                                 args.repeat)
                else:  # ops/quant_ops.py, and its test for _scaled_mm
                    scaled_mm = _scaled_mm_ok(x) and dtype != torch.float32 and k % 16 == 0 and n % 16 == 0
                    paths.update({f"awq_gemm[{b}]": "dequantize then matmul",
                                  f"fp8_gemm[{b}]": "torch._scaled_mm" if scaled_mm else "fp32 emulation"})
            row = {"layer": name, "M": m, "K": k, "N": n, "seconds": base, "paths": paths,
                   "weight_bytes": {"dense": k * n * dense.element_size(), "awq": k * n // 2 + (k // 128) * n * 6,
                                    "fp8": k * n + n * 4}}
            rows.append(row)
            print(f"{name:8s} M={m:4d} " + "  ".join(f"{kk} {v * 1e3:8.3f} ms" for kk, v in base.items()))
    record = {**metadata(device), "dtype": str(dtype).replace("torch.", ""), "backends": backends,
              "interpreter": interpreted, "rows": rows,
              "note": "CPU: the torch/cpp backends dequantize then matmul, so awq_gemm ~ the baseline by design; "
                      "the Triton kernel's speed is only meaningful on a GPU"}
    write_record(args.json, record)


if __name__ == "__main__":
    main()
