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
import os
import time
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cprec.data import template
from cprec.data.cleaning import markdown_text
from cprec.data.prepared import LEAVE_ONE_OUT, Prepared, read_manifest, split_kind
from cprec.data.stream import stable_key
from cprec.config import check_seed
from cprec.errors import CPRecError
from cprec.eval import ranks as rank_files
from cprec.eval.metrics import HR_KS, NDCG_KS, rank_against_ties, ranking_metrics
from cprec.staging import STAGING_MARKER

PROTOCOLS = ("full", "sampled", "both")
SPLITS = ("test", "valid")  # leave-one-out: test's target is the last item, valid's the one before it
DTYPES = ("auto", "float32", "bfloat16", "float16")
TOP_K = max(HR_KS + NDCG_KS)


@dataclass
class EvalConfig:
    protocol: str = "both"  # full (every title), sampled (target + negatives) or both
    domains: list[str] | None = None  # default: every downstream domain of the prepared data
    users: int | None = None  # evaluate a seeded sample of this many test users per domain (default: all)
    negatives: int = 99  # sampled protocol: negatives per user
    seed: int = 0  # the user sample and the negatives
    beam: int | None = None  # prefixes each user expands per search step (None: 20 CPU, 256 GPU); exact either way
    exhaustive_below: int | None = None  # fewer titles (catalogue, candidates) are all scored (None: 60 CPU, 500 GPU); exact either way
    frontier: int = 50_000  # open prefixes kept per user by the search; past it, cut and checked (still exact)
    batch_users: int | None = None  # users whose prompts and titles share forward passes (None: 16 CPU, 256 GPU)
    row_nodes: int = 256  # prefix-tree nodes per row of a forward pass
    tokens_per_pass: int | None = None  # fed positions per forward pass (None: 4096 CPU, 65536 GPU); keys add prompt+context
    node_cache_mb: int | None = None  # K/V kept per batch of users in a search (None: 1024 CPU, 1/3 of free GPU memory)
    device: str = "auto"  # auto: this rank's GPU when there is one, else cpu; or cpu, cuda, cuda:N
    dtype: str = "auto"  # auto: bfloat16 on a GPU, float32 on the CPU
    split: str = "test"  # valid: the validation users (model selection: in-training metric, anneal sweep)

    def validate(self) -> None:
        check_seed(self.seed)
        if self.protocol not in PROTOCOLS:
            raise CPRecError(f"protocol must be one of {', '.join(PROTOCOLS)}, got '{self.protocol}'")
        if self.split not in SPLITS:
            raise CPRecError(f"split must be one of {', '.join(SPLITS)}, got '{self.split}'")
        if self.users is not None and self.users < 1:
            raise CPRecError(f"users must be at least 1 (or left out for every test user), got {self.users}")
        for name in ("negatives", "beam", "frontier", "batch_users", "row_nodes", "tokens_per_pass",
                     "node_cache_mb"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise CPRecError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.dtype not in DTYPES:
            raise CPRecError(f"dtype must be one of {', '.join(DTYPES)}, got '{self.dtype}'")


# ---------------------------------------------------------------- device, precision, model

def resolve_device(device: str = "auto", dtype: str = "auto"):
    """(torch.device, torch.dtype) of this process: auto picks its local rank's GPU when one is visible
    (bf16 there), else the CPU (fp32)."""
    import torch

    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CPRecError(f"device={device}: no GPU is visible to this process (torch.cuda.is_available() is "
                         f"False); use device=cpu")
    try:
        dev = torch.device(f"cuda:{local}" if device == "cuda" else device)
    except RuntimeError:
        raise CPRecError(f"device must be auto, cpu, cuda or cuda:N, got '{device}'") from None
    if dtype not in DTYPES:
        raise CPRecError(f"dtype must be one of {', '.join(DTYPES)}, got '{dtype}'")
    if dtype == "auto":
        dtype = "bfloat16" if dev.type == "cuda" else "float32"
    return dev, getattr(torch, dtype)


def sized_for(cfg: EvalConfig, device) -> EvalConfig:
    """The batch sizes left to the device: a GPU takes far larger passes than a CPU. A GPU's search also
    takes a wider beam: a step's bookkeeping costs about the same for 20 prefixes as for 256, and a GPU's
    pass is short, so fewer, wider steps pay (on a compute-bound CPU a narrow beam feeds fewer nodes).

    Which catalogues are scored whole: on a CPU the time follows the nodes fed, and the search feeds about
    half of a 90-title MovieLens genre's tree for the top 20 (1.3x faster than scoring every title) but
    most of a 42-title one (1.2x slower), hence whole below 3 x TOP_K titles. On a GPU a small tree is
    one pass, whole below 500 (`benchmarks/bench_eval.py`, `benchmarks/gpu_eval.py`).

    A GPU's 256 users per batch (65536 fed positions per pass) were measured on an 80 GB H100 with
    SmolLM2-135M (~23 KB of keys and values per position in bf16): ~9 GB per pass beside ~3 GB of prompts
    and the node cache (a third of the free memory). A model with more K/V per position, or a smaller GPU,
    needs `batch_users` and `tokens_per_pass` lowered in proportion."""
    gpu = device.type == "cuda"
    exhaustive_below = cfg.exhaustive_below if cfg.exhaustive_below is not None else (500 if gpu else 3 * TOP_K)
    return replace(cfg, batch_users=cfg.batch_users or (256 if gpu else 16),
                   tokens_per_pass=cfg.tokens_per_pass or (65536 if gpu else 4096),
                   beam=cfg.beam or (256 if gpu else 20), node_cache_mb=cfg.node_cache_mb or node_cache_default(device),
                   exhaustive_below=exhaustive_below)


def node_cache_default(device) -> int:
    """MB of keys and values a search keeps. A batch of 256 GPU users feeds ~860k nodes on a 10k catalogue
    (~23 KB each for SmolLM2 in bf16: ~20 GB); when the cache is full, later rows feed ancestors again and
    the search slows by ~1.7x. So a GPU gives it a third of its free memory, a CPU 1 GB."""
    import torch

    if device.type != "cuda":
        return 1024
    free, _ = torch.cuda.mem_get_info(device)
    return max(1024, free // 3 >> 20)


def model_folder(spec: str) -> Path:
    from cprec.backbone import smollm2_folder

    return smollm2_folder() if spec == "smollm2" else Path(spec)


def load_model(spec: str, device=None, dtype=None):
    """(model, tokenizer) of a Hugging Face folder or 'smollm2', on `device` in `dtype` (default: CPU, fp32)."""
    import torch
    import transformers

    from cprec.attention import for_evaluation
    from cprec.backbone import load_pretrained

    transformers.logging.set_verbosity_error()
    folder = model_folder(spec)
    if not (folder / "config.json").is_file():
        raise CPRecError(f"--model {spec}: not a Hugging Face model folder (no config.json) nor 'smollm2'")
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        raise CPRecError(f"--model {spec}: the folder has no tokenizer (tokenizer.json); evaluation renders text, "
                         f"so copy the backbone's tokenizer files into it (an export takes them from the run's "
                         f"model/ folder, which has none when the run trained a model built from model.config)")
    dtype = dtype or torch.float32
    try:  # the batched scorer passes its own 4-D masks, which SDPA (and eager) attention take
        model = load_pretrained(folder, dtype=dtype, attn_implementation=for_evaluation(device))
    except (ValueError, ImportError):
        model = load_pretrained(folder, dtype=dtype, attn_implementation="eager")
    return model.to(device or "cpu"), transformers.AutoTokenizer.from_pretrained(folder)


def fingerprint(paths: list[Path]) -> str:
    """BLAKE2b-128 of the files' names and contents (a resume must see the same model, data, candidates)."""
    digest = hashlib.blake2b(digest_size=16)
    for path in sorted(paths):
        digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------- data

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
        path = out / "candidates" / f"{ds.slug}.jsonl"
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        with open(tmp, "w", encoding="utf-8") as fh:
            for row, c in zip(ds.test, cands):
                fh.write(json.dumps({"user": row["user"], "target": row["target"], "candidates": c},
                                    ensure_ascii=False) + "\n")
        os.replace(tmp, path)
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


def protocols(cfg: EvalConfig) -> list[str]:
    return [p for p in ("sampled", "full") if cfg.protocol in (p, "both")]


# ---------------------------------------------------------------- ranks (processes)

class Ranks:
    """This process's place among the torchrun ranks (one process without a launcher). Collectives carry
    only small Python objects, over gloo, whatever the device: no NCCL timeout can end a long evaluation."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.created = False
        if self.world > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                # ranks wait for the slowest at the end: allow for a long imbalance
                dist.init_process_group("gloo", timeout=timedelta(hours=24))
                self.created = True
            self.dist = dist

    def from_rank0(self, value):
        """Rank 0's `value` on every rank."""
        if self.world == 1:
            return value
        box = [value]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value) -> list:
        if self.world == 1:
            return [value]
        out = [None] * self.world
        self.dist.all_gather_object(out, value)
        return out

    def close(self) -> None:
        if self.created:
            self.dist.destroy_process_group()


# ---------------------------------------------------------------- the evaluation

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
    ranks = Ranks()
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
    from cprec.eval.batched import BatchScorer, PrefixTree

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


def _claim(ranks: Ranks, out: Path, settings) -> None:
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
    from cprec.eval.batched import PrefixTree

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
                      "| model | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
            lines += [f"| {markdown_text(name)} | " + " | ".join(f"{m[k]:.4f}" for k in keys) + " |"
                      for name, m in rows]
            lines.append("")
    return "\n".join(lines)
