"""Vision-stage benchmark: the InternViT tower + pixel shuffle + projector (`ModelRunner.vision`) for a ladder of tile
counts on every available kernel backend, against the torch backend in the same run and against the compute floor
(bench/floors.py: 723.6 GFLOP per 448x448 tile for InternViT-300M plus the projector, over the matmul peak measured
at start). On CUDA each backend runs eagerly and from the engine's vision graphs (a graph per tile count, captured in
the warm-up call); the torch backend's eager run is the baseline.

  python benchmarks/vision.py --device cuda --json out.json       # tiles 1, 4, 13; torch, triton, cuda
  python benchmarks/vision.py --device cpu                        # tiles 1, 2; torch and cpp
"""
from __future__ import annotations

import argparse

import torch

from internvl_engine import LLM, ops
from internvl_engine.bench.common import backends_to_run, measure_peaks, metadata, time_fn, write_record
from internvl_engine.bench.floors import vision_cost
from internvl_engine.worker.cuda_graphs import VisionGraphs
from internvl_engine.worker.runner import VISION_CHUNK_TILES


def run(args) -> dict:
    device = torch.device(args.device)
    llm = LLM(args.model, dtype=args.dtype, device=device, kv_cache_tokens=4096)  # the vision stage needs no KV
    # "auto" is the engine's default per-op binding, the others bind every op to one backend
    backends = backends_to_run(args.backends, device, with_auto=True)
    record = metadata(device) | {"model": args.model, "dtype": str(llm.dtype).replace("torch.", ""),
                                 "backends": backends, "peaks": measure_peaks(device), "results": []}
    peak = record["peaks"]["matmul_flop_per_s"]
    elem = torch.tensor([], dtype=llm.dtype).element_size()
    per_tile = vision_cost(llm.config, 1, elem).flops
    side = llm.config.vision.image_size
    print(f"# {record['device']}  {args.model} {record['dtype']}  {per_tile / 1e9:.1f} GFLOP per tile  matmul peak "
          f"{peak / 1e12:.1f} TFLOP/s  backends {backends}")
    modes = ["eager", "graphs"] if device.type == "cuda" else ["eager"]
    print(f"{'tiles':>5s} {'backend':8s} {'mode':6s} {'ms':>10s} {'ms/tile':>9s} {'TFLOP/s':>8s} {'x floor':>8s} "
          f"{'vs torch':>8s}")
    runner = llm.runner
    for tiles in [int(t) for t in args.tiles.split(",")]:
        g = torch.Generator().manual_seed(tiles)
        pixels = torch.randn(tiles, 3, side, side, generator=g).to(device, llm.dtype)
        base = None
        for backend, mode in ((b, m) for b in backends for m in modes):
            llm.model.use_ops(ops.OpTable.resolve(backend, device))
            # a fresh graph set per backend: a captured graph keeps the kernels it was captured with
            runner.vision_graphs = VisionGraphs(runner, VISION_CHUNK_TILES) if mode == "graphs" else None
            t = time_fn(lambda: runner.vision(pixels), device, repeat=args.repeat, warmup=1)
            base = t if (backend, mode) == ("torch", "eager") else base
            floor = vision_cost(llm.config, tiles, elem).floor_s(record["peaks"])
            row = {"tiles": tiles, "backend": backend, "mode": mode, "time_s": t, "flops": tiles * per_tile,
                   "flop_per_s": tiles * per_tile / t, "floor_s": floor, "vs_floor": t / floor,
                   "speedup_vs_torch": None if base is None else base / t}
            record["results"].append(row)
            vs = "" if base is None else f"{base / t:7.2f}x"
            print(f"{tiles:5d} {backend:8s} {mode:6s} {t * 1e3:10.1f} {t * 1e3 / tiles:9.2f} "
                  f"{row['flop_per_s'] / 1e12:8.2f} {t / floor:7.1f}x {vs:>8s}", flush=True)
        runner.vision_graphs = None
    return record


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", default="random:internvl3-1b", help="random:<preset> or a checkpoint directory")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--tiles", default=None, help="comma-separated tile counts (default 1,4,13 on CUDA, 1,2 on CPU)")
    ap.add_argument("--backends", default=None, help="comma-separated (default: every available one; triton on "
                                                     "the CPU only when named)")
    ap.add_argument("--repeat", type=int, default=None, help="timed runs per point (default 10 on CUDA, 2 on CPU)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.tiles = args.tiles or ("1,4,13" if cuda else "1,2")
    args.repeat = args.repeat or (10 if cuda else 2)
    record = run(args)
    write_record(args.json, record)


if __name__ == "__main__":
    main()
