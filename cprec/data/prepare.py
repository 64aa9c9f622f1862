"""The prepare stage: raw multi-domain logs -> cleaned behaviour, rendered documents and downstream splits.

Output directory (written under `<out>.partial` and renamed when complete: `cprec.staging`):

    manifest.json                 source (files, each interaction file's timestamp unit), resolved config,
                                  template version, domains, counts, percentiles
    rejects.jsonl                 every unusable input row: file, line, reason, excerpt
    items.jsonl                   kept items: domain, title, source id, interactions
    documents/<stream>.jsonl      pre-training documents {stream, user, text, prompt_chars}; one stream per
                                  pre-training domain plus `mixed`
    downstream/<slug>/train.jsonl     {user, items}: the training prefix
    downstream/<slug>/valid.jsonl     {user, history, target}: target = second to last item
    downstream/<slug>/test.jsonl      {user, history, target}: target = last item
    downstream/<slug>/sft.jsonl       fine-tuning examples rendered from the training prefix

Two splits of the held-out domains (`split`, recorded in the manifest under `split`; numbers from the two are
not comparable, and evaluation refuses to mix them):

* `leave-one-out` (default; RecFormer, the paper): per user, the last item is the test target, the second to
  last the validation target, the rest the training prefix.
* `chronological` (the BIGRec / D3 / MiniOneRec line): each held-out domain's interactions are cut 8:1:1 by
  time, at the timestamps below which 80% and 90% of them fall (`split_ratios`). A user's training prefix is
  what they did before the first cut; their validation target is their first item between the cuts and their
  test target their first item after the second cut, each with everything they did before it as history. A
  user with nothing after the second cut (or nothing before it) is not a test user. One target per user
  keeps the users independent for the paired bootstrap; the BIGRec line scores every later item instead.

The layout, the manifest reader and the stream names belong to `cprec.data.prepared`. `prompt_chars` is the
design notes' `prompt_len` counted in characters of `text`; pack turns it into tokens.
"""

from __future__ import annotations

import array
import collections
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cprec import __version__, staging
from cprec.config import to_dict
from cprec.data import cleaning, template
from cprec.data.prepared import LEAVE_ONE_OUT, MIXED_STREAM, is_prepared, stream_name
from cprec.data.readers import AmazonReviews, MovieLens1M, TableSource
from cprec.data.rejects import RejectLog
from cprec.data.synthetic import SyntheticConfig, SyntheticWorld
from cprec.errors import CPRecError

SPLITS_KINDS = (LEAVE_ONE_OUT, "chronological")
SOURCES = ("movielens-1m", "amazon2018", "amazon2023", "csv", "parquet", "synthetic")
# The seven largest first-genres of MovieLens-1M pre-train; three others are the unseen downstream domains.
MOVIELENS_PRETRAIN = ["Comedy", "Action", "Drama", "Horror", "Adventure", "Crime", "Animation"]
MOVIELENS_DOWNSTREAM = ["Children's", "Thriller", "Sci-Fi"]


@dataclass
class InputConfig:
    path: str | None = None  # movielens-1m: directory with ml-1m.inter/.item; amazon: directory of file pairs
    pairs: dict[str, list[str]] = field(default_factory=dict)  # amazon: {domain: [reviews, meta]}
    interactions: str | None = None  # csv / parquet: user,item,timestamp,domain
    items: str | None = None  # csv / parquet: item,title


