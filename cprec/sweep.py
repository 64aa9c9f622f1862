"""`cprec sweep`: which stable-phase checkpoint to anneal. An anneal branch from each chosen branch point of a
run, each trained, exported and evaluated on the downstream *validation* split, then one table and plot.

    cprec sweep RUN --anneal-steps N [--every K | --steps S1 S2 ...] [--mixture stream=w ...] [--out DIR]

Branch points are the run's complete stable-phase checkpoints: `--steps` names them, `--every K` takes those
at multiples of K, and by default those at multiples of the run's `checkpoint.branch_every` (which retention
keeps forever). Each branch is the ordinary anneal branch (`--anneal-from CKPT --anneal-steps N`, see
`cprec.train.run`), so its schedule, data order and lineage are what `cprec train` gives it, with the
in-training evaluation off (the sweep evaluates the finished branch instead).

Layout of OUT (default RUN/sweep):

    sweep-settings.json       what decides the numbers; a re-run with other settings is refused, naming them
    stepNNNNNNNN/run/         the branch's run directory (trained by the launcher, in a child process)
    stepNNNNNNNN/hf/          its export
    stepNNNNNNNN/eval/        `cprec evaluate ... split=valid` of the export
    stepNNNNNNNN/branch.json  the branch's row, written last: a branch with it is finished
    sweep.json, sweep.md, plots/sweep.png

Resumable: a finished branch (branch.json) is never touched again; an unfinished one resumes its stage: the
training from its latest complete checkpoint (`--resume`), an export that is missing or stale is redone, and
the evaluation resumes from its ranks.jsonl. `--branch I` does the I-th chosen branch only and writes no
table: one Slurm array task per branch, then one plain run (which finds every branch finished) for the table.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import subprocess
import sys
from pathlib import Path

from cprec import checkpoint as ckpt
from cprec import staging
from cprec.tables import markdown_table
from cprec import schedule as wsa
from cprec.errors import CPRecError

SETTINGS = "sweep-settings.json"
BRANCH_ROW = "branch.json"
METRICS = ("HR@10", "NDCG@10")


@dataclasses.dataclass
class SweepSpec:
    """What a sweep computes; `settings()` is what a resumed sweep must match."""
    run: Path
    anneal_steps: int
    out: Path
    eval_cfg: object  # cprec.eval.config.EvalConfig, split valid
    prepared: Path
    every: int | None = None
    steps: list[int] | None = None
    mixture: dict | None = None
    shape: str | None = None
    launcher: list[str] = dataclasses.field(default_factory=lambda: [sys.executable, "-m", "cprec.cli", "train"])

    def settings(self) -> dict:
        e = self.eval_cfg
        return {"run": str(self.run.resolve()), "anneal_steps": self.anneal_steps, "anneal_shape": self.shape,
                "mixture": self.mixture, "prepared": str(self.prepared.resolve()),
                "eval": {"split": e.split, "protocol": e.protocol, "users": e.users, "domains": e.domains,
                         "negatives": e.negatives, "seed": e.seed}}


# ---------------------------------------------------------------- which branch points

def stable_points(run: Path) -> dict[int, Path]:
    """{step: checkpoint} of the run's complete checkpoints that an anneal may branch from."""
    root = run / "checkpoints"
    points = {}
    for tag in ckpt.complete_tags(root):
        state = ckpt.read_state(root / tag)
        if wsa.phase(state["step"], wsa.ScheduleConfig(**state["schedule"])) == "stable":
            points[state["step"]] = root / tag
    return points


