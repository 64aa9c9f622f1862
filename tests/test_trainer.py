"""The ZeRO-3 trainer for real: two processes over gloo (torchrun), a tiny Llama in fp32, random shards."""

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
from cprec.schedule import ScheduleConfig, branch, lr
from cprec.train.engine import build_ds_config
from cprec.train.config import TrainConfig
from tests.conftest import SCHEDULE, TOTAL, train_tiny
from tests.helpers import REPO, TINY, free_port, metrics



def weights(run: Path, tag: str) -> dict:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(run / "checkpoints"), tag=tag)


@pytest.fixture(scope="module")
def straight(work):
    """Ten steps on two ranks without interruption, a checkpoint after every step, branch points kept."""
    train_tiny(work, "straight", "checkpoint.every=1", "checkpoint.branch_every=2")
    return work / "straight"


@pytest.mark.slow
def test_straight_run_follows_the_schedule_and_writes_the_run_directory(straight):
    records = metrics(straight)
    assert [r["step"] for r in records] == list(range(1, TOTAL + 1))
    cfg = ScheduleConfig(**SCHEDULE)
    assert [r["lr"] for r in records] == [lr(s, cfg) for s in range(TOTAL)]
    assert [r["phase"] for r in records] == ["warmup"] * 2 + ["stable"] * 6 + ["anneal"] * 2
    assert records[-1]["loss"] < records[0]["loss"]
    assert set(records[0]["loss_per_stream"]) == {"a", "b", "mixed"}
    for name in ("config.yaml", "lineage.json", "plots/lr.png", "plots/loss.png", "model/config.json"):
        assert (straight / name).is_file(), name
    assert (straight / "checkpoints" / ckpt.LATEST).read_text().strip() == ckpt.tag_for(TOTAL)
    state = ckpt.read_state(straight / "checkpoints" / ckpt.tag_for(TOTAL))
    assert state["step"] == TOTAL and state["world_size"] == 2 and state["stream"]["step"] == TOTAL


@pytest.mark.slow
@pytest.mark.parametrize("cut", [1, 5, 9])  # in warmup, stable and anneal
def test_stop_and_resume_is_bit_exact(work, straight, cut):
    run = f"cut{cut}"
    train_tiny(work, run, f"max_steps={cut}")
    assert ckpt.latest_complete(work / run / "checkpoints") == ckpt.tag_for(cut)
    train_tiny(work, run, "--resume")
    assert [r["loss"] for r in metrics(work / run)] == [r["loss"] for r in metrics(straight)]  # max |d| = 0
    final, want = weights(work / run, ckpt.tag_for(TOTAL)), weights(straight, ckpt.tag_for(TOTAL))
    assert final.keys() == want.keys() and all(torch.equal(final[k], want[k]) for k in want)


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
def test_kill_during_a_save_resumes_from_the_previous_complete_checkpoint(work, straight):
    run = work / "killed"
    proc = train_tiny(work, "killed", "checkpoint.every=3", check=False,
                    script=REPO / "tests" / "helpers" / "kill_in_save.py", env={"KILL_IN_SAVE": ckpt.tag_for(6)})
    assert proc.returncode != 0
    assert (run / "checkpoints" / ckpt.tag_for(6)).is_dir()  # written, but never marked complete
    assert ckpt.latest_complete(run / "checkpoints") == ckpt.tag_for(3)
    resumed = train_tiny(work, "killed", "checkpoint.every=3", "--resume")
    assert "removed incomplete checkpoint(s) step00000006" in resumed.stdout + resumed.stderr
    assert [r["loss"] for r in metrics(run)] == [r["loss"] for r in metrics(straight)]


