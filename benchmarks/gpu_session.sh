#!/usr/bin/env bash
# The GPU measurements of issues 14 (evaluation) and 15 (trainer throughput) in one call, as run on a lent
# machine with one GPU and no network (see docs/benchmarks.md, "GPU check"). What it needs beside the repository:
#   .whl/  wheels of what the machine's image lacks (deepspeed built here with `pip wheel --no-deps`,
#          transformers, tokenizers, pydantic and its parts, hjson, zstandard, typing_extensions), for Python 3.12
#   .gpu/smollm2-config/  SmolLM2-135M's config.json and tokenizer files, for gpu_eval's random-weights
#          stand-in (the real weights, 98 MB of GGUF, travel in parts: gpu_experiment_prepare.sh)
# Results go to $OUT (gpu.txt, levers.log, gpu_check.json, eval.log, gpu_eval.json).
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 TORCH_EXTENSIONS_DIR=/tmp/torch_extensions
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import sys, torch, deepspeed, transformers; print(sys.version.split()[0], torch.__version__,
deepspeed.__version__, transformers.__version__)" 2>&1 | grep -v WARNING | tee -a "$OUT/gpu.txt"
PARTS=" ${PARTS:-levers eval} "  # e.g. PARTS=eval: the evaluation only (about 3 minutes of GPU time)
if [[ $PARTS == *" levers "* ]]; then
  timeout "${LEVERS_S:-370}" python3 benchmarks/gpu_check.py --parts levers --steps 8 --micro-batch 16 --timeout 100 \
    --out "$OUT" 2>&1 | grep -v "WARNING\|real_accelerator" | tee "$OUT/levers.log"
fi
if [[ $PARTS == *" eval "* ]]; then
  timeout "${EVAL_S:-200}" python3 benchmarks/gpu_eval.py --model random:.gpu/smollm2-config --users 512 \
    --batch-users 256 512 128 256 512 --beam 256 --exhaustive-users 128 --check-users 1 \
    --out "$OUT/gpu_eval.json" --profile "$OUT/eval_profile.txt" --host-profile "$OUT/eval_host_profile.txt" 2>&1 \
    | grep -v "WARNING\|real_accelerator" | tee "$OUT/eval.log"
fi
