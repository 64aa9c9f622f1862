#!/usr/bin/env bash
# Issue 28's measurements in one short GPU run (about 9 minutes on one H100; a 10-minute device call):
#   1. levers: SmolLM2-135M and the ~0.5B Llama through the trainer with Liger kernels and compiled decoder
#      blocks (ZeRO-2 and ZeRO-3, and at twice the rows with the chunked loss), each beside a bare torch loop
#      given the same kernels, against ZeRO-3 as shipped -- tokens/s, MFU, peak memory;
#   2. memory: two steps of the paper-scale recipe's 1.5B model at its micro-batch (peak GPU memory).
# Needs beside the repository: .whl/ from benchmarks/gpu_experiment_prepare.sh plus liger-kernel's wheel (the
# prepare script adds it). Results: $OUT/gpu_check.json and $OUT/gpu_throughput.log.
#   LEVERS="label prefix;..." narrows part 1 (default: the four Liger + compiled-blocks settings, as ordered in
#   benchmarks/gpu_check.py's LEVERS); STEPS, TIMEOUT (s per training run) shrink it. CPU smoke test (the same
#   code on a tiny config; Liger is refused there, by name, in its rows):
#   WHEELS=none STEPS=5 TIMEOUT=600 OUT=/tmp/gt bash benchmarks/gpu_throughput.sh
set -euo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
WHEELS=${WHEELS:-.whl}  # WHEELS=none: use this environment's packages (the CPU smoke test)
if [ -d "$WHEELS" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 TORCH_EXTENSIONS_DIR=/tmp/torch_extensions TRITON_CACHE_DIR=/tmp/triton
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1 || echo "no GPU" > "$OUT/gpu.txt"
LEVERS=${LEVERS:-"ZeRO-3 (shipped config);ZeRO-2, Liger + compiled blocks;ZeRO-3, Liger + compiled blocks;ZeRO-2, Liger + compiled blocks, chunked loss, 2x rows"}
python3 benchmarks/gpu_check.py --parts levers,memory --levers "$LEVERS" --steps "${STEPS:-20}" \
  --timeout "${TIMEOUT:-120}" --out "$OUT" 2>&1 | grep -v "WARNING\|real_accelerator" | tee "$OUT/gpu_throughput.log"
