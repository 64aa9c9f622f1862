"""`cprec experiment`: the paper's comparison on one prepared dataset, with its uncertainty, resumable.

One command runs, on the same test users (all of each held-out domain by default) and the same candidates:

    base     the backbone zero-shot                       once (deterministic)
    cpt      continual pre-training, zero-shot            once, or once per seed (`cpt.per_seed`)
    sft      fine-tuning only (from the backbone)         once per seed
    cpt_sft  continual pre-training, then fine-tuning     once per seed (from the seed's or the one CPT model)
    sasrec   SASRec on the downstream training prefixes   once per seed

then the statistics (`cprec.eval.stats`) and a report: OUT/report.md, OUT/results.json, OUT/plots/ (HR@10 and
NDCG@10 per model and domain with their 95% seed intervals; the pre-training loss curve).

Stages and resuming. Every stage (prepare, pack, the backbone, each training run, each evaluation of one
model, seed and domain, the report) writes its outputs, then its marker `OUT/stages/<stage>.json`, last. A
re-run skips every stage with a marker and redoes a stage without one from where its own files allow
(training resumes from its latest complete checkpoint, an evaluation from its per-user ranks). The resolved
config is recorded in `OUT/experiment.json`; a re-run with a config that changes a result is refused, naming
the keys (speed settings may change), so results of two configs, or two splits, are never mixed. OUT must be
new, empty, or an earlier experiment's folder.

Training runs in child processes (`cprec train`, `cprec sft`): DeepSpeed keeps an engine's memory referenced
for the life of its process. Evaluation and SASRec run in this process.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cprec import kernels, staging
from cprec.config import check_seed, deep_merge, field_value, from_dict, parse_overrides, read_config_file, to_dict
from cprec.data.prepare import PrepareConfig
from cprec.errors import CPRecError
from cprec.eval.config import EvalConfig
from cprec.eval.sasrec import SASRecConfig
from cprec.experiment_report import COMPARISONS, MODELS

MARKER = "experiment.json"
RECIPES = ("cpt", "sft")  # the training recipes an experiment runs (its `cpt:` and `sft:` sections)
SPEED_KEYS = {"pack_workers", "sizes", "eval.batch_users", "eval.row_nodes", "eval.tokens_per_pass",
              "eval.node_cache_mb", "eval.beam", "eval.frontier", "eval.exhaustive_below",
              "description"}  # not eval.device / dtype: bf16 reorders ranks; description is prose


@dataclass
class CPTStage:
    config: str = "launch/configs/ml1m_smollm2_gpu.yaml"  # a training recipe (shipped or a path)
    overrides: list[str] = field(default_factory=list)  # key=value on the recipe (run_dir, shards, model.name, seed are set)
    per_seed: bool = False  # one continual pre-training per seed (else one, with the first seed)


@dataclass
class SFTStage:
    config: str = "launch/configs/sft.yaml"  # the fine-tuning recipe (shipped or a path)
    epochs: float | None = 1.0  # passes over the held-out domains' fine-tuning streams (null: the config's steps)
    overrides: list[str] = field(default_factory=list)  # key=value on the recipe


@dataclass
class ExperimentConfig:
    name: str = "experiment"  # the report's title
    data: PrepareConfig = field(default_factory=PrepareConfig)  # the prepare config (its table above)
    seq_len: int = 1024  # packed row length; data.window_tokens must be seq_len - 1 when budgeted in tokens
    pack_workers: int = 1  # pack processes
    model: str = "smollm2"  # the backbone: smollm2 or a Hugging Face folder
    model_config: dict[str, Any] | None = None  # instead: a random Llama of this config (tests), saved as OUT/base
    cpt: CPTStage = field(default_factory=CPTStage)  # continual pre-training
    sft: SFTStage = field(default_factory=SFTStage)  # fine-tuning, from the backbone and from CPT
    sasrec: SASRecConfig = field(default_factory=SASRecConfig)  # the SASRec baseline (its table above)
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(protocol="full"))  # the evaluation (its table above; protocol: full here)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # fine-tuning and SASRec seeds
    bootstrap: int = 10_000  # paired bootstrap resamples
    sizes: dict[str, dict[str, Any]] = field(default_factory=dict)  # named overlays chosen by --size
    models: list[str] = field(default_factory=lambda: list(MODELS))  # the models run and reported (base always)
    description: str = ""  # what this size's numbers can and cannot show: the report prints it

    def validate(self) -> None:
        unknown = [m for m in self.models if m not in MODELS]
        if unknown or "base" not in self.models or len(set(self.models)) != len(self.models):
            raise CPRecError(f"models must be distinct names among {', '.join(MODELS)} and include base (every "
                             f"comparison is on the backbone's test users), got {self.models}")
        if "cpt_sft" in self.models and "cpt" not in self.models:
            raise CPRecError("models: cpt_sft fine-tunes the continual pre-training's model, so it needs cpt too")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise CPRecError(f"seeds must be a non-empty list of distinct integers, got {self.seeds}")
        for seed in self.seeds:
            check_seed(seed, "seeds")
        if self.model_config is not None and not self.data.tokenizer:
            raise CPRecError("model_config (a random backbone) needs data.tokenizer: the tokenizer it is built for")
        if self.data.tokenizer and self.data.window_tokens > self.seq_len - 1:
            raise CPRecError(f"data.window_tokens={self.data.window_tokens} does not fit rows of seq_len="
                             f"{self.seq_len} (at most seq_len - 1 = {self.seq_len - 1})")
        # the report compares per-user full-ranking ranks of test users
        if self.eval.protocol not in ("full", "both"):
            raise CPRecError(f"eval.protocol must be full or both (the report's statistics are on full-ranking "
                             f"ranks), got '{self.eval.protocol}'")
        if self.eval.split != "test":
            raise CPRecError(f"eval.split must be test (the experiment reports test users; validation users are "
                             f"for model selection: cprec sweep), got '{self.eval.split}'")


def load_experiment_config(path: str | Path, size: str | None = None, overrides: list[str] = ()) -> ExperimentConfig:
    """The YAML file, then its `sizes.<size>` overlay, then `key=value` overrides; typed (errors name the key)."""
    path, data = read_config_file(path)
    if size is not None:
        sizes = field_value(ExperimentConfig, "sizes", data.get("sizes") or {}, str(path))  # before merging it
        if size not in sizes:
            raise CPRecError(f"--size {size}: {path} has no sizes.{size} (sizes: {', '.join(sizes) or 'none'})")
        data = deep_merge(data, sizes[size])
    data = deep_merge(data, parse_overrides(list(overrides)))
    return from_dict(ExperimentConfig, data, f"{path}" + (f" (size {size})" if size else ""))


# ---------------------------------------------------------------- the folder and its stage markers

def check_recipes(cfg: ExperimentConfig) -> dict:
    """Load the CPT and SFT recipes with their overrides, as the training children will, before the first
    stage: an unknown key or a bad value is named now, not after prepare, pack and the first evaluations.
    Returns each recipe's content (its resolved YAML), which the experiment records instead of a path alone:
    editing a recipe file changes the experiment."""
    from cprec.config import load_config
    from cprec.train.config import TrainConfig

    resolved = {}
    for stage in RECIPES:
        recipe = getattr(cfg, stage)
        path, _ = read_config_file(recipe.config)
        loaded = load_config(TrainConfig, path, ["shards=unchecked", *recipe.overrides])
        resolved[stage] = {k: v for k, v in to_dict(loaded).items() if k not in ("shards", "run_dir")}
    return resolved


# the stages each config key feeds: a key may change on resume while none of them has finished
KEY_STAGES = {"cpt.": ("train__cpt__",), "sft.": ("train__sft__", "train__cpt_sft__"),
              "sasrec.": ("eval__sasrec__",), "bootstrap": ()}


def _semantic(cfg: ExperimentConfig) -> dict:
    """The resolved config less the keys that change only speed, with the recipes' resolved content."""
    data = to_dict(cfg)
    data["recipes"] = check_recipes(cfg)
    for key in SPEED_KEYS:
        node, *rest = key.split(".")
        if rest:
            data.get(node, {}).pop(rest[0], None)
        else:
            data.pop(node, None)
    return data


