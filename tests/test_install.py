"""A fresh machine and a real install: the backbone converted from an empty cache, and a wheel outside the
checkout. CI runs every test with empty caches (`.ci/run`); these tests empty them once more on purpose."""

import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest
import yaml

from cprec import checkpoint as ckpt
from cprec.backbone import CONVERTED, convert_once
from cprec.data.shards import write_random_shardset

REPO = Path(__file__).resolve().parents[1]


def test_an_interrupted_conversion_is_never_trusted_and_is_redone(tmp_path):
    source = tmp_path / "weights.gguf"
    source.write_bytes(b"gguf")
    target = tmp_path / "cache" / "model"

    def killed_half_way(tmp: Path) -> None:
        (tmp / "config.json").write_text("{}")
        raise KeyboardInterrupt  # a Ctrl-C or a kill while the weights are being written

    with pytest.raises(KeyboardInterrupt):
        convert_once(target, killed_half_way, source)
    assert not target.exists()  # nothing a later run could mistake for a converted folder
    assert len(list(target.parent.glob("model.tmp*"))) == 1

    calls = []

    def complete(tmp: Path) -> None:
        calls.append(tmp)
        (tmp / "config.json").write_text("{}")
        (tmp / "model.safetensors").write_bytes(b"w")

    assert convert_once(target, complete, source) == target
    assert (target / CONVERTED).is_file() and (target / "model.safetensors").is_file()
    assert not list(target.parent.glob("model.tmp*"))  # the interrupted attempt was cleaned up
    convert_once(target, complete, source)
    assert len(calls) == 1  # converted once, then trusted


@pytest.fixture(scope="module")
def smollm2_config(tmp_path_factory):
    """A two-step run of the packaged SmolLM2-135M (ZeRO-3, fp32, CPU) on random shards of its vocabulary."""
    root = tmp_path_factory.mktemp("smollm2_cold")
    write_random_shardset(root / "shards", {"a": 16, "mixed": 8}, seq_len=32, shard_rows=8, vocab=49152)
    config = {"shards": str(root / "shards"), "model": {"name": "smollm2"}, "global_batch": 2, "micro_batch": 1,
              "schedule": {"warmup_steps": 1, "stable_steps": 1, "anneal_steps": 0},
              "checkpoint": {"every": 100}, "plots": False}
    (root / "smollm2.yaml").write_text(yaml.safe_dump(config))
    return root


def _cold_env(cache: Path) -> dict:
    return {**os.environ, "CPREC_CACHE": str(cache), "HF_HOME": str(cache.parent / "hf_home")}


def _assert_trained(run: Path, proc) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert ckpt.read_state(run / "checkpoints" / ckpt.tag_for(2))["step"] == 2


@pytest.mark.slow
def test_smollm2_trains_from_an_empty_cache_on_two_ranks(smollm2_config, tmp_path):
    """A fresh machine: the first rank of the node converts the backbone into the empty cache while the other
    waits (one rank alone takes the same path; a separate one-rank run was dropped to save a minute of CI)."""
    from tests.helpers import free_port

    cache = tmp_path / "cache"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(REPO / "launch" / "train.py"), "--config", str(smollm2_config / "smollm2.yaml"),
           f"run_dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=_cold_env(cache), cwd=tmp_path)
    _assert_trained(tmp_path / "run", proc)
    assert ckpt.read_state(tmp_path / "run" / "checkpoints" / ckpt.tag_for(2))["world_size"] == 2
    assert [p.name for p in next(cache.glob("smollm2-*")).iterdir() if not p.name.startswith(".")] \
        in (["model", "tokenizer"], ["tokenizer", "model"])  # converted once: no second or leftover folder


