"""End-to-end benchmark harness: latency and throughput of `LLM.generate` per batch size, split by stage, against
the physical floors of the model's shape and, optionally, transformers on the very same weights and inputs.

    python benchmarks/e2e.py --model random:internvl3-1b --device cuda --tiles 1 --batch 1,8,64 --baseline hf \
        --json out.json --plot out.png
    internvl-engine bench ...   (the same flags)

Workload: every request is one conversation with --images random images (distinct, seeded) whose aspect ratio
selects --tiles tiles each, and a seeded random text of --prompt-words words; generation is greedy with
ignore_eos, exactly --output-tokens tokens. For each batch size B, one warm-up batch runs first (its own inputs),
then --requests requests run in groups of B through `LLM.generate` (static batching).

Ours, from each request's metrics: TTFT = request in -> first token out, split into preprocess / vision / prefill
(p50 of each); TPOT = (e2e - TTFT) / (n - 1) per request (p50); e2e p50/p90/p99; output tokens per second = all
generated tokens / summed wall time of the groups; images per second likewise.

transformers (--baseline hf), the same conversations in the same groups, in the same process: TTFT = wall time of a
`generate(max_new_tokens=1)` over the group (processor included), e2e = wall time of the full
`generate(max_new_tokens=N, min_new_tokens=N, do_sample=False)` over the group (each request of the group gets it),
TPOT = (e2e - TTFT) / (N - 1); left padding for B > 1. Ratios: latency hf / ours, throughput ours / hf (> 1: we are
faster). Greedy ids are compared per request.

Floors (bench/floors.py, its counting rules): max(FLOPs / matmul peak, bytes / copy bandwidth) per stage
with the peaks measured at the start of the run; vs_floor = measured / floor."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..config import PRESETS
from ..constants import TILE_SIZE
from ..llm import LLM
from ..models.decode_fused import MAX_BATCH as FUSED_MAX_BATCH
from ..progress import bar, set_enabled
from ..sampling import SamplingParams
from ..settings import EngineConfig, add_settings_flags, settings_from_args
from . import common
from .floors import floors as compute_floors, weight_summary

SCHEMA = "internvl-engine/e2e/1"
MODELS = tuple(f"random:{name}" for name in PRESETS)  # each also -awq / -fp8
WORDS = ("red", "blue", "green", "house", "river", "mountain", "cat", "dog", "bird", "tree", "car", "road", "city",
         "light", "shadow", "window", "table", "chair", "book", "paper", "music", "sound", "water", "stone", "cloud",
         "storm", "morning", "evening", "winter", "summer", "garden", "flower", "market", "bridge", "train", "ship",
         "island", "forest", "desert", "ocean", "small", "large", "quiet", "bright", "dark", "old", "new", "fast",
         "slow", "warm", "cold", "happy", "strange", "simple", "careful", "open", "closed", "left", "right", "near")


# ---------------------------------------------------------------------------------------------- workload
def image_for_tiles(rng: np.random.Generator, tiles: int) -> Image.Image:
    """A random image whose aspect ratio selects `tiles` tiles: one tile's square for 1, else a (tiles-1) x 1 grid
    plus the thumbnail (with max_num_tiles = tiles)."""
    cols = 1 if tiles <= 1 else tiles - 1
    return Image.fromarray(rng.integers(0, 256, (TILE_SIZE, TILE_SIZE * cols, 3), dtype=np.uint8))


def make_conversations(n: int, images: int, tiles: int, prompt_words: int, seed: int) -> list:
    rng = np.random.default_rng(seed)
    convs = []
    for _ in range(n):
        content = [{"type": "image", "image": image_for_tiles(rng, tiles)} for _ in range(images if tiles else 0)]
        words = " ".join(rng.choice(WORDS, prompt_words)) if prompt_words else ""
        lead = "Describe this image in detail." if content else "Write about these words."
        content.append({"type": "text", "text": f"{lead} {words}".strip()})
        convs.append([{"role": "user", "content": content}])
    return convs


def percentile(xs, q: float) -> float:
    return float(np.percentile(np.asarray(xs, dtype=np.float64), q))


def p50(xs) -> float:
    return percentile(xs, 50)


def _step(bar, label: str) -> None:
    """One group done: the bar (internvl_engine.progress.bar, a tqdm bar on a terminal) names what ran last."""
    bar.set_description_str(label, refresh=False)
    bar.update()


# ---------------------------------------------------------------------------------------------- arguments
def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", default="random:tiny", help=f"{' | '.join(MODELS)} | a checkpoint directory")
    # the engine's own flags, as generate and serve have them (floors stay one device's under tensor parallelism)
    add_settings_flags(ap, EngineConfig, only=("device", "dtype", "backend", "quant_backend", "enforce_eager",
                                               "tensor_parallel_size", "vision_graphs", "decode_path"),
                       defaults_in_help=False)
    ap.add_argument("--gpu-memory-utilization", type=float, default=None,
                    help="share of free GPU memory for our KV pool (default 0.9, or 0.5 with --baseline hf so "
                         "transformers fits beside it)")
    ap.add_argument("--images", type=int, default=1, help="images per request")
    ap.add_argument("--tiles", type=int, default=1, help="tiles per image (0: text only)")
    ap.add_argument("--prompt-words", type=int, default=8, help="random words added to each prompt")
    ap.add_argument("--output-tokens", type=int, default=None, help="tokens generated per request (default: 32 on "
                                                                      "CUDA, 8 on the CPU)")
    ap.add_argument("--batch", default="1", help="comma-separated batch sizes, e.g. 1,8,64")
    ap.add_argument("--requests", type=int, default=None,
                    help="requests per batch size, rounded up to a multiple of it (default: batch x --repeat)")
    ap.add_argument("--repeat", type=int, default=2, help="groups per batch size when --requests is not given")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--baseline", choices=["none", "hf"], default="none")
    ap.add_argument("--json", default=None, metavar="PATH", help="write the full record here")
    ap.add_argument("--plot", default=None, metavar="PATH", help="PNG of TTFT and TPOT vs batch size (matplotlib)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars (also INTERNVL_ENGINE_PROGRESS=0)")
    return ap


def _batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--batch: expected comma-separated integers, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise SystemExit(f"--batch: batch sizes must be >= 1, got {text!r}")
    return sizes


# ---------------------------------------------------------------------------------------------- measuring
def run_ours(llm, groups, params, progress, label: str) -> tuple[list, float]:
    outputs, wall = [], 0.0
    for group in groups:
        common.sync(llm.device)
        t0 = time.perf_counter()
        outputs += llm.generate(group, params)
        common.sync(llm.device)
        wall += time.perf_counter() - t0
        _step(progress, label)
    return outputs, wall


def summarize_ours(outputs, wall: float, images: int) -> dict:
    ms = [o.metrics for o in outputs]
    e2e = [m.e2e_s for m in ms]
    tokens = sum(m.generated_tokens for m in ms)
    return {"preprocess_s": p50([m.preprocess_s for m in ms]), "vision_s": p50([m.vision_s for m in ms]),
            "prefill_s": p50([m.prefill_s for m in ms]), "ttft_s": p50([m.ttft_s for m in ms]),
            "tpot_s": p50([(m.e2e_s - m.ttft_s) / max(1, m.generated_tokens - 1) for m in ms]),
            "e2e_s": {"p50": p50(e2e), "p90": percentile(e2e, 90), "p99": percentile(e2e, 99)},
            "output_tokens_per_s": tokens / wall, "images_per_s": images / wall}


def run_hf(hf, groups, n_tokens: int, progress, label: str) -> tuple[list, dict]:
    ids, ttft, tpot, e2e, wall, tokens = [], [], [], [], 0.0, 0
    for group in groups:
        r = hf.run_batch(group, n_tokens)
        ids += r["ids"]
        ttft += [r["ttft_s"]] * len(group)
        tpot += [r["tpot_s"]] * len(group)
        e2e += [r["e2e_s"]] * len(group)
        wall += r["e2e_s"]
        tokens += sum(len(x) for x in r["ids"])
        _step(progress, label)
    return ids, {"ttft_s": p50(ttft), "tpot_s": p50(tpot),
                 "e2e_s": {"p50": p50(e2e), "p90": percentile(e2e, 90), "p99": percentile(e2e, 99)},
                 "output_tokens_per_s": tokens / wall, "wall_s": wall}


def decode_path_record(llm, path: str) -> dict:
    """What the record says of EngineConfig.decode_path: the path asked for and, for "fused", whether the model took
    it (models/decode_fused.py: dense, one rank) and the batches it covers (larger ones take the default forward)."""
    if path != "fused":
        return {"decode_path": path}
    model = llm.engine.model
    return {"decode_path": path, "fused_decode": {"active": model.fused_decode is not None,
                                                  "unsupported": model.fused_unsupported, "max_batch": FUSED_MAX_BATCH}}


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


# ---------------------------------------------------------------------------------------------- output
def _ms(x) -> str:
    if x is None:
        return "-"
    x *= 1e3
    return f"{x:.0f}" if x >= 1000 else f"{x:.1f}" if x >= 10 else f"{x:.2f}" if x >= 0.1 else f"{x:.4f}"


def format_table(record: dict) -> str:
    head = (f"{'batch':>5} {'who':<8} {'TTFT ms':>9} {'(pre / vision / prefill)':>26} {'TPOT ms':>9} "
            f"{'e2e p50':>9} {'p90':>9} {'p99':>9} {'tok/s':>9} {'img/s':>8}")
    graphs = "CUDA-graph decode" if record.get("cuda_graphs") else "eager decode"
    fused = record.get("fused_decode")
    if fused:
        graphs += (f", fused decode path at batch <= {fused['max_batch']}" if fused["active"] else
                   f", fused decode path asked but not taken ({fused['unsupported']})")
    w = record.get("weights") or {}
    quant = (f" ({w['quantization']}: LM weights {w['lm_decode_bytes'] / 1e9:.2f} GB a step, dense "
             f"{w['lm_decode_bytes_dense'] / 1e9:.2f} GB; quantized matmuls on {record.get('quant_backend') or 'auto'}"
             ")") if w.get("quantization") else ""
    lines = [f"{record['model']}{quant} on {record['device']}, {record['dtype']}, backend {record['backend']}, {graphs}; "
             f"{record['workload']['images_per_request']} image(s) x {record['workload']['tiles_per_image']} tile(s), "
             f"{record['workload']['output_tokens']} output tokens", head, "-" * len(head)]
    for run in record["runs"]:
        o, b, f = run["ours"], run.get("baseline_hf"), run["floors"]
        split = f"{_ms(o['preprocess_s'])} / {_ms(o['vision_s'])} / {_ms(o['prefill_s'])}"
        lines.append(f"{run['batch']:>5} {'ours':<8} {_ms(o['ttft_s']):>9} {split:>26} {_ms(o['tpot_s']):>9} "
                     f"{_ms(o['e2e_s']['p50']):>9} {_ms(o['e2e_s']['p90']):>9} {_ms(o['e2e_s']['p99']):>9} "
                     f"{o['output_tokens_per_s']:>9.1f} {o['images_per_s']:>8.2f}")
        if b is not None:
            lines.append(f"{'':>5} {'hf':<8} {_ms(b['ttft_s']):>9} {'':>26} {_ms(b['tpot_s']):>9} "
                         f"{_ms(b['e2e_s']['p50']):>9} {_ms(b['e2e_s']['p90']):>9} {_ms(b['e2e_s']['p99']):>9} "
                         f"{b['output_tokens_per_s']:>9.1f} {b['images_per_s']:>8.2f}")
        fsplit = f"- / {_ms(f['vision_s'])} / {_ms(f['prefill_s'])}"
        lines.append(f"{'':>5} {'floor':<8} {_ms(f['ttft_s']):>9} {fsplit:>26} {_ms(f['tpot_s']):>9}")
        v = run["vs_floor"]
        note = f"{'':>5} ours/floor: TTFT {v['ttft']:.1f}x, TPOT {v['tpot']:.1f}x"
        if b is not None:
            r = run["ratio_vs_hf"]
            agree = "all equal" if run["ids_agree"] else f"first difference at token {run['ids_first_difference']}"
            note += (f" | vs hf (>1: ours faster): TTFT {r['ttft']:.2f}x, TPOT {r['tpot']:.2f}x, "
                     f"e2e p50 {r['e2e_p50']:.2f}x, tok/s {r['output_tokens_per_s']:.2f}x | ids: {agree}")
        lines.append(note)
    return "\n".join(lines)


def plot(record: dict, path: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"note: matplotlib is not installed, so no plot was written to {path} (pip install matplotlib)",
              file=sys.stderr)
        return False
    runs = record["runs"]
    batches = [r["batch"] for r in runs]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in ((axes[0], "ttft_s", "TTFT"), (axes[1], "tpot_s", "TPOT")):
        ax.plot(batches, [r["ours"][key] * 1e3 for r in runs], "o-", label="ours")
        if all("baseline_hf" in r for r in runs):
            ax.plot(batches, [r["baseline_hf"][key] * 1e3 for r in runs], "s-", label="transformers")
        ax.plot(batches, [r["floors"][key] * 1e3 for r in runs], "k--", label="floor")
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel(f"{title} (ms)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"{record['model']}, {record['device']}, {record['dtype']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------------- main
def main(argv=None, prog: str | None = None) -> dict:
    args = build_parser(prog).parse_args(argv)
    set_enabled(False if args.quiet else None)  # None: INTERNVL_ENGINE_PROGRESS decides (default on)

    batch_sizes = _batch_sizes(args.batch)
    if args.images < 0 or args.tiles < 0 or args.prompt_words < 0:
        raise SystemExit("--images, --tiles and --prompt-words must be >= 0")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    n_tokens = args.output_tokens or (32 if device.type == "cuda" else 8)
    images = args.images if args.tiles else 0
    tiles = args.tiles if images else 0

    util = args.gpu_memory_utilization or (0.5 if args.baseline == "hf" else 0.9)
    engine = settings_from_args(EngineConfig, args) | {"device": device, "gpu_memory_utilization": util}
    llm = LLM(args.model, **engine)
    device = llm.device
    peaks = common.measure_peaks(device)
    dtype_bytes = torch.empty((), dtype=llm.dtype).element_size()
    params = SamplingParams(max_tokens=n_tokens, ignore_eos=True, max_num_tiles=max(1, tiles))
    hf = None
    if args.baseline == "hf":
        from .hf_baseline import HFBaseline
        hf = HFBaseline(llm, args.model, max(1, tiles))

    plan = []
    for b in batch_sizes:
        n = args.requests if args.requests is not None else b * max(1, args.repeat)
        plan.append((b, -(-max(1, n) // b) * b))
    per_group = 2 if hf is not None else 1
    progress = bar(sum((n // b + 1) * per_group for b, n in plan), "bench", unit="group")

    runs = []
    for index, (b, n) in enumerate(plan):
        seed = args.seed * 1_000_003 + index * 7919
        warm = make_conversations(b, images, tiles, args.prompt_words, seed + 1)
        convs = make_conversations(n, images, tiles, args.prompt_words, seed + 2)
        groups = [convs[i:i + b] for i in range(0, n, b)]
        run_ours(llm, [warm], params, progress, f"ours B={b} warm-up")
        outputs, wall = run_ours(llm, groups, params, progress, f"ours B={b}")
        ours = summarize_ours(outputs, wall, n * images)
        prompt_tokens = [len(o.prompt_token_ids) for o in outputs]
        tiles_per_request = int(np.median([o.metrics.num_tiles for o in outputs]))
        fl = compute_floors(llm.config, peaks, tiles_per_request=tiles_per_request,
                            prompt_tokens=prompt_tokens[:b], output_tokens=n_tokens, dtype_bytes=dtype_bytes)
        run = {"batch": b, "requests": n, "prompt_tokens": prompt_tokens, "tiles_per_request": tiles_per_request,
               "ours": ours}
        if hf is not None:
            hf.run_batch(warm, n_tokens)
            _step(progress, f"hf B={b} warm-up")
            hf_ids, base = run_hf(hf, groups, n_tokens, progress, f"hf B={b}")
            base["images_per_s"] = n * images / base.pop("wall_s")
            diffs = [first_difference(o.token_ids, h) for o, h in zip(outputs, hf_ids)]
            worst = [d for d in diffs if d is not None]
            run["baseline_hf"] = base
            run["ratio_vs_hf"] = {"ttft": base["ttft_s"] / ours["ttft_s"], "tpot": base["tpot_s"] / ours["tpot_s"],
                                  "e2e_p50": base["e2e_s"]["p50"] / ours["e2e_s"]["p50"],
                                  "output_tokens_per_s": ours["output_tokens_per_s"] / base["output_tokens_per_s"]}
            run["ids_agree"] = not worst
            run["ids_first_difference"] = min(worst) if worst else None
        run["floors"] = fl
        run["vs_floor"] = {"ttft": ours["ttft_s"] / fl["ttft_s"], "tpot": ours["tpot_s"] / fl["tpot_s"]}
        runs.append(run)
    progress.close()

    record = {"schema": SCHEMA, **common.metadata(device), "model": args.model,
              "dtype": str(llm.dtype).replace("torch.", ""), "backend": args.backend,
              "quant_backend": args.quant_backend,
              "tensor_parallel_size": args.tensor_parallel_size, **decode_path_record(llm, args.decode_path),
              "kernels": llm.runner.kernels, "peaks": peaks, "weights": weight_summary(llm.config, dtype_bytes),
              "cuda_graphs": None if llm.runner.graphs is None else
              {"decode_steps_replayed": llm.runner.graphs.replays, "captured": sorted(llm.runner.graphs.graphs)},
              "workload": {"images_per_request": images, "tiles_per_image": tiles,
                           "prompt_words": args.prompt_words, "output_tokens": n_tokens, "batch_sizes": batch_sizes,
                           "requests": [n for _, n in plan], "seed": args.seed},
              "runs": runs}
    print(format_table(record), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=2))
    if args.plot:
        plot(record, args.plot)
    if args.tensor_parallel_size > 1:
        llm.engine.shutdown()  # join the workers now rather than at exit
    return record
