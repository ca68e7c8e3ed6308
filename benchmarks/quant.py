"""Quantized matmul benchmarks (issue 18): the awq_gemm and fp8_gemm ops on each backend against the
dequantize-then-matmul baseline (dequantize the whole weight with the oracle's unpacking, then one dense matmul)
and the dense matmul itself, at InternVL3-1B's decoder shapes (hidden 896, intermediate 4864: q/k/v 896 -> 1152,
gate/up 896 -> 9728, down 4864 -> 896), for decode (1 token) and a prefill chunk.

  python benchmarks/quant.py --device cpu --json benchmarks/results/<date>-cpu-<commit>-quant.json
  python benchmarks/quant.py --device cuda --backends torch,triton --json ...      (GPU: only from a device run)

On the CPU the triton backend runs under the interpreter (TRITON_INTERPRET=1): its times measure the interpreter,
not the kernel, so it is off unless asked for (--backends torch,triton)."""
from __future__ import annotations

import argparse
import os

import torch

from internvl_engine import ops
from internvl_engine.bench.common import metadata, time_fn, write_record
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="activation dtype (default: fp32 on cpu, bf16 on cuda)")
    p.add_argument("--backends", default=None, help="comma list (default: torch on cpu; torch,triton on cuda)")
    p.add_argument("--tokens", default="1,64", help="comma list of M")
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float32 if device.type == "cpu" else torch.bfloat16)
    backends = (args.backends or ("torch" if device.type == "cpu" else "torch,triton")).split(",")
    rows = []
    for name, (k, n) in SHAPES.items():
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
            for b in backends:
                if b == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
                    continue
                with ops.use_backend(b, device):
                    base[f"awq_gemm[{b}]"] = time_fn(lambda: ops.awq_gemm(x, qw, qz, s), device, args.repeat)
                    base[f"fp8_gemm[{b}]"] = time_fn(lambda: ops.fp8_gemm(x, w8, ws), device, args.repeat)
            row = {"layer": name, "M": m, "K": k, "N": n, "seconds": base,
                   "weight_bytes": {"dense": k * n * dense.element_size(), "awq": k * n // 2 + (k // 128) * n * 6,
                                    "fp8": k * n + n * 4}}
            rows.append(row)
            print(f"{name:8s} M={m:4d} " + "  ".join(f"{kk} {v * 1e3:8.3f} ms" for kk, v in base.items()))
    record = {**metadata(device), "dtype": str(dtype).replace("torch.", ""), "backends": backends, "rows": rows,
              "note": "CPU: the torch/cpp backends dequantize then matmul, so awq_gemm ~ the baseline by design; "
                      "the Triton kernel's speed is only meaningful on a GPU"}
    write_record(args.json, record)


if __name__ == "__main__":
    main()