@pytest.mark.slow
def test_a_wheel_installed_outside_the_checkout_finds_what_it_reads(tmp_path):
    """The install of Docker images and shared cluster environments: a wheel, run from another directory."""
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(wheels), str(REPO)], check=True, capture_output=True, text=True, timeout=600)
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    # the dependencies (torch, deepspeed, ...) come from this environment's site-packages, appended after the
    # new environment's own: a plain path line, so this environment's editable `cprec` finder is not loaded
    import sysconfig

    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                    str(next(wheels.glob("cprec-*.whl")))], check=True, capture_output=True, text=True, timeout=600)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    def run(*args):
        proc = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=elsewhere, env=env)
        assert proc.returncode == 0, f"{args}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        return proc.stdout

    where = run(str(python), "-c", "import cprec, cprec.resources as r; print(cprec.__file__); "
                "print(r.ds_config('zero3_fp32_cpu.json')); print(r.recipe('sft.yaml')); "
                "print(r.recipe('quickstart.yaml'))").splitlines()
    assert all(Path(line).is_relative_to(site) for line in where), where  # the wheel's, not the checkout's
    # a recipe named as in the README, with its explicit `deepspeed: ds_configs/zero3_bf16.json`, from elsewhere
    run(str(python), "-c", "from cprec.config import load_config; from cprec.train.config import TrainConfig; "
        "from cprec.train.engine import build_ds_config; cfg = load_config(TrainConfig, 'launch/configs/ml1m_smollm2_gpu.yaml'); "
        "assert build_ds_config(cfg, 1, cuda=True)['bf16']['enabled']")
    for top in ("ds_configs", "launch/configs"):  # every shipped file, byte for byte
        for source in (REPO / top).iterdir():
            assert (site / "cprec" / "_shipped" / top / source.name).read_bytes() == source.read_bytes()

    write_random_shardset(elsewhere / "shards", {"a": 16}, seq_len=16, shard_rows=8, vocab=64)
    tiny = {"model_type": "llama", "vocab_size": 64, "hidden_size": 16, "intermediate_size": 32,
            "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
            "max_position_embeddings": 16}
    (elsewhere / "tiny.yaml").write_text(yaml.safe_dump({
        "shards": "shards", "model": {"config": tiny, "name": None}, "deepspeed": "auto", "global_batch": 2,
        "schedule": {"warmup_steps": 1, "stable_steps": 1, "anneal_steps": 1}, "plots": False}))
    run(str(env_dir / "bin" / "cprec"), "train", "--config", "tiny.yaml", "run_dir=run")
    assert ckpt.read_state(elsewhere / "run" / "checkpoints" / ckpt.tag_for(3))["step"] == 3
    assert "--epochs" in run(str(env_dir / "bin" / "cprec"), "sft", "--help")
    assert "--sft-steps" in run(str(env_dir / "bin" / "cprec"), "quickstart", "--help")


@pytest.mark.slow
def test_training_on_a_cpu_machine_without_a_compiler(tmp_path):
    """A slim image has no C++ compiler: nothing the trainer runs may need a JIT build (DeepSpeed builds its
    shared-memory all-reduce on a CPU process group's first start unless told not to)."""
    write_random_shardset(tmp_path / "shards", {"a": 16}, seq_len=16, shard_rows=8, vocab=64)
    tiny = {"model_type": "llama", "vocab_size": 64, "hidden_size": 16, "intermediate_size": 32,
            "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
            "max_position_embeddings": 16}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump({
        "shards": str(tmp_path / "shards"), "model": {"config": tiny, "name": None}, "global_batch": 2,
        "schedule": {"warmup_steps": 1, "stable_steps": 1, "anneal_steps": 0}, "plots": False}))
    env = {**os.environ, "CXX": str(tmp_path / "no-compiler"), "CC": str(tmp_path / "no-compiler"),
           "TORCH_EXTENSIONS_DIR": str(tmp_path / "torch_extensions")}  # nothing built here before
    proc = subprocess.run([sys.executable, "-m", "cprec.cli", "train", "--config", str(tmp_path / "tiny.yaml"),
                           f"run_dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=600, env=env)
    _assert_trained(tmp_path / "run", proc)
