"""The trainer's launchers, signals and refusals for real: torchrun, two nodes on localhost, the deepspeed
launcher, stop signals, ZeRO stages across a resume, and the config and batch errors (split from
test_trainer.py so that the two halves run side by side on two cores)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cprec import checkpoint as ckpt
from cprec.config import ConfigError, from_dict
from cprec.errors import CPRecError
from cprec.train.engine import build_ds_config
from cprec.train.config import TrainConfig
from tests.conftest import train_tiny
from tests.helpers import REPO, TINY, free_port, metrics


@pytest.mark.slow
def test_resume_inside_a_phase_with_its_own_mixture_keeps_its_position(work):
    """A cut in an anneal phase with its own mixture: the resumed run continues that phase's order."""
    mix = "phase_mixtures={anneal: {mixed: 1.0}}"
    train_tiny(work, "own_mix_straight", mix)
    train_tiny(work, "own_mix_cut", mix, "max_steps=9")
    train_tiny(work, "own_mix_cut", mix, "--resume")
    straight, resumed = metrics(work / "own_mix_straight"), metrics(work / "own_mix_cut")
    assert list(straight[-1]["tokens_per_stream"]) == ["mixed"]  # the anneal phase reads its own mixture
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]
    assert [r["tokens_per_stream"] for r in resumed] == [r["tokens_per_stream"] for r in straight]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_saves_at_the_next_step_and_exits_zero(work, sig):
    name = f"signal_{sig.name}"
    proc = train_tiny(work, name, "schedule.stable_steps=100000", "log_every=1", wait=False)
    run = work / name
    deadline = time.time() + 240
    while time.time() < deadline and not ((run / "metrics.jsonl").is_file() and len(metrics(run)) >= 2):
        time.sleep(0.2)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2
    for pid in workers:  # as Slurm signals the job's processes
        os.kill(int(pid), sig)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out[-3000:]
    tag = ckpt.latest_complete(run / "checkpoints")
    assert tag is not None and ckpt.read_state(run / "checkpoints" / tag)["step"] == metrics(run)[-1]["step"]
    assert f"{sig.name}: saved {tag}, exiting" in out


@pytest.mark.slow
def test_two_node_rendezvous_on_localhost(work):
    port = free_port()
    procs = []
    for node in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
               "--node_rank", str(node), "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}",
               "--rdzv_id", "cprec-test", str(REPO / "launch" / "train.py"), "--config", str(work / "tiny.yaml"),
               f"run_dir={work / 'two_nodes'}", "max_steps=3"]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:]
    state = ckpt.read_state(work / "two_nodes" / "checkpoints" / ckpt.tag_for(3))
    assert state["world_size"] == 2 and len(metrics(work / "two_nodes")) == 3


