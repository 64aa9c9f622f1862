"""The training command line, one process per rank: `launch/train.py` and `cprec train` share it.

    deepspeed launch/train.py --config launch/configs/quickstart.yaml
    torchrun --nproc_per_node 8 launch/train.py --config C [key=value ...]
    ... --resume                                        continue from the latest complete checkpoint
    ... --anneal-from RUN/checkpoints/stepNNNNNNNN --anneal-steps N [--mixture mixed=1] run_dir=NEW_RUN

Without `--config`, a resumed run reads its own saved config and a branch its parent's (less `max_steps`,
which limits the process that saved it, not the run); overrides come last.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from pathlib import Path

import torch
import yaml

from cprec.config import load_config, parse_overrides
from cprec.errors import CPRecError
from cprec.train.config import TrainConfig
from cprec.train.loop import Trainer


def add_train_arguments(p) -> None:
    """The training command line, shared by `launch/train.py` and `cprec train`."""
    p.add_argument("--config", help="YAML training config")
    p.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint")
    p.add_argument("--anneal-from", dest="anneal_from", help="branch: a stable-phase checkpoint directory")
    p.add_argument("--anneal-steps", dest="anneal_steps", type=int, help="branch: anneal over N steps")
    p.add_argument("--anneal-shape", dest="anneal_shape", help="branch: linear, cosine, 1-sqrt or exponential")
    p.add_argument("--mixture", nargs="*", default=[], metavar="stream=weight", help="branch: its own mixture")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. max_steps=10")


def split_mixture_overrides(args):
    """`--mixture mixed=1 run_dir=R`: nargs='*' takes the override too; a config key (or a dotted one) is never
    a stream name, so those words go back to the overrides."""
    keys = {f.name for f in dataclasses.fields(TrainConfig)}
    is_override = [w.partition("=")[0] in keys or "." in w.partition("=")[0] for w in args.mixture]
    args.overrides = list(args.overrides) + [w for w, o in zip(args.mixture, is_override) if o]
    args.mixture = [w for w, o in zip(args.mixture, is_override) if not o]
    return args


def parse_args(argv: list[str] | None = None):
    import argparse

    p = argparse.ArgumentParser(prog="launch/train.py", description="CPRec continual pre-training (one process "
                                "per rank; start with deepspeed, torchrun or Slurm)")
    add_train_arguments(p)
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # the deepspeed launcher's
    return split_mixture_overrides(p.parse_intermixed_args(argv))


def parse_mixture(pairs: list[str]) -> dict[str, float]:
    """`--mixture mixed=0.7 comedy=0.3` -> {"mixed": 0.7, "comedy": 0.3}."""
    mixture = {}
    for pair in pairs:
        name, sep, weight = pair.partition("=")
        try:
            mixture[name] = float(weight)
        except ValueError:
            raise CPRecError(f"--mixture {pair}: expected stream=weight with a number as weight, "
                             f"e.g. mixed=0.5") from None
        if not sep or not name or not math.isfinite(mixture[name]) or mixture[name] < 0:
            raise CPRecError(f"--mixture {pair}: expected stream=weight with a weight >= 0, e.g. mixed=0.5")
    return mixture


def train_config(args) -> TrainConfig:
    """The run's config from parsed arguments: the --config file, or without one the saved config of the run
    being resumed (or of a branch's parent); then the overrides."""
    base = None
    if not args.config:
        run_dir = parse_overrides(args.overrides).get("run_dir")
        saved = Path(args.anneal_from).parent.parent / "config.yaml" if args.anneal_from else \
            (Path(run_dir) / "config.yaml" if args.resume and run_dir else None)
        base = yaml.safe_load(saved.read_text()) if saved is not None and saved.is_file() else None
        if base is not None:
            base.pop("max_steps", None)  # a limit of the process that saved it, not of the run
    return load_config(TrainConfig, args.config, args.overrides, base=base)


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


def run(args) -> int:
    """Train as the parsed command line says (this process is one rank)."""
    cfg = train_config(args)
    mixture = parse_mixture(args.mixture)
    trainer = Trainer(cfg, resume=args.resume, anneal_from=args.anneal_from, anneal_steps=args.anneal_steps,
                      anneal_mixture=mixture or None, anneal_shape=args.anneal_shape)
    last = trainer.fit()
    if trainer.rank == 0 and last:
        print(f"step {last['step']}: loss {last['loss']:.4f}, lr {last['lr']:.3g}, "
              f"{last['tokens_per_s']:,.0f} tokens/s", flush=True)
    with contextlib.suppress(Exception):
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0