@pytest.mark.slow
def test_resume_on_one_rank_sees_the_same_global_rows(work, straight):
    run = work / "two_to_one"
    train_tiny(work, "two_to_one", "max_steps=4")
    out = train_tiny(work, "two_to_one", "--resume", "micro_batch=2", nproc=1)
    assert "written by 2 ranks, now 1" in out.stdout + out.stderr
    assert (run / "checkpoints" / f"{ckpt.tag_for(4)}_universal").is_dir()  # DeepSpeed's conversion
    got, want = metrics(run), metrics(straight)
    assert [r["tokens_per_stream"] for r in got] == [r["tokens_per_stream"] for r in want]  # the same rows
    for g, w in zip(got[4:], want[4:]):  # one rank sums in another order: equal up to rounding
        assert g["loss"] == pytest.approx(w["loss"], rel=1e-4)


@pytest.mark.slow
def test_anneal_branch_starts_from_the_parents_weights_moments_and_lr(work, straight):
    parent = straight / "checkpoints" / ckpt.tag_for(4)
    assert parent.is_dir()  # a branch point outlives retention
    train_tiny(work, "branch", "--anneal-from", str(parent), "--anneal-steps", "3", "max_steps=0")
    branch_run = work / "branch"
    lineage = json.loads((branch_run / "lineage.json").read_text())
    assert lineage["parent"]["step"] == 4 and lineage["parent"]["checkpoint"] == str(parent)
    start = branch_run / "checkpoints" / ckpt.tag_for(4)
    for f in sorted(parent.glob("*optim_states.pt")):
        a = torch.load(f, weights_only=False)["optimizer_state_dict"]
        b = torch.load(start / f.name, weights_only=False)["optimizer_state_dict"]
        sa, sb = a["optimizer_state_dict"]["state"], b["optimizer_state_dict"]["state"]
        assert sa.keys() == sb.keys() and sa
        for k in sa:
            for name in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(sa[k][name], sb[k][name])
    train_tiny(work, "branch", "--resume")  # a branch resumes like any run, from its own checkpoints
    assert json.loads((branch_run / "lineage.json").read_text())["parent"]["step"] == 4  # still its parent's
    records = metrics(branch_run)
    want = branch(ScheduleConfig(**SCHEDULE), 4, 3)
    assert [r["step"] for r in records] == [5, 6, 7]
    assert [r["lr"] for r in records] == [lr(s, want) for s in (4, 5, 6)]
    assert records[0]["lr"] == SCHEDULE["peak_lr"] and [r["phase"] for r in records] == ["anneal"] * 3
    parent_records = metrics(straight)
    assert records[0]["tokens_per_stream"] == parent_records[4]["tokens_per_stream"]  # the data continues


@pytest.mark.slow
def test_export_gives_the_engines_logits(work, straight, tmp_path):
    from transformers import AutoModelForCausalLM

    from cprec.export import export

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(REPO / "tests" / "helpers" / "engine_logits.py"), str(work / "tiny.yaml"), str(tmp_path / "ref.pt"),
           f"run_dir={straight}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-4000:]
    ref = torch.load(tmp_path / "ref.pt")
    assert ref["step"] == TOTAL
    out = export(straight / "checkpoints" / ckpt.tag_for(TOTAL), tmp_path / "hf")
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        logits = model(input_ids=ref["input_ids"]).logits
    torch.testing.assert_close(logits, ref["logits"], rtol=1e-5, atol=1e-5)
    with pytest.raises(CPRecError, match="not a complete checkpoint"):
        export(tmp_path, tmp_path / "nope")


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
    proc = train_tiny(work, "exists", "max_steps=1")
    again = train_tiny(work, "exists", "max_steps=1", check=False)
    assert again.returncode != 0 and "already holds checkpoints; pass --resume" in again.stderr
    assert proc.returncode == 0


