"""The recommendation metric during training: every `eval.every` steps (and at the schedule's last step) the
model being trained is scored on a fixed, seeded sample of the downstream domains' *validation* users (under
leave-one-out the item before the test item, under the chronological split the first item between the two
cuts; the test split is never read), and an `eval` record goes to
metrics.jsonl, TensorBoard and `plots/eval.png` (`cprec.train.metrics_log`).

Contract:

* **Equal to `cprec evaluate`.** The scoring is `cprec.eval.evaluate.rank_in_memory`: the same users,
  candidates, units and batched scorer as `cprec evaluate ... split=valid` with the same settings, so an
  eval record equals that command's results on an export of the checkpoint saved at the same step.
* **Lockstep under ZeRO-3.** The trained module is never run forward. Every rank gathers it parameter by
  parameter, in the same order (`GatheredParameters`: the only collectives besides one `all_gather_object`
  of the results), into a plain, non-partitioned copy built outside `zero.Init`; each rank then scores its
  round-robin share of the units on its copy without any collective, so ranks may run different numbers of
  forward passes without deadlock, and the union does not depend on the number of ranks (2 ranks == 1).
  The copy costs one full set of weights per rank in `eval.dtype` while an evaluation runs; it is freed after.
* **Training is unchanged.** The trained module's mode, parameters and gradients are not touched (gathering
  reads them); the copy is built under `torch.random.fork_rng`, so no random state moves; the data loader
  is not read. On CPU, losses with evaluation on equal those with it off, bit for bit.
* It runs after the step and before the step's checkpoint, so a run killed during an evaluation redoes that
  step and its evaluation on resume; a run stopped by a signal saves first and evaluates the step when
  resumed (`missed`).
"""

from __future__ import annotations

import contextlib
import gc
import time
from dataclasses import dataclass, replace
from pathlib import Path

from cprec.data.shards import ShardSet, read_index
from cprec.errors import CPRecError
from cprec.eval.config import EvalConfig
from cprec.train.metrics_log import read_metrics

IN_TRAINING_PROTOCOLS = ("sampled", "full")


@dataclass
class TrainEvalConfig(EvalConfig):
    """`eval:` of a training config: EvalConfig's keys (domains, users, protocol, negatives, seed, batch sizes,
    device, dtype) with defaults for a cheap, frequent check, plus when to run and on what data."""
    every: int = 0  # evaluate every N steps and at the schedule's last step (0: never)
    prepared: str = ""  # the prepared directory (default: the one the shards were packed from)
    protocol: str = "sampled"
    users: int | None = 256  # a fixed, seeded sample of validation users per domain (None: all)
    split: str = "valid"

    def validate(self) -> None:
        try:
            super().validate()
        except CPRecError as exc:  # name the section: the same keys exist for `cprec evaluate`
            raise CPRecError(f"eval.{exc}") from None
        if self.every < 0:
            raise CPRecError(f"eval.every must be >= 0 (0: no evaluation during training), got {self.every}")
        if self.protocol not in IN_TRAINING_PROTOCOLS:
            raise CPRecError(f"eval.protocol must be sampled or full during training (one metric per record), "
                             f"got '{self.protocol}'")
        if self.split != "valid":
            raise CPRecError(f"eval.split must be valid: training never looks at the test split, got '{self.split}'")


def prepared_of(cfg: TrainEvalConfig, shards: str, index: dict | None = None) -> Path:
    """`eval.prepared`, else the prepared directory recorded in the shards' index (read here unless given)."""
    if cfg.prepared:
        return Path(cfg.prepared)
    source = (index if index is not None else read_index(Path(shards))).get("source", {}).get("prepared")
    if not source:
        raise CPRecError(f"{shards}/index.json does not name its prepared directory: set eval.prepared")
    return Path(source)


