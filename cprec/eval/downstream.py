"""The downstream data an evaluation reads: the held-out domains of a prepared directory (`downstream_domains`),
each domain's catalogue, test users and prompts (`Downstream`), and the sampled protocol's candidates
(`sampled_candidates`), drawn with a seed and saved so that every model (and SASRec) is scored on the same ones.
What `cprec evaluate`, SASRec, the metric during training and the experiment read them through."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cprec import staging
from cprec.data import template
from cprec.data.prepared import Prepared, read_manifest
from cprec.data.stream import stable_key
from cprec.errors import CPRecError
from cprec.eval.config import EvalConfig


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise CPRecError(f"{path}: missing")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


class Downstream:
    """One downstream domain of a prepared directory: catalogue, test users, prompts and candidates."""

    def __init__(self, prepared: Path, manifest: dict, domain: str, cfg: EvalConfig, cost):
        self.domain = domain
        self.slug = manifest["domains"]["streams"][domain]
        self.titles = sorted({it["title"] for it in read_jsonl(prepared / "items.jsonl") if it["domain"] == domain})
        self.index = {t: i for i, t in enumerate(self.titles)}
        test = read_jsonl(prepared / "downstream" / self.slug / f"{cfg.split}.jsonl")
        if cfg.users is not None and cfg.users < len(test):
            keep = np.sort(np.random.default_rng([cfg.seed, stable_key(domain)]).choice(len(test), cfg.users, replace=False))
            test = [test[i] for i in keep]
        self.test = test
        self.budget, self.cost = manifest["budget"]["size"], cost

    def prompt(self, row: dict) -> str:
        return template.render_example(self.domain, row["history"], None, self.budget, self.cost)[0]

    def candidates(self, row: dict, negatives: int, seed: int) -> list[str]:
        """The target first, then `negatives` titles the user never touched (seeded by user); all untouched
        titles where the catalogue has fewer (MovieLens genres have 42-92 items after the 5-core)."""
        free = np.ones(len(self.titles), dtype=bool)  # the untouched titles, in catalogue order
        free[[self.index[t] for t in {*row["history"], row["target"]} if t in self.index]] = False
        pool = np.flatnonzero(free)
        n = min(negatives, len(pool))
        pick = np.random.default_rng([seed, stable_key(self.domain, row["user"])]).choice(len(pool), n, replace=False)
        return [row["target"]] + [self.titles[pool[i]] for i in sorted(pick)]


def sampled_candidates(ds: Downstream, cfg: EvalConfig, out: Path, reuse: Path | None,
                       write: bool = True) -> list[list[str]]:
    """Candidates of every test user: read from `reuse` when given (the same for every model), else drawn
    and (when `write`) written to `out/candidates/<domain>.jsonl`."""
    if reuse is not None:
        rows = read_jsonl(reuse / f"{ds.slug}.jsonl")
        by_user = {r["user"]: r["candidates"] for r in rows}
        missing = [r["user"] for r in ds.test if r["user"] not in by_user]
        if missing:
            raise CPRecError(f"{reuse / (ds.slug + '.jsonl')} has no candidates for user {missing[0]}")
        return [by_user[r["user"]] for r in ds.test]
    cands = [ds.candidates(r, cfg.negatives, cfg.seed) for r in ds.test]
    if write:
        (out / "candidates").mkdir(parents=True, exist_ok=True)
        staging.write_atomic(out / "candidates" / f"{ds.slug}.jsonl", "".join(
            json.dumps({"user": row["user"], "target": row["target"], "candidates": c}, ensure_ascii=False) + "\n"
            for row, c in zip(ds.test, cands)))
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
    data = Prepared(prepared)
    for domain in domains:  # a domain without users would drop out of every table without a word
        path = data.downstream(domain, cfg.split)
        if not path.is_file() or not any(line.strip() for line in path.open(encoding="utf-8")):
            raise CPRecError(f"held-out domain '{domain}' has no {cfg.split} users ({path} is empty): its results "
                             f"would be missing from every table. Leave it out (domains: [...]) or prepare it with "
                             f"more users (a lower k_core, or min_downstream_items)")
    return manifest, domains