@dataclass
class PrepareConfig:
    source: str = "movielens-1m"  # movielens-1m, amazon2018, amazon2023, csv, parquet or synthetic
    input: InputConfig = field(default_factory=InputConfig)  # where the source's files are
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)  # the synthetic world (tests, checks)
    pretrain_domains: list[str] | None = None  # default: per source (MovieLens: seven largest genres)
    downstream_domains: list[str] | None = None  # held out: never enter the pre-training corpus
    k_core: int = 5  # iterative k-core per domain, on users and items
    max_title_chars: int = 200  # longer titles are cut at a word boundary
    tokenizer: str | None = None  # when set ('smollm2' or a folder), documents are budgeted in tokens
    window_tokens: int = 1023  # budget of one document with a tokenizer: seq_len - 1 (pack appends EOS)
    window_chars: int = 2000  # budget of one document without a tokenizer, in characters
    min_doc_items: int = 2  # a window with fewer items is not rendered
    min_downstream_items: int = 3  # a downstream user needs train prefix + valid + test
    sft_examples_per_user: int = 10  # fine-tuning targets per user, newest of the training prefix
    max_reject_fraction: float = 0.01  # prepare fails when more of the rows read are rejected
    split: str = LEAVE_ONE_OUT  # or chronological: the held-out domains cut 8:1:1 by time (module docstring)
    split_ratios: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])  # chronological: train, valid, test

    def validate(self) -> None:
        if self.source not in SOURCES:
            raise CPRecError(f"unknown source '{self.source}' (known: {', '.join(SOURCES)})")
        if self.min_downstream_items < 3:
            raise CPRecError("min_downstream_items must be at least 3 (train prefix, valid, test)")
        if self.tokenizer is None and self.window_chars < 64 + self.max_title_chars:
            raise CPRecError(f"window_chars={self.window_chars} must leave room for a header and one title "
                             f"of max_title_chars={self.max_title_chars} (at least {64 + self.max_title_chars})")
        if self.tokenizer is not None and self.window_tokens < 32:
            raise CPRecError(f"window_tokens must be at least 32, got {self.window_tokens}")
        if self.split not in SPLITS_KINDS:
            raise CPRecError(f"split must be one of {', '.join(SPLITS_KINDS)}, got '{self.split}'")
        if len(self.split_ratios) != 3 or min(self.split_ratios) <= 0 or abs(sum(self.split_ratios) - 1) > 1e-6:
            raise CPRecError(f"split_ratios must be three positive shares summing to 1 (train, valid, test), got "
                             f"{self.split_ratios}")
        if not 0.0 <= self.max_reject_fraction <= 1.0:
            raise CPRecError(f"max_reject_fraction must be in [0, 1], got {self.max_reject_fraction}")
        overlap = set(self.pretrain_domains or []) & set(self.downstream_domains or [])
        if overlap:
            raise CPRecError(f"domain(s) {sorted(overlap)} are both pre-training and downstream; a downstream "
                             f"domain must stay unseen")


def make_source(cfg: PrepareConfig):
    if cfg.source == "movielens-1m":
        return MovieLens1M(cfg.input.path)
    if cfg.source in ("amazon2018", "amazon2023"):
        pairs = {d: tuple(p) for d, p in cfg.input.pairs.items()}
        if cfg.input.path:
            pairs = {**AmazonReviews.discover(cfg.input.path, given=set(pairs)), **pairs}
        for domain, files in pairs.items():
            if len(files) != 2:
                raise CPRecError(f"input.pairs.{domain} must be [reviews, meta], got {list(files)}")
        return AmazonReviews(cfg.source, pairs)
    if cfg.source in ("csv", "parquet"):
        return TableSource(cfg.source, cfg.input.interactions, cfg.input.items)
    return SyntheticWorld(cfg.synthetic)


class Budget:
    """How long a document may be: characters, or tokens of the backbone's tokenizer."""

    def __init__(self, cfg: PrepareConfig):
        self.tokenizer = None
        if cfg.tokenizer is None:
            self.unit, self.size, self.cost, self.identity = "chars", cfg.window_chars, len, None
            return
        from cprec.backbone import load_tokenizer, resolve_tokenizer, tokenizer_identity

        folder = resolve_tokenizer(cfg.tokenizer)
        self.tokenizer = load_tokenizer(folder)
        self.identity = tokenizer_identity(folder, self.tokenizer, cfg.tokenizer if cfg.tokenizer == "smollm2"
                                           else Path(folder).name)
        self.unit, self.size = "tokens", cfg.window_tokens
        self._cache: dict[str, int] = {}
        self.cost = self._tokens

    def _tokens(self, line: str) -> int:
        n = self._cache.get(line)
        if n is None:
            n = self._cache[line] = len(self.tokenizer(line, add_special_tokens=False)["input_ids"])
        return n

    def describe(self) -> dict:
        return {"unit": self.unit, "size": self.size, "tokenizer": self.identity}


