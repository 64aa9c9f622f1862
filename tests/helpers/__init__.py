"""What many test files share: the repository, a tiny Llama config, running `cprec` and `torchrun` in fresh
processes, and reading what they wrote. Fixtures live in `tests/conftest.py`; the scripts beside this file are
children that tests start (killed at chosen moments)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TRAIN_SCRIPT = REPO / "launch" / "train.py"
# a random 2-layer Llama small enough for two gloo ranks on a laptop
TINY = {"model_type": "llama", "vocab_size": 128, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}


def installed(name: str) -> bool:
    try:
        importlib.metadata.distribution(name)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _failed(cmd, proc) -> AssertionError:
    return AssertionError(f"{' '.join(map(str, cmd))} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")


def run_cli(*args, env: dict | None = None, check: bool = True, timeout: int = 600, **kwargs):
    """`cprec ARGS` in a fresh process (a trainer initialises a process group of its own); `env` adds to
    this process's environment."""
    cmd = [sys.executable, "-m", "cprec.cli", *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
                          **kwargs)
    if check and proc.returncode:
        raise _failed(cmd, proc)
    return proc


def torchrun(*args, nproc: int = 2, env: dict | None = None, check: bool = True, wait: bool = True,
             script: Path = TRAIN_SCRIPT):
    """`torchrun --nproc_per_node NPROC SCRIPT ARGS` on a free port; with `wait=False` the started process (in a
    session of its own, so that a test can signal its whole group)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(free_port()), str(script), *map(str, args)]
    full_env = {**os.environ, **(env or {})}
    if not wait:
        return subprocess.Popen(cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
    proc = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode:
        raise _failed(cmd, proc)
    return proc


def refused(proc, *needles) -> None:
    """Exit 2 with one clear message (no traceback) that says each of `needles`."""
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    for needle in needles:
        assert needle in proc.stderr, proc.stderr[-4000:]


def file_tree(path: Path) -> dict[str, bytes]:
    """Every file's bytes, less the folder lock (`staging.LOCK_FILE`: it names the last command that held it)."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and p.name != ".cprec.lock"}


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
