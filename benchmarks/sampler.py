"""The sampler alone: time per step at batch 64 over a 151,674-token vocabulary (InternVL3's Qwen2.5 vocabulary),
rows mixing greedy, temperature, top_p, top_k, min_p, seeds and penalties, before (the per-row sampler of a git
revision) and after (this checkout's batched sampler), in one run.

    python benchmarks/sampler.py --before 7f1dafe --json benchmarks/results/<date>-cpu-<commit>-sampler.json

The "before" sampler is `internvl_engine/sampling.py` as of --before, read with `git show` and loaded as a module
beside this checkout's package. Rounds alternate before and after so both see the same machine state; each round
times --steps calls, and the record holds the median over rounds of each round's median (wall time, and the CPU
time of this process, which includes torch's intra-op threads). Two kinds of logits: "peaked" (a trained model's
shape: a top_p nucleus of a few tokens) and "flat" (a nucleus of thousands of tokens, where a top_p row needs a
full sort of its vocabulary). The record also says whether both samplers drew the same tokens on the first step
(greedy rows must; seeded rows draw torch.multinomial's own exponential race in both, so they should)."""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from internvl_engine import SamplingParams  # noqa: E402
from internvl_engine.engine.step_builder import sampling_input  # noqa: E402
from internvl_engine.sampling import Sampler  # noqa: E402

VOCAB = 151_674
STOP_IDS = {151_645, 151_643}  # <|im_end|>, <|endoftext|>


def sampler_at(rev: str):
    """`Sampler` of internvl_engine/sampling.py at git revision `rev`, loaded as internvl_engine.sampling_<rev>: a
    per-row sampler called as sampler(logits, sequences, stop ids)."""
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:internvl_engine/sampling.py"], check=True,
                         capture_output=True, text=True).stdout
    name = f"internvl_engine.sampling_{rev}"
    module = types.ModuleType(name)
    module.__package__ = "internvl_engine"  # its relative imports (.errors) resolve in this checkout
    sys.modules[name] = module  # dataclasses look their module up here
    exec(compile(src, f"{rev}:internvl_engine/sampling.py", "exec"), module.__dict__)
    return module.Sampler()


def batched():
    """This checkout's sampler, called as the per-row one was: building its rows (engine/step_builder.py, the
    penalties' token pairs included) is part of each timed call."""
    sampler = Sampler()
    return lambda logits, seqs, stop_ids: sampler(logits, sampling_input(seqs, stop_ids))


def mix(batch: int) -> list[SamplingParams]:
    """Row i's parameters: a quarter greedy, the rest temperature with top_p, top_k, both, or min_p; every third
    row seeded; every fourth penalised (repetition, frequency, presence); every fifth has min_tokens left."""
    out = []
    for i in range(batch):
        kind = i % 8
        kw = dict(max_tokens=512)
        if kind >= 2:
            kw.update(temperature=(0.6, 0.8, 1.0)[i % 3])
            kw.update([dict(top_p=0.9), dict(top_k=50), dict(top_k=40, top_p=0.95), dict(min_p=0.05),
                       dict(top_p=0.8, min_p=0.02), dict(top_k=20)][kind - 2])
            if i % 3 == 0:
                kw.update(seed=1000 + i)
        if i % 4 == 1:
            kw.update(repetition_penalty=1.1, frequency_penalty=0.3, presence_penalty=0.2)
        if i % 5 == 2:
            kw.update(min_tokens=200)
        out.append(SamplingParams(**kw))
    return out


def sequences(params: list[SamplingParams], prompt_len: int, output_len: int) -> list:
    """What the sampler reads of an engine Sequence, each with a fresh generator for its seed."""
    g = torch.Generator().manual_seed(0)
    seqs = []
    for p in params:
        ids = torch.randint(VOCAB, (prompt_len + output_len,), generator=g).tolist()
        seqs.append(types.SimpleNamespace(
            params=p, prompt_ids=ids[:prompt_len], output_ids=ids[prompt_len:],
            generator=None if p.seed is None else torch.Generator().manual_seed(p.seed),
            plain=not (p.penalized or p.min_tokens or p.logprobs is not None)))
    return seqs


