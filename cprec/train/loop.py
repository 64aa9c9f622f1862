"""The training loop: one process is one rank; it reads its slice of each global batch of the packed data
stream, takes an optimizer step under the WSA schedule, and reports and checkpoints through the callbacks.

Started once per rank by `deepspeed launch/train.py --config C`, `torchrun --nproc_per_node N
launch/train.py --config C` or the Slurm script; `cprec train` runs the one-process case (`cprec.train.launch`).
The pieces: `engine` (process group, DeepSpeed config, model), `step` (the loss and its statistics), `run`
(the run directory: config hash, lineage, resume and branch rules), `checkpointing` (when and how a
checkpoint is saved and loaded), `metrics` (metrics.jsonl, TensorBoard, plots), and the mixture plan
(`cprec.data.mixture`), resolved once and validated against the shards before the loader exists.

Stop signals (SIGTERM, SIGUSR1) are noted by the handler and agreed on by all ranks after a step; the run
then saves and returns. DataLoader workers ignore them: `scancel` and pre-emptions signal the whole process
group, and a worker that died of it would take the step, and the save, down with it.
"""

from __future__ import annotations

import dataclasses
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cprec import checkpoint as ckpt
from cprec import staging
from cprec import schedule as wsa
from cprec.config import check_seed, to_dict
from cprec.data.mixture import MixturePlan
from cprec.data.shards import ShardSet
from cprec.data.stream import PackedStream
from cprec.errors import CPRecError
from cprec.schedule import ScheduleConfig
from cprec.tracking import WandbConfig, start_wandb
from cprec.train import run as runs
from cprec.train.checkpointing import CheckpointConfig, Checkpointer, load_engine, refuse_unsafe_pickles
from cprec.train.engine import (ZERO_STAGES, ModelConfig, OptimConfig, build_ds_config, build_model,
                                init_distributed, zero_stage)
from cprec.train.evaluating import TrainEvalConfig, TrainingEval
from cprec.train.metrics import MetricsLog, finite, mfu
from cprec.train.step import TrainStep, check_chunkable

TASKS = ("pretrain", "sft")  # which kind of packed stream the default mixture takes
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # save at the next step boundary, then exit 0


@dataclass
class TrainConfig:
    run_dir: str = "runs/train"  # the run directory: config, lineage, model/, metrics, checkpoints, plots
    shards: str = ""  # a `cprec pack` output (recorded as an absolute path)
    task: str = "pretrain"  # pretrain: continual pre-training; sft: fine-tuning (default mixture: the sft streams)
    model: ModelConfig = field(default_factory=ModelConfig)  # the backbone
    deepspeed: str = "auto"  # a DeepSpeed JSON; auto: zero3_bf16.json on GPUs, zero3_fp32_cpu.json on CPUs
    global_batch: int = 8  # rows of seq_len tokens per optimizer step, fixed for the run
    micro_batch: int = 1  # rows per forward pass and rank
    zero_stage: int | None = None  # 1, 2 or 3 overrides the DeepSpeed config's stage (see cprec/train/engine.py)
    loss_chunk_tokens: int = 0  # > 0: the loss computes logits this many tokens at a time (cprec/train/step.py)
    compile: bool = False  # torch.compile the model through DeepSpeed (DeepCompile if the DeepSpeed JSON enables it)
    grad_accum: int | None = None  # default: global_batch / (world size * micro_batch)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)  # Warmup-Stable-Annealing (cprec/schedule.py)
    mixture: dict[str, float] = field(default_factory=dict)  # default: the streams of the task's kind by their rows
    phase_mixtures: dict[str, dict[str, float]] = field(default_factory=dict)  # e.g. {anneal: {mixed: 1}}
    seed: int = 0  # the data order and the model initialisation
    optim: OptimConfig = field(default_factory=OptimConfig)  # AdamW
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)  # saves, retention, branch points
    eval: TrainEvalConfig = field(default_factory=TrainEvalConfig)  # recommendation metric during training
    loader_workers: int = 0  # DataLoader worker processes (0: the main process reads)
    log_every: int = 1  # steps between metrics.jsonl records
    tensorboard: bool = False  # also log to run/tensorboard/
    wandb: WandbConfig | None = None  # Weights & Biases: {project, name, mode}; see cprec/tracking.py
    plots: bool = True  # draw run/plots/*.png at the end
    max_steps: int | None = None  # stop after this many steps in this process (the schedule is unchanged)

    def validate(self) -> None:
        check_seed(self.seed)
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
        if self.zero_stage is not None and self.zero_stage not in ZERO_STAGES:
            raise CPRecError(f"zero_stage must be one of {', '.join(map(str, ZERO_STAGES))} (or unset: the DeepSpeed "
                             f"config's stage), got {self.zero_stage!r}")
        if self.loss_chunk_tokens < 0:
            raise CPRecError(f"loss_chunk_tokens must be >= 0 (0: whole logits), got {self.loss_chunk_tokens}")
        if self.max_steps is not None and self.max_steps < 0:
            raise CPRecError(f"max_steps must be >= 0, got {self.max_steps}")
        self.eval.validate()