class _Interactions:
    """Interactions as growing typed arrays (12 bytes each) plus string tables for users and items."""

    def __init__(self):
        self.users, self.items, self.stamps = array.array("i"), array.array("i"), array.array("d")
        self.user_ids: dict[str, int] = {}
        self.item_ids: dict[tuple[str, str], int] = {}  # (domain, title) -> item index
        self.item_source: list[str] = []  # first raw id seen for each item
        self.domain_ids: dict[str, int] = {}
        self.item_domain = array.array("i")

    def add(self, user: str, domain: str, title: str, raw_item: str, stamp: float) -> None:
        uid = self.user_ids.setdefault(user, len(self.user_ids))
        key = (domain, title)
        iid = self.item_ids.get(key)
        if iid is None:
            iid = self.item_ids[key] = len(self.item_ids)
            self.item_source.append(raw_item)
            self.item_domain.append(self.domain_ids.setdefault(domain, len(self.domain_ids)))
        self.users.append(uid)
        self.items.append(iid)
        self.stamps.append(stamp)


def _read_items(source, cfg: PrepareConfig, log: RejectLog, filtered: collections.Counter) -> dict:
    table: dict[str, tuple[str | None, str | None]] = {}
    for _file, _line, key, raw_title, domain in source.items(log):
        if key in table:
            filtered["duplicate item rows (first kept)"] += 1
            continue
        title = cleaning.normalize_title(raw_title, cfg.max_title_chars)
        if title is None:
            filtered["items without a usable title"] += 1
        table[key] = (title, cleaning.normalize_domain(domain))
    return table


def _read_interactions(source, table: dict, wanted: set | None, log: RejectLog, filtered: collections.Counter,
                       raw_domain_counts: collections.Counter, units: cleaning.TimestampUnits) -> _Interactions:
    data = _Interactions()
    for file, line, user, item, stamp, domain in source.interactions(log):
        units.see(file, line, stamp, len(data.users))
        entry = table.get(item)
        if entry is None:
            log.reject(file, line, f"unknown item '{item}' (not in the item table)", f"user={user} item={item}")
            continue
        title, item_domain = entry
        domain = cleaning.normalize_domain(domain) or item_domain
        if domain is None:
            log.reject(file, line, "missing domain", f"user={user} item={item}")
            continue
        raw_domain_counts[domain] += 1
        if title is None:
            filtered["interactions with items without a usable title"] += 1
        elif wanted is not None and domain not in wanted:
            filtered["interactions in unused domains"] += 1
        else:
            data.add(user, domain, title, item, stamp)
    return data


def _resolve_domains(cfg: PrepareConfig, source, available: collections.Counter) -> tuple[list, list]:
    pretrain, downstream = cfg.pretrain_domains, cfg.downstream_domains
    if cfg.source == "movielens-1m":
        pretrain = MOVIELENS_PRETRAIN if pretrain is None else pretrain
        downstream = MOVIELENS_DOWNSTREAM if downstream is None else downstream
    elif cfg.source == "synthetic" and downstream is None:
        names = source.domain_names
        downstream = names[-2:] if len(names) >= 3 else names[-1:]
    if downstream is None:
        raise CPRecError(f"source '{cfg.source}': set downstream_domains (the held-out domains); the data has "
                         f"{_domain_list(available)}")
    if pretrain is None:
        pretrain = [d for d in sorted(available) if d not in downstream]
    missing = [d for d in list(pretrain) + list(downstream) if d not in available]
    if missing:
        raise CPRecError(f"configured domain '{missing[0]}' is not in the data, which has {_domain_list(available)}; "
                         f"change pretrain_domains / downstream_domains")
    if not pretrain:
        raise CPRecError("no pre-training domains: set pretrain_domains")
    return list(pretrain), list(downstream)


