"""The training loop: one process is one rank; it reads its slice of each global batch of the packed data
stream, takes an optimizer step under the WSA schedule, and reports and checkpoints through the callbacks.

Started once per rank by `deepspeed launch/train.py --config C`, `torchrun --nproc_per_node N
launch/train.py --config C` or the Slurm script; `cprec train` runs the one-process case (`cprec.train.arguments`).
The pieces: `config` (TrainConfig), `engine` (DeepSpeed config, model; the process group is
`cprec.process_group`'s), `step` (the loss and its statistics), `run`
(the run directory: config hash, lineage, resume and branch rules), `checkpointing` (when and how a
checkpoint is saved and loaded), `metrics_log` (metrics.jsonl, TensorBoard, plots), and the mixture plan
(`cprec.data.mixture`), resolved once and validated against the shards before the loader exists.

Stop signals (SIGTERM, SIGUSR1) are noted by the handler and agreed on by all ranks after a step; the run
then saves and returns. DataLoader workers ignore them: `scancel` and pre-emptions signal the whole process
group, and a worker that died of it would take the step, and the save, down with it.
"""

from __future__ import annotations

import dataclasses
import signal
import time
from pathlib import Path

import torch

from cprec import checkpoint as ckpt
from cprec import staging
from cprec import schedule as wsa
from cprec.config import to_dict
from cprec.data.stream import PackedStream
from cprec.tracking import start_wandb
from cprec.train import run as runs
from cprec.train.checkpointing import Checkpointer, load_engine
from cprec.train.config import TrainConfig
from cprec.process_group import init_distributed
from cprec.train.engine import build_model, zero_stage
from cprec.train.evaluating import TrainingEval
from cprec.train.metrics_log import MetricsLog, finite, mfu
from cprec.train.step import TrainStep, check_chunkable

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # save at the next step boundary, then exit 0


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
        # one call settles the run and checks all that can refuse it, before anything of it is written
        opened = runs.open_run(cfg, self.rank, self.world, self.cuda, resume,
                               runs.Branch(anneal_from, anneal_steps, anneal_mixture, anneal_shape))
        self.cfg = cfg = opened.cfg
        self.run, self.ckpt_root, self.lineage, self.hash = opened.run, opened.ckpt_root, opened.lineage, opened.hash
        self.schedule, self.ds_config, shards, self.plan = cfg.schedule, opened.ds_config, opened.shards, opened.plan

        model, folder, self._hf_ds = build_model(cfg, self.ds_config, self.cuda, self.rank)
        runs.check_vocabulary(shards, model.config.vocab_size)
        if cfg.loss_chunk_tokens:
            check_chunkable(model.config)
        self.evaluator = TrainingEval(cfg.eval, shards, folder, self.rank, self.world, self.schedule.total_steps)
        self.n_params = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters())
        if self.rank == 0:
            runs.write_run_files(self.run, cfg, model.config, folder or runs.packed_tokenizer_or_none(shards),
                                 self.lineage)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                                                 config=self.ds_config)
        self.device = self.engine.device
        if cfg.compile:
            self.engine.compile()
        first = self.plan.data_phase("warmup")
        self.stream = PackedStream(cfg.shards, self.plan.mixture(first), cfg.seed, cfg.global_batch, self.rank,
                                   self.world, phase=first, index=shards.index)
        self.train_step = TrainStep(self.engine, self.world, self.stream.stream_names, cfg.loss_chunk_tokens)
        self.checkpointer = Checkpointer(cfg.checkpoint, self.ckpt_root, self.schedule, self.rank, self.world)
        self.step = 0
        self.resumed = opened.resume_tag is not None
        if opened.resume_tag is not None:
            self._restore(self.ckpt_root, opened.resume_tag)
        elif opened.parent is not None:
            self._restore(opened.parent.parent, opened.parent.name)
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
