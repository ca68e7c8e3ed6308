"""Kernel benchmarks: every op of the kernel contract on every available backend, against torch's own
implementation (the `torch` backend: scaled_dot_product_attention, eager norms) in the same run, at the shapes of
InternVL3-1B, 2B and 8B. Prints time, GB/s or TFLOP/s, the fraction of the device peaks measured at start, and the
speedup over torch.

  python benchmarks/kernels.py --device cuda --json out.json          # all models, all backends available
  python benchmarks/kernels.py --device cpu                           # smaller shapes, torch and cpp
  python benchmarks/kernels.py --device cpu --models '' --moe-models internvl3_5-30b-a3b   # fused_moe alone

fused_moe runs at the --moe-models' layer shapes (one layer's experts, top-k of a random softmax routing); its bytes
are the floor: the weights of the experts the routing touches (k at batch 1, nearly all E at a prefill), plus x and
y, each read or written once.
"""
from __future__ import annotations

import argparse

import torch

from internvl_engine import ops
from internvl_engine.bench.common import backends_to_run, measure_peaks, metadata, time_fn, write_record
from internvl_engine.layers.rotary import RotaryEmbedding
from internvl_engine.config import PRESETS

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def cases(model: str, device: torch.device, dtype: torch.dtype, small: bool):
    """(op, label, make_args, bytes moved, flops) at the model's shapes; on the CPU token counts shrink 8x."""
    t, v = PRESETS[model]["text"], PRESETS[model]["vision"]
    c, h, hk = t["hidden_size"], t["num_attention_heads"], t["num_key_value_heads"]
    d, e = c // h, torch.tensor([], dtype=dtype).element_size()
    vc, vh = v["hidden_size"], v["num_attention_heads"]
    div = 8 if small else 1
    prefill, tiles, ctx = 4096 // div, max(1, 13 // div), 1024 // div
    vis_tokens = 1025 * tiles
    r = lambda *s: torch.randn(*s, device=device, dtype=dtype)  # noqa: E731

    def norm_rows(n):
        return lambda: (r(n, c), 1 + 0.1 * r(c), 1e-6, r(n, c))

    for n in (1, 64, prefill):
        yield "rms_norm", f"{n}x{c} +residual", norm_rows(n), 4 * n * c * e, 0
    yield ("layer_norm", f"{vis_tokens}x{vc}", lambda: (r(vis_tokens, vc), r(vc), r(vc), 1e-6),
           2 * vis_tokens * vc * e, 0)
    yield "pixel_shuffle", f"{tiles}x1024x{vc}", lambda: (r(tiles, 1024, vc), 0.5), 2 * tiles * 1024 * vc * e, 0
    table = RotaryEmbedding(d, 1e6, 32768).table(device)

    def qkv(n, heads, kv_heads, dim):
        x = r(n, (heads + 2 * kv_heads) * dim)
        q, k, w = x.split([heads * dim, kv_heads * dim, kv_heads * dim], -1)
        return q.view(n, heads, dim), k.view(n, kv_heads, dim), w.view(n, kv_heads, dim)

    def rotary_args():
        q, k, _ = qkv(prefill, h, hk, d)
        return q, k, torch.arange(prefill, device=device), table

    yield "rotary", f"{prefill} tok {h}/{hk}x{d}", rotary_args, 2 * prefill * (h + hk) * d * e, 0
    bs = 16

    def kv_args():
        _, k, w = qkv(prefill, h, hk, d)
        blocks = prefill // bs + 1
        return (k, w, r(blocks, bs, hk, d), r(blocks, bs, hk, d),
                torch.randperm(blocks * bs, device=device)[:prefill].to(torch.int64))

    yield "write_kv_cache", f"{prefill} tok {hk}x{d}", kv_args, 4 * prefill * hk * d * e, 0

    def attn_args(n, heads, kv_heads, dim, seqs, causal):
        q, k, w = qkv(n * seqs, heads, kv_heads, dim)
        cu = torch.arange(0, (seqs + 1) * n, n, dtype=torch.int32, device=device)
        return q, k, w, cu, cu, n, n, causal, dim ** -0.5

    vd = vc // vh
    yield ("flash_attention", f"vision {tiles}x1025 {vh}x{vd}",
           lambda: attn_args(1025, vh, vh, vd, tiles, False), 4 * tiles * 1025 * vh * vd * e,
           4 * tiles * 1025 ** 2 * vh * vd)
    yield ("flash_attention", f"prefill {prefill} causal {h}/{hk}x{d}",
           lambda: attn_args(prefill, h, hk, d, 1, True), 2 * prefill * (h + 2 * hk) * d * e, 2 * prefill ** 2 * h * d)

    def paged_args(batch):
        blocks_per = ctx // bs
        perm = torch.randperm(batch * blocks_per, device=device).to(torch.int32)
        kc, vcache = r(batch * blocks_per, bs, hk, d), r(batch * blocks_per, bs, hk, d)
        q, _, _ = qkv(batch, h, hk, d)
        return (q, kc, vcache, perm.view(batch, blocks_per), torch.full((batch,), ctx, dtype=torch.int32,
                                                                             device=device), d ** -0.5)

    for batch in (1, 32, 64):
        yield ("paged_attention", f"B={batch} ctx={ctx} {h}/{hk}x{d}", (lambda b=batch: paged_args(b)),
               2 * batch * ctx * hk * d * e, 4 * batch * ctx * h * d)