def choose_points(run: Path, every: int | None, steps: list[int] | None) -> list[tuple[int, Path]]:
    """The chosen branch points in step order (see the module docstring); errors name what is available."""
    import yaml

    if not (run / "checkpoints").is_dir():
        raise CPRecError(f"{run}: not a CPRec run directory (no checkpoints/)")
    points = stable_points(run)
    have = ", ".join(map(str, sorted(points))) or "none"
    if steps:
        missing = [s for s in steps if s not in points]
        if missing:
            raise CPRecError(f"--steps {missing[0]}: {run} has no complete stable-phase checkpoint at that step "
                             f"(it has: {have})")
        chosen = sorted(set(steps))
    else:
        if every is None:
            saved = yaml.safe_load((run / "config.yaml").read_text()) if (run / "config.yaml").is_file() else {}
            every = (saved.get("checkpoint") or {}).get("branch_every") or 0
            if not every:
                raise CPRecError(f"{run} keeps no branch points (checkpoint.branch_every is 0): choose them with "
                                 f"--steps S1 S2 ... or --every K (complete stable-phase checkpoints: {have})")
        if every < 1:
            raise CPRecError(f"--every must be at least 1, got {every}")
        chosen = [s for s in sorted(points) if s % every == 0]
        if not chosen:
            raise CPRecError(f"{run} has no complete stable-phase checkpoint at a multiple of {every} (it has: "
                             f"{have})")
    return [(s, points[s]) for s in chosen]


# ---------------------------------------------------------------- one branch

def branch_dir(out: Path, step: int) -> Path:
    return out / ckpt.tag_for(step)


def train_branch(spec: SweepSpec, step: int, source: Path) -> Path:
    """Train (or resume, or leave alone when finished) the branch from `source`; its final checkpoint."""
    run = branch_dir(spec.out, step) / "run"
    final = ckpt.tag_for(step + spec.anneal_steps)
    latest = ckpt.latest_complete(run / "checkpoints") if (run / "checkpoints").is_dir() else None
    if latest == final:
        return run / "checkpoints" / final
    if latest is not None:  # half-trained: the same branch, from its latest complete checkpoint
        args = ["--resume", f"run_dir={run}"]
    else:
        args = ["--anneal-from", str(source), "--anneal-steps", str(spec.anneal_steps), f"run_dir={run}",
                "eval.every=0"]
        if spec.shape:
            args += ["--anneal-shape", spec.shape]
        if spec.mixture:
            args += ["--mixture", *(f"{k}={v}" for k, v in spec.mixture.items())]
    cmd = [*spec.launcher, *args]
    print(f"\n== branch from step {step}: {shlex.join(cmd)}", flush=True)
    # a caller holding a process group (the quickstart) must not hand its rank and port to the child
    code = subprocess.run(cmd, env=staging.child_env()).returncode
    if code or ckpt.latest_complete(run / "checkpoints") != final:
        raise CPRecError(f"training the branch from step {step} stopped (exit {code}) before its final checkpoint "
                         f"{final} (command: {shlex.join(cmd)}); run the same sweep again to resume it")
    return run / "checkpoints" / final


def export_branch(checkpoint: Path, hf: Path) -> Path:
    """The export of `checkpoint` in `hf`, redone when missing or of another checkpoint."""
    from cprec.export import EXPORT_MARKER, export

    marker = hf / EXPORT_MARKER
    if marker.is_file() and json.loads(marker.read_text())["checkpoint"] == str(checkpoint):
        return hf
    return export(checkpoint, hf, overwrite=True)


def evaluate_branch(spec: SweepSpec, hf: Path, out: Path) -> dict:
    """`cprec evaluate` of the export on the validation users (it resumes from its own ranks.jsonl)."""
    from cprec.eval.evaluate import evaluate

    if (out / "results.json").is_file():
        return json.loads((out / "results.json").read_text())
    return evaluate(str(hf), spec.prepared, out, dataclasses.replace(spec.eval_cfg))


def pooled(results: dict, protocol: str) -> dict:
    """HR@10 and NDCG@10 over every evaluated user (the user-weighted mean of the domains')."""
    domains = results["domains"].values()
    users = sum(d["users"] for d in domains)
    return {m: sum(d["users"] * d[protocol][m] for d in domains) / users for m in METRICS}


def final_losses(run: Path) -> tuple[float, dict]:
    from cprec.train.metrics_log import read_metrics

    steps, _ = read_metrics(run)
    if not steps:
        raise CPRecError(f"{run}/metrics.jsonl has no step record")
    return steps[-1]["loss"], steps[-1]["loss_per_stream"]


