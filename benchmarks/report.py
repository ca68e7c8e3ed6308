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


def table() -> str:
    rows = ["| model (random weights) | device | dtype | image tiles | prompt tokens | TTFT ours / transformers (ms) "
            "| TPOT ours / transformers (ms) | greedy ids vs transformers | commit | date |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for f in sorted(glob.glob(str(ROOT / "benchmarks/results/*-e2e.json"))):
        for r in json.load(open(f)):
            o, b, w = r["ours"], r.get("baseline_hf"), r["workload"]
            ttft = f"{o['ttft_s'] * 1e3:.1f} / {b['ttft_s'] * 1e3:.1f}" if b else f"{o['ttft_s'] * 1e3:.1f} / -"
            tpot = f"{o['tpot_s'] * 1e3:.2f} / {b['tpot_s'] * 1e3:.2f}" if b else f"{o['tpot_s'] * 1e3:.2f} / -"
            agree = "-" if b is None else ("all equal" if r["ids_agree"] else f"equal up to token {r['ids_agree_prefix']}")
            rows.append(f"| {r['model'].removeprefix('random:')} | {r['device']} | {r['dtype']} | {w['tiles']} | "
                        f"{w['prompt_tokens']} | {ttft} | {tpot} | {agree} (of {w['output_tokens']}) | {r['commit']} | "
                        f"{r['date'][:10]} |")
    return "\n".join(rows)


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
