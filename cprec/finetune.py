"""Downstream fine-tuning (`cprec sft`): the continual pre-training trainer on the packed `sft-*` streams.

A fine-tuning document is a next-item example that prepare renders from a downstream user's training prefix
(`downstream/<domain>/sft.jsonl`): the template's prompt over the history, then the target item's line. Pack
keeps the prompt length of every such document and collation masks it, so the loss falls on the target's
title and end marker only: exactly what evaluation scores.

The CPRec recipe is continual pre-training then fine-tuning (`--model` = the export of a pre-training run);
the ablation "fine-tuning only" is the same command from the base model. The run is an ordinary training run
(`task: sft` in `launch/configs/sft.yaml`), so several ranks work the usual way:
`torchrun --nproc_per_node 8 launch/train.py --config launch/configs/sft.yaml model.name=HF_DIR shards=...`,
then `cprec export`. `cprec sft` is the one-process case, and exports the final checkpoint to `RUN/hf`.
"""

from __future__ import annotations

import math
from pathlib import Path

from cprec import checkpoint as ckpt
from cprec import resources
from cprec.config import load_config
from cprec.data.prepared import sft_stream, stream_name
from cprec.data.shards import ShardSet
from cprec.data.stream import default_mixture
from cprec.errors import CPRecError
from cprec.train.config import TrainConfig
from cprec.train.loop import Trainer
WARMUP_FRACTION, ANNEAL_FRACTION = 0.05, 0.2  # of an epoch-sized schedule; the rest is stable


def sft_mixture(shards: str | Path, domains: list[str]) -> dict[str, float]:
    """The fine-tuning streams of `domains` (domain names such as "Children's", or stream names), by rows."""
    streams = {name: st for name, st in ShardSet(shards).streams.items() if st["kind"] == "sft"}
    mixture = {}
    for domain in domains:
        name = domain if domain in streams else sft_stream(stream_name(domain))
        if name not in streams:
            raise CPRecError(f"{shards}: no fine-tuning stream for domain '{domain}' (fine-tuning streams: "
                             f"{', '.join(streams) or 'none'})")
        mixture[name] = float(streams[name]["rows"])
    return mixture


def size_schedule_to_epochs(cfg: TrainConfig, epochs: float) -> None:
    """Set the schedule's steps to `epochs` passes over the rows of the mixture's streams (5% warmup, 20%
    anneal, the rest stable), keeping its learning rates and shape."""
    if epochs <= 0:
        raise CPRecError(f"--epochs must be > 0, got {epochs}")
    streams = ShardSet(cfg.shards).streams
    mixture = cfg.mixture or default_mixture(streams, cfg.task)
    rows = sum(streams[name]["rows"] for name, weight in mixture.items() if weight > 0 and name in streams)
    total = max(1, math.ceil(epochs * rows / cfg.global_batch))
    s = cfg.schedule
    s.warmup_steps = round(WARMUP_FRACTION * total)
    s.anneal_steps = min(total - s.warmup_steps, max(1, round(ANNEAL_FRACTION * total)))
    s.stable_steps = total - s.warmup_steps - s.anneal_steps


def load_sft_config(model: str, shards: str | Path, run_dir: str | Path, overrides: list[str] = (),
                    config: str | Path | None = None) -> TrainConfig:
    """The fine-tuning config as given (the shards are not read)."""
    config = config or resources.recipe("sft.yaml")
    cfg = load_config(TrainConfig, config,
                      [f"model.name={model}", f"shards={shards}", f"run_dir={run_dir}", *overrides])
    if cfg.task != "sft":
        raise CPRecError(f"{config}: a fine-tuning config needs task: sft (it has task: {cfg.task})")
    return cfg


def sft_config(model: str, shards: str | Path, run_dir: str | Path, overrides: list[str] = (),
               domains: list[str] | None = None, epochs: float | None = None,
               config: str | Path | None = None) -> TrainConfig:
    """The fine-tuning config, its mixture and schedule sized from the shards' fine-tuning streams."""
    cfg = load_sft_config(model, shards, run_dir, overrides, config)
    if domains:
        cfg.mixture = sft_mixture(cfg.shards, domains)
    if epochs is not None:
        size_schedule_to_epochs(cfg, epochs)
    return cfg


def finetune(cfg: TrainConfig, resume: bool = False) -> tuple[dict, Path | None]:
    """Train in this process; export the final checkpoint to RUN/hf (None when stopped early by a signal).
    The caller ends the process group when it has no more training to do."""
    import torch

    from cprec.export import export

    trainer = Trainer(cfg, resume=resume)
    last = trainer.fit()
    hf = None
    if trainer.rank == 0 and trainer.step >= trainer.schedule.total_steps:
        run = Path(cfg.run_dir)
        tag = ckpt.latest_complete(run / "checkpoints")
        hf = export(run / "checkpoints" / tag, run / "hf", overwrite=True)  # its own export, redone on a resume
    torch.distributed.barrier()  # the caller ends the process group: DeepSpeed caches its groups,
    return last, hf                      # so another engine in this process must reuse it, not a new one
