"""Tensor-parallel measurements on the CPU (gloo, 2 ranks: the driver here and one spawned worker).

rss:    peak resident memory of each rank while loading a checkpoint whose language model dominates (tiny vision
        tower; Qwen2-style LM: hidden 1024, 8 layers, 16 heads / 4 KV heads, intermediate 4096, vocabulary 151674,
        untied lm_head; stored bf16, loaded fp32 as the CPU does), with tensor_parallel_size 1 and 2. Each
        configuration runs in a fresh process; per rank: RSS after imports (before the engine), peak RSS after
        loading, and their difference.
vision: the two vision-tower choices for a tower no N divides (InternViT-6B has 25 heads): "spread" (a batch's
        tiles split over the ranks, features gathered on the driver) vs "driver" (the driver runs every tile; the
        latency a replicated tower would have), for 1, 2, 4 and 8 tiles of 448 px through a reduced tower (hidden
        256, 4 layers, 4 heads, MLP 1024), every rank on one thread (one core per rank: the stand-in for one GPU
        per rank). --repeat calls per mode, the modes interleaved; wall time min and median, and each rank's CPU time
        (median). This machine's cores are shared with other work, so wall times are noisy; the CPU time of the
        busiest rank is the latency the call would have with a core per rank (gloo waits without spinning).

  python benchmarks/tensor_parallel.py rss vision --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from internvl_engine.bench.common import metadata, write_record

RSS_SHAPE = dict(vision=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                             attention_bias=True, use_qk_norm=False, norm_type="layer_norm"),
                 text=dict(hidden=1024, layers=8, heads=16, kv=4, inter=4096))
VISION_SHAPE = dict(vision=dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
                                attention_bias=True, use_qk_norm=False, norm_type="layer_norm"),
                    text=dict(hidden=128, layers=2, heads=4, kv=2, inter=256))


def write(path: Path, shape: dict, dtype: torch.dtype) -> Path:
    """A random-weight -hf checkpoint of `shape` (loader.write_checkpoint's files, stored in `dtype`)."""
    from safetensors.torch import load_file, save_file

    from internvl_engine.config import presets
    from internvl_engine.loader import write_checkpoint

    if (path / "config.json").exists():
        return path
    t = shape["text"]
    name = f"measure-{path.name}"
    presets.PRESETS[name] = dict(vision=shape["vision"], text=presets._text(t["hidden"], t["layers"], t["heads"],
                                                                              t["kv"], t["inter"]))
    write_checkpoint(path, name)
    weights = path / "model.safetensors"
    save_file({k: v.to(dtype) for k, v in load_file(str(weights)).items()}, str(weights), metadata={"format": "pt"})
    return path


def child_rss(path: str, n: int) -> None:
    """In a fresh process: build the engine, print what each rank's memory did."""
    from internvl_engine import LLM
    from internvl_engine.worker.loop import peak_rss_bytes, rss_bytes

    before = rss_bytes()
    t0 = time.perf_counter()
    llm = LLM(path, dtype="float32", device="cpu", tensor_parallel_size=n, kv_cache_tokens=256)
    ranks = [dict(rank=0, rss_before_load_bytes=before, peak_rss_bytes=peak_rss_bytes(),
                  load_s=time.perf_counter() - t0)]
    if n > 1:
        ranks += [llm.engine.executor.worker_info[r] for r in range(1, n)]
        llm.engine.shutdown()
    lm = sum(p.numel() * p.element_size() for name, p in llm.model.named_parameters()
             if not name.startswith(("vision_tower", "multi_modal_projector")))
    print("RESULT " + json.dumps(dict(n=n, ranks=ranks, lm_bytes_on_driver=lm)), flush=True)


def run_rss(root: Path) -> dict:
    path = write(root / "rss", RSS_SHAPE, torch.bfloat16)
    out = {"checkpoint_bytes": (path / "model.safetensors").stat().st_size, "shape": RSS_SHAPE, "runs": []}
    for n in (1, 2):
        run = subprocess.run([sys.executable, __file__, "--child-rss", str(path), str(n)], capture_output=True,
                             text=True, timeout=900)
        line = [x for x in run.stdout.splitlines() if x.startswith("RESULT ")]
        if run.returncode or not line:
            raise SystemExit(f"rss child N={n} failed:\n{run.stderr[-3000:]}")
        out["runs"].append(json.loads(line[0][7:]))
    print(f"# checkpoint {out['checkpoint_bytes'] / 2**20:.0f} MiB (bf16), loaded fp32")
    print(f"{'N':>2s} {'rank':>4s} {'before MiB':>10s} {'peak MiB':>9s} {'peak-before':>11s} {'LM params MiB':>13s}")
    for r in out["runs"]:
        for k in r["ranks"]:
            lm = r["lm_bytes_on_driver"] / 2**20 if k["rank"] == 0 else float("nan")
            print(f"{r['n']:2d} {k['rank']:4d} {k['rss_before_load_bytes'] / 2**20:10.0f} "
                  f"{k['peak_rss_bytes'] / 2**20:9.0f} {(k['peak_rss_bytes'] - k['rss_before_load_bytes']) / 2**20:11.0f} "
                  f"{lm:13.0f}")
    return out


def _cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a process has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_vision(root: Path, repeat: int) -> dict:
    from internvl_engine import LLM
    from internvl_engine.worker.executor import ParallelRunner

    path = write(root / "vision", VISION_SHAPE, torch.float32)
    torch.set_num_threads(1)  # the driver's rank: one core, as the worker has (2 ranks over this machine's cores)
    llm = LLM(path, dtype="float32", device="cpu", tensor_parallel_size=2, kv_cache_tokens=256)
    runner = llm.runner
    side = llm.config.vision.image_size
    out = {"shape": VISION_SHAPE, "threads_per_rank": 1, "repeat": repeat, "results": []}
    worker = llm.engine.executor.procs[1].pid
    print(f"{'tiles':>5s} {'driver: wall min/med ms':>24s} {'cpu ms':>7s} {'spread: wall min/med ms':>24s} "
          f"{'cpu ms (rank 0 | 1)':>20s} {'speedup wall':>12s} {'critical-path cpu':>17s}")
    for tiles in (1, 2, 4, 8):
        pixels = torch.randn(tiles, 3, side, side)
        row, times = {"tiles": tiles}, {"driver": [], "spread": []}
        cpu = {"driver": [], "spread": []}
        for rep in range(repeat + 1):  # the modes interleaved, so a burst of load from elsewhere hits both
            for mode in times:
                ParallelRunner.vision_mode = mode
                c0, w0, t0 = time.process_time(), _cpu_seconds(worker), time.perf_counter()
                runner.vision(pixels)
                if rep:  # the first round warms up
                    times[mode].append(time.perf_counter() - t0)
                    cpu[mode].append((time.process_time() - c0, _cpu_seconds(worker) - w0))
        for mode, ts in times.items():
            row[f"{mode}_ms"] = 1e3 * statistics.median(ts)
            row[f"{mode}_min_ms"] = 1e3 * min(ts)
            row[f"{mode}_cpu_ms"] = [1e3 * statistics.median(c[r] for c in cpu[mode]) for r in (0, 1)]
        ParallelRunner.vision_mode = "spread"
        a, b = runner.vision(pixels), None
        ParallelRunner.vision_mode = "driver"
        b = runner.vision(pixels)
        ParallelRunner.vision_mode = "spread"
        row["max_abs_diff"] = (a - b).abs().max().item()
        out["results"].append(row)
        d, sp = row["driver_cpu_ms"], row["spread_cpu_ms"]
        row["critical_path_cpu_speedup"] = max(d) / max(sp)
        print(f"{tiles:5d} {row['driver_min_ms']:11.0f} / {row['driver_ms']:10.0f} {d[0]:7.0f} "
              f"{row['spread_min_ms']:11.0f} / {row['spread_ms']:10.0f} {sp[0]:9.0f} | {sp[1]:8.0f} "
              f"{row['driver_min_ms'] / row['spread_min_ms']:12.2f} {row['critical_path_cpu_speedup']:17.2f}"
              f"   (features differ by {row['max_abs_diff']:.1e})")
    llm.engine.shutdown()
    return out


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--child-rss":
        return child_rss(sys.argv[2], int(sys.argv[3]))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("parts", nargs="+", choices=["rss", "vision"])
    ap.add_argument("--dir", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "internvl-tp-measure"),
                    help="where the checkpoints are written (reused)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    root = Path(args.dir)
    record = metadata(torch.device("cpu")) | {"cpu_count": os.cpu_count(), "load_average": os.getloadavg()}
    if "rss" in args.parts:
        record["rss"] = run_rss(root)
    if "vision" in args.parts:
        record["vision"] = run_vision(root, args.repeat)
    write_record(args.json, record)


if __name__ == "__main__":
    main()