@pytest.mark.slow
def test_deepspeed_launcher_runs_two_ranks(work):
    launcher = Path(sys.executable).parent / "deepspeed"  # this environment's, activated or not
    cmd = [str(launcher), "--num_gpus", "2", "--master_port", str(free_port()), str(REPO / "launch" / "train.py"),
           "--config", str(work / "tiny.yaml"), f"run_dir={work / 'ds_launcher'}", "max_steps=2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert ckpt.read_state(work / "ds_launcher" / "checkpoints" / ckpt.tag_for(2))["world_size"] == 2


@pytest.mark.slow
def test_config_and_batch_errors_name_what_is_wrong(work):
    with pytest.raises(ConfigError, match="unknown key 'schedule.peak'"):
        from_dict(TrainConfig, {"shards": "x", "schedule": {"peak": 1}})
    cfg = from_dict(TrainConfig, {"shards": "x", "global_batch": 8, "micro_batch": 3})
    with pytest.raises(CPRecError, match=r"global_batch=8 must equal world size \(2\) x micro_batch \(3\) x "
                                         r"grad_accum \(1\) = 6"):
        build_ds_config(cfg, 2, cuda=False)
    proc = train_tiny(work, "exists", "max_steps=1", nproc=1)  # one rank: the refusal is the same on any number
    again = train_tiny(work, "exists", "max_steps=1", check=False, nproc=1)
    assert again.returncode != 0 and "already holds checkpoints; pass --resume" in again.stderr
    assert proc.returncode == 0


def test_zero_stage_and_loss_chunk_settings_are_checked(tmp_path):
    for bad in (0, 4):
        with pytest.raises(CPRecError, match=f"zero_stage must be one of 1, 2, 3 .* got {bad}"):
            from_dict(TrainConfig, {"shards": "x", "zero_stage": bad}).validate()
    with pytest.raises(CPRecError, match="loss_chunk_tokens must be >= 0"):
        from_dict(TrainConfig, {"shards": "x", "loss_chunk_tokens": -1}).validate()
    cfg = from_dict(TrainConfig, {"shards": "x", "zero_stage": 2, "global_batch": 2})
    ds = build_ds_config(cfg, 1, cuda=False)
    assert ds["zero_optimization"]["stage"] == 2
    assert "reduce_scatter" not in ds["zero_optimization"]  # the world-size-1 ZeRO-3 settings are not added
    assert build_ds_config(from_dict(TrainConfig, {"shards": "x", "global_batch": 2}), 1,
                           cuda=False)["zero_optimization"]["reduce_scatter"] is False
    stage0 = tmp_path / "stage0.json"
    stage0.write_text(json.dumps({"zero_optimization": {"stage": 0}}))
    with pytest.raises(CPRecError, match="zero_optimization.stage is 0; CPRec trains with ZeRO stage 1, 2 or 3"):
        build_ds_config(from_dict(TrainConfig, {"shards": "x", "deepspeed": str(stage0)}), 1, cuda=False)


def test_chunked_loss_head_gives_the_same_losses_and_gradients_with_tied_weights():
    """Whole logits against 17-token chunks (a ragged last chunk), ignored labels included, tied head."""
    import copy

    from transformers import AutoConfig, AutoModelForCausalLM

    from cprec.train.step import ChunkedLossHead, token_losses

    torch.manual_seed(0)
    config = AutoConfig.for_model(**{**TINY, "vocab_size": 1000, "tie_word_embeddings": True})
    whole = AutoModelForCausalLM.from_config(config)
    chunked = copy.deepcopy(whole)
    head = ChunkedLossHead(chunked.get_output_embeddings(), 17)
    ids, targets = torch.randint(0, 1000, (3, 50)), torch.randint(0, 1000, (3, 50))
    targets[:, :5] = -100
    positions = torch.arange(50).repeat(3, 1)
    a, b = token_losses(whole, ids, positions, targets), token_losses(chunked, ids, positions, targets, head)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert (b[:, :5] == 0).all() and head.targets is None
    (a.sum() * 0.3).backward()
    (b.sum() * 0.3).backward()
    for (name, p), q in zip(whole.named_parameters(), chunked.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)
    with pytest.raises(RuntimeError, match="without targets"):
        chunked(input_ids=ids)
    from cprec.train.step import check_chunkable

    check_chunkable(config)  # a plain Llama: fine
    config.final_logit_softcapping = 30.0
    with pytest.raises(CPRecError, match="transforms its logits after the head \\(final_logit_softcapping=30.0\\)"):
        check_chunkable(config)


@pytest.mark.slow
@pytest.mark.parametrize("first,then", [(3, 2), (2, 3)])
def test_resume_or_branch_under_another_zero_stage_is_refused_naming_both(work, first, then):
    run = f"stage{first}_to_{then}"
    train_tiny(work, run, f"zero_stage={first}", "max_steps=4", "checkpoint.branch_every=2", nproc=1)
    before = (work / run / "metrics.jsonl").read_text()
    for args in (["--resume"], ["--anneal-from", str(work / run / "checkpoints" / ckpt.tag_for(4)),
                                "--anneal-steps", "2", f"run_dir={work / run}_branch"]):
        # one rank throughout: the stage check refuses before anything depends on the number of ranks
        proc = train_tiny(work, run, f"zero_stage={then}", *args, check=False, nproc=1)
        assert proc.returncode != 0
        assert f"written under ZeRO stage {first} and this run uses stage {then}" in proc.stdout + proc.stderr
    assert (work / run / "metrics.jsonl").read_text() == before  # nothing of the run rewritten
    assert not (work / f"{run}_branch" / "config.yaml").exists()


@pytest.mark.slow
def test_zero_stage_2_resumes_on_another_number_of_ranks(work):
    train_tiny(work, "stage2_elastic", "zero_stage=2", "max_steps=4")
    train_tiny(work, "stage2_elastic_ref", "zero_stage=2")
    out = train_tiny(work, "stage2_elastic", "zero_stage=2", "micro_batch=2", "--resume", nproc=1)
    assert "written by 2 ranks, now 1" in out.stdout + out.stderr
    got, want = metrics(work / "stage2_elastic"), metrics(work / "stage2_elastic_ref")
    assert [r["tokens_per_stream"] for r in got] == [r["tokens_per_stream"] for r in want]
    for g, w in zip(got[4:], want[4:]):
        assert g["loss"] == pytest.approx(w["loss"], rel=1e-4)