def _domain_list(counts: collections.Counter) -> str:
    return ", ".join(f"{d} ({n})" for d, n in counts.most_common()) or "no domains at all"


def _clean(data: _Interactions, k: int, removed: collections.Counter):
    users = np.frombuffer(data.users, dtype=np.int32)
    items = np.frombuffer(data.items, dtype=np.int32)
    stamps = np.frombuffer(data.stamps, dtype=np.float64)
    item_domain = np.frombuffer(data.item_domain, dtype=np.int32)
    order = cleaning.time_order(users, stamps)
    users, items = users[order], items[order]
    first = cleaning.first_occurrences(users, items)
    removed["repeated user-item pairs (first kept)"] = int((~first).sum())
    users, items = users[first], items[first]
    domains = item_domain[items]
    core = cleaning.k_core(users.astype(np.int64) * (len(data.domain_ids) + 1) + domains, items, k)
    removed[f"outside the {k}-core of their domain"] = int((~core).sum())
    return users[core], items[core], domains[core], stamps[order][first][core]


def _percentiles(values: list[int]) -> dict:
    if not values:
        return {}
    arr = np.asarray(values)
    p50, p90, p99 = np.percentile(arr, [50, 90, 99])
    return {"min": int(arr.min()), "p50": round(float(p50), 1), "p90": round(float(p90), 1),
            "p99": round(float(p99), 1), "max": int(arr.max())}


def _jsonl(fh, record: dict) -> None:
    fh.write(json.dumps(record, ensure_ascii=False) + "\n")


def split_record(cfg: PrepareConfig, data: _Interactions, domains, stamps, downstream) -> dict:
    """The manifest's `split`: its kind and, for the chronological one, each held-out domain's two cut times
    (interactions before the first train, from the second on test) and how many interactions fall in each."""
    if cfg.split == LEAVE_ONE_OUT:
        return {"kind": LEAVE_ONE_OUT}
    record = {"kind": "chronological", "ratios": list(cfg.split_ratios), "cuts": {}, "interactions": {}}
    for domain in downstream:
        times = np.sort(stamps[domains == data.domain_ids[domain]])
        n = len(times)
        cut1 = float(times[min(n - 1, int(cfg.split_ratios[0] * n))])
        cut2 = float(times[min(n - 1, int((cfg.split_ratios[0] + cfg.split_ratios[1]) * n))])
        record["cuts"][domain] = [cut1, cut2]
        record["interactions"][domain] = {"train": int(np.sum(times < cut1)),
                                          "valid": int(np.sum((times >= cut1) & (times < cut2))),
                                          "test": int(np.sum(times >= cut2))}
        if cut1 == cut2:  # whole-day timestamps tie often: an empty validation period leaves no model selection
            raise CPRecError(f"split=chronological: held-out domain '{domain}' has its two cuts at the same time "
                             f"({cut1:g}; {n} interactions, split_ratios {list(cfg.split_ratios)}), so its "
                             f"validation period is empty; widen the middle share of split_ratios or use "
                             f"split=leave-one-out")
    return record