def _ignore_stop_signals(_worker_id: int) -> None:
    """In a DataLoader worker: a stop signal is for the trainer (see the module docstring)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class Trainer:
    def __init__(self, cfg: TrainConfig, resume: bool = False, anneal_from: str | None = None,
                 anneal_steps: int | None = None, anneal_mixture: dict | None = None,
                 anneal_shape: str | None = None):
        import deepspeed

        self.rank, self.world, self.cuda = init_distributed()
        self.run = Path(cfg.run_dir)
        self.ckpt_root = self.run / "checkpoints"
        self.lineage, parent_state = dict(runs.NO_PARENT), None
        if anneal_from is not None:
            self.lineage, parent_state = runs.new_branch(anneal_from, anneal_steps, anneal_mixture, anneal_shape,
                                                         self.ckpt_root)
        elif resume:
            self.lineage = runs.read_lineage(self.run)
        elif ckpt.complete_tags(self.ckpt_root):
            raise CPRecError(f"{self.run} already holds checkpoints; pass --resume to continue it or choose "
                             f"another run_dir")
        self.cfg = cfg = runs.branch_config(runs.absolute_paths(cfg), self.lineage)
        self.schedule, self.hash = cfg.schedule, runs.config_hash(cfg)
        self.plan = MixturePlan.resolve(ShardSet(cfg.shards).streams, cfg.task, cfg.mixture, cfg.phase_mixtures)
        if self.rank == 0:
            runs.open_directory(self.run)
        torch.distributed.barrier()
        # everything that can refuse a resume is checked before anything of the run is written
        resume_tag = runs.resume_tag(self.ckpt_root, self.rank, self.world) if resume else None
        self.ds_config = build_ds_config(cfg, self.world, self.cuda)
        if resume_tag is not None:
            runs.check_same_config(self.run, self.ckpt_root / resume_tag, cfg, self.hash)
            runs.check_same_zero_stage(self.ckpt_root / resume_tag, zero_stage(self.ds_config))
            refuse_unsafe_pickles(self.ckpt_root / resume_tag, self.rank, self.world)
        elif anneal_from is not None:
            runs.check_same_zero_stage(Path(anneal_from), zero_stage(self.ds_config))
            refuse_unsafe_pickles(Path(anneal_from), self.rank, self.world)

        model, folder, self._hf_ds = build_model(cfg, self.ds_config, self.cuda, self.rank)
        runs.check_vocabulary(cfg.shards, model.config.vocab_size)
        if cfg.loss_chunk_tokens:
            check_chunkable(model.config)
        self.evaluator = TrainingEval(cfg.eval, cfg.shards, folder, self.rank, self.world, self.schedule.total_steps)
        self.n_params = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters())
        if self.rank == 0:
            runs.write_run_files(self.run, cfg, model.config, folder or runs.packed_tokenizer_or_none(cfg.shards),
                                 self.lineage)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                                                 config=self.ds_config)
        self.device = self.engine.device
        if cfg.compile:
            self.engine.compile()
        first = self.plan.data_phase("warmup")
        self.stream = PackedStream(cfg.shards, self.plan.mixture(first), cfg.seed, cfg.global_batch, self.rank,
                                   self.world, phase=first)
        self.train_step = TrainStep(self.engine, self.world, self.stream.stream_names, cfg.loss_chunk_tokens)
        self.checkpointer = Checkpointer(cfg.checkpoint, self.ckpt_root, self.schedule, self.rank, self.world)
        self.step = 0
        self.resumed = resume_tag is not None
        if resume_tag is not None:
            self._restore(self.ckpt_root, resume_tag)
        elif parent_state is not None:
            self._restore(Path(anneal_from).parent, Path(anneal_from).name)
        self._stop_signal = None
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_signal)

    def _restore(self, directory: Path, tag: str) -> None:
        """Weights, optimizer moments, step and data position of a checkpoint: this run's (resume) or a
        parent's (a branch, which then enters its anneal phase's order at its first step, if it has one)."""
        state = ckpt.read_state(directory / tag)
        load_engine(self.engine, directory, tag, self.rank, self.world)
        saved = state["stream"]
        if saved["phase"] != self.stream.state.phase:  # saved inside a phase with its own mixture
            self.stream.enter_phase(saved["phase"], self.plan.mixture(saved["phase"]))
        self.stream.load_state_dict(saved)
        self.step = state["step"]
        if self.rank == 0:
            branch = directory != self.ckpt_root
            runs.truncate_metrics(self.run, 0 if branch else self.step)
            print(f"branched from {directory / tag} at step {self.step}: annealing over "
                  f"{self.schedule.anneal_steps} steps" if branch else
                  f"resumed {self.run} at step {self.step} from {tag} (written by {state['world_size']} ranks, "
                  f"now {self.world})", flush=True)

    def _on_signal(self, signum, _frame) -> None:
        self._stop_signal = signal.Signals(signum).name

    # ---- the loop
    def fit(self) -> dict:
        total = self.schedule.total_steps
        end = total if self.cfg.max_steps is None else min(total, self.step + self.cfg.max_steps)
        tracking = start_wandb(self.cfg.wandb if self.rank == 0 else None, self.run, to_dict(self.cfg))
        metrics = MetricsLog(self.run, self.rank, total, self.step, self.cfg.log_every, self.cfg.tensorboard,
                             self.cfg.plots, tracking)
        if self.cfg.max_steps == 0 and not ckpt.complete_tags(self.ckpt_root):
            self.save()  # materialise the starting point (e.g. a branch's loaded weights and moments)
        # a resumed run whose stop signal saved this step before its evaluation (not a branch's first step: that
        # is its parent's model, evaluated in the parent's run)
        if self.resumed and self.evaluator.missed(self.run, self.step):
            metrics.on_eval(self.evaluator.run(self.engine.module, self.step, wsa.phase(self.step - 1, self.schedule)))
        batches, last = None, {}
        while self.step < end:
            phase = wsa.phase(self.step, self.schedule)
            if self.plan.data_phase(phase) != self.stream.state.phase:  # a phase with its own mixture begins
                self.stream.enter_phase(self.plan.data_phase(phase), self.plan.mixture(self.plan.data_phase(phase)))
                batches = None
            if batches is None:
                batches = self._batches()
            last = self._one_step(phase, batches)
            metrics.on_step(last)
            stop = self._agreed_stop()
            if not stop and self.evaluator.due(self.step):  # before the save: a kill in it redoes both
                metrics.on_eval(self.evaluator.run(self.engine.module, self.step, phase))
            if stop or self.checkpointer.due(self.step, end):
                tag = self.save()
                if stop:
                    if self.rank == 0:
                        print(f"\n{stop}: saved {tag}, exiting", flush=True)
                    break
        metrics.close(finished=self.step >= total)
        staging.unlock_folder(self.run)  # taken by runs.open_directory (rank 0)
        return last

    def _batches(self):
        workers = self.cfg.loader_workers
        return iter(torch.utils.data.DataLoader(
            self.stream, batch_size=None, num_workers=workers, prefetch_factor=4 if workers else None,
            persistent_workers=False, worker_init_fn=_ignore_stop_signals if workers else None))

    def _one_step(self, phase: str, batches) -> dict:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()  # this step's peak, not an evaluation copy's before it
        started = time.perf_counter()
        lr = wsa.lr(self.step, self.schedule)
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        batch = next(batches)
        assert batch["step"] == self.stream.state.step, "the loader and the stream state disagree"
        stats = self.train_step(batch)
        self.stream.advance(stats.tokens_per_stream)
        self.step += 1
        seconds = time.perf_counter() - started
        record = {"step": self.step, "phase": phase, "lr": lr, **dataclasses.asdict(stats),
                  "tokens_per_s": sum(stats.tokens_per_stream.values()) / seconds,
                  "grad_norm": finite(self.engine.get_global_grad_norm()), "seconds": seconds}
        if (value := mfu(self.n_params, record["tokens_per_s"], self.world)) is not None:
            record["mfu"] = value
        if self.cuda:
            record["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
        return record

    def _agreed_stop(self) -> str | None:
        flag = self.train_step.all_reduce(torch.tensor([1.0 if self._stop_signal else 0.0]),
                                          op=torch.distributed.ReduceOp.MAX)
        return (self._stop_signal or "signal on another rank") if flag.item() else None

    def save(self) -> str:
        state = {"step": self.step, "phase": wsa.phase(max(self.step - 1, 0), self.schedule),
                 "stream": self.stream.state_dict(), "config_hash": self.hash, "lineage": self.lineage,
                 "world_size": self.world, "zero_stage": zero_stage(self.ds_config),
                 "schedule": dataclasses.asdict(self.schedule)}
        return self.checkpointer.save(self.engine, self.step, state)