def time_steps(sampler, logits, params, args) -> tuple[list[float], list[float], list[int]]:
    seqs = sequences(params, args.prompt_len, args.output_len)
    wall, cpu, first = [], [], None
    for _ in range(args.steps):
        w, c = time.perf_counter(), time.process_time()
        tokens = sampler(logits, seqs, STOP_IDS).tolist()  # the engine's one device-to-host copy
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)
        first = tokens if first is None else first
    return wall, cpu, first


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", default="7f1dafe", help="git revision of the per-row sampler")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3, help="timed calls per round and side")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompt-len", type=int, default=1000)
    ap.add_argument("--output-len", type=int, default=100)
    ap.add_argument("--json")
    args = ap.parse_args()

    before, after = sampler_at(args.before), batched()
    params = mix(args.batch)
    g = torch.Generator().manual_seed(1)
    # peaked: logits ~ N(0, 1) * 8 put ~all the mass on a few tokens; flat: N(0, 1) * 1 spreads it over thousands
    kinds = {name: torch.randn(args.batch, VOCAB, generator=g) * scale for name, scale in (("peaked", 8.0),
                                                                                          ("flat", 1.0))}
    results = {}
    for name, logits in kinds.items():
        side = {"before": ([], [], None), "after": ([], [], None)}
        for _ in range(args.rounds):
            for label, sampler in (("before", before), ("after", after)):
                wall, cpu, first = time_steps(sampler, logits, params, args)
                side[label][0].append(statistics.median(wall))
                side[label][1].append(statistics.median(cpu))
                side[label] = (side[label][0], side[label][1], first)
        greedy = [i for i, p in enumerate(params) if p.greedy]
        seeded = [i for i, p in enumerate(params) if p.seed is not None and not p.greedy]
        b_tok, a_tok = side["before"][2], side["after"][2]
        results[name] = {
            label: {"median_step_ms": 1e3 * statistics.median(side[label][0]),
                    "median_step_cpu_ms": 1e3 * statistics.median(side[label][1]),
                    "round_medians_ms": [1e3 * t for t in side[label][0]]} for label in side}
        results[name]["speedup"] = results[name]["before"]["median_step_ms"] / results[name]["after"]["median_step_ms"]
        results[name]["same_greedy_tokens"] = f"{sum(b_tok[i] == a_tok[i] for i in greedy)}/{len(greedy)}"
        results[name]["same_seeded_tokens"] = f"{sum(b_tok[i] == a_tok[i] for i in seeded)}/{len(seeded)}"

    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "internvl_engine/sampling.py",
                            "internvl_engine/engine/step_builder.py"],
                           capture_output=True, text=True).stdout.strip()
    device = f"{platform.machine()} CPU x{os.cpu_count()}, torch {torch.__version__}, {torch.get_num_threads()} threads"
    print(f"sampler alone, batch {args.batch}, vocabulary {VOCAB}, {device}; before {args.before}, after {commit}"
          + (" (sampler modified)" if dirty else ""))
    print(f"command: python {' '.join(sys.argv)}")
    for name, r in results.items():
        before_ms, after_ms = r["before"]["median_step_ms"], r["after"]["median_step_ms"]
        print(f"  {name:6s}  before {before_ms:8.1f} ms  after {after_ms:7.1f} ms"
              f"  ({r['speedup']:.1f}x; CPU {r['before']['median_step_cpu_ms']:.0f} -> "
              f"{r['after']['median_step_cpu_ms']:.0f} ms)  same tokens: greedy {r['same_greedy_tokens']}, "
              f"seeded {r['same_seeded_tokens']}")
    record = {"schema": "internvl-engine/sampler/1", "date": time.strftime("%Y-%m-%d"), "device": device,
              "commit": commit + ("-dirty" if dirty else ""), "before_commit": args.before,
              "command": f"python {' '.join(sys.argv)}", "batch": args.batch, "vocab": VOCAB, "steps": args.steps,
              "rounds": args.rounds, "prompt_len": args.prompt_len, "output_len": args.output_len,
              "mix": [{k: v for k, v in vars(p).items() if k in ("temperature", "top_k", "top_p", "min_p", "seed",
                                                                    "repetition_penalty", "frequency_penalty",
                                                                    "presence_penalty", "min_tokens")}
                      for p in params],
              "results": results}
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
