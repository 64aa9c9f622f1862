"""Optional experiment tracking with Weights & Biases: `wandb: {project, name, mode}` in the training config.

Rank 0 logs every record it writes to `metrics.jsonl`, flattened (`loss_per_stream/mixed`,
`tokens_per_stream/a`, lr, tokens_per_s, grad_norm, mfu when present, ...), against the trainer's `step`. The
W&B run lives in `RUN/wandb/` and keeps its id across resumes and requeues (`RUN/wandb/cprec-run-id`), so a
resumed run continues the same W&B run. `mode: offline` (or `WANDB_MODE=offline`) writes files only, no
network; `wandb sync RUN/wandb/offline-run-*` uploads them later. Needs `pip install 'cprec[wandb]'`.

Tracking never costs a checkpoint: a failure to log (the W&B service killed by the job's SIGTERM, say) is
reported once and logging stops; training and its save go on.
"""

from __future__ import annotations

import importlib.util
import numbers
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

from cprec.errors import CPRecError

MODES = ("online", "offline", "disabled")
RUN_ID_FILE = "cprec-run-id"


@dataclass
class WandbConfig:
    project: str = "cprec"
    name: str | None = None  # the W&B run's display name; default: the run directory's name
    mode: str | None = None  # online, offline or disabled; default: $WANDB_MODE, else online

    def validate(self) -> None:
        if self.mode is not None and self.mode not in MODES:
            raise CPRecError(f"wandb.mode must be one of {', '.join(MODES)}, got '{self.mode}'")
        if self.mode != "disabled" and importlib.util.find_spec("wandb") is None:
            raise CPRecError("wandb: in the config needs the wandb package: pip install 'cprec[wandb]'")


def flatten(record: dict, prefix: str = "") -> dict:
    """The numbers of a metrics record, nested keys joined by '/'; strings (the phase) and None left out."""
    flat = {}
    for key, value in record.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}/"))
        elif isinstance(value, numbers.Real) and not isinstance(value, bool):
            flat[prefix + key] = value
    return flat


class NoTracking:
    """What the trainer holds when W&B is off (or on ranks other than 0)."""

    def log(self, record: dict) -> None:
        pass

    def finish(self) -> None:
        pass


class WandbTracking(NoTracking):
    def __init__(self, run):
        self.run = run

    def log(self, record: dict) -> None:
        if self.run is None:
            return
        try:
            self.run.log(flatten(record))
        except Exception as exc:  # noqa: BLE001  (whatever W&B raises, the training step must go on)
            print(f"wandb: logging stopped at step {record.get('step')}: {exc}", file=sys.stderr, flush=True)
            self.run = None

    def finish(self) -> None:
        if self.run is None:
            return
        try:
            self.run.finish()
        except Exception as exc:  # noqa: BLE001
            print(f"wandb: could not finish the run: {exc}", file=sys.stderr, flush=True)
        self.run = None


def start_wandb(cfg: WandbConfig | None, run_dir: Path, config: dict) -> NoTracking:
    """A W&B run for the training run in `run_dir` (resumed if it had one), or NoTracking when `cfg` is None.
    `config` (the resolved training config) becomes the W&B run's config."""
    if cfg is None or cfg.mode == "disabled":
        return NoTracking()
    import wandb

    folder = Path(run_dir) / "wandb"
    folder.mkdir(parents=True, exist_ok=True)
    id_file = folder / RUN_ID_FILE
    run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:8]
    id_file.write_text(run_id + "\n")
    try:
        # console off: the job log stays the trainer's own (W&B's stdout capture would wrap it)
        run = wandb.init(project=cfg.project, name=cfg.name or Path(run_dir).resolve().name, mode=cfg.mode,
                         dir=str(run_dir), config=config, id=run_id, resume="allow",
                         settings=wandb.Settings(console="off"))
    except Exception as exc:  # noqa: BLE001  (no API key, no network in online mode, ...)
        raise CPRecError(f"wandb: could not start the W&B run ({exc}); fix it, or set wandb.mode=offline "
                         f"(sync later) or remove wandb from the config") from None
    # the trainer's step is the x axis: a resumed run may repeat steps W&B's own counter has passed
    run.define_metric("step")
    run.define_metric("*", step_metric="step")
    return WandbTracking(run)
