"""The fault suite: what a hostile but fair user does to CPRec, and what CPRec must do in return.

Each test is one fault case (issue 12 and the cases found since): it fails on the code before its fix. Fast,
CPU only; tiny random models and small generated data. The README's "Faults" table summarises the cases.
"""

from __future__ import annotations


# ================================================================ prepare: readers, inputs and configs
# (section A)



# ================================================================ pack, shards and inspect
# (section B)



# ================================================================ train, checkpoints, export, sft, evaluate
# (section C)

import json as _json
import os as _os
import shutil as _shutil
import signal as _signal
import subprocess as _subprocess
import sys as _sys
import time as _time
from pathlib import Path as _Path

import pytest
import yaml as _yaml

from cprec import checkpoint as _ckpt

_REPO = _Path(__file__).resolve().parents[1]
_TINY = {"model_type": "llama", "vocab_size": 128, "hidden_size": 32, "intermediate_size": 64,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Random shards, a tiny Llama config (4 steps of 4 rows) and one finished run of it."""
    from cprec.data.shards import write_random_shardset

    root = tmp_path_factory.mktemp("train_faults")
    write_random_shardset(root / "shards", {"a": 64, "mixed": 32}, seq_len=32, shard_rows=16, vocab=128)
    config = {"shards": str(root / "shards"), "model": {"name": None, "config": _TINY}, "global_batch": 4,
              "micro_batch": 2, "schedule": {"peak_lr": 0.003, "min_lr": 0.0003, "warmup_steps": 1,
                                             "stable_steps": 2, "anneal_steps": 1},
              "checkpoint": {"every": 1, "keep_last": 10}, "plots": False}
    (root / "tiny.yaml").write_text(_yaml.safe_dump(config))
    _cli("train", "--config", root / "tiny.yaml", f"run_dir={root / 'done'}")
    return root


def _cli(*args, check=True, **kwargs):
    """`cprec ARGS` in a fresh process (a trainer initialises a process group of its own)."""
    proc = _subprocess.run([_sys.executable, "-m", "cprec.cli", *map(str, args)], capture_output=True, text=True,
                           timeout=600, **kwargs)
    if check and proc.returncode:
        raise AssertionError(f"cprec {' '.join(map(str, args))}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def _refused(proc, *needles):
    """Exit 2 with one clear message (no traceback) that says each of `needles`."""
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    for needle in needles:
        assert needle in proc.stderr, proc.stderr[-4000:]


def _copy_run(tiny, name):
    _shutil.copytree(tiny / "done", tiny / name)
    return tiny / name


def _tree(path):
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _metrics(run):
    return [_json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_export_never_removes_a_folder_that_is_not_an_earlier_export(tiny):
    run = _copy_run(tiny, "export_target")
    before = _tree(run)
    last = run / "checkpoints" / _ckpt.tag_for(4)
    _refused(_cli("export", last, "--out", run, check=False), "not an earlier export")
    assert _tree(run) == before  # every checkpoint and the metrics are still there
    _cli("export", last, "--out", tiny / "hf_once")
    _refused(_cli("export", last, "--out", tiny / "hf_once", check=False), "--overwrite")
    _cli("export", run / "checkpoints" / _ckpt.tag_for(2), "--out", tiny / "hf_once", "--overwrite")
    assert _json.loads((tiny / "hf_once" / "cprec_export.json").read_text())["step"] == 2


def test_a_refused_resume_writes_nothing_and_names_the_changed_keys(tiny):
    run = _copy_run(tiny, "refused")
    before = _tree(run)
    _refused(_cli("train", "--config", tiny / "tiny.yaml", f"run_dir={run}", "--resume", "schedule.peak_lr=0.1",
                  check=False), "schedule.peak_lr: 0.003 -> 0.1")
    _refused(_cli("train", "--config", tiny / "tiny.yaml", f"run_dir={run}", "--resume",
                  "model.config.hidden_size=64", check=False), "hidden_size")
    assert _tree(run) == before  # config.yaml, model/config.json and lineage.json untouched
    _cli("train", "--resume", f"run_dir={run}")  # a plain resume is still accepted (the run is finished)
    _cli("export", run / "checkpoints" / _ckpt.tag_for(4), "--out", tiny / "hf_refused")  # and still exports


def test_resume_does_not_inherit_max_steps_from_the_saved_config(tiny):
    run = tiny / "max_steps"
    _cli("train", "--config", tiny / "tiny.yaml", f"run_dir={run}", "max_steps=2")
    assert _ckpt.latest_complete(run / "checkpoints") == _ckpt.tag_for(2)
    _cli("train", "--resume", f"run_dir={run}")  # no --config: the saved one, without its max_steps
    assert [r["step"] for r in _metrics(run)] == [1, 2, 3, 4]
    assert [r["loss"] for r in _metrics(run)] == [r["loss"] for r in _metrics(tiny / "done")]


def test_a_truncated_checkpoint_file_is_named_and_resume_falls_back(tiny):
    run = _copy_run(tiny, "truncated")
    damaged = run / "checkpoints" / _ckpt.tag_for(4)
    victim = sorted(damaged.glob("*model_states.pt"))[0]
    victim.write_bytes(victim.read_bytes()[:100])
    from cprec.errors import CPRecError
    from cprec.export import export

    with pytest.raises(CPRecError, match=f"{victim.name} has 100 bytes"):
        export(damaged, tiny / "hf_truncated")
    proc = _cli("train", "--resume", f"run_dir={run}")
    assert f"checkpoint {_ckpt.tag_for(4)} is damaged" in proc.stdout and victim.name in proc.stdout
    assert "resumed" in proc.stdout and f"at step 3 from {_ckpt.tag_for(3)}" in proc.stdout
    assert [r["loss"] for r in _metrics(run)] == [r["loss"] for r in _metrics(tiny / "done")]


@pytest.mark.parametrize("ranks", [1, 2])
def test_sigterm_to_the_whole_process_group_with_loader_workers_still_saves(tiny, ranks):
    run = tiny / f"pgroup{ranks}"
    if ranks == 1:
        cmd = [_sys.executable, "-m", "cprec.cli", "train"]
    else:
        from tests.test_trainer import free_port

        cmd = [_sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), str(_REPO / "launch" / "train.py")]
    cmd += ["--config", str(tiny / "tiny.yaml"), f"run_dir={run}", "loader_workers=2",
            "schedule.stable_steps=100000", "checkpoint.every=100000"]
    proc = _subprocess.Popen(cmd, stdout=_subprocess.PIPE, stderr=_subprocess.STDOUT, text=True,
                             start_new_session=True)
    deadline = _time.time() + 300
    while _time.time() < deadline and not ((run / "metrics.jsonl").is_file() and len(_metrics(run)) >= 3):
        _time.sleep(0.2)
    _os.killpg(proc.pid, _signal.SIGTERM)  # what scancel or a pre-emption delivers: every process of the job
    out, _ = proc.communicate(timeout=300)
    if ranks == 1:
        assert proc.returncode == 0, out[-4000:]
    assert "SIGTERM: saved" in out, out[-4000:]
    tag = _ckpt.latest_complete(run / "checkpoints")
    assert tag is not None and _ckpt.read_state(run / "checkpoints" / tag)["step"] == _metrics(run)[-1]["step"]


def test_a_full_disk_while_saving_names_the_checkpoint_and_keeps_the_previous_one(tiny):
    import resource

    run = _copy_run(tiny, "full_disk")
    _cli("train", "--config", tiny / "tiny.yaml", f"run_dir={tiny / 'nothing'}", "max_steps=0")  # size of a save
    limit = 64 * 1024  # bytes per file: the run's small files fit, a checkpoint's states do not

    def small_disk():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    _shutil.rmtree(run / "checkpoints" / _ckpt.tag_for(4))
    (run / "checkpoints" / _ckpt.LATEST).write_text(_ckpt.tag_for(3) + "\n")
    proc = _cli("train", "--resume", f"run_dir={run}", check=False, preexec_fn=small_disk)
    _refused(proc, f"could not write checkpoint {run / 'checkpoints' / _ckpt.tag_for(4)}",
             f"previous complete checkpoint ({_ckpt.tag_for(3)}) is intact")
    assert _ckpt.latest_complete(run / "checkpoints") == _ckpt.tag_for(3)
    resumed = _cli("train", "--resume", f"run_dir={run}")  # room again: the partial save is removed, then redone
    assert "removed incomplete checkpoint(s) step00000004" in resumed.stdout
    assert [r["loss"] for r in _metrics(run)] == [r["loss"] for r in _metrics(tiny / "done")]


def test_an_unwritable_run_directory_is_named(tiny):
    import resource

    def nothing_writable():
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))  # every write fails, as on a full or read-only disk

    proc = _cli("train", "--config", tiny / "tiny.yaml", f"run_dir={tiny / 'unwritable'}", check=False,
                preexec_fn=nothing_writable)
    _refused(proc, f"cannot write the run directory {tiny / 'unwritable'}")


def test_bad_training_inputs_get_clear_errors(tiny):
    from cprec.data.shards import write_random_shardset

    write_random_shardset(tiny / "wide_shards", {"a": 16}, seq_len=32, shard_rows=16, vocab=1000)
    _refused(_cli("train", "--config", tiny / "tiny.yaml", f"run_dir={tiny / 'vocab'}",
                  f"shards={tiny / 'wide_shards'}", check=False), "1,000 tokens", "(128)")
    _refused(_cli("train", "--config", tiny / "tiny.yaml", f"run_dir={tiny / 'mt'}", "model.config.model_type=llamma",
                  check=False), "model.config", "llamma")
    _refused(_cli("train", "--config", tiny / "tiny.yaml", f"run_dir={tiny / 'zero'}", "schedule.warmup_steps=0",
                  "schedule.stable_steps=0", "schedule.anneal_steps=0", check=False), "the schedule has no steps")
    parent = _ckpt.tag_for(2)
    _refused(_cli("train", "--anneal-from", tiny / "done" / "checkpoints" / parent, "--anneal-steps", "2",
                  "--mixture", "books=abc", f"run_dir={tiny / 'mix'}", check=False), "--mixture books=abc")


def test_a_second_trainer_without_a_launcher_does_not_collide_on_a_port(tiny):
    import socket

    with socket.socket() as busy:  # what a first trainer on the old fixed port 29511 held
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            busy.bind(("127.0.0.1", 29511))
        except OSError:
            pytest.skip("port 29511 is taken on this machine")
        busy.listen()
        env = {k: v for k, v in _os.environ.items() if k != "MASTER_PORT"}
        _cli("train", "--config", tiny / "tiny.yaml", f"run_dir={tiny / 'port'}", "max_steps=1", env=env)


def test_evaluation_refuses_what_it_cannot_evaluate(tiny, prepared_small, tmp_path):
    _cli("export", tiny / "done" / "checkpoints" / _ckpt.tag_for(4), "--out", tmp_path / "hf")  # a random model:
    _refused(_cli("evaluate", "--model", tmp_path / "hf", "--data", prepared_small, "--out", tmp_path / "e",
                  check=False), "has no tokenizer")                                           # no tokenizer
    for users in ("0", "-3"):
        _refused(_cli("evaluate", "--model", tmp_path / "hf", "--data", prepared_small, "--out", tmp_path / "e",
                      "--users", users, check=False), f"users must be at least 1, got {users}")
    from cprec.config import from_dict
    from cprec.data.prepare import PrepareConfig, prepare
    from tests.conftest import SMALL_WORLD

    flat = tmp_path / "no_downstream"  # every domain pre-trained on: nothing held out
    prepare(from_dict(PrepareConfig, {"source": "synthetic", "synthetic": SMALL_WORLD, "k_core": 2,
                                      "downstream_domains": []}), flat)
    _refused(_cli("evaluate", "--model", tmp_path / "hf", "--data", flat, "--out", tmp_path / "e", check=False),
             "no downstream domain to evaluate on")
    assert not (tmp_path / "e" / "results.json").exists()
