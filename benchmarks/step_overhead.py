"""Host cost of one engine step with the model stubbed out: what the engine itself spends per decode step
(scheduling, block manager, step-input and sampling-row building, host-to-device copies, the runner sampling a tiny
vocabulary and its copy back, detokenising, outputs), i.e. the overhead a GPU cannot hide, in CPU seconds of the
measuring process. The model's forward returns zeros and its lm_head a [rows, 1024] zero matrix, so the measurement
holds no matmul and no vocabulary-sized sampling.

    python benchmarks/step_overhead.py --batch 1,64 --steps 200 --json out.json
    python benchmarks/step_overhead.py --batch 1,64 --compare 10bf286 --json out.json   # before vs after, one run

--compare REV checks REV out into a temporary git worktree (with this checkout's built extension copied in) and
runs the same measurement there in a subprocess, alternating rounds of REV and this checkout so both see the same
machine state; it reports the median over rounds of each round's median step time. Only the public API is used
(LLMEngine, add_request, step), so it runs on both sides of a refactor."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STUB_VOCAB = 1024


def measure(batch: int, steps: int, prompt_words: int = 0, output_kind: str | None = None) -> list[float]:
    """CPU seconds of this process for each of `steps` decode steps at `batch` running sequences (random:tiny, CPU,
    forward stubbed). CPU time rather than wall time: other processes on a shared 2-core machine stretch wall time
    by several times, but not the cycles this process spends."""
    import torch
    from internvl_engine import SamplingParams
    from internvl_engine.engine.llm_engine import LLMEngine

    prompt = "Describe a quiet morning by the river." + " river" * prompt_words  # ~1 token a word
    engine = LLMEngine("random:tiny", device="cpu", kv_cache_tokens=batch * (steps + prompt_words + 64) * 2,
                       max_num_seqs=batch, max_num_batched_tokens=max(8192, prompt_words + 64))
    hidden_size = engine.config.text.hidden_size
    model = engine.runner.model  # the runner's forward and lm_head are stubbed; its sampling and copies are not
    model.forward = lambda ids, *rest, **kw: torch.zeros(ids.shape[0], hidden_size)
    model.compute_logits = lambda h: torch.zeros(h.shape[0], STUB_VOCAB)
    # output_kind (SamplingParams, newer revisions only): None keeps the default, so older revisions run unchanged
    params = SamplingParams(max_tokens=steps + 8, ignore_eos=True,
                            **({"output_kind": output_kind} if output_kind else {}))
    for i in range(batch):
        engine.add_request(f"r{i}", prompt, params)
    if output_kind is None:  # the public API only, as on older revisions: prefill all, then the first decode
        while sum(len(o.token_ids) > 0 for o in engine.step()) < batch:
            pass
    else:  # final_only hands out nothing before the end: read the sequences
        while engine.scheduler.waiting or not all(s.output_ids for s in engine.scheduler.running):
            engine.step()
    times = []
    torch.set_num_threads(1)  # the stubbed step is host work: no intra-op threads whose time would be counted
    for _ in range(steps):
        t0 = time.process_time()
        outs = engine.step()
        times.append(time.process_time() - t0)
        assert len(outs) == (0 if output_kind == "final_only" else batch), "every running sequence decodes each step"
    return times


def child(args) -> None:
    print(json.dumps({b: measure(b, args.steps, args.prompt_words, args.output_kind) for b in args.batches}))


def run_side(src: Path, args) -> dict:
    env = dict(os.environ, PYTHONPATH=str(src))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--batch", ",".join(map(str, args.batches)),
           "--steps", str(args.steps), "--prompt-words", str(args.prompt_words)] + (["--output-kind", args.output_kind] if args.output_kind else [])
    out = subprocess.run(cmd, env=env, cwd=src, capture_output=True, text=True, check=True).stdout
    return {int(b): v for b, v in json.loads(out.strip().splitlines()[-1]).items()}


def worktree(rev: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix="step-overhead-")) / "tree"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), rev], check=True,
                   capture_output=True)
    for so in (ROOT / "internvl_engine").glob("_C*.so"):  # the extension is built in place by `pip install -e`
        shutil.copy(so, path / "internvl_engine" / so.name)
    return path


def commit(rev: str = "HEAD") -> str:
    return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", rev], capture_output=True,
                          text=True).stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", default="1,64")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--prompt-words", type=int, default=0,
                    help="lengthen each prompt by this many one-token words (a 13-tile image prompt is ~3,400 tokens)")
    ap.add_argument("--output-kind", default=None, help="SamplingParams.output_kind (default: the default, cumulative)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--compare", help="a git revision measured against this checkout in the same run")
    ap.add_argument("--json")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.batches = [int(b) for b in args.batch.split(",")]
    if args.child:
        return child(args)
    sides = {"after": ROOT}
    if args.compare:
        sides = {"before": worktree(args.compare), **sides}
    rounds = {name: {b: [] for b in args.batches} for name in sides}
    try:
        for _ in range(args.rounds):
            for name, src in sides.items():
                for b, times in run_side(src, args).items():
                    rounds[name][b].append(statistics.median(times))
    finally:
        if args.compare:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(sides["before"])])
    result = {name: {b: {"median_step_ms": 1e3 * statistics.median(r), "round_medians_ms": [1e3 * x for x in r]}
                     for b, r in per.items()} for name, per in rounds.items()}
    for b in args.batches:
        line = ", ".join(f"{name} {result[name][b]['median_step_ms']:.3f} ms" for name in sides)
        if args.compare:
            ratio = result["after"][b]["median_step_ms"] / result["before"][b]["median_step_ms"]
            line += f" (after / before {ratio:.3f})"
        print(f"batch {b}: {line}")
    import platform
    record = {"schema": "internvl-engine/step-overhead/1", "date": time.strftime("%Y-%m-%d"),
              "device": f"{platform.machine()} CPU x{os.cpu_count()}", "commit": commit(),
              "before_commit": commit(args.compare) if args.compare else None,
              "command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
              "steps": args.steps, "prompt_words": args.prompt_words, "output_kind": args.output_kind, "rounds": args.rounds, "stub_vocab": STUB_VOCAB, "results": result}
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
