"""The mixture plan: which mixture of packed streams the data stream reads in each phase of a run.

Resolved once, from the run's config (and a branch's own anneal mixture), and validated against the shards
before any loader exists, so a bad stream name or weight fails at start-up, not at a phase boundary hours
later. The stream's order has *data phases*: `main` by default, through warmup, stable and anneal alike (the
order just continues), plus one per schedule phase that has a mixture of its own (`phase_mixtures`), which
starts an order of its own, seeded by its name, at that phase's first step.

* `main`'s mixture is the config's `mixture`, else the task's streams (`pretrain` or `sft`) in proportion to
  their rows (`stream.default_mixture`);
* `phase_mixtures[phase]` gives a schedule phase its own data phase and mixture;
* a resumed checkpoint must be in a data phase of the plan, and the stream checks that its mixture is the plan's.
"""

from __future__ import annotations

from dataclasses import dataclass

from cprec.data.stream import default_mixture, normalize_mixture
from cprec.errors import CPRecError

MAIN = "main"  # the data phase of every schedule phase without a mixture of its own


@dataclass(frozen=True)
class MixturePlan:
    mixtures: dict[str, dict[str, float]]  # data phase -> stream weights; MAIN always present

    @classmethod
    def resolve(cls, streams: dict, task: str, mixture: dict[str, float],
                phase_mixtures: dict[str, dict[str, float]]) -> "MixturePlan":
        """The plan of a run over a shard index's `streams`, each mixture checked against them."""
        mixtures = {MAIN: dict(mixture) if mixture else default_mixture(streams, task)}
        mixtures.update({phase: dict(m) for phase, m in phase_mixtures.items()})
        for phase, weights in mixtures.items():
            try:
                normalize_mixture(weights, list(streams))
            except CPRecError as exc:
                raise CPRecError(f"the {phase} mixture: {exc}") from None
        return cls(mixtures)

    def data_phase(self, schedule_phase: str) -> str:
        """A schedule phase with a mixture of its own reads its own order; the others continue `main`."""
        return schedule_phase if schedule_phase in self.mixtures else MAIN

    def mixture(self, data_phase: str) -> dict[str, float]:
        if data_phase not in self.mixtures:  # a checkpoint saved in a phase this run's config does not have
            raise CPRecError(f"refusing to resume: the checkpoint is in data phase '{data_phase}', which this "
                             f"run's mixtures do not have (phases: {', '.join(self.mixtures)})")
        return dict(self.mixtures[data_phase])
