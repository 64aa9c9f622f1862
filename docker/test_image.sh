#!/usr/bin/env bash
# Build the CPU image from docker/Dockerfile and run it as a user would, with podman and no image registry:
#   sudo bash docker/test_image.sh            (root: podman, debootstrap and the test user's files need it)
# Checks, inside the image: `cprec --help`; a tiny training through the image's entry point (deepspeed
# launch/train.py) into a mounted run folder, as a non-root user (--user 4242:4242); a resume of it; an export;
# every file on the host owned by that user; the configs shipped with the package found from any folder.
#
# Needs: podman and runc (apt install podman runc debootstrap); /etc/containers/containers.conf with
# `[containers]` `default_ulimits = []` where the VM refuses podman's default rlimits (this script adds it).
# Settings (environment):
#   BASE_IMAGE   the base (default localhost/debian-bookworm:base, made with debootstrap when missing)
#   TORCH_INDEX  a PEP 503 index holding torch (default: one served from TORCH_WHEELS on localhost)
#   TORCH_WHEELS a folder with torch's CPU wheel for the base's Python (default /opt/wheels)
#   OUT          where the log and summary go (default benchmarks/results/<date>-image)
#   PIP_CA       a CA bundle pip inside the build must trust (default: this machine's pip `cert` setting, when it
#                has one: a registry proxy that re-signs TLS); mounted for the build only, not kept in the image
set -euo pipefail
cd "$(dirname "$0")/.."
BASE_IMAGE=${BASE_IMAGE:-localhost/debian-bookworm:base}
TORCH_WHEELS=${TORCH_WHEELS:-/opt/wheels}
IMAGE=localhost/cprec:cpu
OUT=${OUT:-benchmarks/results/$(date +%F)-image}
USER_ID=4242
PODMAN=(podman --runtime runc)  # crun refuses this VM's hybrid cgroups
mkdir -p "$OUT"
step() { printf '\n== %s\n' "$*"; }
exec > >(tee "$OUT/test_image.log") 2>&1

if ! grep -qs default_ulimits /etc/containers/containers.conf; then
  mkdir -p /etc/containers && printf '[containers]\ndefault_ulimits = []\n' >> /etc/containers/containers.conf
fi
if ! podman image exists "$BASE_IMAGE"; then
  step "base image $BASE_IMAGE from debootstrap (Debian bookworm, minbase)"
  rootfs=$(mktemp -d)
  debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates bookworm "$rootfs"
  tar -C "$rootfs" -c . | podman import - "$BASE_IMAGE"
  rm -rf "$rootfs"
fi

server=""
if [ -z "${TORCH_INDEX:-}" ]; then  # a one-package index over the local wheel, for the build only
  index=$(mktemp -d)
  mkdir -p "$index/simple/torch"
  wheel=$(ls "$TORCH_WHEELS"/torch-2.13.0*cp311*.whl | head -1)
  ln -s "$wheel" "$index/simple/torch/$(basename "$wheel")"
  echo "<a href=\"$(basename "$wheel")\">$(basename "$wheel")</a>" > "$index/simple/torch/index.html"
  # a fixed port while it is free: the index's address is a build argument, so a new one would rebuild every
  # layer from torch's on (a code change should rebuild only the last ones)
  port=$(python3 -c 'import socket
s = socket.socket()
try: s.bind(("127.0.0.1", 47113))
except OSError: s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])')
  python3 -m http.server "$port" --bind 127.0.0.1 --directory "$index" > /dev/null 2>&1 &
  server=$!
  TORCH_INDEX="http://127.0.0.1:$port/simple"
fi
cleanup() { [ -n "$server" ] && kill "$server" 2>/dev/null || true; }
trap cleanup EXIT

build_mounts=()
PIP_CA=${PIP_CA:-${PIP_CERT:-$(pip config list 2>/dev/null | sed -n "s/^global.cert='\(.*\)'$/\1/p" | head -1)}}
if [ -n "$PIP_CA" ]; then  # pip reads /etc/pip.conf; both files exist during the build's RUN steps only
  pipconf=$(mktemp)
  printf '[global]\ncert = /etc/ssl/certs/build-ca.crt\n' > "$pipconf"
  build_mounts=(-v "$PIP_CA:/etc/ssl/certs/build-ca.crt:ro" -v "$pipconf:/etc/pip.conf:ro")
