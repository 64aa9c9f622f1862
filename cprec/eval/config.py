"""The evaluation's config (`EvalConfig`), shared by `cprec evaluate`, SASRec, the metric during training and
the experiment, and what it leaves to the device: which device and precision (`resolve_device`) and the batch
sizes a CPU or a GPU takes (`sized_for`)."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

from cprec.config import check_seed
from cprec.errors import CPRecError
from cprec.eval.metrics import HR_KS, NDCG_KS

PROTOCOLS = ("full", "sampled", "both")
SPLITS = ("test", "valid")  # leave-one-out: test's target is the last item, valid's the one before it
DTYPES = ("auto", "float32", "bfloat16", "float16")
TOP_K = max(HR_KS + NDCG_KS)



@dataclass
class EvalConfig:
    protocol: str = "both"  # full (every title), sampled (target + negatives) or both
    domains: list[str] | None = None  # default: every downstream domain of the prepared data
    users: int | None = None  # evaluate a seeded sample of this many test users per domain (default: all)
    negatives: int = 99  # sampled protocol: negatives per user
    seed: int = 0  # the user sample and the negatives
    beam: int | None = None  # prefixes each user expands per search step (None: 20 CPU, 256 GPU); exact either way
    exhaustive_below: int | None = None  # fewer titles (catalogue, candidates) are all scored (None: 60 CPU, 500 GPU); exact either way
    frontier: int = 50_000  # open prefixes kept per user by the search; past it, cut and checked (still exact)
    batch_users: int | None = None  # users whose prompts and titles share forward passes (None: 16 CPU, 256 GPU)
    row_nodes: int = 256  # prefix-tree nodes per row of a forward pass
    tokens_per_pass: int | None = None  # fed positions per forward pass (None: 4096 CPU, 65536 GPU); keys add prompt+context
    node_cache_mb: int | None = None  # K/V kept per batch of users in a search (None: 1024 CPU, 1/3 of free GPU memory)
    device: str = "auto"  # auto: this rank's GPU when there is one, else cpu; or cpu, cuda, cuda:N
    dtype: str = "auto"  # auto: bfloat16 on a GPU, float32 on the CPU
    split: str = "test"  # valid: the validation users (model selection: in-training metric, anneal sweep)

    def validate(self) -> None:
        check_seed(self.seed)
        if self.protocol not in PROTOCOLS:
            raise CPRecError(f"protocol must be one of {', '.join(PROTOCOLS)}, got '{self.protocol}'")
        if self.split not in SPLITS:
            raise CPRecError(f"split must be one of {', '.join(SPLITS)}, got '{self.split}'")
        if self.users is not None and self.users < 1:
            raise CPRecError(f"users must be at least 1 (or left out for every test user), got {self.users}")
        for name in ("negatives", "beam", "frontier", "batch_users", "row_nodes", "tokens_per_pass",
                     "node_cache_mb"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise CPRecError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.dtype not in DTYPES:
            raise CPRecError(f"dtype must be one of {', '.join(DTYPES)}, got '{self.dtype}'")


def protocols(cfg: EvalConfig) -> list[str]:
    return [p for p in ("sampled", "full") if cfg.protocol in (p, "both")]


# ---------------------------------------------------------------- the evaluation


def resolve_device(device: str = "auto", dtype: str = "auto"):
    """(torch.device, torch.dtype) of this process: auto picks its local rank's GPU when one is visible
    (bf16 there), else the CPU (fp32)."""
    import torch

    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CPRecError(f"device={device}: no GPU is visible to this process (torch.cuda.is_available() is "
                         f"False); use device=cpu")
    try:
        dev = torch.device(f"cuda:{local}" if device == "cuda" else device)
    except RuntimeError:
        raise CPRecError(f"device must be auto, cpu, cuda or cuda:N, got '{device}'") from None
    if dtype not in DTYPES:
        raise CPRecError(f"dtype must be one of {', '.join(DTYPES)}, got '{dtype}'")
    if dtype == "auto":
        dtype = "bfloat16" if dev.type == "cuda" else "float32"
    return dev, getattr(torch, dtype)


def sized_for(cfg: EvalConfig, device) -> EvalConfig:
    """The batch sizes left to the device: a GPU takes far larger passes than a CPU. A GPU's search also
    takes a wider beam: a step's bookkeeping costs about the same for 20 prefixes as for 256, and a GPU's
    pass is short, so fewer, wider steps pay (on a compute-bound CPU a narrow beam feeds fewer nodes).

    Which catalogues are scored whole: on a CPU the time follows the nodes fed, and the search feeds about
    half of a 90-title MovieLens genre's tree for the top 20 (1.3x faster than scoring every title) but
    most of a 42-title one (1.2x slower), hence whole below 3 x TOP_K titles. On a GPU a small tree is
    one pass, whole below 500 (`benchmarks/bench_eval.py`, `benchmarks/gpu_eval.py`).

    A GPU's 256 users per batch (65536 fed positions per pass) were measured on an 80 GB H100 with
    SmolLM2-135M (~23 KB of keys and values per position in bf16): ~9 GB per pass beside ~3 GB of prompts
    and the node cache (a third of the free memory). A model with more K/V per position, or a smaller GPU,
    needs `batch_users` and `tokens_per_pass` lowered in proportion."""
    gpu = device.type == "cuda"
    exhaustive_below = cfg.exhaustive_below if cfg.exhaustive_below is not None else (500 if gpu else 3 * TOP_K)
    return replace(cfg, batch_users=cfg.batch_users or (256 if gpu else 16),
                   tokens_per_pass=cfg.tokens_per_pass or (65536 if gpu else 4096),
                   beam=cfg.beam or (256 if gpu else 20), node_cache_mb=cfg.node_cache_mb or node_cache_default(device),
                   exhaustive_below=exhaustive_below)


def node_cache_default(device) -> int:
    """MB of keys and values a search keeps. A batch of 256 GPU users feeds ~860k nodes on a 10k catalogue
    (~23 KB each for SmolLM2 in bf16: ~20 GB); when the cache is full, later rows feed ancestors again and
    the search slows by ~1.7x. So a GPU gives it a third of its free memory, a CPU 1 GB."""
    import torch

    if device.type != "cuda":
        return 1024
    free, _ = torch.cuda.mem_get_info(device)
    return max(1024, free // 3 >> 20)