def tokenizer_folder(run_model: Path | None, shards: str, index: dict) -> Path:
    """The run's tokenizer (model/ holds it when the model came from a folder), else the shards' own."""
    from cprec.backbone import packed_tokenizer

    if run_model is not None and any((run_model / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json")):
        return run_model
    return packed_tokenizer(index, where=f"the shards of {shards}")


class TrainingEval:
    """The in-training evaluation of one rank; `run` is collective (every rank calls it at the same steps)."""

    def __init__(self, cfg: TrainEvalConfig, shards: ShardSet, tokenizer: Path | None, rank: int, world: int,
                 total_steps: int):
        self.cfg, self.rank, self.world, self.total = cfg, rank, world, total_steps
        self.active = cfg.every > 0
        if not self.active:
            return
        from cprec.backbone import load_tokenizer
        from cprec.eval.config import resolve_device, sized_for
        from cprec.eval.downstream import downstream_domains

        cfg.validate()
        self.prepared = prepared_of(cfg, str(shards.root), shards.index)
        _, domains = downstream_domains(self.prepared, cfg)  # names a missing or unknown domain now
        for domain in domains:
            from cprec.data.prepared import read_manifest

            slug = read_manifest(self.prepared)["domains"]["streams"][domain]
            if not (self.prepared / "downstream" / slug / "valid.jsonl").is_file():
                raise CPRecError(f"eval: {self.prepared / 'downstream' / slug / 'valid.jsonl'} is missing")
        self.device, self.dtype = resolve_device(cfg.device, cfg.dtype)
        self.scoring = sized_for(replace(cfg), self.device)
        self.tok = load_tokenizer(tokenizer_folder(tokenizer, str(shards.root), shards.index))

    def due(self, step: int) -> bool:
        return self.active and step > 0 and (step % self.cfg.every == 0 or step == self.total)

    def missed(self, run: Path, step: int) -> bool:
        """Due at `step` but without a record in metrics.jsonl (a run stopped by a signal saved it first)."""
        import torch

        if not self.due(step):
            return False
        missing = None
        if self.rank == 0:  # rank 0 wrote (and truncated) the file; every rank must take the same branch
            missing = not any(r["step"] == step for r in read_metrics(run)[1])
        box = [missing]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def run(self, module, step: int, phase: str) -> dict | None:
        """Score the trained `module` at `step`; the `eval` record on rank 0, None elsewhere."""
        import torch

        from cprec.eval.evaluate import rank_in_memory

        started = time.perf_counter()
        copy = plain_copy(module, self.device, self.dtype)
        try:
            mine = rank_in_memory(copy, self.tok, self.prepared, self.scoring, self.rank, self.world)
        finally:
            del copy
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        shares = [None] * self.world
        torch.distributed.all_gather_object(shares, mine)
        if self.rank != 0:
            return None
        return eval_record([r for share in shares for r in share], step, phase, self.cfg,
                           time.perf_counter() - started)


def eval_record(records: list[dict], step: int, phase: str, cfg: EvalConfig, seconds: float) -> dict:
    """metrics.jsonl's `eval` record: HR@10 and NDCG@10 over all users, and per domain (summed in
    `cprec evaluate`'s order, so that the floats are its floats)."""
    from cprec.eval.metrics import ranking_metrics

    records = sorted(records, key=lambda r: (r["domain"], r["index"]))
    per_domain = {}
    for domain in dict.fromkeys(r["domain"] for r in records):
        metrics = ranking_metrics([r["rank"] for r in records if r["domain"] == domain])
        per_domain[domain] = {"HR@10": metrics["HR@10"], "NDCG@10": metrics["NDCG@10"],
                              "users": sum(r["domain"] == domain for r in records)}
    overall = ranking_metrics([r["rank"] for r in records])
    return {"step": step, "kind": "eval", "phase": phase, "split": cfg.split, "protocol": cfg.protocol,
            "users": len(records), "HR@10": overall["HR@10"], "NDCG@10": overall["NDCG@10"],
            "domains": per_domain, "seconds": seconds}


def plain_copy(module, device, dtype):
    """A non-partitioned copy of the (ZeRO-3 partitioned) `module`, in eval mode, for scoring. Collective:
    every rank gathers every parameter in the same order. Built outside zero.Init and under a forked random
    state, so neither DeepSpeed nor the training's random numbers see it."""
    import deepspeed
    import torch
    import transformers
    from transformers.integrations import deepspeed as hf_ds

    from cprec.attention import for_evaluation

    config = module.config.__class__.from_dict(module.config.to_dict())
    config.use_cache = True  # as an export: the scorer keeps key/value caches
    config._attn_implementation = for_evaluation(device)  # as `cprec evaluate` loads a model (4-D masks)
    saved = hf_ds._hf_deepspeed_config_weak_ref
    hf_ds.unset_hf_deepspeed_config()  # else transformers builds the copy partitioned, under zero.Init
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), _no_init():
            copy = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = saved
    if getattr(config, "tie_word_embeddings", False):
        copy.tie_weights()  # skipped with the initialisation: an untied head would score with garbage
    copy = copy.to(device).eval().requires_grad_(False)
    targets = dict(copy.named_parameters())
    names = [name for name, _ in module.named_parameters()]
    if set(names) != set(targets):  # every weight of the copy must come from the trained module
        raise CPRecError(f"eval: the evaluation copy's parameters differ from the trained model's "
                         f"({sorted(set(names) ^ set(targets))[:3]})")
    for name, param in module.named_parameters():
        with deepspeed.zero.GatheredParameters([param]):  # collective; reads only (no modifier rank)
            targets[name].data.copy_(param.data)
    buffers = dict(copy.named_buffers())
    for name, buf in module.named_buffers():  # never partitioned
        if name in buffers:
            buffers[name].copy_(buf)
    return copy


def _no_init():
    """Skip the copy's random initialisation (every weight is overwritten): fast for large models."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            return contextlib.nullcontext()
    return no_init_weights()
