"""`cprec evaluate`: next-item recommendation of a model on the held-out downstream domains.

Leave-one-out test users of each downstream domain; the prompt is the template's next-item prompt over the
user's history (newest items that fit the prepared budget).

* full ranking (primary): the exact top-K titles of the domain's catalogue (summed log-probability of title
  plus end marker, no length normalisation), by scoring every title of a catalogue under `exhaustive_below`
  titles, else by best-first search over the prefix tree; HR@{1,5,10,20} and NDCG@{5,10,20};
* sampled (secondary, labelled so): the target and `negatives` items the user never touched, drawn with a
  seed and saved in `candidates/`, so that every model (and SASRec) is scored on the same candidates; ties
  count against the target.

Scale: users are scored in batches of `batch_users` (`cprec.eval.batched`), on the GPU when there is one
(bf16 there, fp32 on the CPU; `device`/`dtype` override). Under torchrun (`launch/evaluate.py`, the same
arguments) the batches are dealt to the ranks round-robin, every batch to exactly one rank, whatever the
number of users. Each batch's per-user ranks are appended as soon as it finishes, so a killed evaluation
re-run with the same command resumes where it stopped (`cprec.eval.ranks`).

Writes `ranks.jsonl` (per user), `results.json` and `results.md` (a table per domain naming the protocol and
the number of users), which depend on the settings only, and `timing.json` (this run's device, ranks and
seconds per user).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cprec.backbone import load_model, model_folder
from cprec.data.cleaning import markdown_text
from cprec.data.prepared import LEAVE_ONE_OUT, Prepared, read_manifest, split_kind
from cprec.errors import CPRecError
from cprec.eval import ranks as rank_files
from cprec.eval.config import TOP_K, EvalConfig, protocols, resolve_device, sized_for
from cprec.eval.downstream import Downstream, downstream_domains, sampled_candidates
from cprec.eval.metrics import HR_KS, NDCG_KS, rank_against_ties, ranking_metrics
from cprec.process_group import RankGroup
from cprec.staging import STAGING_MARKER
from cprec.tables import markdown_table


def fingerprint(paths: list[Path]) -> str:
    """BLAKE2b-128 of the files' names and contents (a resume must see the same model, data, candidates)."""
    digest = hashlib.blake2b(digest_size=16)
    for path in sorted(paths):
        digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()


def settings_record(model_spec: str, prepared: Path, domains: list[str], cfg: EvalConfig, candidates: Path | None,
                    dtype) -> dict:
    """What decides the results (see `cprec.eval.ranks`)."""
    folder = model_folder(model_spec)
    files = [p for p in folder.iterdir() if p.is_file() and p.name != STAGING_MARKER]  # a kill can leave it
    record = {"model": str(model_spec), "model_files": fingerprint(files),
              "data": str(prepared.resolve()), "data_manifest": fingerprint([prepared / "manifest.json"]),
              "protocol": cfg.protocol, "domains": domains, "users": cfg.users, "negatives": cfg.negatives,
              "seed": cfg.seed, "top_k": TOP_K, "dtype": str(dtype).removeprefix("torch.")}
    # the files the users, histories, targets and titles come from: a resume after any of them changed is
    # refused (the manifest alone says nothing of an edited test.jsonl)
    data = Prepared(prepared)
    record["data_files"] = fingerprint([data.items] + [data.downstream(d, split) for d in domains
                                                      for split in ("train", "valid", "test")
                                                      if data.downstream(d, split).is_file()])
    record["candidates"] = str(candidates.resolve()) if candidates else None
    record["candidates_files"] = fingerprint(sorted(candidates.glob("*.jsonl"))) if candidates else None
    # both recorded only off their defaults, so that leave-one-out test-split records stay as they were (a
    # resume of an earlier evaluation is not refused for a key it never had): how the held-out domains were
    # split (a resume that would mix splits is refused naming it), and which of their users are scored
    kind = split_kind(read_manifest(prepared))
    if kind != LEAVE_ONE_OUT:
        record["split_kind"] = kind
    if cfg.split != "test":
        record["split"] = cfg.split
    return record


