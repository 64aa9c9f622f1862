"""The training config (`TrainConfig`), its parts owned by training (`ModelConfig`, `OptimConfig`) and its
own checks. Every key is documented in docs/reference.md (`python -m cprec.reference`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from cprec import kernels
from cprec import schedule as wsa
from cprec.config import check_seed
from cprec.errors import CPRecError
from cprec.schedule import ScheduleConfig
from cprec.tracking import WandbConfig
from cprec.train.checkpointing import CheckpointConfig
from cprec.train.evaluating import TrainEvalConfig

TASKS = ("pretrain", "sft")  # which kind of packed stream the default mixture takes
ZERO_STAGES = (1, 2, 3)  # stage 0 has no ZeRO checkpoint files, which export and elastic resume read


@dataclass
class ModelConfig:
    name: str | None = "smollm2"  # a Hugging Face folder, or smollm2 (the packaged SmolLM2-135M)
    config: dict | None = None  # instead of name: build a random model from this config (tests)
    attn: str = "auto"  # auto: flash_attention_2 on GPUs when installed, else sdpa; see cprec.attention
    gradient_checkpointing: bool = False  # recompute activations in the backward pass (less memory, more time)
    kernels: str = "none"  # liger: Liger's Triton kernels for RMSNorm, SwiGLU, RoPE (GPU; cprec/kernels.py)
    compile_blocks: bool = False  # torch.compile each decoder block before DeepSpeed wraps the model


@dataclass
class OptimConfig:
    weight_decay: float = 0.1  # AdamW decoupled weight decay
    beta1: float = 0.9  # AdamW first-moment decay
    beta2: float = 0.95  # AdamW second-moment decay
    eps: float = 1e-8  # AdamW epsilon
    grad_clip: float = 1.0  # clip the global gradient norm to this (0: no clipping)
    torch_adam: bool = True  # torch's AdamW: no fused_adam build (2 min on CPU; needs nvcc on GPUs)


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
        kernels.check_config(self.model.kernels, self.model.compile_blocks, self.compile)
        self.eval.validate()