def _write_outputs(tmp: Path, data: _Interactions, users, items, domains, stamps, pretrain, downstream, cfg, budget,
                   split: dict) -> dict:
    """Render documents and splits user by user; return per-stream and per-domain statistics."""
    domain_names = {i: d for d, i in data.domain_ids.items()}
    titles = [t for _d, t in data.item_ids]
    user_names = list(data.user_ids)
    streams = {d: stream_name(d) for d in pretrain + downstream}
    if len(set(streams.values())) != len(streams) or MIXED_STREAM in streams.values():
        raise CPRecError(f"domain names map to clashing stream names: {streams}")
    pre_ids = {data.domain_ids[d] for d in pretrain}
    down_ids = {data.domain_ids[d]: d for d in downstream}

    (tmp / "documents").mkdir()
    doc_files = {s: open(tmp / "documents" / f"{s}.jsonl", "w", encoding="utf-8")
                 for s in [streams[d] for d in pretrain] + [MIXED_STREAM]}
    split_files = {}
    for d in downstream:
        folder = tmp / "downstream" / streams[d]
        folder.mkdir(parents=True)
        split_files[d] = {k: open(folder / f"{k}.jsonl", "w", encoding="utf-8")
                          for k in ("train", "valid", "test", "sft")}
    seq_lens = collections.defaultdict(list)
    doc_counts = collections.Counter()
    split_counts = collections.defaultdict(collections.Counter)

    bounds = np.flatnonzero(np.diff(users)) + 1
    starts = np.concatenate([[0], bounds]) if len(users) else np.array([], dtype=np.int64)
    ends = np.concatenate([bounds, [len(users)]]) if len(users) else starts
    for start, end in tqdm(zip(starts, ends), total=len(starts), desc="render", unit=" users", mininterval=1.0):
        user = user_names[users[start]]
        u_items, u_domains = items[start:end].tolist(), domains[start:end].tolist()
        u_stamps = stamps[start:end].tolist()
        per_domain = collections.defaultdict(list)
        per_domain_stamps = collections.defaultdict(list)
        mixed_titles, mixed_domains = [], []
        for iid, did, stamp in zip(u_items, u_domains, u_stamps):
            per_domain[did].append(titles[iid])
            per_domain_stamps[did].append(stamp)
            if did in pre_ids:
                mixed_titles.append(titles[iid])
                mixed_domains.append(domain_names[did])
        for did, seq in per_domain.items():
            domain = domain_names[did]
            if did in pre_ids:
                _emit(doc_files[streams[domain]], streams[domain], user, domain, seq, None, cfg, budget,
                      seq_lens, doc_counts)
            elif did in down_ids:
                parts = _split_user(seq, per_domain_stamps[did], split["cuts"][domain]) \
                    if split["kind"] == "chronological" else _leave_one_out(seq, cfg)
                _emit_split(split_files[domain], "sft-" + streams[domain], user, domain, parts, cfg, budget,
                            split_counts[domain])
        if len(set(mixed_domains)) > 1:  # a one-domain history adds nothing beyond its domain stream
            _emit(doc_files[MIXED_STREAM], MIXED_STREAM, user, template.MIXED_SCOPE, mixed_titles,
                  mixed_domains, cfg, budget, seq_lens, doc_counts)
    for fh in list(doc_files.values()) + [f for files in split_files.values() for f in files.values()]:
        fh.close()
    return {"streams": {s: {"documents": doc_counts[s], "sequences": len(seq_lens[s]),
                            "sequence_items": _percentiles(seq_lens[s]),
                            # windows left out with fewer than min_doc_items items: a title too long for the budget
                            "short_windows_dropped": doc_counts[f"{s} windows too short"]} for s in doc_files},
            "downstream": {d: dict(split_counts[d]) for d in downstream}}


def _emit(fh, stream, user, scope, titles, tags, cfg, budget, seq_lens, doc_counts) -> None:
    if len(titles) < cfg.min_doc_items:
        return
    seq_lens[stream].append(len(titles))
    for text in template.render_documents(scope, titles, tags, budget.size, budget.cost):
        if text.count("\n") - 1 < cfg.min_doc_items:  # header line + item lines
            # a window this short holds an item whose title alone fills the budget: counted, never silent
            doc_counts[f"{stream} windows too short"] += 1
            continue
        _jsonl(fh, {"stream": stream, "user": user, "text": text, "prompt_chars": 0})
        doc_counts[stream] += 1


def _leave_one_out(seq: list[str], cfg: PrepareConfig) -> tuple | None:
    """(train prefix, valid (history, target) or None, test (history, target) or None), or None: too short."""
    if len(seq) < cfg.min_downstream_items:
        return None
    return seq[:-2], (seq[:-2], seq[-2]), (seq[:-1], seq[-1])