@dataclass
class Unit:
    """A batch of users of one domain and protocol: the unit of work, of sharding and of resuming."""
    domain: str
    protocol: str
    users: list[int]  # indices into the domain's test users


def plan(domains: list[str], test_sizes: dict[str, int], prompt_lengths: dict[str, list[int]], cfg: EvalConfig
         ) -> list[Unit]:
    """Every unit of the evaluation in a fixed order. Users are grouped by prompt length (little padding);
    the units do not depend on the number of ranks, so every rank count computes the same batches."""
    units = []
    for domain in domains:
        order = np.argsort(prompt_lengths[domain], kind="stable").tolist()
        for protocol in protocols(cfg):
            units += [Unit(domain, protocol, order[i:i + cfg.batch_users])
                      for i in range(0, test_sizes[domain], cfg.batch_users)]
    return units


def evaluate(model_spec: str, prepared: str | Path, out: str | Path, cfg: EvalConfig,
             candidates: str | Path | None = None) -> dict | None:
    """Evaluate (this process is one rank of any number); returns the results on rank 0, None elsewhere."""
    from cprec.eval.batched import BatchScorer

    cfg.validate()
    prepared, out = Path(prepared), Path(out)
    reuse = Path(candidates) if candidates else None
    manifest, domains = downstream_domains(prepared, cfg)
    ranks = RankGroup()
    try:
        device, dtype = resolve_device(cfg.device, cfg.dtype)
        model, tok = load_model(model_spec, device, dtype)  # a model that cannot load claims no folder
        _claim(ranks, out, lambda: settings_record(model_spec, prepared, domains, cfg, reuse, dtype))
        done = rank_files.read_done(out)
        cfg = sized_for(cfg, device)
        scorer = BatchScorer(model, tok, cfg.row_nodes, cfg.tokens_per_pass, cfg.node_cache_mb << 20)
        sets, units = domain_sets(scorer, prepared, manifest, domains, cfg, out, reuse, write=ranks.rank == 0)
        started = time.perf_counter()
        seconds = _score_units(scorer, sets, units[ranks.rank::ranks.world], done, out, ranks.rank, cfg)
        timing = ranks.gather({"seconds": seconds, "stats": scorer.stats})
        if ranks.world > 1:
            ranks.dist.barrier()  # every rank's appends are on disk
        results = None
        if ranks.rank == 0:
            results = _finish(out, model_spec, prepared, cfg, sets, settings_record_of(out))
            _write_timing(out, timing, time.perf_counter() - started, device, dtype, ranks.world, cfg)
        if ranks.world > 1:
            ranks.dist.barrier()
        return results
    finally:
        ranks.close()


def domain_sets(scorer, prepared: Path, manifest: dict, domains: list[str], cfg: EvalConfig, out: Path | None,
                reuse: Path | None, write: bool) -> tuple[dict, list[Unit]]:
    """({domain: (Downstream, prompts, candidates or None)}, every unit in order): what an evaluation scores.
    `cfg` must be `sized_for` its device; candidates are written to `out` only when `write`."""
    cost = (lambda line: len(scorer.tok(line, add_special_tokens=False)["input_ids"])) \
        if manifest["budget"]["unit"] == "tokens" else len
    sets = {}
    for domain in domains:
        ds = Downstream(prepared, manifest, domain, cfg, cost)
        cands = sampled_candidates(ds, cfg, out, reuse, write=write) if "sampled" in protocols(cfg) else None
        sets[domain] = (ds, [ds.prompt(r) for r in ds.test], cands)
    units = plan(domains, {d: len(s[0].test) for d, s in sets.items()},
                 {d: [len(scorer.prompt_ids(p)) for p in s[1]] for d, s in sets.items()}, cfg)
    return sets, units


