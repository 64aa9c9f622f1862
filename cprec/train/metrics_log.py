"""What a run reports: `metrics.jsonl` (one record per logged step), TensorBoard scalars, Weights & Biases
(`cprec.tracking`), a progress bar, and the learning-rate and per-stream loss plots drawn at the end. Only
rank 0 reports.

A record holds step, phase, lr, loss, loss and tokens per stream, tokens/s, grad norm, seconds, and MFU on
known GPUs (6 x parameters x tokens/s over the GPUs' dense bf16 peak; attention FLOPs left out). An `eval`
record (`"kind": "eval"`, from `cprec.train.evaluating`) holds step, phase, split, protocol, users, HR@10,
NDCG@10, the same per domain, and seconds; readers tell the two apart with `is_eval`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from cprec.errors import CPRecError
from cprec.staging import writing

# dense bf16 peak FLOP/s per GPU, for MFU; unknown devices report no MFU
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def mfu(n_params: int, tokens_per_s: float, world: int) -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
    return None if peak is None else 6 * n_params * tokens_per_s / (peak * world)


def finite(value) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


class MetricsLog:
    """Rank 0's reporting of one process's steps; every other rank's is a no-op."""

    def __init__(self, run: Path, rank: int, total_steps: int, first_step: int, log_every: int,
                 tensorboard: bool, plots: bool, tracking):
        self.run, self.active, self.total, self.log_every, self.plots = run, rank == 0, total_steps, log_every, plots
        self.tracking = tracking  # cprec.tracking: Weights & Biases, or nothing
        self.writer = self.progress = None
        if not self.active:
            return
        from tqdm import tqdm

        self.progress = tqdm(total=total_steps, initial=first_step, desc=f"train {run.name}", unit=" steps")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise CPRecError("tensorboard: true needs the tensorboard package: pip install tensorboard") from None
            self.writer = SummaryWriter(str(run / "tensorboard"))

    def on_step(self, record: dict) -> None:
        if not self.active:
            return
        self.progress.update(1)
        self.progress.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}", phase=record["phase"])
        if record["step"] % self.log_every and record["step"] != self.total:
            return
        with writing(self.run), open(self.run / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\n")
        self.tracking.log(record)
        if self.writer is not None:
            for key in ("lr", "loss", "tokens_per_s", "grad_norm"):
                if record.get(key) is not None:
                    self.writer.add_scalar(key, record[key], record["step"])
            for name, value in record["loss_per_stream"].items():
                self.writer.add_scalar(f"loss/{name}", value, record["step"])

    def on_eval(self, record: dict | None) -> None:
        """An in-training evaluation's record (None on ranks other than 0)."""
        if not self.active or record is None:
            return
        self.progress.write(f"step {record['step']}: {record['protocol']} HR@10 {record['HR@10']:.4f}, "
                            f"NDCG@10 {record['NDCG@10']:.4f} on {record['users']} {record['split']} users "
                            f"({record['seconds']:.1f} s)")
        with writing(self.run), open(self.run / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\n")
        self.tracking.log({"step": record["step"], "eval": {k: record[k] for k in ("HR@10", "NDCG@10", "seconds")}})
        if self.writer is not None:
            for key in ("HR@10", "NDCG@10"):
                self.writer.add_scalar(f"eval/{key}", record[key], record["step"])
                for domain, values in record["domains"].items():
                    self.writer.add_scalar(f"eval/{domain}/{key}", values[key], record["step"])

    def close(self, finished: bool) -> None:
        if not self.active:
            return
        self.progress.close()
        if self.writer is not None:
            self.writer.close()
        self.tracking.finish()
        if self.plots and finished:
            plot_run(self.run)


def is_eval(record: dict) -> bool:
    return record.get("kind") == "eval"


def read_metrics(run: Path) -> tuple[list[dict], list[dict]]:
    """(step records, eval records) of a run's metrics.jsonl."""
    path = run / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    return [r for r in records if not is_eval(r)], [r for r in records if is_eval(r)]


def plot_run(run: Path) -> None:
    """PNG plots of the learning rate and of the loss per stream, and of the in-training recommendation
    metric when there is one, from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records, evals = read_metrics(run)
    if not records:
        return
    (run / "plots").mkdir(exist_ok=True)
    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(steps, [r["lr"] for r in records])
    ax.set(xlabel="step", ylabel="learning rate", title="WSA schedule")
    fig.tight_layout()
    fig.savefig(run / "plots" / "lr.png", dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(steps, [r["loss"] for r in records], label="all", color="black", linewidth=2)
    for name in sorted({n for r in records for n in r["loss_per_stream"]}):
        points = [(r["step"], r["loss_per_stream"][name]) for r in records if name in r["loss_per_stream"]]
        ax.plot(*zip(*points), label=name, linewidth=0.8, alpha=0.8, marker=".")
    ax.set(xlabel="step", ylabel="loss", title="training loss per stream")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(run / "plots" / "loss.png", dpi=110)
    plt.close(fig)
    if evals:
        plot_eval(run / "plots" / "eval.png", records, evals)


def plot_eval(path: Path, records: list[dict], evals: list[dict]) -> None:
    """HR@10 and NDCG@10 against step, with the phase boundaries (where the step records' phase changes)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    steps = [r["step"] for r in evals]
    for key in ("HR@10", "NDCG@10"):
        ax.plot(steps, [r[key] for r in evals], marker="o", label=key)
    for before, after in zip(records, records[1:]):
        if before["phase"] != after["phase"]:
            ax.axvline(before["step"], color="grey", linestyle="--", linewidth=0.8)
            ax.text(before["step"], ax.get_ylim()[1], f" {after['phase']}", fontsize=7, va="top", color="grey")
    ax.set(xlabel="step", ylabel="metric", title=f"{evals[-1]['protocol']} ranking, {evals[-1]['users']} "
           f"{evals[-1]['split']} users")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
