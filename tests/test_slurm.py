"""Slurm for real: a one-node cluster on localhost (tests/slurm_cluster.py) runs launch/slurm_train.sbatch and
launch/slurm_anneal.sbatch, two CPU ranks through the script's torchrun rendezvous, a tiny random Llama.

To the end; pre-empted (warning signal -> checkpoint -> requeue -> resume, with the uninterrupted run's
losses); cancelled (SIGTERM to every process, DataLoader workers included, still saves); a job array of
anneal branches. Each job spends 20-40 s starting two ranks on two cores; the steps take ~0.1 s.
"""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cprec import checkpoint as ckpt
from tests.conftest import tiny_work
from tests.helpers import free_port

REPO = Path(__file__).resolve().parents[1]
# long enough a stable phase that the warning signal, sent after a few steps, lands well before the end
SCHEDULE = {"peak_lr": 0.003, "min_lr": 0.0003, "warmup_steps": 2, "stable_steps": 60, "anneal_steps": 4,
            "anneal_shape": "cosine"}
TOTAL = 66
BRANCH_EVERY = 20  # the straight run keeps the stable checkpoints at steps 20, 40 and 60 as branch points


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tiny_work(tmp_path_factory.mktemp("slurm_work"), SCHEDULE, checkpoint={"every": 1000, "keep_last": 2},
                     plots=False)


def submit(cluster, work: Path, script: str, *args: str, sbatch_options: tuple = (), env: dict | None = None) -> str:
    """sbatch launch/SCRIPT from the repository root, as the README does, on this CPU node: two ranks, the
    node's CPUs, the log in `work` (--chdir); this interpreter's torchrun first on PATH."""
    env = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "CPREC_NPROC_PER_NODE": "2",
           "MASTER_PORT": str(free_port()), **(env or {})}
    return cluster.sbatch("--nodes=1", f"--cpus-per-task={os.cpu_count()}", f"--chdir={work}", *sbatch_options,
                          str(REPO / "launch" / script), *args, cwd=REPO, env=env)


def metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def wait_for_steps(cluster, job: str, run: Path, steps: int, timeout: float = 240) -> None:
    """Until `run` has logged `steps` steps; fails at once if the job ended before."""
    deadline = time.monotonic() + timeout
    while len(metrics(run)) < steps:
        state = cluster.job(job)["JobState"]
        assert state in ("PENDING", "CONFIGURING", "RUNNING"), f"job {job} is {state} before step {steps}"
        assert time.monotonic() < deadline, f"job {job}: no step {steps} within {timeout:.0f} s"
        time.sleep(0.1)


def job_log(work: Path, job: str) -> str:
    return read_log(work / f"cprec-{job}.out")


def read_log(path: Path) -> str:
    """A job's output file: several processes write it at once (ranks, srun), so a multi-byte character (a
    progress bar's block) can be torn by another's write; that byte is replaced, never a failure."""
    return path.read_text(errors="replace")


@pytest.fixture(scope="module")
def straight(slurm_cluster, work):
    """`sbatch launch/slurm_train.sbatch CONFIG run_dir=...`, uninterrupted: the reference run."""
    run = work / "straight"
    job = submit(slurm_cluster, work, "slurm_train.sbatch", str(work / "tiny.yaml"), f"run_dir={run}",
                 f"checkpoint.branch_every={BRANCH_EVERY}")
    return run, job, slurm_cluster.wait_finished(job)[0]


@pytest.mark.slow
@pytest.mark.slurm
def test_sbatch_runs_to_the_end_on_two_ranks(straight, work):
    run, job, record = straight
    assert (record["JobState"], record["ExitCode"], record["Restarts"]) == ("COMPLETED", "0:0", "0"), \
        job_log(work, job)[-3000:]
    assert [r["step"] for r in metrics(run)] == list(range(1, TOTAL + 1))
    state = ckpt.read_state(run / "checkpoints" / ckpt.tag_for(TOTAL))
    assert state["world_size"] == 2 and state["step"] == TOTAL
    assert f"job {job}, restart 0: 1 node(s) x 2 ranks" in job_log(work, job)