def rank_in_memory(model, tok, prepared: Path, cfg: EvalConfig, rank: int = 0, world: int = 1) -> list[dict]:
    """This rank's share of an evaluation of an in-memory `model`, nothing written: the `ranks.jsonl`
    records of units rank::world, each with `index`, the user's place in the domain's sample (the order
    `evaluate` computes its metrics in). The units, candidates and scorer are `evaluate`'s, so the union over
    the ranks equals `evaluate`'s records for the same weights and settings, whatever `world` is. `model` is
    only run forward, under no_grad, in whatever mode the caller set."""
    from cprec.eval.batched import BatchScorer
    from cprec.eval.search import PrefixTree

    cfg.validate()
    manifest, domains = downstream_domains(prepared, cfg)
    scorer = BatchScorer(model, tok, cfg.row_nodes, cfg.tokens_per_pass, cfg.node_cache_mb << 20)
    sets, units = domain_sets(scorer, prepared, manifest, domains, cfg, None, None, write=False)
    records, trees = [], {}
    for unit in units[rank::world]:
        ds = sets[unit.domain][0]
        if unit.protocol == "full" and unit.domain not in trees:
            trees[unit.domain] = PrefixTree(scorer.lines_ids(ds.titles))
        found = _rank_unit(scorer, unit, sets[unit.domain], trees.get(unit.domain), cfg)
        records += [{**rank_files.record(unit.domain, unit.protocol, ds.test[i]["user"], r, n), "index": i}
                    for i, (r, n) in zip(unit.users, found)]
    return records


def _claim(ranks: RankGroup, out: Path, settings) -> None:
    """Rank 0 starts or resumes `out` (`cprec.eval.ranks.claim`); every rank learns whether it may go on."""
    error = None
    if ranks.rank == 0:
        try:
            rank_files.claim(out, settings())
        except Exception as exc:  # noqa: BLE001 - the other ranks wait for word of it
            if ranks.world == 1:
                raise
            error = str(exc) if isinstance(exc, CPRecError) else f"{type(exc).__name__}: {exc}"
    error = ranks.from_rank0(error)
    if error:
        raise CPRecError(error)


def settings_record_of(out: Path) -> dict:
    return json.loads((out / rank_files.SETTINGS_FILE).read_text(encoding="utf-8"))


def _score_units(scorer, sets: dict, units: list[Unit], done: dict, out: Path, rank: int, cfg: EvalConfig) -> dict:
    """Score this rank's units that `done` lacks, appending each unit's ranks; seconds per (domain, protocol)."""
    from cprec.eval.search import PrefixTree

    todo = [u for u in units if any((u.domain, u.protocol, str(sets[u.domain][0].test[i]["user"])) not in done
                                    for i in u.users)]
    log = rank_files.RankLog(out, rank)
    trees: dict[str, object] = {}
    seconds: dict = {}
    bar = tqdm(total=sum(len(u.users) for u in todo), desc="evaluate", unit=" users", disable=rank != 0)
    try:
        for unit in todo:
            ds = sets[unit.domain][0]
            started = time.perf_counter()
            if unit.protocol == "full" and unit.domain not in trees:
                trees[unit.domain] = PrefixTree(scorer.lines_ids(ds.titles))
            found = _rank_unit(scorer, unit, sets[unit.domain], trees.get(unit.domain), cfg)
            records = [rank_files.record(unit.domain, unit.protocol, ds.test[i]["user"], r, n)
                       for i, (r, n) in zip(unit.users, found)]
            log.append([r for r in records if rank_files.key(r) not in done])
            entry = seconds.setdefault(f"{unit.domain}/{unit.protocol}", [0, 0.0])
            entry[0] += len(unit.users)
            entry[1] += time.perf_counter() - started
            bar.update(len(unit.users))
    finally:
        bar.close()
        log.close()
    return seconds


