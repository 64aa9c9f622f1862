"""Process groups, the one owner, for training and for evaluation.

* `init_distributed()` (training): joins the launcher's process group (torchrun, deepspeed, Slurm), or makes
  one for a lone process on a free port; gloo on CPUs, NCCL on GPUs. Returns (rank, world, cuda).
* `RankGroup` (evaluation): this process's place among the ranks; its collectives carry small Python objects
  over gloo whatever the device, so no NCCL timeout can end a long evaluation.
* `close_process_group(clean)`: every command closes its group before the interpreter's teardown.
"""

from __future__ import annotations

import os
from datetime import timedelta


def init_distributed():
    import warnings

    import deepspeed
    import torch

    # DeepSpeed 0.19 calls collectives that torch 2.13 marks deprecated, once per step and rank
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")

    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:  # a single process without a launcher: a free port, so that two can run
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT") or str(_free_port()))
    if not cuda and "OMP_NUM_THREADS" not in os.environ:  # the deepspeed launcher does not set it
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    if not cuda:
        # DeepSpeed builds its shared-memory all-reduce (used by inference only, never by training) the first
        # time a CPU process group starts: a C++ JIT build that fails where no compiler is installed (slim
        # images) and costs a minute on a fresh machine. DeepSpeed keeps this table for such edits.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), cuda


def close_process_group(clean: bool = True) -> None:
    """Destroy this process's process group, if one is open, before the interpreter's teardown: a process
    that exits with a gloo group alive can abort there ("terminate called without an active exception",
    exit -6, pytorch#190489: gloo's worker threads still hold work items when the interpreter is gone), turning
    a clean refusal into a crash. After an error (`clean=False`) only a gloo group is destroyed: that is local
    to this process, while an NCCL group's teardown can wait on ranks still inside a collective."""
    import sys

    if "torch.distributed" not in sys.modules:  # nothing distributed ran: do not import torch for that
        return
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    if clean or dist.get_backend() == "gloo":
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RankGroup:
    """This process's place among the torchrun ranks (one process without a launcher). Collectives carry
    only small Python objects, over gloo, whatever the device: no NCCL timeout can end a long evaluation."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.created = False
        if self.world > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                # ranks wait for the slowest at the end: allow for a long imbalance
                dist.init_process_group("gloo", timeout=timedelta(hours=24))
                self.created = True
            self.dist = dist

    def from_rank0(self, value):
        """Rank 0's `value` on every rank."""
        if self.world == 1:
            return value
        box = [value]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value) -> list:
        if self.world == 1:
            return [value]
        out = [None] * self.world
        self.dist.all_gather_object(out, value)
        return out

    def close(self) -> None:
        if self.created:
            self.dist.destroy_process_group()