def claim_folder(out: Path, cfg: ExperimentConfig) -> None:
    """Start or resume OUT: record the config, or refuse one that would change results (naming the keys)."""
    now = _semantic(cfg)  # loads the recipes with their overrides first: a bad one makes no folder
    # recorded since issue 25 (the recipes' content) and issue 28 (the model's speed levers): an older record
    # is compared without them
    since = ["recipes", *(f"recipes.{stage}.model.{lever}" for stage in RECIPES for lever in kernels.LEVERS)]
    staging.claim(out, MARKER, now, "an experiment", may_change=lambda c: _may_change(out, c), since=since,
                  key="config")


def _may_change(out: Path, difference: str) -> bool:
    """A changed key (`key: old -> new`) is accepted on resume when no stage that depends on it has finished:
    a corrected recipe override before its training ran, the bootstrap count (the report is always redone)."""
    key = difference.split(":", 1)[0].removeprefix("recipes.")
    for prefix, stages in KEY_STAGES.items():
        if key.startswith(prefix):
            return not any(p.name.startswith(stages) for p in (out / "stages").glob("*.json")) if stages else True
    return False


# ---------------------------------------------------------------- the stages

class Experiment:
    """The stages of one experiment in OUT, in the order they run (see the module docstring)."""

    def __init__(self, cfg: ExperimentConfig, out: str | Path, size: str | None = None):
        self.cfg, self.out, self.size = cfg, Path(out), size
        self.prepared, self.shards = self.out / "prepared", self.out / "shards"
        self.stages: staging.Stages | None = None

    # paths
    def base_model(self) -> str:
        return str(self.out / "base") if self.cfg.model_config is not None else self.cfg.model

    def cpt_seeds(self) -> list[int]:
        return list(self.cfg.seeds) if self.cfg.cpt.per_seed else [self.cfg.seeds[0]]

    def cpt_dir(self, seed: int) -> Path:
        return self.out / "cpt" / f"s{seed}"

    def cpt_for(self, seed: int) -> Path:
        """The CPT model that seed `seed`'s CPT+SFT starts from."""
        return self.cpt_dir(seed if self.cfg.cpt.per_seed else self.cfg.seeds[0]) / "hf"

    def runs(self) -> dict[str, list[tuple[int | None, str | None]]]:
        """Model -> its (seed, model folder) runs, for the config's `models` in table order; SASRec has no
        folder, the base model no seed."""
        cfg = self.cfg
        every = {"base": [(None, self.base_model())],
                 "cpt": [(s, str(self.cpt_dir(s) / "hf")) for s in self.cpt_seeds()],
                 "sft": [(s, str(self.out / "sft" / f"s{s}" / "hf")) for s in cfg.seeds],
                 "cpt_sft": [(s, str(self.out / "cpt_sft" / f"s{s}" / "hf")) for s in cfg.seeds],
                 "sasrec": [(s, None) for s in cfg.seeds]}
        return {model: runs for model, runs in every.items() if model in cfg.models}

    def comparisons(self) -> list[tuple[str, str]]:
        """The COMPARISONS whose two models are both run."""
        return [(a, b) for a, b in COMPARISONS if a in self.cfg.models and b in self.cfg.models]

    def eval_dir(self, model: str, seed: int | None, domain_slug: str) -> Path:
        return self.out / "eval" / model / ("once" if seed is None else f"s{seed}") / domain_slug

    # the whole run
    def run(self) -> Path:
        claim_folder(self.out, self.cfg)
        try:
            return self._stages()
        finally:
            staging.unlock_folder(self.out)  # taken by claim_folder

    def _stages(self) -> Path:
        self.stages = st = staging.Stages(self.out)
        st.run("prepare", self.prepare)
        st.run("pack", self.pack)
        if self.cfg.model_config is not None:
            st.run("base", self.build_base)
        domains = self.domains()
        if self._candidates_dir() is not None:
            st.run("candidates", lambda: self.candidates(domains))
        models = self.cfg.models
        self.evaluate_model("base", domains)
        if "cpt" in models:
            for seed in self.cpt_seeds():
                st.run(f"train/cpt/s{seed}", lambda s=seed: self.train_cpt(s))
            self.evaluate_model("cpt", domains)
        for seed in self.cfg.seeds if "sasrec" in models else []:
            for domain, slug in domains:
                st.run(f"eval/sasrec/s{seed}/{slug}", lambda s=seed, d=domain, g=slug: self.sasrec(s, d, g))
        for model, start in (("sft", lambda s: self.base_model()), ("cpt_sft", lambda s: str(self.cpt_for(s)))):
            if model not in models:
                continue
            for seed in self.cfg.seeds:
                st.run(f"train/{model}/s{seed}", lambda m=model, s=seed, f=start: self.train_sft(m, s, f(s)))
            self.evaluate_model(model, domains)
        from cprec.experiment_report import write_report

        report = write_report(self)  # always rewritten: cheap, and it reads only finished stages' files
        st.mark("report", 0.0)
        return report

    def domains(self) -> list[tuple[str, str]]:
        """(domain, slug) of the evaluated held-out domains."""
        from cprec.eval.downstream import downstream_domains

        manifest, names = downstream_domains(self.prepared, self.cfg.eval)
        return [(d, manifest["domains"]["streams"][d]) for d in names]  # as Prepared.slug reads it

    def prepare(self) -> dict:
        from cprec.data.prepare import prepare

        manifest = prepare(self.cfg.data, self.prepared, overwrite=True)  # a half-written one is replaced
        return {"split": manifest["split"]["kind"]}

    def pack(self) -> dict:
        from cprec.data.pack import PackConfig, pack

        tokenizer = self.cfg.data.tokenizer or "smollm2"
        index = pack(self.prepared, tokenizer, self.shards, PackConfig(seq_len=self.cfg.seq_len,
                                                                       workers=self.cfg.pack_workers))
        return {"rows": {n: s["rows"] for n, s in index["streams"].items()}}

    def build_base(self) -> dict:
        """A random Llama of `model_config` with the data's tokenizer (seeded: the same on every run)."""
        import torch
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        from cprec.backbone import resolve_tokenizer

        tok = AutoTokenizer.from_pretrained(resolve_tokenizer(self.cfg.data.tokenizer))
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**{"vocab_size": len(tok), **self.cfg.model_config}))
        model.save_pretrained(self.out / "base")
        tok.save_pretrained(self.out / "base")

    def candidates(self, domains) -> None:
        """The sampled protocol's candidates, drawn once and scored by every model."""
        from cprec.data.prepared import read_manifest
        from cprec.eval.downstream import Downstream, sampled_candidates

        manifest = read_manifest(self.prepared)
        for domain, _ in domains:
            ds = Downstream(self.prepared, manifest, domain, self.cfg.eval, len)
            sampled_candidates(ds, self.cfg.eval, self.out, None)  # -> OUT/candidates/<slug>.jsonl

    def _candidates_dir(self) -> Path | None:
        return self.out / "candidates" if self.cfg.eval.protocol in ("sampled", "both") else None

    def evaluate_model(self, model: str, domains) -> None:
        from cprec.eval.evaluate import evaluate

        for seed, folder in self.runs()[model]:
            for domain, slug in domains:
                out = self.eval_dir(model, seed, slug)
                cfg = replace(self.cfg.eval, domains=[domain])
                self.stages.run(f"eval/{model}/{'once' if seed is None else f's{seed}'}/{slug}",
                                lambda f=folder, o=out, c=cfg: _quiet(evaluate(f, self.prepared, o, c,
                                                                               self._candidates_dir())))

    def sasrec(self, seed: int, domain: str, slug: str) -> None:
        from cprec.eval.sasrec import evaluate_sasrec

        evaluate_sasrec(self.prepared, self.eval_dir("sasrec", seed, slug), replace(self.cfg.eval, domains=[domain]),
                        replace(self.cfg.sasrec, seed=seed), self._candidates_dir())

    def train_cpt(self, seed: int) -> dict:
        """`cprec train --resume` (a fresh run when there is no checkpoint yet), then the export to hf/."""
        from cprec import checkpoint as ckpt
        from cprec.export import export

        run = self.cpt_dir(seed) / "run"
        _child(["train", "--config", self.cfg.cpt.config, "--resume", f"run_dir={run}", f"shards={self.shards}",
                f"model.name={self.base_model()}", f"seed={seed}", *self.cfg.cpt.overrides])
        tag = ckpt.latest_complete(run / "checkpoints")
        export(run / "checkpoints" / tag, self.cpt_dir(seed) / "hf", overwrite=True)
        return {"checkpoint": tag}

    def train_sft(self, model: str, seed: int, start: str) -> None:
        """`cprec sft --resume` from `start` (it exports the final checkpoint to hf/)."""
        _child(["sft", "--model", start, "--shards", str(self.shards), "--out", str(self.out / model / f"s{seed}"),
                *(["--epochs", str(self.cfg.sft.epochs)] if self.cfg.sft.epochs is not None else []),
                "--config", self.cfg.sft.config, "--resume", f"seed={seed}", *self.cfg.sft.overrides])


def _quiet(_result) -> None:
    """A stage's marker records no more than it needs: the results are in the stage's own folder."""
    return None


def _child(args: list[str]) -> None:
    """A `cprec` command in a child process; its output goes to ours. It takes a free port on its own."""
    code = subprocess.run([sys.executable, "-m", "cprec.cli", *args], env=staging.child_env()).returncode
    if code:
        raise CPRecError(f"`cprec {' '.join(args)}` failed (exit {code}); fix the cause and run the same "
                         f"experiment command again: finished stages are kept")


def run_experiment(config: str | Path, out: str | Path, size: str | None = None, overrides: list[str] = ()) -> Path:
    """Run (or resume) the experiment; the path of its report."""
    cfg = load_experiment_config(config, size, overrides)
    return Experiment(cfg, out, size).run()
