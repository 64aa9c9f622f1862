"""The checkpoint policy of a run: when to save, how a save is written and marked, what is kept, and how an
engine is loaded back (format and completeness rules: `cprec.checkpoint`).

A save is due every `checkpoint.every` steps, at a stable-phase branch point (`branch_every`), at the end of
this process's steps and on a stop signal. Every rank writes its part, then each hashes a share of the
checkpoint's files; rank 0 writes the marker with the whole file table and prunes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from cprec import checkpoint as ckpt
from cprec import schedule as wsa
from cprec.errors import CPRecError


@dataclass
class CheckpointConfig:
    every: int = 50  # save every N steps (and at the end, and on SIGTERM/SIGUSR1)
    keep_last: int = 2  # complete checkpoints kept besides branch points and the latest
    branch_every: int = 0  # keep stable-phase checkpoints at multiples of this step forever (0: none)


class Checkpointer:
    def __init__(self, cfg: CheckpointConfig, root: Path, schedule: wsa.ScheduleConfig, rank: int, world: int):
        self.cfg, self.root, self.schedule, self.rank, self.world = cfg, root, schedule, rank, world

    def is_branch_point(self, step: int) -> bool:
        every = self.cfg.branch_every
        return every > 0 and step % every == 0 and wsa.phase(step, self.schedule) == "stable"

    def due(self, step: int, end: int) -> bool:
        return step == end or step % self.cfg.every == 0 or self.is_branch_point(step)

    def save(self, engine, step: int, state: dict) -> str:
        """Write checkpoint `step` with the CPRec training `state`; complete once every rank wrote it."""
        tag = ckpt.tag_for(step)
        try:
            engine.save_checkpoint(str(self.root), tag=tag, client_state={"cprec": state}, save_latest=False)
        except (OSError, RuntimeError) as exc:  # torch reports a full disk as "enforce fail ... iostream error"
            previous = ckpt.latest_complete(self.root)
            raise CPRecError(f"could not write checkpoint {self.root / tag} ({str(exc).splitlines()[0]}): is "
                             f"the disk full or the folder read-only? The previous complete checkpoint "
                             f"({previous or 'none'}) is intact and the partial one is removed by the next start; "
                             f"make room, then --resume") from None
        torch.distributed.barrier()
        names = ckpt.checkpoint_files(self.root / tag)
        shares = [None] * self.world
        torch.distributed.all_gather_object(shares, ckpt.describe_files(self.root / tag,
                                                                        names[self.rank::self.world]))
        if self.rank == 0:
            ckpt.mark_complete(self.root, tag, {**state, "files": {n: e for share in shares for n, e in share.items()}})
            ckpt.prune(self.root, self.cfg.keep_last, self.is_branch_point)
        torch.distributed.barrier()
        return tag


def refuse_unsafe_pickles(checkpoint: Path, rank: int, world: int) -> None:
    """Collective: every rank checks its share of the checkpoint's `.pt` files with the restricted unpickler
    (`cprec.checkpoint.unsafe_pickle`) before DeepSpeed unpickles them without restrictions; one refusal stops
    every rank, naming each file."""
    names = ckpt.checkpoint_files(checkpoint)[rank::world]
    found = [None] * world
    torch.distributed.all_gather_object(found, ckpt.unsafe_pickles(checkpoint, names))
    ckpt.refuse_unsafe(checkpoint, [p for share in found for p in share])


def load_engine(engine, directory: Path, tag: str, rank: int, world: int) -> None:
    """Weights and optimizer state of checkpoint `directory/tag` into the engine; a checkpoint written by
    another number of ranks goes through DeepSpeed's universal conversion first (once, by rank 0). The caller
    has checked the checkpoint's files with `refuse_unsafe_pickles` (the Trainer does, before it writes)."""
    saved_world = ckpt.saved_world_size(directory / tag)
    if saved_world and saved_world != world:
        if rank == 0:
            ckpt.to_universal(directory / tag)
        torch.distributed.barrier()
        engine._config.load_universal_checkpoint = True
        tag = tag + "_universal"
        refuse_unsafe_pickles(directory / tag, rank, world)  # an earlier conversion's folder is reused as it is
    path, _ = engine.load_checkpoint(str(directory), tag=tag, load_optimizer_states=True,
                                     load_lr_scheduler_states=False)
    if path is None:
        raise CPRecError(f"DeepSpeed could not load {directory / tag}")
