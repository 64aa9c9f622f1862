"""The Warmup-Stable-Annealing learning-rate schedule: lr(step) as a pure function of the step and config.

    warmup  [0, W)            linear from warmup_start_lr to peak_lr
    stable  [W, W + S)        peak_lr
    anneal  [W + S, W + S + A) from peak_lr down to min_lr, shaped linear | cosine | 1-sqrt | exponential
    after                     min_lr

`exponential` is MiniCPM's decay, peak * 0.5 ** (t / half_life) with t the steps into the anneal phase,
shifted and scaled so that it ends at min_lr exactly. Checkpoints store the step, never the curve. An
anneal branch from a stable-phase checkpoint at step s is the same schedule with S = s - W and its own A.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from cprec.errors import CPRecError

SHAPES = ("linear", "cosine", "1-sqrt", "exponential")
PHASES = ("warmup", "stable", "anneal")


@dataclass
class ScheduleConfig:
    peak_lr: float = 3e-4  # the stable phase's learning rate
    min_lr: float = 3e-5  # where the anneal ends (and the warmup starts)
    warmup_steps: int = 10  # linear warmup
    stable_steps: int = 80  # constant peak_lr; its checkpoints are branch points
    anneal_steps: int = 10  # the decay to min_lr
    anneal_shape: str = "exponential"  # linear, cosine, 1-sqrt or exponential (MiniCPM)
    warmup_start_lr: float | None = None  # default: min_lr (as transformers' get_wsd_schedule)
    half_life: float = 0.125  # exponential: half-life as a fraction of the anneal steps

    def validate(self) -> None:
        if self.anneal_shape not in SHAPES:
            raise CPRecError(f"schedule.anneal_shape must be one of {', '.join(SHAPES)}, got '{self.anneal_shape}'")
        for name in ("warmup_steps", "stable_steps", "anneal_steps"):
            if getattr(self, name) < 0:
                raise CPRecError(f"schedule.{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.min_lr <= self.peak_lr:
            raise CPRecError(f"schedule needs 0 <= min_lr <= peak_lr, got min_lr={self.min_lr}, peak_lr={self.peak_lr}")
        if self.half_life <= 0:
            raise CPRecError(f"schedule.half_life must be > 0, got {self.half_life}")

    @property
    def total_steps(self) -> int:
        return self.warmup_steps + self.stable_steps + self.anneal_steps


def phase(step: int, cfg: ScheduleConfig) -> str:
    if step < cfg.warmup_steps:
        return "warmup"
    if step < cfg.warmup_steps + cfg.stable_steps:
        return "stable"
    return "anneal"


def lr(step: int, cfg: ScheduleConfig) -> float:
    peak, low = cfg.peak_lr, cfg.min_lr
    if step < cfg.warmup_steps:
        start = low if cfg.warmup_start_lr is None else cfg.warmup_start_lr
        return start + (peak - start) * step / cfg.warmup_steps
    if step < cfg.warmup_steps + cfg.stable_steps:
        return peak
    t = step - cfg.warmup_steps - cfg.stable_steps
    if t >= cfg.anneal_steps:
        return low
    p = t / cfg.anneal_steps
    if cfg.anneal_shape == "linear":
        factor = 1.0 - p
    elif cfg.anneal_shape == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * p))
    elif cfg.anneal_shape == "1-sqrt":
        factor = 1.0 - math.sqrt(p)
    else:  # exponential, rescaled so that it reaches exactly 0 (min_lr) at the end
        end = 0.5 ** (1.0 / cfg.half_life)
        factor = (0.5 ** (p / cfg.half_life) - end) / (1.0 - end)
    return low + (peak - low) * factor


def branch(cfg: ScheduleConfig, from_step: int, anneal_steps: int, shape: str | None = None) -> ScheduleConfig:
    """The schedule of an anneal branch started at stable-phase step `from_step`."""
    if phase(from_step, cfg) != "stable":
        raise CPRecError(f"step {from_step} is in the {phase(from_step, cfg)} phase; an anneal branch starts from "
                         f"a stable-phase checkpoint (steps {cfg.warmup_steps} to "
                         f"{cfg.warmup_steps + cfg.stable_steps - 1})")
    out = ScheduleConfig(**{**cfg.__dict__, "stable_steps": from_step - cfg.warmup_steps,
                            "anneal_steps": anneal_steps, "anneal_shape": shape or cfg.anneal_shape})
    out.validate()
    return out