def _rank_unit(scorer, unit: Unit, domain_set: tuple, tree, cfg: EvalConfig) -> list[tuple[int | None, int]]:
    """(rank of the target or None, titles ranked) for each user of `unit`."""
    ds, prompts, cands = domain_set
    users_prompts = [prompts[i] for i in unit.users]
    if unit.protocol == "sampled":
        titles = [cands[i] for i in unit.users]
        if max(map(len, titles)) < cfg.exhaustive_below:  # score them all: fewest, largest passes
            ranks = [rank_against_ties(s, 0) for s in scorer.score_users(users_prompts, titles)]
        else:  # expand only what scores at least the target
            ranks = scorer.rank_users(users_prompts, titles)
        return list(zip(ranks, map(len, titles)))
    top = scorer.top_k_users(users_prompts, tree, TOP_K, cfg.beam, exhaustive=len(ds.titles) < cfg.exhaustive_below,
                             frontier=cfg.frontier)
    found = []
    for best, i in zip(top, unit.users):
        titles = [ds.titles[t] for t, _ in best]
        target = ds.test[i]["target"]
        found.append((titles.index(target) if target in titles else None, len(ds.titles)))
    return found


def _finish(out: Path, model_spec: str, prepared: Path, cfg: EvalConfig, sets: dict, settings: dict) -> dict:
    """Rank 0, once every rank is done: ranks.jsonl in its fixed order, results.json and results.md."""
    done = rank_files.read_done(out)
    records, missing = [], []
    results = {"model": str(model_spec), "prepared": str(prepared), "protocol": cfg.protocol,
               "split": cfg.split, "split_kind": settings.get("split_kind", LEAVE_ONE_OUT), "settings": settings,
               "domains": {}}
    for domain, (ds, _, _) in sets.items():
        entry: dict = {"users": len(ds.test), "items": len(ds.titles)}
        for protocol in protocols(cfg):
            mine = []
            for row in ds.test:
                rec = done.get((domain, protocol, str(row["user"])))
                if rec is None:
                    missing.append((domain, protocol, row["user"]))
                else:
                    mine.append(rec)
            records += mine
            if not mine:
                continue
            metrics = ranking_metrics([r["rank"] for r in mine])
            if protocol == "sampled":
                metrics.update(candidates=cfg.negatives + 1,
                               mean_candidates=float(np.mean([r["candidates"] for r in mine])))
            entry[protocol] = metrics
        results["domains"][domain] = entry
    if missing:  # a rank died without raising: never write results over a hole
        raise CPRecError(f"{out}: {len(missing)} users have no rank (first: {missing[0]}); run the same command "
                         f"again to score them")
    rank_files.finish(out, records)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(results_markdown({str(model_spec): results}))
    return results


def _write_timing(out: Path, per_rank: list[dict], wall: float, device, dtype, world: int, cfg: EvalConfig) -> None:
    """This run's speed (a resumed run counts only the users it scored)."""
    totals: dict = {}
    for part in per_rank:
        for name, (users, seconds) in part["seconds"].items():
            entry = totals.setdefault(name, {"users": 0, "seconds": 0.0})
            entry["users"] += users
            entry["seconds"] += seconds
    for entry in totals.values():
        entry["seconds_per_user"] = entry["seconds"] / entry["users"]  # one rank's seconds per user
    users = sum(entry["users"] for entry in totals.values())
    timing = {"device": str(device), "dtype": str(dtype).removeprefix("torch."), "ranks": world,
              "batch_users": cfg.batch_users, "wall_seconds": wall,
              "users_per_second": users / wall if users else None, "scored": totals,
              "search": {"fallbacks": sum(p["stats"]["fallbacks"] for p in per_rank),
                         "peak_frontier": max(p["stats"]["peak_frontier"] for p in per_rank)}}
    (out / "timing.json").write_text(json.dumps(timing, indent=2) + "\n")


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
            kind = first.get("split_kind", LEAVE_ONE_OUT)
            split = f", {kind} split" + (f" ({first['split']} users)" if first.get("split", "test") != "test" else "")
            keys = [f"HR@{k}" for k in HR_KS] + [f"NDCG@{k}" for k in NDCG_KS]
            lines += [f"### {markdown_text(domain)} — {label}, {users} test users{split}", "",
                      *markdown_table(["model", *keys], [[markdown_text(name), *(f"{m[k]:.4f}" for k in keys)]
                                                         for name, m in rows])]
            lines.append("")
    return "\n".join(lines)
