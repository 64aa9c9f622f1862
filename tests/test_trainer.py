"""The ZeRO-3 trainer for real: two processes over gloo (torchrun), a tiny Llama in fp32, random shards."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cprec import checkpoint as ckpt
from cprec.errors import CPRecError
from cprec.schedule import ScheduleConfig, branch, lr
from tests.conftest import SCHEDULE, TOTAL, train_tiny
from tests.helpers import REPO, free_port, metrics


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
def test_stop_and_resume_is_bit_exact(work, straight):
    """Stopped in warmup (step 1), in the stable phase (5) and in the anneal (9), each time resumed: one run
    of four processes, the straight run's losses and final weights exactly."""
    train_tiny(work, "cuts", "max_steps=1")
    for cut, steps in ((5, 4), (9, 4)):
        assert ckpt.latest_complete(work / "cuts" / "checkpoints") == ckpt.tag_for(cut - steps)
        train_tiny(work, "cuts", "--resume", f"max_steps={steps}")
    assert ckpt.latest_complete(work / "cuts" / "checkpoints") == ckpt.tag_for(9)
    train_tiny(work, "cuts", "--resume")
    assert [r["loss"] for r in metrics(work / "cuts")] == [r["loss"] for r in metrics(straight)]  # max |d| = 0
    final, want = weights(work / "cuts", ckpt.tag_for(TOTAL)), weights(straight, ckpt.tag_for(TOTAL))
    assert final.keys() == want.keys() and all(torch.equal(final[k], want[k]) for k in want)


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


# ---------------------------------------------------------------- ZeRO stage and the chunked loss


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
