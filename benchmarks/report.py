"""Turns the records under benchmarks/results/ into the README's performance tables, so they are generated, never
typed:  python benchmarks/report.py [--write-readme]
  *-e2e.json      end-to-end records (benchmarks/e2e.py)       -> the perf-table block
  *-kernels.json  kernel records (benchmarks/kernels.py)       -> the kernel-table block (newest record per device)"""
from __future__ import annotations

import argparse
import glob
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- perf-table:begin -->", "<!-- perf-table:end -->"
KBEGIN, KEND = "<!-- kernel-table:begin -->", "<!-- kernel-table:end -->"


def _ms(x) -> str:
    return "-" if x is None else f"{x * 1e3:.1f}" if x >= 0.01 else f"{x * 1e3:.2f}"


def _pair(ours, base) -> str:
    return f"{_ms(ours)} / {_ms(base)}" if base is not None else f"{_ms(ours)} / -"


def _decode_mode(r, batch: int | None = None) -> str:
    return _graphs_mode(r) + _fused_mode(r, batch)


def _graphs_mode(r) -> str:
    # CPU (metadata names it "<machine> CPU xN threads"), or a record from before CUDA graphs existed
    if r["device"] == "cpu" or " CPU " in r["device"] or "cuda_graphs" not in r:
        return "eager"
    if r["cuda_graphs"]:
        return "CUDA graphs"
    # no graphs without the flag: a MoE model whose fused_moe syncs the host (models/moe.py decode_graph_problem)
    return "eager (enforce_eager)" if "--enforce-eager" in r.get("command", "") else "eager"


def _fused_mode(r, batch: int | None) -> str:
    """The decode path where it is not the default (records before --decode-path existed ran the default): fused
    where the model took it and the batch is one it covers (bench/e2e.py decode_path_record), else why not."""
    f = r.get("fused_decode")  # present exactly when decode_path is "fused"
    if f is None:
        return ""
    if not f["active"]:
        return f", fused asked, not taken: {f['unsupported']}"
    if batch is None or batch <= f["max_batch"]:
        return ", fused"
    return f", default (fused covers batch <= {f['max_batch']})"