# ---------------------------------------------------------------- ZeRO stage and the chunked loss

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
def test_zero_stage_2_trains_resumes_bit_exact_and_exports(work, straight, tmp_path):
    """Stage 2 keeps the parameters whole on each rank: the same rows, a bit-exact resume of its own, and
    checkpoints that export. (A random init differs from ZeRO-3's, which initialises each module's partition as
    it is built; that stage 2 computes ZeRO-3's steps from the same weights is the next test's.)"""
    from cprec.export import export

    train_tiny(work, "stage2", "zero_stage=2")
    train_tiny(work, "stage2_cut", "zero_stage=2", "max_steps=5")
    train_tiny(work, "stage2_cut", "zero_stage=2", "--resume")
    got, want = metrics(work / "stage2"), metrics(straight)
    assert [r["tokens_per_stream"] for r in got] == [r["tokens_per_stream"] for r in want]
    assert got[-1]["loss"] < got[0]["loss"] - 0.5
    assert [r["loss"] for r in metrics(work / "stage2_cut")] == [r["loss"] for r in got]  # max |d| = 0
    tag = ckpt.tag_for(TOTAL)
    assert ckpt.read_state(work / "stage2" / "checkpoints" / tag)["zero_stage"] == 2
    out = export(work / "stage2" / "checkpoints" / tag, tmp_path / "hf")
    from safetensors.torch import load_file

    exported = load_file(str(out / "model.safetensors"))
    saved = weights(work / "stage2", tag)
    shared = set(exported) & set(saved)
    assert len(shared) >= len(saved) - 1  # every weight (lm_head may be tied away in the export)
    assert all(torch.equal(exported[k], saved[k]) for k in shared)


@pytest.mark.slow
@pytest.mark.parametrize("first,then", [(3, 2), (2, 3)])
def test_resume_or_branch_under_another_zero_stage_is_refused_naming_both(work, first, then):
    run = f"stage{first}_to_{then}"
    train_tiny(work, run, f"zero_stage={first}", "max_steps=4", "checkpoint.branch_every=2")
    before = (work / run / "metrics.jsonl").read_text()
    for args in (["--resume"], ["--anneal-from", str(work / run / "checkpoints" / ckpt.tag_for(4)),
                                "--anneal-steps", "2", f"run_dir={work / run}_branch"]):
        proc = train_tiny(work, run, f"zero_stage={then}", *args, check=False)
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


@pytest.fixture(scope="module")
def exported(work, straight):
    """The straight run's step-4 weights as a Hugging Face folder: a start that every ZeRO stage loads alike."""
    from cprec.export import export

    return export(straight / "checkpoints" / ckpt.tag_for(4), work / "hf4")


FROM_EXPORTED = ["model.config=null", "schedule.stable_steps=2", "schedule.anneal_steps=0"]


@pytest.fixture(scope="module")
def from_exported_zero3(work, exported):
    train_tiny(work, "from_hf_stage3", f"model.name={exported}", *FROM_EXPORTED, "zero_stage=3")
    return metrics(work / "from_hf_stage3")


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2])
def test_zero_stages_1_and_2_take_zero3s_steps_from_the_same_weights(work, exported, from_exported_zero3, stage):
    train_tiny(work, f"from_hf_stage{stage}", f"model.name={exported}", *FROM_EXPORTED, f"zero_stage={stage}")
    got, want = metrics(work / f"from_hf_stage{stage}"), from_exported_zero3
    assert len(got) == len(want) == 4
    for g, w in zip(got, want):
        assert g["loss"] == pytest.approx(w["loss"], abs=1e-5)
        assert g["grad_norm"] == pytest.approx(w["grad_norm"], rel=1e-4)


@pytest.mark.slow
def test_chunked_loss_gives_the_same_losses_under_zero3_on_two_ranks(work, straight):
    train_tiny(work, "chunked", "loss_chunk_tokens=24")  # 64 tokens per micro-batch: chunks of 24, 24, 16
    got, want = metrics(work / "chunked"), metrics(straight)
    assert len(got) == TOTAL
    for g, w in zip(got, want):
        assert g["loss"] == pytest.approx(w["loss"], abs=1e-5)
        assert g["grad_norm"] == pytest.approx(w["grad_norm"], rel=1e-4)
