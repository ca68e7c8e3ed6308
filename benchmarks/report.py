"""Turns the end-to-end records under benchmarks/results/ (*-e2e.json) into the README's performance table, so
the table is generated, never typed:  python benchmarks/report.py [--write-readme]"""
from __future__ import annotations

import argparse
import glob
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- perf-table:begin -->", "<!-- perf-table:end -->"


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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--write-readme", action="store_true")
    args = ap.parse_args()
    t = table()
    if args.write_readme:
        readme = ROOT / "README.md"
        text = readme.read_text()
        text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), f"{BEGIN}\n{t}\n{END}", text, flags=re.S)
        readme.write_text(text)
    print(t)


if __name__ == "__main__":
    main()