@pytest.mark.slow
@pytest.mark.slurm
def test_warning_signal_saves_requeues_and_resumes_with_the_same_losses(slurm_cluster, work, straight):
    run = work / "preempted"
    job = submit(slurm_cluster, work, "slurm_train.sbatch", str(work / "tiny.yaml"), f"run_dir={run}")
    wait_for_steps(slurm_cluster, job, run, 3)
    slurm_cluster.run("scancel", "--signal=USR1", "--batch", job)  # what --signal=B:USR1@120 sends
    record = slurm_cluster.wait_finished(job)[0]
    log = job_log(work, job)
    assert (record["JobState"], record["ExitCode"], record["Restarts"]) == ("COMPLETED", "0:0", "1"), log[-3000:]
    saved = re.search(r"SIGUSR1: saved (step\d{8}), exiting", log)
    assert saved, log[-3000:]
    tag = saved.group(1)
    assert 3 <= int(tag[4:]) < TOTAL  # saved after the steps the test waited for, before the end
    order = ["restart 0:", "pre-emption warning", f"SIGUSR1: saved {tag}, exiting", f"requeueing job {job}",
             "restart 1:", f"resumed {run} at step {int(tag[4:])} from {tag}", f"step {TOTAL}: loss"]
    positions = [log.find(line) for line in order]
    assert -1 not in positions and positions == sorted(positions), list(zip(order, positions))
    got, want = metrics(run), metrics(straight[0])
    assert [r["step"] for r in got] == list(range(1, TOTAL + 1))
    assert [r["loss"] for r in got] == [r["loss"] for r in want]  # bit-exact on CPUs


@pytest.mark.slow
@pytest.mark.slurm
def test_scancel_saves_a_checkpoint_and_the_job_stays_cancelled(slurm_cluster, work):
    run = work / "cancelled"
    job = submit(slurm_cluster, work, "slurm_train.sbatch", str(work / "tiny.yaml"), f"run_dir={run}",
                 "schedule.stable_steps=100000", "loader_workers=1")  # a worker: it gets SIGTERM too
    wait_for_steps(slurm_cluster, job, run, 3)
    slurm_cluster.run("scancel", job)
    record = slurm_cluster.wait_finished(job)[0]
    log = job_log(work, job)
    assert (record["JobState"], record["Restarts"]) == ("CANCELLED", "0"), log[-3000:]
    tag = ckpt.latest_complete(run / "checkpoints")
    assert tag is not None, log[-3000:]
    assert ckpt.read_state(run / "checkpoints" / tag)["step"] == metrics(run)[-1]["step"]
    assert f"SIGTERM: saved {tag}, exiting" in log


@pytest.mark.slow
@pytest.mark.slurm
def test_job_array_anneals_one_branch_per_task(slurm_cluster, work, straight):
    parent = straight[0]
    steps = (BRANCH_EVERY, 2 * BRANCH_EVERY)
    job = submit(slurm_cluster, work, "slurm_anneal.sbatch", str(parent), ",".join(map(str, steps)), "3",
                 sbatch_options=("--array=0-1",))
    records = slurm_cluster.wait_finished(job)
    logs = "\n".join(read_log(p) for p in sorted(work.glob(f"cprec-anneal-{job}_*.out")))
    assert sorted((r["ArrayTaskId"], r["JobState"], r["ExitCode"]) for r in records) == \
        [("0", "COMPLETED", "0:0"), ("1", "COMPLETED", "0:0")], logs[-3000:]
    for step in steps:
        branch = Path(f"{parent}_anneal{step}")
        lineage = json.loads((branch / "lineage.json").read_text())
        assert lineage["parent"]["step"] == step and lineage["anneal_steps"] == 3
        records = metrics(branch)
        assert [r["step"] for r in records] == [step + 1, step + 2, step + 3]
        assert [r["phase"] for r in records] == ["anneal"] * 3 and records[0]["lr"] == SCHEDULE["peak_lr"]
        assert records[0]["tokens_per_stream"] == metrics(parent)[step]["tokens_per_stream"]  # the data continues


def anneal_script(tmp_path: Path, task: int, *args: str) -> subprocess.CompletedProcess:
    """launch/slurm_anneal.sbatch as array task `task`, with a stand-in slurm_train.sbatch that prints its
    arguments: what the task would train, without Slurm."""
    fake = tmp_path / "repo" / "launch"
    fake.mkdir(parents=True, exist_ok=True)
    (fake / "slurm_train.sbatch").write_text('echo "$@"\n')
    env = {**os.environ, "SLURM_ARRAY_TASK_ID": str(task), "SLURM_SUBMIT_DIR": str(tmp_path / "repo")}
    return subprocess.run(["bash", str(REPO / "launch" / "slurm_anneal.sbatch"), *args], env=env,
                          capture_output=True, text=True, cwd=tmp_path)