fi

step "build $IMAGE (base $BASE_IMAGE, torch from $TORCH_INDEX, no extras)"
start=$(date +%s)
"${PODMAN[@]}" build --network host "${build_mounts[@]}" -f docker/Dockerfile -t "$IMAGE" \
  --build-arg BASE_IMAGE="$BASE_IMAGE" --build-arg TORCH_INDEX="$TORCH_INDEX" --build-arg EXTRAS= \
  --build-arg PYTHON=python3.11 .
build_s=$(( $(date +%s) - start ))
size=$(podman image inspect "$IMAGE" --format '{{.Size}}')
echo "built in ${build_s} s; image size $((size / 1000000)) MB"

runs=$(mktemp -d)
chown "$USER_ID:$USER_ID" "$runs"
as_user=("${PODMAN[@]}" run --rm --network none --ipc host --user "$USER_ID:$USER_ID" -v "$runs:/runs")

step "cprec --help"
"${PODMAN[@]}" run --rm --network none --entrypoint cprec "$IMAGE" --help | head -5

step "the shipped configs are found from another folder"
"${as_user[@]}" --workdir /runs --entrypoint python "$IMAGE" -c "
from cprec import resources
for path in (resources.ds_config('zero3_fp32_cpu.json'), resources.recipe('quickstart.yaml')):
    assert path.is_file(), path
    print(path)"

step "random shards and a tiny config in the mounted folder"
"${as_user[@]}" --entrypoint python "$IMAGE" -c "
import yaml
from cprec.data.shards import write_random_shardset
write_random_shardset('/runs/shards', {'a': 64, 'mixed': 32}, seq_len=32, shard_rows=16, vocab=128)
tiny = {'model_type': 'llama', 'vocab_size': 128, 'hidden_size': 32, 'intermediate_size': 64, 'num_hidden_layers': 2,
        'num_attention_heads': 4, 'num_key_value_heads': 2, 'max_position_embeddings': 64}
config = {'shards': '/runs/shards', 'model': {'name': None, 'config': tiny}, 'global_batch': 4, 'micro_batch': 2,
          'schedule': {'peak_lr': 0.003, 'min_lr': 0.0003, 'warmup_steps': 1, 'stable_steps': 2, 'anneal_steps': 1},
          'checkpoint': {'every': 1}, 'plots': False}
open('/runs/tiny.yaml', 'w').write(yaml.safe_dump(config))"

step "train 2 of 4 steps through the entry point (deepspeed launch/train.py)"
"${as_user[@]}" "$IMAGE" --config /runs/tiny.yaml run_dir=/runs/run max_steps=2
step "resume to the end"
"${as_user[@]}" "$IMAGE" --resume run_dir=/runs/run
step "export the last checkpoint"
"${as_user[@]}" --entrypoint cprec "$IMAGE" export /runs/run/checkpoints/step00000004 --out /runs/hf

step "what the host sees"
ls -ln "$runs" "$runs/run" "$runs/hf"
python3 - "$runs" <<'EOF'
import json, sys
from pathlib import Path
runs = Path(sys.argv[1])
steps = [json.loads(line)["step"] for line in (runs / "run" / "metrics.jsonl").read_text().splitlines()]
assert steps == [1, 2, 3, 4], steps
assert (runs / "hf" / "config.json").is_file() and any((runs / "hf").glob("*.safetensors")), list((runs / "hf").iterdir())
print("metrics steps", steps, "; export", sorted(p.name for p in (runs / "hf").iterdir()))
EOF
foreign=$(find "$runs" ! -uid "$USER_ID" | head -5)
if [ -n "$foreign" ]; then echo "FAIL: not owned by $USER_ID: $foreign"; exit 1; fi
echo "every file under the mounted folder is owned by $USER_ID:$USER_ID"
rm -rf "$runs"
printf '\nOK: build %s s, image %s MB\n' "$build_s" "$((size / 1000000))" | tee "$OUT/summary.txt"