def do_branch(spec: SweepSpec, step: int, source: Path) -> dict:
    """The branch's row: trained, exported and evaluated as needed, or read back when finished."""
    folder = branch_dir(spec.out, step)
    if (folder / BRANCH_ROW).is_file():
        return json.loads((folder / BRANCH_ROW).read_text())
    final = train_branch(spec, step, source)
    hf = export_branch(final, folder / "hf")
    results = evaluate_branch(spec, hf, folder / "eval")
    protocol = "full" if spec.eval_cfg.protocol == "full" else "sampled"
    loss, per_stream = final_losses(folder / "run")
    row = {"branch_step": step, "final_step": step + spec.anneal_steps, "checkpoint": str(final), "hf": str(hf),
           "final_loss": loss, "final_loss_per_stream": per_stream, "protocol": protocol,
           "users": sum(d["users"] for d in results["domains"].values()), **pooled(results, protocol),
           "domains": {name: {m: d[protocol][m] for m in METRICS} | {"users": d["users"]}
                       for name, d in results["domains"].items()}}
    staging.write_json_atomic(folder / BRANCH_ROW, row)
    return row


# ---------------------------------------------------------------- the sweep

def claim(out: Path, settings: dict) -> None:
    """Start OUT, or continue it with the same settings (else name the differences). Not locked: the branches
    of one sweep run as separate array tasks, all in OUT."""
    # another array task may be writing the settings (SETTINGS.tmpPID) or a branch (step*) right now
    staging.claim(out, SETTINGS, settings, "a sweep", lock=False,
                  is_own=lambda folder: all(p.name.startswith((SETTINGS, "step")) for p in staging.entries(folder)))


def best_row(rows: list[dict]) -> dict:
    """Highest HR@10, then NDCG@10, then the earlier branch (cheaper to reproduce)."""
    return max(rows, key=lambda r: (r["HR@10"], r["NDCG@10"], -r["branch_step"]))


def sweep(spec: SweepSpec, branch: int | None = None) -> dict | None:
    """Run the sweep (or its `branch`-th branch only); the summary, or None with `branch`."""
    spec.eval_cfg.validate()
    points = choose_points(spec.run, spec.every, spec.steps)
    if branch is not None and not 0 <= branch < len(points):
        raise CPRecError(f"--branch {branch}: the sweep has {len(points)} branch points "
                         f"({', '.join(str(s) for s, _ in points)}), numbered from 0")
    claim(spec.out, spec.settings())
    if branch is not None:
        do_branch(spec, *points[branch])
        return None
    rows = [do_branch(spec, step, source) for step, source in points]
    summary = {"settings": spec.settings(), "branches": rows, "best": best_row(rows)["branch_step"]}
    staging.write_json_atomic(spec.out / "sweep.json", summary)
    (spec.out / "sweep.md").write_text(sweep_markdown(summary))
    plot_sweep(spec.out / "plots" / "sweep.png", summary)
    return summary


def sweep_markdown(summary: dict) -> str:
    """The table: one row per branch, the best marked."""
    rows = summary["branches"]
    streams = sorted({s for r in rows for s in r["final_loss_per_stream"]})
    s = summary["settings"]
    lines = [f"Anneal branches of `{s['run']}` over {s['anneal_steps']} steps"
             f"{' with mixture ' + json.dumps(s['mixture']) if s['mixture'] else ''}; {rows[0]['protocol']} "
             f"ranking of {rows[0]['users']} validation users ({', '.join(rows[0]['domains'])}). "
             f"Best: the branch from step {summary['best']} (**bold**).", ""]
    cells = []
    for r in rows:
        mark = "**" if r["branch_step"] == summary["best"] else ""
        cells.append([f"{mark}{r['branch_step']}{mark}", f"{r['final_loss']:.4f}",
                      *(f"{r['final_loss_per_stream'][n]:.4f}" if n in r["final_loss_per_stream"] else ""
                        for n in streams),
                      f"{mark}{r['HR@10']:.4f}{mark}", f"{mark}{r['NDCG@10']:.4f}{mark}"])
    lines += markdown_table(["branch step", "final loss", *(f"loss {n}" for n in streams), "HR@10", "NDCG@10"], cells)
    return "\n".join(lines) + "\n"