def _split_user(seq: list[str], times: list[float], cuts: list[float]) -> tuple:
    """The chronological split of one user's items in a held-out domain (module docstring)."""
    first_valid = next((i for i, t in enumerate(times) if t >= cuts[0]), len(seq))
    first_test = next((i for i, t in enumerate(times) if t >= cuts[1]), len(seq))
    valid = (seq[:first_valid], seq[first_valid]) if 0 < first_valid < first_test else None
    test = (seq[:first_test], seq[first_test]) if 0 < first_test < len(seq) else None
    return seq[:first_valid], valid, test


def _emit_split(files, stream, user, domain, parts, cfg, budget, counts) -> None:
    if parts is None:
        counts["users with too few items"] += 1
        return
    train, valid, test = parts
    if train:
        _jsonl(files["train"], {"user": user, "items": train})
    if valid:
        _jsonl(files["valid"], {"user": user, "history": valid[0], "target": valid[1]})
    if test is None:
        counts["users without a test item"] += 1
    else:
        _jsonl(files["test"], {"user": user, "history": test[0], "target": test[1]})
        counts["users"] += 1
    for t in range(max(1, len(train) - cfg.sft_examples_per_user), len(train)):
        text, prompt_chars = template.render_example(domain, train[:t], train[t], budget.size, budget.cost)
        _jsonl(files["sft"], {"stream": stream, "user": user, "text": text, "prompt_chars": prompt_chars})
        counts["sft examples"] += 1


