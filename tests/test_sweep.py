"""`cprec sweep`: an anneal branch from each chosen branch point, each exported and evaluated on the validation
split; one row per branch, equal to a separate export and `cprec evaluate` of that branch."""

import json
import sys

import pytest

from cprec import checkpoint as ckpt
from cprec.errors import CPRecError
from tests.conftest import SWEEP_ANNEAL, SWEEP_ARGS, run_cli
from tests.helpers import REPO, metrics, refused


@pytest.fixture(scope="module")
def swept(sweep_parent, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "sweep"
    run_cli("sweep", sweep_parent, *SWEEP_ARGS, "--out", out)
    return out


@pytest.mark.slow
def test_a_sweep_writes_one_row_per_branch_equal_to_separate_evaluations(swept, sweep_parent, prepared_small,
                                                                         tmp_path):
    summary = json.loads((swept / "sweep.json").read_text())
    rows = summary["branches"]
    assert [r["branch_step"] for r in rows] == [4, 8]  # the parent's branch_every points
    assert summary["best"] in (4, 8)
    for name in ("sweep.md", "plots/sweep.png"):
        assert (swept / name).is_file(), name
    assert "**" in (swept / "sweep.md").read_text()  # the best branch is marked
    for row in rows:
        final = row["branch_step"] + SWEEP_ANNEAL
        branch = swept / ckpt.tag_for(row["branch_step"]) / "run"
        lineage = json.loads((branch / "lineage.json").read_text())
        assert lineage["parent"]["step"] == row["branch_step"] and lineage["anneal_steps"] == SWEEP_ANNEAL
        assert ckpt.latest_complete(branch / "checkpoints") == ckpt.tag_for(final)
        steps = [json.loads(line) for line in (branch / "metrics.jsonl").read_text().splitlines()]
        assert [r["phase"] for r in steps] == ["anneal"] * SWEEP_ANNEAL
        assert row["final_loss"] == steps[-1]["loss"] and row["final_loss_per_stream"] == steps[-1]["loss_per_stream"]
        # a separate export and evaluation of the branch's final checkpoint gives the row's numbers
        hf = tmp_path / f"hf{final}"
        run_cli("export", branch / "checkpoints" / ckpt.tag_for(final), "--out", hf)
        run_cli("evaluate", "--model", hf, "--data", prepared_small, "--out", tmp_path / f"eval{final}",
                "--protocol", "sampled", "--users", 12, "split=valid")
        results = json.loads((tmp_path / f"eval{final}" / "results.json").read_text())
        for domain, entry in results["domains"].items():
            assert row["domains"][domain] == {"HR@10": entry["sampled"]["HR@10"],
                                              "NDCG@10": entry["sampled"]["NDCG@10"], "users": entry["users"]}
        users = sum(e["users"] for e in results["domains"].values())
        assert row["users"] == users == 24
        assert row["HR@10"] == pytest.approx(sum(e["users"] * e["sampled"]["HR@10"]
                                                 for e in results["domains"].values()) / users, abs=1e-12)


@pytest.mark.slow
def test_a_finished_sweep_is_not_redone_and_other_settings_are_refused(swept, sweep_parent):
    before = {p: p.stat().st_mtime_ns for p in swept.rglob("*") if p.is_file() and "step" in str(p.parent)}
    out = run_cli("sweep", sweep_parent, *SWEEP_ARGS, "--out", swept).stdout
    assert "== branch" not in out  # nothing trained
    assert {p: p.stat().st_mtime_ns for p in before} == before
    refused = run_cli("sweep", sweep_parent, "--anneal-steps", 2, "--out", swept, check=False)
    assert refused.returncode == 2 and "anneal_steps: 3 -> 2" in refused.stderr


@pytest.mark.slow
def test_sweep_branch_points_are_checked(sweep_parent, tmp_path):
    from cprec.sweep import choose_points

    assert [s for s, _ in choose_points(sweep_parent, None, None)] == [4, 8]
    assert [s for s, _ in choose_points(sweep_parent, 8, None)] == [8]
    with pytest.raises(CPRecError, match="--steps 3: .* no complete stable-phase checkpoint .*it has: 4, 8"):
        choose_points(sweep_parent, None, [3])
    refused = run_cli("sweep", sweep_parent, "--anneal-steps", 2, "--steps", 4, "--branch", 1, "--out",
                      tmp_path / "s", check=False)
    assert refused.returncode == 2 and "--branch 1: the sweep has 1 branch points" in refused.stderr


@pytest.mark.slow
def test_a_sweep_killed_half_way_redoes_nothing_finished(swept, sweep_parent, tmp_path):
    """Fault: a sweep job killed while a branch was half-trained. The branch trainer is killed (SIGKILL) in
    the middle of saving the second branch's checkpoint 10 (tests/helpers/kill_in_save.py as the launcher).
    The re-run must not touch the finished first branch, must resume the second from its last complete
    checkpoint (9) rather than start it again (step 9's record is kept as it was), and must give what the
    uninterrupted sweep (`swept`) gives."""
    out = tmp_path / "sweep"
    launcher = f"{sys.executable} {REPO / 'tests' / 'helpers' / 'kill_in_save.py'}"
    killed = run_cli("sweep", sweep_parent, *SWEEP_ARGS, "--out", out, "--launcher", launcher,
                     env={"KILL_IN_SAVE": ckpt.tag_for(10)}, check=False)
    refused(killed, "training the branch from step 8 stopped", "run the same sweep again to resume it")
    first, second = out / ckpt.tag_for(4), out / ckpt.tag_for(8)
    assert (first / "branch.json").is_file() and not (second / "branch.json").exists()
    assert ckpt.latest_complete(second / "run" / "checkpoints") == ckpt.tag_for(9)
    finished = {p: p.stat().st_mtime_ns for p in first.rglob("*") if p.is_file()}
    step9 = (second / "run" / "metrics.jsonl").read_text().splitlines()[0]  # its seconds are this run's own

    resumed = run_cli("sweep", sweep_parent, *SWEEP_ARGS, "--out", out)
    assert "== branch from step 4" not in resumed.stdout and "--resume" in resumed.stdout
    assert {p: p.stat().st_mtime_ns for p in finished} == finished  # the finished branch: not a file touched
    assert f"at step 9 from {ckpt.tag_for(9)}" in resumed.stdout  # resumed, not branched again
    assert (second / "run" / "metrics.jsonl").read_text().splitlines()[0] == step9
    assert [r["step"] for r in metrics(second / "run")] == [9, 10, 11]
    rows = json.loads((out / "sweep.json").read_text())["branches"]
    want = json.loads((swept / "sweep.json").read_text())["branches"]
    drop = ("checkpoint", "hf")  # paths
    assert [{k: v for k, v in r.items() if k not in drop} for r in rows] == \
        [{k: v for k, v in r.items() if k not in drop} for r in want]