def plot_sweep(path: Path, summary: dict) -> None:
    """Metrics and final loss per stream against the branch step, the best branch marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["branches"]
    steps = [r["branch_step"] for r in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    for key in METRICS:
        left.plot(steps, [r[key] for r in rows], marker="o", label=key)
    left.axvline(summary["best"], color="grey", linestyle="--", linewidth=0.8, label="best branch")
    left.set(xlabel="branch step", ylabel="validation metric", title=f"{rows[0]['protocol']} ranking after the anneal")
    left.legend(fontsize=8)
    right.plot(steps, [r["final_loss"] for r in rows], color="black", linewidth=2, marker="o", label="all")
    for name in sorted({n for r in rows for n in r["final_loss_per_stream"]}):
        right.plot(steps, [r["final_loss_per_stream"].get(name) for r in rows], marker=".", linewidth=0.8, label=name)
    right.axvline(summary["best"], color="grey", linestyle="--", linewidth=0.8)
    right.set(xlabel="branch step", ylabel="final loss", title="final training loss per stream")
    right.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- the command line

def spec_from_args(args) -> SweepSpec:
    """The sweep of the parsed `cprec sweep` command line. The evaluation settings default to the run's
    `eval:` section (validation split), then the command line's --users/--protocol/--domains and overrides."""
    import yaml

    from cprec.config import from_dict, load_config
    from cprec.eval.config import EvalConfig
    from cprec.train.evaluating import prepared_of
    from cprec.train.arguments import parse_mixture

    run = Path(args.run)
    if not (run / "config.yaml").is_file():
        raise CPRecError(f"{run}/config.yaml is missing: RUN must be a CPRec training run directory")
    saved = yaml.safe_load((run / "config.yaml").read_text())
    from cprec.train.evaluating import TrainEvalConfig

    run_eval = from_dict(TrainEvalConfig, saved.get("eval") or {}, origin=str(run / "config.yaml"), prefix="eval.")
    base = {f.name: getattr(run_eval, f.name) for f in dataclasses.fields(EvalConfig)}
    overrides = list(args.overrides)
    overrides += [f"{k}={getattr(args, k)}" for k in ("users", "protocol") if getattr(args, k) is not None]
    if args.domains:
        overrides.append(f"domains={json.dumps(args.domains)}")
    eval_cfg = load_config(EvalConfig, None, [*overrides, "split=valid"], base=base)
    if args.anneal_steps is None or args.anneal_steps < 1:
        raise CPRecError("--anneal-steps N (N >= 1) is required: the length of every branch's anneal")
    return SweepSpec(run=run, anneal_steps=args.anneal_steps, out=Path(args.out) if args.out else run / "sweep",
                     eval_cfg=eval_cfg, prepared=prepared_of(run_eval, saved["shards"]), every=args.every,
                     steps=args.steps, mixture=parse_mixture(args.mixture) or None, shape=args.anneal_shape,
                     **({"launcher": shlex.split(args.launcher)} if args.launcher else {}))


def add_sweep_arguments(p) -> None:
    p.add_argument("run", help="a training run directory (its stable-phase checkpoints are the branch points)")
    p.add_argument("--anneal-steps", dest="anneal_steps", type=int, required=True, help="each branch's anneal length")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--every", type=int, help="branch from the stable checkpoints at multiples of K (default: "
                       "the run's checkpoint.branch_every)")
    which.add_argument("--steps", type=int, nargs="+", help="branch from these steps")
    p.add_argument("--mixture", nargs="*", default=[], metavar="stream=weight", help="the branches' anneal mixture")
    p.add_argument("--anneal-shape", dest="anneal_shape", help="linear, cosine, 1-sqrt or exponential")
    p.add_argument("--out", help="sweep folder (default: RUN/sweep)")
    p.add_argument("--users", type=int, help="validation users per domain (default: the run's eval.users)")
    p.add_argument("--protocol", choices=["sampled", "full"], help="default: the run's eval.protocol")
    p.add_argument("--domains", nargs="*", help="downstream domains (default: the run's eval.domains, else all)")
    p.add_argument("--branch", type=int, help="only the I-th chosen branch point (from 0), no table: one Slurm "
                   "array task per branch")
    p.add_argument("--launcher", help="command that trains a branch given launch/train.py's arguments "
                   "(default: this Python's `cprec train`), e.g. 'torchrun --nproc_per_node 8 launch/train.py'")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="evaluation settings, e.g. negatives=99 seed=0")
