"""`cprec evaluate`: next-item recommendation of a model on the held-out downstream domains.

Leave-one-out test users of each downstream domain; the prompt is the template's next-item prompt over the
user's history (newest items that fit the prepared budget).

* full ranking (primary): the exact top-K titles of the domain's catalogue (prefix-tree constrained search,
  summed log-probability of title plus end marker, no length normalisation); HR@{1,5,10,20} and
  NDCG@{5,10,20};
* sampled (secondary, labelled so): the target and `negatives` items the user never touched, drawn with a
  seed and saved in `candidates/`, so that every model (and SASRec) is scored on the same candidates; ties
  count against the target.

Writes `results.json` and `results.md` (a table per domain naming the protocol and the number of users).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cprec.data import template
from cprec.data.prepared import read_manifest
from cprec.data.stream import _key
from cprec.errors import CPRecError
from cprec.eval.metrics import HR_KS, NDCG_KS, rank_against_ties, ranking_metrics

PROTOCOLS = ("full", "sampled", "both")


@dataclass
class EvalConfig:
    protocol: str = "both"
    domains: list[str] | None = None  # default: every downstream domain of the prepared data
    users: int | None = None  # evaluate a seeded sample of this many test users per domain (default: all)
    negatives: int = 99
    seed: int = 0
    beam: int = 20  # prefixes expanded per batched step of the full-ranking search (exactness does not depend on it)
    exhaustive_below: int = 500  # full ranking scores every title of a smaller catalogue (same exact top-K)
    batch_size: int = 64

    def validate(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise CPRecError(f"protocol must be one of {', '.join(PROTOCOLS)}, got '{self.protocol}'")
        if self.users is not None and self.users < 1:
            raise CPRecError(f"users must be at least 1 (or left out for every test user), got {self.users}")
        for name in ("negatives", "beam", "batch_size"):
            if getattr(self, name) < 1:
                raise CPRecError(f"{name} must be at least 1, got {getattr(self, name)}")


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise CPRecError(f"{path}: missing")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def load_model(spec: str):
    import torch
    import transformers

    from cprec.backbone import smollm2_folder

    transformers.logging.set_verbosity_error()
    folder = smollm2_folder() if spec == "smollm2" else Path(spec)
    if not (folder / "config.json").is_file():
        raise CPRecError(f"--model {spec}: not a Hugging Face model folder (no config.json) nor 'smollm2'")
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        raise CPRecError(f"--model {spec}: the folder has no tokenizer (tokenizer.json); evaluation renders text, "
                         f"so copy the backbone's tokenizer files into it (an export takes them from the run's "
                         f"model/ folder, which has none when the run trained a model built from model.config)")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return model, transformers.AutoTokenizer.from_pretrained(folder)


class Downstream:
    """One downstream domain of a prepared directory: catalogue, test users, prompts and candidates."""

    def __init__(self, prepared: Path, manifest: dict, domain: str, cfg: EvalConfig, cost):
        self.domain = domain
        self.slug = manifest["domains"]["streams"][domain]
        self.titles = sorted({it["title"] for it in read_jsonl(prepared / "items.jsonl") if it["domain"] == domain})
        self.index = {t: i for i, t in enumerate(self.titles)}
        test = read_jsonl(prepared / "downstream" / self.slug / "test.jsonl")
        if cfg.users is not None and cfg.users < len(test):
            keep = np.sort(np.random.default_rng([cfg.seed, _key(domain)]).choice(len(test), cfg.users, replace=False))
            test = [test[i] for i in keep]
        self.test = test
        self.budget, self.cost = manifest["budget"]["size"], cost

    def prompt(self, row: dict) -> str:
        return template.render_example(self.domain, row["history"], None, self.budget, self.cost)[0]

    def candidates(self, row: dict, negatives: int, seed: int) -> list[str]:
        """The target first, then `negatives` titles the user never touched (seeded by user); all untouched
        titles where the catalogue has fewer (MovieLens genres have 42-92 items after the 5-core)."""
        seen = set(row["history"]) | {row["target"]}
        pool = [t for t in self.titles if t not in seen]
        n = min(negatives, len(pool))
        pick = np.random.default_rng([seed, _key(self.domain, row["user"])]).choice(len(pool), n, replace=False)
        return [row["target"]] + [pool[i] for i in sorted(pick)]


def sampled_candidates(ds: Downstream, cfg: EvalConfig, out: Path, reuse: Path | None) -> list[list[str]]:
    """Candidates of every test user: read from `reuse` when given (the same for every model), else drawn
    and written to `out/candidates/<domain>.jsonl`."""
    if reuse is not None:
        rows = read_jsonl(reuse / f"{ds.slug}.jsonl")
        by_user = {r["user"]: r["candidates"] for r in rows}
        missing = [r["user"] for r in ds.test if r["user"] not in by_user]
        if missing:
            raise CPRecError(f"{reuse / (ds.slug + '.jsonl')} has no candidates for user {missing[0]}")
        return [by_user[r["user"]] for r in ds.test]
    cands = [ds.candidates(r, cfg.negatives, cfg.seed) for r in ds.test]
    (out / "candidates").mkdir(parents=True, exist_ok=True)
    with open(out / "candidates" / f"{ds.slug}.jsonl", "w", encoding="utf-8") as fh:
        for row, c in zip(ds.test, cands):
            fh.write(json.dumps({"user": row["user"], "target": row["target"], "candidates": c},
                                ensure_ascii=False) + "\n")
    return cands


def downstream_domains(prepared: Path, cfg: EvalConfig) -> tuple[dict, list[str]]:
    manifest = read_manifest(prepared)
    domains = cfg.domains or manifest["domains"]["downstream"]
    if not domains:
        raise CPRecError(f"{prepared} has no downstream domain to evaluate on: prepare it with "
                         f"downstream_domains='[...]' (held-out domains get leave-one-out splits)")
    unknown = [d for d in domains if d not in manifest["domains"]["downstream"]]
    if unknown:
        raise CPRecError(f"'{unknown[0]}' is not a downstream domain of {prepared} "
                         f"({', '.join(manifest['domains']['downstream'])})")
    return manifest, domains


def evaluate(model_spec: str, prepared: str | Path, out: str | Path, cfg: EvalConfig,
             candidates: str | Path | None = None) -> dict:
    from cprec.eval.scoring import TitleScorer, TitleTrie

    cfg.validate()
    prepared, out = Path(prepared), Path(out)
    manifest, domains = downstream_domains(prepared, cfg)
    model, tok = load_model(model_spec)
    scorer = TitleScorer(model, tok, cfg.batch_size)
    cost = (lambda line: len(scorer.tok(line, add_special_tokens=False)["input_ids"])) \
        if manifest["budget"]["unit"] == "tokens" else len
    out.mkdir(parents=True, exist_ok=True)
    results = {"model": str(model_spec), "prepared": str(prepared), "protocol": cfg.protocol,
               "config": cfg.__dict__, "domains": {}}
    for domain in domains:
        ds = Downstream(prepared, manifest, domain, cfg, cost)
        entry: dict = {"users": len(ds.test), "items": len(ds.titles)}
        prompts = [ds.prompt(r) for r in ds.test]
        if cfg.protocol in ("sampled", "both"):
            cands = sampled_candidates(ds, cfg, out, Path(candidates) if candidates else None)
            started = time.perf_counter()
            ranks = [rank_against_ties(scorer.score(p, c), 0)
                     for p, c in tqdm(list(zip(prompts, cands)), desc=f"sampled {domain}", unit=" users")]
            entry["sampled"] = {**ranking_metrics(ranks), "candidates": cfg.negatives + 1,
                                "mean_candidates": float(np.mean([len(c) for c in cands])),
                                "seconds_per_user": (time.perf_counter() - started) / len(ranks)}
        if cfg.protocol in ("full", "both"):
            trie = TitleTrie([scorer.line_ids(t) for t in ds.titles], ds.titles)
            k = max(HR_KS + NDCG_KS)
            started = time.perf_counter()
            ranks = []
            for p, row in tqdm(list(zip(prompts, ds.test)), desc=f"full {domain}", unit=" users"):
                top = [ds.titles[i] for i, _ in scorer.top_k(p, trie, k, cfg.beam, cfg.exhaustive_below)]
                ranks.append(top.index(row["target"]) if row["target"] in top else None)
            entry["full"] = {**ranking_metrics(ranks), "seconds_per_user": (time.perf_counter() - started) / len(ranks)}
        results["domains"][domain] = entry
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(results_markdown({str(model_spec): results}))
    return results


def results_markdown(runs: dict[str, dict]) -> str:
    """One table per domain and protocol: a row per model (or baseline)."""
    lines = []
    first = next(iter(runs.values()))
    for domain in first["domains"]:
        for protocol, label in (("full", "full ranking"), ("sampled", "sampled: target + up to 99 negatives")):
            rows = [(name, r["domains"][domain][protocol]) for name, r in runs.items()
                    if protocol in r["domains"].get(domain, {})]
            if not rows:
                continue
            users = first["domains"][domain]["users"]
            keys = [f"HR@{k}" for k in HR_KS] + [f"NDCG@{k}" for k in NDCG_KS]
            lines += [f"### {domain} — {label}, {users} test users", "",
                      "| model | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
            lines += [f"| {name} | " + " | ".join(f"{m[k]:.4f}" for k in keys) + " |" for name, m in rows]
            lines.append("")
    return "\n".join(lines)
