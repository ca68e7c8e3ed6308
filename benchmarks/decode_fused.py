"""One decode step, the fused path (EngineConfig.decode_path="fused", issue 3.6) against the default, per batch size,
and whether their greedy tokens agree: the evidence a device session needs to flip the default.

    python benchmarks/decode_fused.py --model random:internvl3-1b --device cuda --dtype bfloat16 --backend triton \
        --default-backend auto --batch 1,8,64 --steps 64 --json out.json
    python benchmarks/decode_fused.py --model random:small --device cpu --batch 1,8 --steps 16 --json out.json

For each path one engine is built (the first freed before the second); for each batch size, `batch` greedy requests
with ignore_eos are prefilled, then `steps` decode steps are timed one by one (engine.step(): schedule, the forward,
sampling and the copy of its tokens back; with CUDA graphs on a GPU one replay). The figure is the median step;
tokens are compared sequence by sequence over the whole run. Batches above models/decode_fused.MAX_BATCH (8) take
the default forward on the fused path too (their record says so): their time shows what else the flag changes (on a
GPU, the sampler inside the decode graph). Random weights: greedy tokens agree where the paths' roundings agree, so
an unequal count is a finding to read, not noise to ignore. On a shared CPU the times are noise; there the record is
the equal-token counts."""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from internvl_engine import SamplingParams  # noqa: E402
from internvl_engine.bench.common import measure_peaks, metadata, sync  # noqa: E402
from internvl_engine.bench.floors import lm_weight_params  # noqa: E402
from internvl_engine.engine.llm_engine import LLMEngine  # noqa: E402
from internvl_engine.models.decode_fused import MAX_BATCH  # noqa: E402

PROMPT = "Describe a quiet morning by the river, the light on the water and the sounds of the town waking up."


def run_path(args, path: str, batches: list[int]) -> dict[int, dict]:
    """Per batch: median decode-step seconds and each sequence's greedy tokens, on one engine for this path (its
    graphs captured once for the whole batch ladder)."""
    backend = args.backend if path == "fused" else (args.default_backend or args.backend)
    most = max(batches)
    engine = LLMEngine(args.model, device=args.device, dtype=args.dtype, backend=backend, decode_path=path,
                       max_num_seqs=most, kv_cache_tokens=most * (args.steps + 128) + 1024,
                       enforce_eager=args.enforce_eager)
    device, graphs = engine.device, getattr(engine.runner, "graphs", None)
    # the weight floor of a decode step: every LM weight but the embedding read once, at the copy bandwidth
    weight_bytes = lm_weight_params(engine.config) * torch.empty((), dtype=engine.dtype).element_size()
    params = SamplingParams(max_tokens=args.steps + 2, temperature=0, ignore_eos=True)
    results = {}
    for batch in batches:
        for i in range(batch):
            engine.add_request(f"b{batch}-r{i}", f"{i}: {PROMPT}", params)
        while engine.scheduler.waiting or not all(s.output_ids for s in engine.scheduler.running):
            engine.step()  # prefill (chunks) until every sequence has its first token
        replays = None if graphs is None else graphs.replays
        times = []
        for _ in range(args.steps):
            sync(device)
            t0 = time.perf_counter()
            engine.step()
            sync(device)
            times.append(time.perf_counter() - t0)
        tokens = {s.request_id: list(s.output_ids) for s in engine.scheduler.running}
        results[batch] = {
            "median_step_ms": 1e3 * statistics.median(times), "p10_ms": 1e3 * _quantile(times, 0.1),
            "p90_ms": 1e3 * _quantile(times, 0.9), "steps": len(times),
            "fused_forward": engine.model.fused_decode is not None and batch <= MAX_BATCH,
            "fused_unsupported": engine.model.fused_unsupported,
            "graph_replays": None if graphs is None else graphs.replays - replays, "backend": backend,
            "kernels": sorted(set(engine.runner.kernels.values())), "weight_bytes": weight_bytes, "tokens": tokens}
        while engine.scheduler.running or engine.scheduler.waiting:
            engine.step()  # the last tokens: the next batch starts from an empty engine
    del engine, graphs
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return results


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def compare(default: dict, fused: dict) -> dict:
    """Equal-token counts between the two paths' runs of one batch."""
    seqs = equal_seqs = tokens = equal_tokens = 0
    first_diff = []
    for rid, a in default.items():
        b = fused.get(rid, [])
        n = min(len(a), len(b))
        same = next((i for i in range(n) if a[i] != b[i]), n)
        seqs += 1
        equal_seqs += a == b
        tokens += len(a)
        equal_tokens += same  # tokens equal before the first difference (after it, the contexts differ)
        if a != b:
            first_diff.append({"request": rid, "position": same})
    return {"equal_sequences": equal_seqs, "sequences": seqs, "equal_prefix_tokens": equal_tokens,
            "tokens": tokens, "first_differences": first_diff}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="random:internvl3-1b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--backend", default="auto", help="kernel backend (triton: the fused path's own kernels)")
    ap.add_argument("--default-backend", help="the default path's backend (default: --backend), e.g. auto: what "
                    "an engine runs today")
    ap.add_argument("--batch", default="1,8,64", help="comma-separated batch sizes")
    ap.add_argument("--steps", type=int, default=64, help="decode steps timed (and tokens compared) per run")
    ap.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    ap.add_argument("--json", help="write the record here")
    args = ap.parse_args(argv)
    batches = [int(b) for b in args.batch.split(",") if b.strip()]
    record = {**metadata(torch.device(args.device)), "benchmark": "decode_fused", "model": args.model,
              "dtype": args.dtype, "backend": args.backend,
              "default_backend": args.default_backend or args.backend, "enforce_eager": args.enforce_eager,
              "steps": args.steps, "max_fused_batch": MAX_BATCH,
              "pdl": os.environ.get("INTERNVL_ENGINE_PDL") == "1",  # kernels/decode_fused.py: the fused kernels only
              "results": []}
    peaks = measure_peaks(torch.device(args.device))
    record["peaks"] = peaks
    by_path = {path: run_path(args, path, batches) for path in ("default", "fused")}
    for b in batches:
        runs = {path: by_path[path][b] for path in by_path}
        cmp = compare(runs["default"]["tokens"], runs["fused"]["tokens"])
        floor_ms = 1e3 * runs["fused"]["weight_bytes"] / peaks["copy_bytes_per_s"]
        row = {"batch": b, **cmp,
               "speedup": runs["default"]["median_step_ms"] / runs["fused"]["median_step_ms"],
               "weight_floor_ms": floor_ms,
               "vs_floor": {path: runs[path]["median_step_ms"] / floor_ms for path in runs},
               **{path: {k: v for k, v in r.items() if k != "tokens"} for path, r in runs.items()}}
        if b > MAX_BATCH:
            row["note"] = f"batch {b} > {MAX_BATCH}: the fused path runs the default forward"
        record["results"].append(row)
        print(f"batch {b:3d}: default {runs['default']['median_step_ms']:8.3f} ms  fused "
              f"{runs['fused']['median_step_ms']:8.3f} ms  x{row['speedup']:.2f}  (weight floor {floor_ms:.3f} ms: "
              f"fused {row['vs_floor']['fused']:.2f}x)  equal sequences "
              f"{cmp['equal_sequences']}/{cmp['sequences']}  equal tokens {cmp['equal_prefix_tokens']}/{cmp['tokens']}"
              f"{'  (default forward)' if b > MAX_BATCH else ''}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
