"""Continual pre-training with DeepSpeed ZeRO-3 on the packed data stream, under the WSA schedule.

Started once per rank by `deepspeed launch/train.py --config C`, `torchrun --nproc_per_node N
launch/train.py --config C` or the Slurm script; `cprec train` runs the one-process case. The run
directory holds `config.yaml` (resolved), `metrics.jsonl`, `checkpoints/`, `lineage.json`, `model/` (the
Hugging Face config and tokenizer, for export), `plots/` and optional `tensorboard/`.

Loss. Each rank computes per-token cross-entropy itself (no loss across documents: see `collate`) and
scales its sum by world * accumulation / (labelled tokens in the global batch). DeepSpeed divides by the
accumulation steps and averages over ranks, so the gradient is the exact token mean of the global batch,
whatever the world size or micro-batch split.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from cprec import checkpoint as ckpt
from cprec import resources
from cprec import schedule as wsa
from cprec.config import load_config, parse_overrides, to_dict
from cprec.errors import CPRecError
from cprec.data.shards import ShardSet
from cprec.data.stream import default_mixture
from cprec.schedule import ScheduleConfig
from cprec.tracking import WandbConfig, start_wandb

KILL_IN_SAVE_ENV = "CPREC_TEST_KILL_IN_SAVE"  # test hook: "stepNNNNNNNN" kills the job during that save
TASKS = ("pretrain", "sft")  # which kind of packed stream the default mixture takes
# dense bf16 peak FLOP/s per GPU, for MFU; unknown devices report no MFU
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


@dataclass
class ModelConfig:
    name: str | None = "smollm2"  # a Hugging Face folder, or smollm2 (the packaged SmolLM2-135M)
    config: dict | None = None  # instead of name: build a random model from this config (tests)
    attn: str = "auto"  # auto: flash_attention_2 on GPUs when installed, else sdpa; see cprec.attention
    gradient_checkpointing: bool = False


@dataclass
class OptimConfig:
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    torch_adam: bool = True  # torch's AdamW: no fused_adam build (2 min on CPU; needs nvcc on GPUs)


@dataclass
class CheckpointConfig:
    every: int = 50  # save every N steps (and at the end, and on SIGTERM/SIGUSR1)
    keep_last: int = 2
    branch_every: int = 0  # keep stable-phase checkpoints at multiples of this step forever (0: none)


@dataclass
class TrainConfig:
    run_dir: str = "runs/train"
    shards: str = ""
    task: str = "pretrain"  # pretrain: continual pre-training; sft: fine-tuning (default mixture: the sft streams)
    model: ModelConfig = field(default_factory=ModelConfig)
    deepspeed: str = "auto"  # a DeepSpeed JSON; auto: zero3_bf16.json on GPUs, zero3_fp32_cpu.json on CPUs
    global_batch: int = 8  # rows of seq_len tokens per optimizer step, fixed for the run
    micro_batch: int = 1  # rows per forward pass and rank
    grad_accum: int | None = None  # default: global_batch / (world size * micro_batch)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    mixture: dict[str, float] = field(default_factory=dict)  # default: the streams of the task's kind by their rows
    phase_mixtures: dict[str, dict[str, float]] = field(default_factory=dict)  # e.g. {anneal: {mixed: 1}}
    seed: int = 0
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    loader_workers: int = 0
    log_every: int = 1
    tensorboard: bool = False
    wandb: WandbConfig | None = None  # Weights & Biases: {project, name, mode}; see cprec/tracking.py
    plots: bool = True
    max_steps: int | None = None  # stop after this many steps in this process (the schedule is unchanged)

    def validate(self) -> None:
        if not self.shards:
            raise CPRecError("set shards: a directory written by `cprec pack`")
        if self.task not in TASKS:
            raise CPRecError(f"task must be one of {', '.join(TASKS)}, got '{self.task}'")
        if self.model.name is None and self.model.config is None:
            raise CPRecError("set model.name (a folder or smollm2) or model.config")
        unknown = set(self.phase_mixtures) - set(wsa.PHASES)
        if unknown:
            raise CPRecError(f"phase_mixtures names unknown phase '{sorted(unknown)[0]}' (phases: "
                             f"{', '.join(wsa.PHASES)})")
        if self.global_batch < 1 or self.micro_batch < 1:
            raise CPRecError("global_batch and micro_batch must be at least 1")
        if self.schedule.total_steps < 1:
            raise CPRecError("the schedule has no steps (schedule.warmup_steps + stable_steps + anneal_steps = 0): "
                             "nothing would be trained")
        if self.max_steps is not None and self.max_steps < 0:
            raise CPRecError(f"max_steps must be >= 0, got {self.max_steps}")


# keys whose change does not change what a resumed run computes
_NON_SEMANTIC = {"run_dir", "checkpoint", "loader_workers", "log_every", "tensorboard", "wandb", "plots", "max_steps"}


def config_hash(cfg: TrainConfig) -> str:
    semantic = {k: v for k, v in to_dict(cfg).items() if k not in _NON_SEMANTIC}
    return hashlib.sha256(json.dumps(semantic, sort_keys=True).encode()).hexdigest()[:16]


def _differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _differences(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key}: {va!r} -> {vb!r}")
    return out


# ---------------------------------------------------------------- distributed set-up

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
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), cuda


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_ds_config(cfg: TrainConfig, world: int, cuda: bool) -> dict:
    path = Path(cfg.deepspeed) if cfg.deepspeed != "auto" else \
        resources.ds_config("zero3_bf16.json" if cuda else "zero3_fp32_cpu.json")
    if not path.is_file() and not path.is_absolute():  # a recipe's `ds_configs/X.json`, from a wheel
        with contextlib.suppress(CPRecError):
            path = resources.shipped_file(str(path))
    if not path.is_file():
        raise CPRecError(f"DeepSpeed config not found: {path}")
    ds = json.loads(path.read_text())
    rows_per_rank, rem = divmod(cfg.global_batch, world)
    accum = cfg.grad_accum if cfg.grad_accum is not None else rows_per_rank // cfg.micro_batch
    if rem or world * cfg.micro_batch * accum != cfg.global_batch:
        raise CPRecError(f"global_batch={cfg.global_batch} must equal world size ({world}) x micro_batch "
                         f"({cfg.micro_batch}) x grad_accum ({accum}) = {world * cfg.micro_batch * accum}")
    ds.update(train_batch_size=cfg.global_batch, train_micro_batch_size_per_gpu=cfg.micro_batch,
              gradient_accumulation_steps=accum, gradient_clipping=cfg.optim.grad_clip)
    if world == 1 and ds.get("zero_optimization", {}).get("stage") == 3:
        # one rank has nothing to partition: keeping every parameter resident skips ZeRO-3's per-layer
        # gather/release (a 40% slowdown on a CPU) while the checkpoints keep the ZeRO-3 format; and
        # averaging in place on the contiguous gradient bucket skips reduce-scatter's flatten-and-copy of every
        # micro-batch's gradients (the same numbers on one rank)
        ds["zero_optimization"].setdefault("stage3_param_persistence_threshold", 10**12)
        ds["zero_optimization"].setdefault("reduce_scatter", False)
    ds["optimizer"] = {"type": "AdamW", "params": {
        "lr": cfg.schedule.peak_lr, "betas": [cfg.optim.beta1, cfg.optim.beta2], "eps": cfg.optim.eps,
        "weight_decay": cfg.optim.weight_decay, "torch_adam": cfg.optim.torch_adam, "adam_w_mode": True}}
    left = [k for k, v in _flatten(ds).items() if v == "auto"]
    if left:
        raise CPRecError(f"{path}: key '{left[0]}' is 'auto' and CPRec does not fill it")
    return ds


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def build_model(cfg: TrainConfig, ds_config: dict, cuda: bool, rank: int):
    """The model under ZeRO-3, built the Hugging Face way (weights initialised, then partitioned)."""
    import torch
    import transformers
    from transformers.integrations import HfDeepSpeedConfig

    from cprec import attention
    from cprec.backbone import SMOLLM2, smollm2_folder

    transformers.logging.set_verbosity_error()
    dtype = torch.bfloat16 if ds_config.get("bf16", {}).get("enabled") else torch.float32
    attn = attention.choose(cfg.model.attn, cuda)
    folder = None
    if cfg.model.config is None and cfg.model.name == SMOLLM2:
        # converted from GGUF before the ZeRO-3 config below exists (under it every model transformers builds,
        # the conversion's too, is partitioned and empty), once per node's cache; the other ranks wait
        if int(os.environ.get("LOCAL_RANK", rank)) == 0:
            smollm2_folder()
        torch.distributed.barrier()
        folder = smollm2_folder()
    elif cfg.model.config is None:
        folder = Path(cfg.model.name)
        if not (folder / "config.json").is_file():
            raise CPRecError(f"model.name={cfg.model.name}: not a Hugging Face model folder (no config.json)")
    keep_alive = HfDeepSpeedConfig(ds_config)  # noqa: F841  (zero.Init while it lives)
    torch.manual_seed(cfg.seed)
    if folder is None:
        try:
            config = transformers.AutoConfig.for_model(**cfg.model.config)
        except (ValueError, KeyError) as exc:
            raise CPRecError(f"model.config: transformers cannot build it ({exc})") from None
        config._attn_implementation = attn
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation=attn)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.config.use_cache = False
    return model, folder, keep_alive


# ---------------------------------------------------------------- the run

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # save at the next step boundary, then exit 0


def _ignore_stop_signals(_worker_id: int) -> None:
    """In a DataLoader worker: a stop signal is for the trainer. `scancel` and pre-emption signal the whole
    process group; a worker that died of it would take the step, and the save, down with it."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class Trainer:
    def __init__(self, cfg: TrainConfig, resume: bool = False, anneal_from: str | None = None,
                 anneal_steps: int | None = None, anneal_mixture: dict | None = None,
                 anneal_shape: str | None = None):
        import deepspeed
        import torch

        from cprec.data.stream import PackedStream

        self.torch = torch
        self.cfg = cfg
        self.rank, self.world, self.cuda = init_distributed()
        self.run = Path(cfg.run_dir)
        self.ckpt_root = self.run / "checkpoints"
        self.schedule = cfg.schedule
        self.lineage: dict = {"parent": None}
        parent_state = None
        if anneal_from is not None:
            parent_state = self._prepare_branch(anneal_from, anneal_steps, anneal_mixture, anneal_shape)
        elif resume and (self.run / "lineage.json").is_file():
            self._reapply_branch(json.loads((self.run / "lineage.json").read_text()))
        elif not resume and ckpt.complete_tags(self.ckpt_root):
            raise CPRecError(f"{self.run} already holds checkpoints; pass --resume to continue it or choose "
                             f"another run_dir")
        self.hash = config_hash(cfg)
        if self.rank == 0:
            with _writing(self.run):
                self.run.mkdir(parents=True, exist_ok=True)
                removed = ckpt.remove_incomplete(self.ckpt_root)
            if removed:
                print(f"removed incomplete checkpoint(s) {', '.join(removed)} (interrupted saves)", flush=True)
        torch.distributed.barrier()
        # everything that can refuse a resume is checked before anything of the run is written
        resume_tag = self._resume_tag() if resume else None
        if resume_tag is not None:
            self._check_same_config(resume_tag)

        self.ds_config = build_ds_config(cfg, self.world, self.cuda)
        model, folder, self._hf_ds = build_model(cfg, self.ds_config, self.cuda, self.rank)
        self._check_vocabulary(model.config.vocab_size)
        self.n_params = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters())
        if self.rank == 0:
            with _writing(self.run):
                self._write_run_files(model, folder)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                                                 config=self.ds_config)
        self.device = self.engine.device
        self.accum = self.engine.gradient_accumulation_steps()

        self.stream = PackedStream(cfg.shards, self._mixture("warmup"), cfg.seed, cfg.global_batch, self.rank,
                                   self.world, phase=self._data_phase("warmup"))
        self.step = 0
        if resume_tag is not None:
            self._resume(resume_tag)
        elif parent_state is not None:
            self._load_branch(anneal_from, parent_state)
        self._stop_signal = None
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_signal)

    # ---- configuration helpers
    def _mixture(self, phase: str) -> dict:
        if phase in self.cfg.phase_mixtures:
            return dict(self.cfg.phase_mixtures[phase])
        if self.cfg.mixture:
            return dict(self.cfg.mixture)
        return default_mixture(ShardSet(self.cfg.shards).streams, self.cfg.task)

    def _data_phase(self, phase: str) -> str:
        """The stream's phase: a schedule phase with a mixture of its own starts a new order; others continue."""
        return phase if phase in self.cfg.phase_mixtures else "main"

    def _write_run_files(self, model, folder) -> None:
        (self.run / "config.yaml").write_text(yaml.safe_dump(to_dict(self.cfg), sort_keys=False))
        model_dir = self.run / "model"
        model_dir.mkdir(exist_ok=True)
        model.config.save_pretrained(model_dir)
        if folder is not None:
            for f in Path(folder).iterdir():
                if f.name.startswith(("tokenizer", "special_tokens", "chat_template", "vocab", "merges")):
                    shutil.copy(f, model_dir / f.name)
        ckpt.write_json_atomic(self.run / "lineage.json", {**self.lineage, "config_hash": config_hash(self.cfg)})

    def _prepare_branch(self, anneal_from, anneal_steps, anneal_mixture, anneal_shape) -> dict:
        source = Path(anneal_from)
        state = ckpt.read_state(source)
        if anneal_steps is None or anneal_steps < 1:
            raise CPRecError("--anneal-from needs --anneal-steps N (N >= 1)")
        if ckpt.complete_tags(self.ckpt_root):
            raise CPRecError(f"{self.run} already holds checkpoints; a branch starts a new run directory")
        self.lineage = {"parent": {"run_dir": str(source.parent.parent), "checkpoint": str(source),
                                   "step": state["step"], "config_hash": state["config_hash"],
                                   "schedule": state["schedule"]},
                        "anneal_steps": anneal_steps, "anneal_shape": anneal_shape, "anneal_mixture": anneal_mixture}
        self._reapply_branch(self.lineage)
        return state

    def _reapply_branch(self, lineage: dict) -> None:
        """A branch's schedule (and mixture) derive from its parent's: the same on start and on resume."""
        if not lineage.get("parent"):
            return
        parent = lineage["parent"]
        self.schedule = self.cfg.schedule = wsa.branch(ScheduleConfig(**parent["schedule"]), parent["step"],
                                                       lineage["anneal_steps"], lineage.get("anneal_shape"))
        if lineage.get("anneal_mixture"):
            self.cfg.phase_mixtures = {**self.cfg.phase_mixtures, "anneal": lineage["anneal_mixture"]}

    # ---- checkpoints
    def _state(self) -> dict:
        return {"step": self.step, "phase": wsa.phase(max(self.step - 1, 0), self.schedule),
                "stream": self.stream.state_dict(), "config_hash": self.hash, "lineage": self.lineage,
                "world_size": self.world, "schedule": dataclasses.asdict(self.schedule)}

    def save(self) -> str:
        tag = ckpt.tag_for(self.step)
        state = self._state()
        try:
            self.engine.save_checkpoint(str(self.ckpt_root), tag=tag, client_state={"cprec": state},
                                        save_latest=False)
        except (OSError, RuntimeError) as exc:  # torch reports a full disk as "enforce fail ... iostream error"
            previous = ckpt.latest_complete(self.ckpt_root)
            raise CPRecError(f"could not write checkpoint {self.ckpt_root / tag} ({str(exc).splitlines()[0]}): is "
                             f"the disk full or the folder read-only? The previous complete checkpoint "
                             f"({previous or 'none'}) is intact and the partial one is removed by the next start; "
                             f"make room, then --resume") from None
        if os.environ.get(KILL_IN_SAVE_ENV) == tag:  # test hook: the job dies after writing, before the marker
            os.kill(os.getpid(), signal.SIGKILL)  # every rank reaches this point
        self.torch.distributed.barrier()
        names = ckpt.checkpoint_files(self.ckpt_root / tag)
        shares = [None] * self.world
        self.torch.distributed.all_gather_object(
            shares, ckpt.describe_files(self.ckpt_root / tag, names[self.rank::self.world]))
        if self.rank == 0:
            state["files"] = {name: entry for share in shares for name, entry in share.items()}
            ckpt.mark_complete(self.ckpt_root, tag, state)
            every = self.cfg.checkpoint.branch_every
            ckpt.prune(self.ckpt_root, self.cfg.checkpoint.keep_last,
                       lambda s: every > 0 and s % every == 0 and wsa.phase(s, self.schedule) == "stable")
        self.torch.distributed.barrier()
        return tag

    def _load_engine(self, directory: Path, tag: str, optimizer: bool = True) -> None:
        saved_world = ckpt.saved_world_size(directory / tag)
        if saved_world and saved_world != self.world:
            if self.rank == 0:
                ckpt.to_universal(directory / tag)  # DeepSpeed's own conversion, once
            self.torch.distributed.barrier()
            self.engine._config.load_universal_checkpoint = True
            tag = tag + "_universal"
        path, _ = self.engine.load_checkpoint(str(directory), tag=tag, load_optimizer_states=optimizer,
                                              load_lr_scheduler_states=False)
        if path is None:
            raise CPRecError(f"DeepSpeed could not load {directory / tag}")

    def _resume_tag(self) -> str | None:
        """The newest complete checkpoint whose files check out against its marker (each rank checks a share
        of the files); a damaged one is named and passed over for the one before it."""
        tags = ckpt.complete_tags(self.ckpt_root)
        latest = ckpt.latest_complete(self.ckpt_root)
        order = ([latest] if latest else []) + [t for t in reversed(tags) if t != latest]
        for tag in order:
            names = ckpt.checkpoint_files(self.ckpt_root / tag)[self.rank::self.world]
            found = [None] * self.world
            self.torch.distributed.all_gather_object(found, ckpt.file_problems(self.ckpt_root / tag, names))
            problems = [p for share in found for p in share]
            if not problems:
                return tag
            if self.rank == 0:
                print(f"checkpoint {tag} is damaged ({'; '.join(problems)}); falling back to the one before it",
                      flush=True)
        if order:
            raise CPRecError(f"no intact checkpoint to resume in {self.ckpt_root}: every complete one is damaged")
        return None

    def _check_same_config(self, tag: str) -> None:
        """Refuse a resume whose config computes something else, naming the changed keys."""
        state = ckpt.read_state(self.ckpt_root / tag)
        if state["config_hash"] == self.hash:
            return
        saved_cfg = yaml.safe_load((self.run / "config.yaml").read_text()) if \
            (self.run / "config.yaml").is_file() else {}
        diff = _differences({k: v for k, v in saved_cfg.items() if k not in _NON_SEMANTIC},
                            {k: v for k, v in to_dict(self.cfg).items() if k not in _NON_SEMANTIC})
        raise CPRecError(f"refusing to resume {self.run}: the config changed ({'; '.join(diff) or 'hash'}); "
                         f"start a new run or an anneal branch instead")

    def _check_vocabulary(self, model_vocab: int) -> None:
        shards_vocab = ShardSet(self.cfg.shards).index["tokenizer"]["vocab_size"]
        if shards_vocab > model_vocab:
            raise CPRecError(f"{self.cfg.shards} was packed with a tokenizer of {shards_vocab:,} tokens, more than the "
                             f"model's vocabulary ({model_vocab:,}): its token ids would index past the embeddings; "
                             f"pack with the model's tokenizer")

    def _resume(self, tag: str) -> None:
        state = ckpt.read_state(self.ckpt_root / tag)
        self._load_engine(self.ckpt_root, tag)
        self.lineage = state["lineage"]
        saved = state["stream"]
        if saved["phase"] != self.stream.state.phase:  # saved inside a phase with its own mixture: enter it
            self.stream.load_state_dict(saved, new_phase=saved["phase"], new_mixture=saved["mixture"])
        self.stream.load_state_dict(saved)  # then restore its counters (a new phase would start at step 0)
        self.step = state["step"]
        if self.rank == 0:
            self._truncate_metrics(self.step)
            print(f"resumed {self.run} at step {self.step} from {tag} (written by {state['world_size']} ranks, "
                  f"now {self.world})", flush=True)

    def _load_branch(self, anneal_from: str, state: dict) -> None:
        source = Path(anneal_from)
        self._load_engine(source.parent, source.name)
        self.step = state["step"]
        new_phase = self._data_phase("anneal")
        if new_phase == state["stream"]["phase"]:  # the anneal phase has no mixture of its own: continue
            self.stream.load_state_dict(state["stream"])
        else:
            self.stream.load_state_dict(state["stream"], new_phase=new_phase, new_mixture=self._mixture("anneal"))
        if self.rank == 0:
            self._truncate_metrics(0)
            print(f"branched from {source} at step {self.step}: annealing over {self.schedule.anneal_steps} steps",
                  flush=True)

    def _truncate_metrics(self, step: int) -> None:
        path = self.run / "metrics.jsonl"
        if path.is_file():
            kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
            path.write_text("".join(line + "\n" for line in kept))

    def _on_signal(self, signum, _frame) -> None:
        self._stop_signal = signal.Signals(signum).name

    # ---- the loop
    def _set_lr(self, value: float) -> None:
        for group in self.engine.optimizer.param_groups:
            group["lr"] = value

    def _all_reduce(self, tensor, op=None):
        """All-reduce a small CPU tensor on the engine's device (NCCL reduces CUDA tensors only); CPU back."""
        on_device = tensor.to(self.device)
        self.torch.distributed.all_reduce(on_device, op=op or self.torch.distributed.ReduceOp.SUM)
        return on_device.cpu()

    def _train_step(self, batch: dict) -> dict:
        torch = self.torch
        from cprec.data.collate import IGNORE_INDEX

        labels = batch["labels"][:, 1:]
        # position t predicts token t + 1: shift the labels, not the logits, so that the (rows x seq x vocab)
        # logits are never copied into a sliced contiguous tensor
        targets = torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)
        n_streams = len(self.stream.stream_names)
        local = torch.zeros(2 + 2 * n_streams, dtype=torch.float64)
        labelled = (labels != IGNORE_INDEX)
        local[1] = labelled.sum()
        total_labelled = self._all_reduce(local[1].clone())
        scale = self.world * self.accum / max(total_labelled.item(), 1.0)
        rows = batch["input_ids"].shape[0]
        micro = rows // self.accum
        for m in range(self.accum):
            sl = slice(m * micro, (m + 1) * micro)
            ids = batch["input_ids"][sl].to(self.device)
            pos = batch["position_ids"][sl].to(self.device)
            lab = targets[sl].to(self.device)
            logits = self.engine(input_ids=ids, position_ids=pos, use_cache=False).logits
            token_loss = torch.nn.functional.cross_entropy(logits.float().view(-1, logits.shape[-1]),
                                                           lab.reshape(-1), ignore_index=IGNORE_INDEX,
                                                           reduction="none").view(lab.shape)
            loss_sum = token_loss.sum()
            self.engine.backward(loss_sum * scale)
            self.engine.step()
            row_loss = token_loss.detach().sum(1).double().cpu()
            row_count = labelled[sl].sum(1).double()
            sid = batch["stream_ids"][sl]
            local[0] += row_loss.sum()
            local[2:2 + n_streams].index_add_(0, sid, row_loss)
            local[2 + n_streams:].index_add_(0, sid, row_count)
        tokens = batch["stream_tokens"].double()
        stats = self._all_reduce(torch.cat([local, tokens]))
        loss_sum, count = stats[0].item(), stats[1].item()
        per_loss, per_count = stats[2:2 + n_streams], stats[2 + n_streams:2 + 2 * n_streams]
        per_tokens = stats[2 + 2 * n_streams:]
        names = self.stream.stream_names
        return {"loss": loss_sum / max(count, 1.0),
                "loss_per_stream": {names[i]: per_loss[i].item() / per_count[i].item()
                                    for i in range(n_streams) if per_count[i] > 0},
                "tokens_per_stream": {names[i]: int(per_tokens[i].item()) for i in range(n_streams)
                                      if per_tokens[i] > 0}}

    def fit(self) -> dict:
        torch = self.torch
        cfg = self.cfg
        total = self.schedule.total_steps
        end = total if cfg.max_steps is None else min(total, self.step + cfg.max_steps)
        writer = self._tensorboard()
        self._tracking = start_wandb(cfg.wandb if self.rank == 0 else None, self.run, to_dict(cfg))
        progress = None
        if self.rank == 0:
            from tqdm import tqdm

            progress = tqdm(total=total, initial=self.step, desc=f"train {self.run.name}", unit=" steps")
        loader_it = None
        last = {}
        if cfg.max_steps == 0 and not ckpt.complete_tags(self.ckpt_root):
            self.save()  # materialise the starting point (e.g. a branch's loaded weights and moments)
        while self.step < end:
            phase = wsa.phase(self.step, self.schedule)
            data_phase = self._data_phase(phase)
            if data_phase != self.stream.state.phase:  # a phase with its own mixture begins
                self.stream.load_state_dict(self.stream.state_dict(), new_phase=data_phase,
                                            new_mixture=self._mixture(phase))
                loader_it = None
            if loader_it is None:
                loader_it = iter(torch.utils.data.DataLoader(
                    self.stream, batch_size=None, num_workers=cfg.loader_workers,
                    prefetch_factor=4 if cfg.loader_workers else None, persistent_workers=False,
                    worker_init_fn=_ignore_stop_signals if cfg.loader_workers else None))
            started = time.perf_counter()
            lr = wsa.lr(self.step, self.schedule)
            self._set_lr(lr)
            batch = next(loader_it)
            assert batch["step"] == self.stream.state.step, "the loader and the stream state disagree"
            out = self._train_step(batch)
            self.stream.advance(out["tokens_per_stream"])
            self.step += 1
            seconds = time.perf_counter() - started
            tokens = sum(out["tokens_per_stream"].values())
            last = {"step": self.step, "phase": phase, "lr": lr, "loss": out["loss"],
                    "loss_per_stream": out["loss_per_stream"], "tokens_per_stream": out["tokens_per_stream"],
                    "tokens_per_s": tokens / seconds, "grad_norm": _float(self.engine.get_global_grad_norm()),
                    "seconds": seconds}
            mfu = self._mfu(last["tokens_per_s"])
            if mfu is not None:
                last["mfu"] = mfu
            if self.rank == 0:
                self._log(last, writer)
                progress.update(1)
                progress.set_postfix(loss=f"{out['loss']:.3f}", lr=f"{lr:.2e}", phase=phase)
            stop = self._agreed_stop()
            if stop or self.step == end or self.step % cfg.checkpoint.every == 0 or self._is_branch_point():
                tag = self.save()
                if stop:
                    if self.rank == 0:
                        print(f"\n{stop}: saved {tag}, exiting", flush=True)
                    break
        if progress is not None:
            progress.close()
        if writer is not None:
            writer.close()
        self._tracking.finish()
        if self.rank == 0 and cfg.plots and self.step >= total:
            plot_run(self.run)
        return last

    def _is_branch_point(self) -> bool:
        every = self.cfg.checkpoint.branch_every
        return every > 0 and self.step % every == 0 and wsa.phase(self.step, self.schedule) == "stable"

    def _agreed_stop(self) -> str | None:
        flag = self._all_reduce(self.torch.tensor([1.0 if self._stop_signal else 0.0]),
                                op=self.torch.distributed.ReduceOp.MAX)
        return (self._stop_signal or "signal on another rank") if flag.item() else None

    def _mfu(self, tokens_per_s: float) -> float | None:
        if not self.cuda:
            return None
        name = self.torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
        return None if peak is None else 6 * self.n_params * tokens_per_s / (peak * self.world)

    def _tensorboard(self):
        if not self.cfg.tensorboard or self.rank != 0:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise CPRecError("tensorboard: true needs the tensorboard package: pip install tensorboard") from None
        return SummaryWriter(str(self.run / "tensorboard"))

    def _log(self, record: dict, writer) -> None:
        if record["step"] % self.cfg.log_every and record["step"] != self.schedule.total_steps:
            return
        with _writing(self.run), open(self.run / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\n")
        self._tracking.log(record)
        if writer is not None:
            for key in ("lr", "loss", "tokens_per_s", "grad_norm"):
                if record.get(key) is not None:
                    writer.add_scalar(key, record[key], record["step"])
            for name, value in record["loss_per_stream"].items():
                writer.add_scalar(f"loss/{name}", value, record["step"])


@contextlib.contextmanager
def _writing(run: Path):
    """Name the run directory when writing into it fails (a read-only or full disk), not a bare OSError."""
    try:
        yield
    except OSError as exc:
        raise CPRecError(f"cannot write the run directory {run}: {exc.strerror or exc} "
                         f"({exc.filename or run}); choose a writable run_dir or make room") from None


def _float(value) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def plot_run(run: Path) -> None:
    """PNG plots of the learning rate and of the loss per stream, from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
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


# ---------------------------------------------------------------- entry point

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
        trainer.torch.distributed.barrier()
        trainer.torch.distributed.destroy_process_group()
    return 0