def harness_table(records) -> str:
    """Records of the harness (schema internvl-engine/e2e/1): one row per model, device and batch size."""
    rows = ["| model (random weights) | device | dtype | batch | tiles / request | prompt tokens | TTFT ours / "
            "transformers (ms) | TPOT ours / transformers (ms) | e2e p50 ours / transformers (ms) | output tok/s ours / "
            "transformers | ids vs transformers | ours / floor (TTFT, TPOT) | kernels | decode | commit | date |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        for run in r["runs"]:
            o, b = run["ours"], run.get("baseline_hf")
            get = (lambda k, sub=None: None if b is None else (b[k][sub] if sub else b[k]))
            agree = "-" if b is None else ("all equal" if run["ids_agree"] else
                                           f"equal up to token {run['ids_first_difference']}")
            tps = f"{o['output_tokens_per_s']:.1f} / " + ("-" if b is None else f"{b['output_tokens_per_s']:.1f}")
            prompt = run["prompt_tokens"]
            prompt = prompt if isinstance(prompt, (int, float)) else max(prompt)
            rows.append(
                f"| {r['model'].removeprefix('random:')} | {r['device']} | {r['dtype']} | {run['batch']} | "
                f"{run['tiles_per_request']} | {prompt} | {_pair(o['ttft_s'], get('ttft_s'))} | "
                f"{_pair(o['tpot_s'], get('tpot_s'))} | {_pair(o['e2e_s']['p50'], get('e2e_s', 'p50'))} | {tps} | "
                f"{agree} (of {r['workload']['output_tokens']}) | {run['vs_floor']['ttft']:.1f}x, "
                f"{run['vs_floor']['tpot']:.1f}x | {'/'.join(sorted(set(r['kernels'].values())))} | {_decode_mode(r, run['batch'])} | {r['commit']} | {r['date'][:10]} |")
    return "\n".join(rows)


def foundation_table(records) -> str:
    """The first records (benchmarks/e2e.py before the harness): batch 1, one list of records per file."""
    rows = ["| model (random weights) | device | dtype | image tiles | prompt tokens | TTFT ours / transformers (ms) "
            "| TPOT ours / transformers (ms) | greedy ids vs transformers | commit | date |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        o, b, w = r["ours"], r.get("baseline_hf"), r["workload"]
        ttft = f"{o['ttft_s'] * 1e3:.1f} / {b['ttft_s'] * 1e3:.1f}" if b else f"{o['ttft_s'] * 1e3:.1f} / -"
        tpot = f"{o['tpot_s'] * 1e3:.2f} / {b['tpot_s'] * 1e3:.2f}" if b else f"{o['tpot_s'] * 1e3:.2f} / -"
        agree = "-" if b is None else ("all equal" if r["ids_agree"] else f"equal up to token {r['ids_agree_prefix']}")
        rows.append(f"| {r['model'].removeprefix('random:')} | {r['device']} | {r['dtype']} | {w['tiles']} | "
                    f"{w['prompt_tokens']} | {ttft} | {tpot} | {agree} (of {w['output_tokens']}) | {r['commit']} | "
                    f"{r['date'][:10]} |")
    return "\n".join(rows)


def table() -> str:
    harness, foundation = [], []
    for f in sorted(glob.glob(str(ROOT / "benchmarks/results/*-e2e.json")), reverse=True):  # newest first
        data = json.load(open(f))  # one record, or a list of them (gpu_check.sh merges its runs)
        for r in data if isinstance(data, list) else [data]:
            (harness if str(r.get("schema", "")).startswith("internvl-engine/e2e/") else foundation).append(r)
    parts = []
    if harness:
        parts.append(harness_table(sorted(harness, key=lambda r: r["date"], reverse=True)))
    if foundation:
        parts.append("Earlier batch-1 records (before the harness):\n\n" + foundation_table(foundation))
    return "\n\n".join(parts)


def kernel_table() -> str:
    """One table per device (its newest record): each op, case and backend with time, throughput, fraction of
    the peaks measured in that run, and the speedup over the torch backend in the same run."""
    newest = {}
    for f in sorted(glob.glob(str(ROOT / "benchmarks/results/*-kernels.json"))):
        r = json.load(open(f))
        if r["device"] not in newest or r["date"] > newest[r["device"]]["date"]:
            newest[r["device"]] = r
    parts = []
    for r in newest.values():
        p = r["peaks"]
        parts.append(f"{r['device']}, {r['dtype']}, commit {r['commit']}, {r['date'][:10]}: peaks measured in the run "
                     f"{p['copy_bytes_per_s'] / 1e9:.0f} GB/s copy, {p['matmul_flop_per_s'] / 1e12:.2f} TFLOP/s "
                     f"matmul ({p['matmul']}); `{r['command']}`\n")
        rows = ["| model | op | case | backend | time (us) | GB/s | TFLOP/s | of peak | vs torch |",
                "|---|---|---|---|---|---|---|---|---|"]
        for x in r["results"]:
            if "error" in x:
                if "runs on cpu tensors" in x["error"]:  # 2be9dbb's harness also tried the CPU-only backend on CUDA
                    continue
                rows.append(f"| {x['model']} | {x['op']} | {x['case']} | {x['backend']} | error | | | | |")
                continue
            tf = f"{x['flop_per_s'] / 1e12:.2f}" if x["flops"] else ""
            vs = "" if x["speedup_vs_torch"] is None else f"{x['speedup_vs_torch']:.2f}x"
            rows.append(f"| {x['model'].removeprefix('internvl3-')} | {x['op']} | {x['case']} | {x['backend']} | "
                        f"{x['time_s'] * 1e6:.1f} | {x['bytes_per_s'] / 1e9:.1f} | {tf} | "
                        f"{100 * x['fraction_of_peak']:.0f} % | {vs} |")
        parts.append("\n".join(rows))
    return "\n\n".join(parts) if parts else "(no kernel records yet)"


def _replace(text: str, begin: str, end: str, body: str) -> str:
    return re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: f"{begin}\n{body}\n{end}", text, flags=re.S)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--write-readme", action="store_true")
    args = ap.parse_args()
    t, k = table(), kernel_table()
    if args.write_readme:
        readme = ROOT / "README.md"
        readme.write_text(_replace(_replace(readme.read_text(), BEGIN, END, t), KBEGIN, KEND, k))
    print(t, k, sep="\n\n")


if __name__ == "__main__":
    main()