def moe_cases(model: str, device: torch.device, dtype: torch.dtype):
    """fused_moe at one layer of `model`'s experts for decode (1), small batches (8, 64) and a prefill (512; 4096
    more on CUDA). Routing: the top-k of a seeded random softmax, renormalised (a router's output)."""
    t = PRESETS[model]["text"]
    hd, e, k, f = t["hidden_size"], t["num_experts"], t["num_experts_per_tok"], t["moe_intermediate_size"]
    size = torch.tensor([], dtype=dtype).element_size()
    g, gd = torch.Generator().manual_seed(0), torch.Generator(device).manual_seed(0)
    # drawn where they live: 30B-A3B's 600 M expert weights take seconds to draw on a CPU core
    w13 = (torch.randn(e, 2 * f, hd, generator=gd, device=device) * hd ** -0.5).to(dtype)
    w2 = (torch.randn(e, hd, f, generator=gd, device=device) * f ** -0.5).to(dtype)
    for n in (1, 8, 64, 512) + ((4096,) if device.type == "cuda" else ()):
        weights, ids = torch.randn(n, e, generator=g).softmax(-1).topk(k, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        x = torch.randn(n, hd, generator=g).to(dtype)
        touched = ids.unique().numel()
        nbytes = touched * 3 * f * hd * size + 2 * n * hd * size
        yield ("fused_moe", f"T={n} {touched}/{e} experts k={k} F={f}",
               lambda x=x, w=weights, i=ids: (x.to(device), w13, w2, w.to(device), i.to(device)),
               nbytes, 2 * n * k * 3 * f * hd)


def run(args) -> dict:
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    backends = backends_to_run(args.backends, device)
    record = metadata(device) | {"dtype": args.dtype, "backends": backends, "peaks": measure_peaks(device),
                                 "results": []}
    peaks = record["peaks"]
    print(f"# {record['device']}  copy {peaks['copy_bytes_per_s'] / 1e9:.0f} GB/s  matmul "
          f"{peaks['matmul_flop_per_s'] / 1e12:.1f} TFLOP/s ({peaks['matmul']})  backends {backends}")
    print(f"{'op':16s} {'case':34s} {'backend':8s} {'time us':>10s} {'GB/s':>8s} {'TFLOP/s':>8s} {'% peak':>7s} "
          f"{'vs torch':>8s}")
    todo = [(m, cases(m, device, dtype, device.type == "cpu"), args.repeat) for m in args.models.split(",") if m]
    todo += [(m, moe_cases(m, device, dtype), args.moe_repeat) for m in args.moe_models.split(",") if m]
    for model, model_cases, repeat in todo:
        for op, label, make, nbytes, flops in model_cases:
            base = None
            torch.manual_seed(0)
            inputs = make()
            for backend in backends:
                with ops.use_backend(backend, device):
                    fn = getattr(ops, op)
                    try:
                        t = time_fn(lambda: fn(*inputs), device, repeat=repeat, warmup=min(3, repeat))
                    except Exception as e:  # an unsupported shape is a row, not the end of the run
                        print(f"{op:16s} {label:34s} {backend:8s} error: {e}")
                        record["results"].append({"model": model, "op": op, "case": label, "backend": backend,
                                                  "error": str(e)})
                        continue
                base = t if backend == "torch" else base
                bw, rate = nbytes / t, flops / t
                frac = max(bw / peaks["copy_bytes_per_s"], rate / peaks["matmul_flop_per_s"])
                row = {"model": model, "op": op, "case": label, "backend": backend, "time_s": t,
                       "bytes": nbytes, "flops": flops, "bytes_per_s": bw, "flop_per_s": rate,
                       "fraction_of_peak": frac, "speedup_vs_torch": None if base is None else base / t}
                record["results"].append(row)
                vs = "" if base is None else f"{base / t:7.2f}x"
                print(f"{op:16s} {label:34s} {backend:8s} {t * 1e6:10.1f} {bw / 1e9:8.1f} "
                      f"{rate / 1e12 if flops else 0:8.2f} {100 * frac:6.1f}% {vs:>8s}", flush=True)
    return record


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: bf16 on CUDA, fp32 on the CPU")
    ap.add_argument("--models", default="internvl3-1b,internvl3-2b,internvl3-8b")
    ap.add_argument("--backends", default=None, help="comma-separated (default: every available one; triton on "
                                                     "the CPU only when named, the interpreter is slow)")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--moe-models", default="internvl3_5-30b-a3b", help="fused_moe at these models' expert shapes "
                                                                      "(comma-separated; '' for none)")
    ap.add_argument("--moe-repeat", type=int, default=None, help="timed calls per fused_moe case (default: "
                                                                  "--repeat on CUDA, 3 on the CPU)")
    ap.add_argument("--json", default=None, help="write the full record here")
    args = ap.parse_args(argv)
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    args.moe_repeat = args.moe_repeat or (args.repeat if args.device.startswith("cuda") else 3)
    record = run(args)
    write_record(args.json, record)


if __name__ == "__main__":
    main()
