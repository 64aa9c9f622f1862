"""The run directory: what a run is (its config and lineage), what it may resume from, and its files.

A run directory holds `config.yaml` (the resolved config), `lineage.json` (the parent of an anneal branch,
and the config hash), `model/` (the Hugging Face config and tokenizer files, for export), `metrics.jsonl`,
`checkpoints/` (see `cprec.checkpoint`), `plots/` and optional `tensorboard/`. `lineage.json` is written first
and marks the folder as a run: a run_dir that is neither new, empty nor a run is refused before anything is
written (a user's folder is never overwritten).

* A run's *semantic* config (every key but `NON_SEMANTIC`) is hashed; a resume with another hash is refused,
  naming the changed keys, before anything of the run is written.
* A branch (`--anneal-from CKPT --anneal-steps N`) derives its schedule from its parent's: the parent's WSA
  schedule with the stable phase ending at the branch step, then N anneal steps (`schedule.branch`), and its
  anneal mixture when given. `branch_config` derives it from the lineage, the same on start and on resume.
* Resume takes the newest complete checkpoint whose files check out against its marker; each rank checks a
  share of the files, and a damaged checkpoint is named and passed over for the one before it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
import hashlib
import json
import shutil
from pathlib import Path

import torch
import yaml

from cprec import checkpoint as ckpt
from cprec import kernels
from cprec import staging
from cprec import schedule as wsa
from cprec.config import to_dict
from cprec.data.mixture import MixturePlan
from cprec.data.shards import ShardSet
from cprec.errors import CPRecError
from cprec.schedule import ScheduleConfig
from cprec.train.config import TrainConfig

# keys whose change does not change what a resumed run computes
# (the ZeRO stage and the loss's chunking change how a step is computed, not what, beyond fp32 rounding;
# the evaluation during training reads the model and never changes it)
NON_SEMANTIC = {"run_dir", "checkpoint", "loader_workers", "log_every", "tensorboard", "wandb", "plots", "max_steps",
                "zero_stage", "loss_chunk_tokens", "compile", "eval",
                # how a global batch is cut into passes: the same rows, the same mean gradient (elastic resume)
                "micro_batch", "grad_accum"}
# nested keys of the same kind: the model's speed levers; left out of the hash, a run made before they existed
# keeps its hash
NON_SEMANTIC_MODEL = set(kernels.LEVERS)
NO_PARENT = {"parent": None}


def semantic(config: dict) -> dict:
    """A config dict less the keys that do not change what a run computes."""
    out = {k: v for k, v in config.items() if k not in NON_SEMANTIC}
    if isinstance(out.get("model"), dict):
        out["model"] = {k: v for k, v in out["model"].items() if k not in NON_SEMANTIC_MODEL}
    return out


def config_hash(cfg: TrainConfig) -> str:
    return hashlib.sha256(json.dumps(semantic(to_dict(cfg)), sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- opening a run

@dataclass
class Branch:
    """`--anneal-from CKPT --anneal-steps N [--mixture] [--shape]`; `source` None: not a branch."""
    source: str | None = None
    steps: int | None = None
    mixture: dict | None = None
    shape: str | None = None


@dataclass
class OpenedRun:
    """What a run is, settled by `open_run` on every rank."""
    cfg: TrainConfig  # the resolved config: absolute paths, a branch's schedule and mixture
    run: Path
    lineage: dict
    hash: str
    shards: ShardSet  # its index read once, for the mixture, the checks, the evaluation and the stream
    plan: MixturePlan  # the mixture of each phase, checked against the shards
    ds_config: dict
    resume_tag: str | None  # the checkpoint this run resumes from
    parent: Path | None  # the stable-phase checkpoint a branch starts from

    @property
    def ckpt_root(self) -> Path:
        return self.run / "checkpoints"


def open_run(cfg: TrainConfig, rank: int, world: int, cuda: bool, resume: bool, branch: Branch) -> OpenedRun:
    """Collective: settle the run (new, resumed or a branch), open its directory (rank 0) and check everything
    that can refuse it, before anything of the run is written."""
    from cprec.train.checkpointing import refuse_unsafe_pickles
    from cprec.train.engine import build_ds_config, zero_stage

    run = Path(cfg.run_dir)
    ckpt_root = run / "checkpoints"
    lineage, parent = dict(NO_PARENT), None
    if branch.source is not None:
        lineage, _ = new_branch(branch.source, branch.steps, branch.mixture, branch.shape, ckpt_root)
        parent = Path(branch.source)
    elif resume:
        lineage = read_lineage(run)
    elif ckpt.complete_tags(ckpt_root):
        raise CPRecError(f"{run} already holds checkpoints; pass --resume to continue it or choose another run_dir")
    cfg = branch_config(absolute_paths(cfg), lineage)
    kernels.check(cfg.model.kernels, cfg.model.compile_blocks, cfg.compile, cuda)  # no CUDA, Triton, ...
    shards = ShardSet(cfg.shards)
    plan = MixturePlan.resolve(shards.streams, cfg.task, cfg.mixture, cfg.phase_mixtures)
    if rank == 0:
        open_directory(run)
    torch.distributed.barrier()
    tag = resume_tag(ckpt_root, rank, world) if resume else None
    ds_config = build_ds_config(cfg, world, cuda)
    hash_ = config_hash(cfg)
    if tag is not None:
        check_same_config(run, ckpt_root / tag, cfg, hash_, shards.fingerprint)
    checked = ckpt_root / tag if tag is not None else parent
    if checked is not None:
        check_same_zero_stage(checked, zero_stage(ds_config))
        refuse_unsafe_pickles(checked, rank, world)
    return OpenedRun(cfg, run, lineage, hash_, shards, plan, ds_config, tag, parent)


# ---------------------------------------------------------------- lineage and branches

def new_branch(anneal_from: str, anneal_steps: int | None, mixture: dict | None, shape: str | None,
               ckpt_root: Path) -> tuple[dict, dict]:
    """(lineage, parent's training state) of a new anneal branch from a complete stable-phase checkpoint."""
    source = Path(anneal_from)
    state = ckpt.read_state(source)
    if anneal_steps is None or anneal_steps < 1:
        raise CPRecError("--anneal-from needs --anneal-steps N (N >= 1)")
    if ckpt.complete_tags(ckpt_root):
        raise CPRecError(f"{ckpt_root.parent} already holds checkpoints; a branch starts a new run directory")
    lineage = {"parent": {"run_dir": str(source.parent.parent), "checkpoint": str(source), "step": state["step"],
                          "config_hash": state["config_hash"], "schedule": state["schedule"]},
               "anneal_steps": anneal_steps, "anneal_shape": shape, "anneal_mixture": mixture}
    return lineage, state


def read_lineage(run: Path) -> dict:
    """A run's lineage as written at its start (without the config hash stored beside it)."""
    path = run / "lineage.json"
    if not path.is_file():
        return dict(NO_PARENT)
    return {k: v for k, v in json.loads(path.read_text()).items() if k != "config_hash"}


def absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """The config with its input paths (shards, a model folder) made absolute: config.yaml records them, and a
    resume from another working folder must find the same files."""
    model = cfg.model
    if model.name and Path(model.name).is_dir():
        model = dataclasses.replace(model, name=str(Path(model.name).resolve()))
    return dataclasses.replace(cfg, shards=str(Path(cfg.shards).resolve()), model=model)


def branch_config(cfg: TrainConfig, lineage: dict) -> TrainConfig:
    """The config a branch runs: its parent's schedule cut at the branch step with its own anneal, and its
    anneal mixture. A run without a parent runs its config as it is."""
    parent = lineage.get("parent")
    if not parent:
        return cfg
    schedule = wsa.branch(ScheduleConfig(**parent["schedule"]), parent["step"], lineage["anneal_steps"],
                          lineage.get("anneal_shape"))
    mixtures = dict(cfg.phase_mixtures)
    if lineage.get("anneal_mixture"):
        mixtures["anneal"] = lineage["anneal_mixture"]
    return dataclasses.replace(cfg, schedule=schedule, phase_mixtures=mixtures)


# ---------------------------------------------------------------- what may be resumed

def resume_tag(ckpt_root: Path, rank: int, world: int) -> str | None:
    """The newest complete checkpoint whose files check out (collective: every rank checks a share)."""
    tags = ckpt.complete_tags(ckpt_root)
    latest = ckpt.latest_complete(ckpt_root)
    order = ([latest] if latest else []) + [t for t in reversed(tags) if t != latest]
    for tag in order:
        names = ckpt.checkpoint_files(ckpt_root / tag)[rank::world]
        found = [None] * world
        torch.distributed.all_gather_object(found, ckpt.file_problems(ckpt_root / tag, names))
        problems = [p for share in found for p in share]
        if not problems:
            return tag
        if rank == 0:
            print(f"checkpoint {tag} is damaged ({'; '.join(problems)}); falling back to the one before it",
                  flush=True)
    if order:
        raise CPRecError(f"no intact checkpoint to resume in {ckpt_root}: every complete one is damaged")
    return None


def check_same_config(run: Path, checkpoint: Path, cfg: TrainConfig, hash_: str, fingerprint: str) -> None:
    """Refuse a resume whose config computes something else, naming the changed keys."""
    state = ckpt.read_state(checkpoint)
    if state["config_hash"] == hash_:
        return
    saved = yaml.safe_load((run / "config.yaml").read_text()) if (run / "config.yaml").is_file() else {}
    diff = staging.differences(semantic(saved), semantic(to_dict(cfg)))
    if state["stream"]["fingerprint"] == fingerprint:  # the shards' (their index read once, in open_run)
        # the same shards at another path (moved, or a relative path from another working folder): the
        # fingerprint is what the sample order depends on, so the path may change
        diff = [d for d in diff if not d.startswith("shards:")]
    if Path(str(saved.get("model", {}).get("name"))).resolve() == Path(str(cfg.model.name)).resolve():
        diff = [d for d in diff if not d.startswith("model.name:")]  # a folder named relatively, then absolutely
    if saved and not diff:  # the same semantic keys: a hash from a version whose NON_SEMANTIC was smaller
        return
    raise CPRecError(f"refusing to resume {run}: the config changed ({'; '.join(diff) or 'hash'}); "
                     f"start a new run or an anneal branch instead")


def check_same_zero_stage(checkpoint: Path, stage: int) -> None:
    """DeepSpeed loads a checkpoint under the ZeRO stage that wrote it (ZeRO-3's files hold each rank's slice
    of every parameter, stages 1-2's the whole module; its universal conversion does not bridge the two)."""
    saved = ckpt.read_state(checkpoint).get("zero_stage", 3)  # checkpoints from before the key: ZeRO-3
    if saved != stage:
        raise CPRecError(f"{checkpoint} was written under ZeRO stage {saved} and this run uses stage {stage}; "
                         f"DeepSpeed cannot load a checkpoint under another stage: set zero_stage={saved}, or "
                         f"export the checkpoint and start a new run from it (model.name=EXPORTED_FOLDER)")


def check_vocabulary(shards: ShardSet, model_vocab: int) -> None:
    shards_vocab = shards.index["tokenizer"]["vocab_size"]
    if shards_vocab > model_vocab:
        raise CPRecError(f"{shards.root} was packed with a tokenizer of {shards_vocab:,} tokens, more than the model's "
                         f"vocabulary ({model_vocab:,}): its token ids would index past the embeddings; pack with "
                         f"the model's tokenizer")


# ---------------------------------------------------------------- the directory's files

RUN_MARKER = "lineage.json"  # the first file a run writes: a folder with it is a CPRec run


def is_run(folder: Path) -> bool:
    """A CPRec run: its lineage is written, or a start was killed before anything but its checkpoints folder."""
    return (folder / RUN_MARKER).is_file() or {p.name for p in staging.entries(folder)} <= {"checkpoints"}


def open_directory(run: Path) -> None:
    """Rank 0, at start: the directory is new, empty or a run's (never a user's folder), exists, and saves
    killed half-way are gone."""
    staging.refuse_foreign(run, is_run, "CPRec run", "run_dir=")
    with staging.writing(run):
        run.mkdir(parents=True, exist_ok=True)
        staging.lock_folder(run)  # a second trainer on this run_dir is refused, naming this one
        removed = ckpt.remove_incomplete(run / "checkpoints")
    if removed:
        print(f"removed incomplete checkpoint(s) {', '.join(removed)} (interrupted saves)", flush=True)


def write_run_files(run: Path, cfg: TrainConfig, model_config, tokenizer_folder: Path | None, lineage: dict) -> None:
    """Rank 0, once the run is accepted: lineage.json (first: it marks the folder as a run), config.yaml, and
    model/ (config and tokenizer, for export)."""
    with staging.writing(run):
        staging.write_json_atomic(run / RUN_MARKER, {**lineage, "config_hash": config_hash(cfg)})
        (run / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        model_dir = run / "model"
        model_dir.mkdir(exist_ok=True)
        model_config.save_pretrained(model_dir)
        if tokenizer_folder is not None:
            for f in Path(tokenizer_folder).iterdir():
                if f.name.startswith(("tokenizer", "special_tokens", "chat_template", "vocab", "merges")):
                    shutil.copy(f, model_dir / f.name)


def packed_tokenizer_or_none(shards: ShardSet) -> Path | None:
    """The tokenizer the shards were packed with, when it can be found and checks out against the index: a run
    of a model built from model.config keeps it in model/, so its exports can be evaluated (cprec sweep)."""
    from cprec.backbone import packed_tokenizer

    try:
        return packed_tokenizer(shards.index)
    except CPRecError:
        return None  # e.g. random test shards: no tokenizer, as before; evaluation then names what is missing


def truncate_metrics(run: Path, step: int) -> None:
    """Keep the metrics of steps up to `step`: a resumed run writes the later ones again."""
    path = run / "metrics.jsonl"
    if path.is_file():
        kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in kept))