@pytest.mark.slow
def test_anneal_array_task_picks_its_branch_point_and_resumes_after_a_requeue(tmp_path):
    run = "runs/x"
    first = anneal_script(tmp_path, 1, run, "200,400", "50", "--mixture", "mixed=1")
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines()[-1] == ("-- --anneal-from runs/x/checkpoints/step00000400 --anneal-steps 50 "
                                             "run_dir=runs/x_anneal400 --mixture mixed=1")
    (tmp_path / "runs" / "x_anneal400" / "checkpoints").mkdir(parents=True)
    (tmp_path / "runs" / "x_anneal400" / "checkpoints" / ckpt.LATEST).write_text(ckpt.tag_for(410))
    again = anneal_script(tmp_path, 1, run, "200,400", "50", "--mixture", "mixed=1")
    assert again.stdout.splitlines()[-1] == "-- --resume run_dir=runs/x_anneal400 --mixture mixed=1"
    beyond = anneal_script(tmp_path, 2, run, "200,400", "50")
    assert beyond.returncode == 2 and "array task 2 has no branch point: 200,400 lists 2" in beyond.stderr


@pytest.mark.slow
@pytest.mark.slurm
def test_a_sweep_fans_out_as_a_job_array_then_one_job_writes_the_table(slurm_cluster, sweep_parent, tmp_path):
    """The README's recipe: `cprec sweep ... --branch $SLURM_ARRAY_TASK_ID` as an array, one task per branch
    point, then a plain `cprec sweep` after it (afterok), which finds every branch finished and writes the table."""
    from tests.conftest import SWEEP_ARGS

    out = tmp_path / "sweep"
    sweep = f"{sys.executable} -m cprec.cli sweep {sweep_parent} {' '.join(map(str, SWEEP_ARGS))} --out {out}"
    env = {"PYTHONPATH": os.environ.get("PYTHONPATH", str(REPO))}
    options = ("--nodes=1", f"--cpus-per-task={os.cpu_count()}", f"--chdir={tmp_path}")
    array = slurm_cluster.sbatch(*options, "--array=0-1", "--wrap", f"{sweep} --branch $SLURM_ARRAY_TASK_ID",
                                 cwd=REPO, env=env)
    table = slurm_cluster.sbatch(*options, f"--dependency=afterok:{array}", "--wrap", sweep, cwd=REPO, env=env)
    records = slurm_cluster.wait_finished(array, timeout=600) + slurm_cluster.wait_finished(table, timeout=300)
    logs = "\n".join(read_log(p) for p in sorted(tmp_path.glob("slurm-*.out")))
    assert all((r["JobState"], r["ExitCode"]) == ("COMPLETED", "0:0") for r in records), logs[-3000:]
    rows = json.loads((out / "sweep.json").read_text())["branches"]
    assert [r["branch_step"] for r in rows] == [4, 8]
    table_log = read_log(tmp_path / f"slurm-{table}.out")
    assert "== branch" not in table_log and "sweep in" in table_log  # the table job trained nothing


@pytest.mark.slow
@pytest.mark.slurm
def test_a_container_prefix_runs_each_nodes_torchrun_through_it(slurm_cluster, work):
    """CPREC_EXEC (`apptainer exec --nv cprec.sif`, a `docker run`): here a wrapper that records its arguments
    and runs them, as a container runtime would, with launch/train.py named by CPREC_TRAIN_PY."""
    wrapper, seen = work / "container.sh", work / "container_args.txt"
    wrapper.write_text(f'#!/bin/bash\necho "$@" >> {seen}\nexec "$@"\n')
    run = work / "in_container"
    job = submit(slurm_cluster, work, "slurm_train.sbatch", str(work / "tiny.yaml"), f"run_dir={run}", "max_steps=2",
                 env={"CPREC_EXEC": f"bash {wrapper}", "CPREC_TRAIN_PY": str(REPO / "launch" / "train.py")})
    record = slurm_cluster.wait_finished(job)[0]
    assert (record["JobState"], record["ExitCode"]) == ("COMPLETED", "0:0"), job_log(work, job)[-3000:]
    assert [r["step"] for r in metrics(run)] == [1, 2]
    assert seen.read_text().startswith("torchrun --nnodes 1 --nproc_per_node 2") and \
        str(REPO / "launch" / "train.py") in seen.read_text()