def prepare(cfg: PrepareConfig, out: str | Path, overwrite: bool = False) -> dict:
    """Run the prepare stage into `out`; return the manifest."""
    out = Path(out)
    _check_output(out, overwrite)
    source = make_source(cfg)
    budget = Budget(cfg)
    tmp = staging.begin(out)
    started = time.perf_counter()

    log = RejectLog(tmp / "rejects.jsonl")
    filtered: collections.Counter = collections.Counter()
    raw_counts: collections.Counter = collections.Counter()
    units = cleaning.TimestampUnits()
    try:
        table = _read_items(source, cfg, log, filtered)
        wanted = None
        if cfg.pretrain_domains is not None and cfg.downstream_domains is not None:
            wanted = set(cfg.pretrain_domains) | set(cfg.downstream_domains)
        elif cfg.source == "movielens-1m":
            wanted = set(cfg.pretrain_domains or MOVIELENS_PRETRAIN) | set(cfg.downstream_domains or
                                                                             MOVIELENS_DOWNSTREAM)
        data = _read_interactions(source, table, wanted, log, filtered, raw_counts, units)
    finally:
        log.close()
    del table
    units.to_seconds(np.frombuffer(data.stamps, dtype=np.float64))  # a view: scales the log in place
    log.check(cfg.max_reject_fraction)
    pretrain, downstream = _resolve_domains(cfg, source, raw_counts)
    if wanted is None:  # the domain lists were resolved only now: drop the unused domains
        wanted = set(pretrain) | set(downstream)
        _drop_unused_domains(data, wanted, filtered)

    users, items, domains, stamps = _clean(data, cfg.k_core, filtered)
    if len(users) == 0:
        raise CPRecError(f"no interactions are left after cleaning (k_core={cfg.k_core}, {dict(filtered)}); "
                         f"lower k_core or give more data")
    per_domain = {}
    for name in pretrain + downstream:
        mask = domains == data.domain_ids.get(name, -1)
        per_domain[name] = {"role": "pretrain" if name in pretrain else "downstream",
                            "raw_interactions": raw_counts[name], "interactions": int(mask.sum()),
                            "users": int(len(np.unique(users[mask]))), "items": int(len(np.unique(items[mask])))}
    empty = [d for d in pretrain + downstream if per_domain[d]["interactions"] == 0]
    if empty:
        listed = empty[0] in (cfg.pretrain_domains or []) + (cfg.downstream_domains or [])
        role = "downstream_domains" if empty[0] in downstream else "pretrain_domains"
        drop = (f"remove it from {role}" if listed else
                f"list the domains to keep in {role} (it came from the data: the default takes every domain)")
        raise CPRecError(f"domain '{empty[0]}' has no interactions left after the {cfg.k_core}-core; lower "
                         f"k_core, or {drop}")

    split = split_record(cfg, data, domains, stamps, downstream)
    stats = _write_outputs(tmp, data, users, items, domains, stamps, pretrain, downstream, cfg, budget, split)
    _write_items(tmp / "items.jsonl", data, items)
    manifest = {
        "stage": "prepare", "cprec_version": __version__, "template_version": template.TEMPLATE_VERSION,
        "source": {"name": cfg.source, "files": source.files(), "timestamp_units": units.units()},
        "config": to_dict(cfg), "budget": budget.describe(), "split": split,
        "domains": {"pretrain": pretrain, "downstream": downstream,
                    "streams": {d: stream_name(d) for d in pretrain + downstream}, "mixed_stream": MIXED_STREAM},
        "counts": {"users": int(len(np.unique(users))), "items": int(len(np.unique(items))),
                   "interactions": int(len(users)), "per_domain": {d: per_domain[d] for d in pretrain + downstream}},
        "streams": stats["streams"], "downstream": stats["downstream"],
        "rejects": log.summary(), "filtered": dict(sorted(filtered.items())),
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    _check_output(out, overwrite)  # again: prepare may have run for hours
    staging.commit(tmp, out, is_prepared)
    manifest["seconds"] = round(time.perf_counter() - started, 2)  # reported, never written: outputs stay byte-identical
    return manifest


def _check_output(out: Path, overwrite: bool) -> None:
    """Refuse an output path that cannot take the result now, before any work is done."""
    staging.refuse_foreign(out, is_prepared, "prepare")
    if out.exists() and not overwrite:
        raise CPRecError(f"--out {out} exists; pass --overwrite to replace it")
    above = next(p for p in out.parents if p.exists())
    if not above.is_dir():
        raise CPRecError(f"output path {out}: {above} is a file, not a directory; choose another --out")


def _drop_unused_domains(data: _Interactions, wanted: set, filtered: collections.Counter) -> None:
    item_domain = np.frombuffer(data.item_domain, dtype=np.int32)
    keep_domain = np.array([name in wanted for name in data.domain_ids], dtype=bool)
    keep = keep_domain[item_domain[np.frombuffer(data.items, dtype=np.int32)]]
    filtered["interactions in unused domains"] += int((~keep).sum())
    for name in ("users", "items", "stamps"):
        arr = getattr(data, name)
        kept = np.frombuffer(arr, dtype=np.float64 if name == "stamps" else np.int32)[keep]
        setattr(data, name, array.array(arr.typecode, kept.tobytes()))


def _write_items(path: Path, data: _Interactions, items: np.ndarray) -> None:
    counts = np.bincount(items, minlength=len(data.item_ids))
    with open(path, "w", encoding="utf-8") as fh:
        for iid, (domain, title) in enumerate(data.item_ids):
            if counts[iid]:
                _jsonl(fh, {"domain": domain, "title": title, "source_id": data.item_source[iid],
                            "interactions": int(counts[iid])})


def summary_rows(manifest: dict) -> list[list]:
    """Rows of the summary table: domain, role, users, items, interactions, documents."""
    streams = manifest["streams"]
    rows = []
    for domain, c in manifest["counts"]["per_domain"].items():
        name = manifest["domains"]["streams"][domain]
        docs = streams[name]["documents"] if c["role"] == "pretrain" else \
            manifest["downstream"][domain].get("sft examples", 0)
        rows.append([domain, c["role"], c["users"], c["items"], c["interactions"], docs])
    rows.append(["(mixed)", "pretrain", streams[MIXED_STREAM]["sequences"], "", "",
                 streams[MIXED_STREAM]["documents"]])
    return rows
