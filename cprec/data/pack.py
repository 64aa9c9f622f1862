"""The pack stage: prepared documents -> tokenized, packed, compressed shards (format in `shards.py`).

Each stream's documents are cut, in input order, into shard-sized groups (by characters, from a measured
characters-per-token ratio, so a shard holds about `shard_rows` rows). A group is one task: a worker
tokenizes it with the fast tokenizer, appends EOS to every document, packs the documents into rows of
`seq_len` tokens by best-fit decreasing and writes the shard. Because a shard depends only on its own
documents and the settings, the output is byte-identical whatever the number of workers, and a re-run keeps
every shard whose sidecar says it was made from the same documents and settings and whose file checks out.
"""

from __future__ import annotations

import bisect
import collections
import concurrent.futures
import ctypes
import errno
import hashlib
import json
import math
import multiprocessing
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cprec import __version__, staging
from cprec.backbone import load_tokenizer, resolve_tokenizer, tokenizer_identity
from cprec.data import shards
from cprec.data.prepared import MANIFEST, Prepared
from cprec.errors import CPRecError

PACKER_VERSION = 1  # bump when the packing of the same documents changes, so old shards are not reused


@dataclass
class PackConfig:
    seq_len: int = 1024  # tokens per packed row
    workers: int = 1  # tokenizer processes (one core each)
    shard_rows: int = 2048  # target rows per shard (planned from characters, so approximate)
    batch_size: int = 256  # documents per tokenizer call
    zstd_level: int = 3  # shard compression level
    line_cache: bool = True  # tokenize each distinct line once (checked against whole documents; see LineTokenizer)
    max_split_fraction: float = 0.01  # pack fails when more of a stream's documents are longer than seq_len

    def validate(self) -> None:
        for name in ("seq_len", "workers", "shard_rows", "batch_size"):
            if getattr(self, name) < 1:
                raise CPRecError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.seq_len < 16:
            raise CPRecError(f"seq_len must be at least 16, got {self.seq_len}")
        if not 0.0 <= self.max_split_fraction <= 1.0:
            raise CPRecError(f"max_split_fraction must be in [0, 1], got {self.max_split_fraction}")


def prepared_streams(prepared: Prepared) -> list[tuple[str, Path, str]]:
    """The prepared directory's streams: (name, documents file, kind) with kind pretrain or sft; each exists."""
    streams = prepared.pack_streams()
    for name, file, _ in streams:
        if not file.is_file():
            raise CPRecError(f"{file}: missing (stream '{name}' is listed in {prepared.root / MANIFEST})")
    return streams


def check_splits(streams: dict, seq_len: int, max_fraction: float) -> None:
    """Fail when a stream has more documents cut into pieces than max_split_fraction allows (worst named).
    The fraction is of the input documents (`source_documents`), not of the pieces the rows hold (`documents`,
    where one cut document counts once per piece)."""
    inputs = {name: st.get("source_documents", st["documents"]) for name, st in streams.items()}
    fractions = {name: st["split_documents"] / inputs[name] for name, st in streams.items() if inputs[name]}
    worst = max(fractions, key=fractions.get, default=None)
    if worst is not None and fractions[worst] > max_fraction:
        st = streams[worst]
        raise CPRecError(f"stream '{worst}': {st['split_documents']:,} of {inputs[worst]:,} documents "
                         f"({fractions[worst]:.1%}) are longer than seq_len={seq_len} and were cut, past "
                         f"max_split_fraction={max_fraction}; no index was written. Pack with a larger --seq-len, "
                         f"or set max_split_fraction={math.ceil(fractions[worst] * 100) / 100} to accept the "
                         f"cuts (the shards written are kept)")


# ---------------------------------------------------------------- packing (pure functions, tested directly)

def best_fit_decreasing(lengths: list[int], seq_len: int) -> list[list[int]]:
    """Assign pieces (all <= seq_len) to rows: longest first, each into the row it fills best.

    Returns rows as lists of piece indices, fullest rows first (so only the last rows carry much padding).
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: ties keep input order
    rows: list[list[int]] = []
    fill: list[int] = []
    room: list[tuple[int, int]] = []  # sorted (remaining capacity, row) of rows that are not full
    for i in order:
        n = lengths[i]
        k = bisect.bisect_left(room, (n, -1))
        if k < len(room):
            rem, r = room.pop(k)
        else:
            rem, r = seq_len, len(rows)
            rows.append([])
            fill.append(0)
        rows[r].append(i)
        fill[r] += n
        if rem - n > 0:
            bisect.insort(room, (rem - n, r))
    by_fill = sorted(range(len(rows)), key=lambda r: -fill[r])
    return [rows[r] for r in by_fill]


def cut_long(ids: list[int], prompt_len: int, seq_len: int) -> list[tuple[list[int], int]]:
    """A document longer than seq_len, as pieces of at most seq_len tokens (the last resort)."""
    pieces = []
    for start in range(0, len(ids), seq_len):
        piece = ids[start:start + seq_len]
        pieces.append((piece, min(max(prompt_len - start, 0), len(piece))))
    return pieces


def pack_documents(docs: list[tuple[int, list[int], int]], seq_len: int, pad_id: int, dtype: np.dtype):
    """docs: (doc_index, token ids with EOS, prompt tokens). Returns the shard arrays and the split count."""
    pieces: list[tuple[int, list[int], int]] = []
    split = 0
    for doc_index, ids, prompt in docs:
        if len(ids) > seq_len:
            split += 1
            pieces.extend((doc_index, p, pl) for p, pl in cut_long(ids, prompt, seq_len))
        else:
            pieces.append((doc_index, ids, prompt))
    rows = best_fit_decreasing([len(p[1]) for p in pieces], seq_len)
    tokens = np.full((len(rows), seq_len), pad_id, dtype=dtype)
    row_docs, doc_lens, prompt_lens, doc_index = [], [], [], []
    for r, members in enumerate(rows):
        pos = 0
        for m in members:
            idx, ids, prompt = pieces[m]
            tokens[r, pos:pos + len(ids)] = ids
            pos += len(ids)
            doc_lens.append(len(ids))
            prompt_lens.append(prompt)
            doc_index.append(idx)
        row_docs.append(len(members))
    return tokens, row_docs, doc_lens, prompt_lens, doc_index, split


# ---------------------------------------------------------------- worker side

_TOKENIZERS: dict = {}


def _tokenizer(task: dict):
    """One tokenizer per worker process and settings, kept across shards (the line cache with it)."""
    key = (task["tokenizer"], task["dtype"], task["line_cache"])
    if key not in _TOKENIZERS:
        tok = load_tokenizer(task["tokenizer"])
        _TOKENIZERS[key] = LineTokenizer(tok, np.dtype(task["dtype"])) if task["line_cache"] else \
            (lambda texts, prompts, eos, first: tokenize(tok, texts, prompts, eos))
    return _TOKENIZERS[key]


def tokenize(tok, texts: list[str], prompt_chars: list[int], eos_id: int) -> list[tuple[list[int], int]]:
    """Token ids (EOS appended) and the number of prompt tokens (tokens starting before prompt_chars)."""
    want_offsets = any(prompt_chars)
    enc = tok(texts, add_special_tokens=False, return_offsets_mapping=want_offsets,
              return_attention_mask=False)
    out = []
    for k, ids in enumerate(enc["input_ids"]):
        prompt = 0
        if prompt_chars[k]:
            prompt = sum(1 for start, _ in enc["offset_mapping"][k] if start < prompt_chars[k])
        out.append((ids + [eos_id], prompt))
    return out


class LineTokenizer:
    """Tokenizes documents line by line, each distinct line once.

    A CPRec document is a header and item lines, each ending in a newline, and a catalogue has far fewer
    distinct lines than a corpus has lines (MovieLens: ~30k distinct lines, ~1.5M lines). With a byte-level
    BPE tokenizer whose pre-tokenizer splits at newlines (GPT-2 style, SmolLM2 among them), the tokens of a
    document are exactly the concatenation of its lines' tokens, since no pre-token crosses a newline and the
    template strips whitespace around titles. That is checked, not assumed: every `verify_every`-th document
    is also tokenized whole, and one mismatch turns the fast path off for the rest of the process.
    """

    MAX_CACHED_LINES = 2_000_000  # a bound on memory for huge catalogues; the cache restarts when full

    def __init__(self, tok, dtype: np.dtype, verify_every: int = 64):
        self.tok, self.dtype, self.verify_every = tok, dtype, verify_every
        self.cache: dict[str, np.ndarray] = {}
        self.exact = True  # False once a whole-document tokenization disagreed

    def _lines(self, texts: list[str]) -> list[list[str]]:
        split = [t.split("\n") for t in texts]
        lines = [[p + "\n" for p in parts[:-1]] + ([parts[-1]] if parts[-1] else []) for parts in split]
        missing = list(dict.fromkeys(l for ls in lines for l in ls if l not in self.cache))
        if len(self.cache) + len(missing) > self.MAX_CACHED_LINES:
            self.cache.clear()
            missing = list(dict.fromkeys(l for ls in lines for l in ls))
        if missing:
            enc = self.tok(missing, add_special_tokens=False, return_attention_mask=False)["input_ids"]
            self.cache.update(zip(missing, (np.asarray(ids, dtype=self.dtype) for ids in enc)))
        return lines

    def __call__(self, texts: list[str], prompt_chars: list[int], eos_id: int, first: int):
        """(ids with EOS, prompt tokens) per text; `first` numbers the documents for the sampling."""
        if not self.exact:
            return tokenize(self.tok, texts, prompt_chars, eos_id)
        eos = np.asarray([eos_id], dtype=self.dtype)
        out = []
        for k, lines in enumerate(self._lines(texts)):
            parts = [self.cache[l] for l in lines]
            prompt = 0
            if prompt_chars[k]:
                chars = 0
                for line, part in zip(lines, parts):
                    if chars >= prompt_chars[k]:
                        break
                    chars += len(line)
                    prompt += len(part)
                if chars != prompt_chars[k]:  # the prompt does not end at a line end: tokenize it whole
                    out.append(tokenize(self.tok, [texts[k]], [prompt_chars[k]], eos_id)[0])
                    continue
            out.append((np.concatenate(parts + [eos]), prompt))
        for k in range(len(texts)):
            if (first + k) % self.verify_every == 0:
                whole = tokenize(self.tok, [texts[k]], [prompt_chars[k]], eos_id)[0]
                if whole[1] != out[k][1] or not np.array_equal(np.asarray(whole[0]), out[k][0]):
                    self.exact = False
                    return tokenize(self.tok, texts, prompt_chars, eos_id)
        return out


def _shard_valid(path: Path, sidecar: Path, input_hash: str) -> dict | None:
    """The sidecar entry if the shard was made from the same input and its file checks out."""
    try:
        entry = json.loads(sidecar.read_text())
        data = path.read_bytes()
    except (OSError, json.JSONDecodeError):
        return None
    if entry.get("input_hash") != input_hash or len(data) != entry.get("bytes") or \
            shards.checksum(data) != entry.get("checksum"):
        return None
    return entry


def pack_shard(task: dict) -> dict:
    """Tokenize, pack and write one shard (or keep a valid one from an earlier run); return its entry."""
    out = Path(task["out"]) / task["stream"]
    path = out / f"{task['shard']:05d}.zst"
    sidecar = out / f"{task['shard']:05d}.json"
    entry = _shard_valid(path, sidecar, task["input_hash"])
    if entry is not None:
        return {**entry, "reused": True}
    tokenize_batch = _tokenizer(task)
    docs = []
    texts, prompts, indices = task["texts"], task["prompt_chars"], task["doc_index"]
    for start in range(0, len(texts), task["batch_size"]):
        end = start + task["batch_size"]
        encoded = tokenize_batch(texts[start:end], prompts[start:end], task["eos_id"], indices[start])
        docs.extend((idx, ids, prompt) for idx, (ids, prompt) in zip(indices[start:end], encoded))
    dtype = np.dtype(task["dtype"])
    tokens, row_docs, doc_lens, prompt_lens, doc_index, split = pack_documents(docs, task["seq_len"],
                                                                               task["pad_id"], dtype)
    entry = shards.write_shard(path, tokens, row_docs, doc_lens, prompt_lens, doc_index, task["zstd_level"])
    entry.update(split_documents=split, source_documents=len(docs), input_hash=task["input_hash"])
    staging.write_atomic(sidecar, json.dumps(entry, sort_keys=True).encode())
    return entry


# ---------------------------------------------------------------- driver

def _read_stream(path: Path):
    with open(path, "rb") as fh:
        for index, line in enumerate(fh):
            try:
                doc = json.loads(line)
                yield index, line, doc["text"], int(doc.get("prompt_chars", 0))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                raise CPRecError(f"{path}:{index + 1}: not a prepared document ({exc})") from None


def chars_per_token(tok, stream_files: list[Path], sample: int = 256) -> float:
    """Measured on the first documents of the corpus, so the shard plan is deterministic."""
    texts = []
    for path in stream_files:
        for _, _, text, _ in _read_stream(path):
            texts.append(text)
            if len(texts) >= sample:
                break
        if len(texts) >= sample:
            break
    if not texts:
        raise CPRecError("the prepared directory holds no documents to pack")
    tokens = sum(len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"])
    return round(sum(len(t) for t in texts) / max(tokens, 1), 3)


def plan_tasks(streams, settings: dict, shard_chars: float):
    """Yield one task per shard: consecutive documents of a stream up to about `shard_chars` characters.

    The task's input hash covers the settings and the documents' raw lines: a re-run keeps a shard only
    when both are unchanged.
    """
    settings_bytes = json.dumps({k: settings[k] for k in sorted(settings) if k not in ("out", "tokenizer", "batch_size", "line_cache")},
                                sort_keys=True).encode()
    for name, path, _kind in streams:
        shard, batch, size = 0, None, 0
        for index, line, text, prompt_chars in _read_stream(path):
            if batch is None:
                batch = {"texts": [], "prompt_chars": [], "doc_index": [],
                         "digest": hashlib.blake2b(settings_bytes, digest_size=16)}
            batch["texts"].append(text)
            batch["prompt_chars"].append(prompt_chars)
            batch["doc_index"].append(index)
            batch["digest"].update(line)
            size += len(text)
            if size >= shard_chars:
                yield _task(settings, name, shard, batch)
                shard, batch, size = shard + 1, None, 0
        if batch is not None:
            yield _task(settings, name, shard, batch)


def _task(settings: dict, stream: str, shard: int, batch: dict) -> dict:
    digest = batch.pop("digest")
    return {**settings, **batch, "stream": stream, "shard": shard, "input_hash": digest.hexdigest()}


PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def _die_with_parent(parent: int) -> None:
    """Worker start-up: have the kernel SIGKILL this worker when pack dies (even by SIGKILL, when no clean-up
    runs), so no worker outlives it. Linux only; elsewhere a no-op. The workers are forked by pack's main
    thread, so `parent` is their parent: if it is no longer, pack died before the request took effect."""
    if not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)


def _run_tasks(tasks, workers: int):
    """Yield entries in task order; at most 2 x workers shards are in flight (memory stays flat)."""
    if workers == 1:
        for task in tasks:
            yield task, pack_shard(task)
        return
    pending: collections.deque = collections.deque()
    # fork (the Linux default until Python 3.14, named so it stays): workers are children of this process,
    # which _die_with_parent relies on
    context = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else None)
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=context,
                                                initializer=_die_with_parent, initargs=(os.getpid(),)) as pool:
        try:
            for task in tasks:
                slim = {k: task[k] for k in ("stream", "shard")}
                pending.append((slim, pool.submit(pack_shard, task)))
                while len(pending) >= 2 * workers:
                    slim, fut = pending.popleft()
                    yield slim, fut.result()
            while pending:
                slim, fut = pending.popleft()
                yield slim, fut.result()
        except concurrent.futures.process.BrokenProcessPool:
            raise CPRecError("a pack worker died; the shards completed so far are kept: re-run the same command "
                             "to finish") from None


def _claim_output(out: Path) -> None:
    """Make `out` a pack output: refuse one that holds anything but an earlier pack's files, write the marker
    first (so an interrupted pack is recognised and resumed) and drop an earlier index, which stops
    describing the directory as soon as a shard is rewritten (the new one is written at the end)."""
    staging.refuse_foreign(out, shards.is_shard_directory, "pack")
    links = sorted(str(p) for p in [out, *(out.iterdir() if out.is_dir() else [])] if p.is_symlink())
    if links:  # pack writes and deletes shards in its stream folders: through a link, in someone else's
        raise CPRecError(f"--out {out}: {', '.join(links)} is a symbolic link; pack writes and removes shards in "
                         f"its own folders only and never follows a link: replace it with a folder")
    out.mkdir(parents=True, exist_ok=True)
    staging.lock_folder(out)  # a second pack into this folder is refused, naming this one
    staging.write_atomic(out / shards.MARKER_FILE, shards.MARKER)
    (out / shards.INDEX_FILE).unlink(missing_ok=True)


def _remove_stale(out: Path, expected: dict[str, set[str]]) -> None:
    """Delete the shards, sidecars and temporaries in stream directories that the new index does not list
    (an earlier run with other input or settings, or one cut short). Only names pack writes are touched:
    anything else in the output is left where it is."""
    for sub in out.iterdir():
        if not sub.is_dir() or sub.is_symlink():  # never delete through a link (refused at the start, too)
            continue
        keep = expected.get(sub.name, set())
        stale = [f for f in sub.iterdir() if shards.PACK_FILE.fullmatch(f.name) and f.name not in keep]
        for f in stale:
            f.unlink()
        if stale and sub.name not in expected and not any(sub.iterdir()):
            sub.rmdir()


def _disk_full(exc: OSError, out: Path) -> CPRecError:
    """Writes are atomic (staging.write_atomic), so a full disk costs only the file being written."""
    reason = "no space left on device" if exc.errno == errno.ENOSPC else "disk quota exceeded"
    return CPRecError(f"{exc.filename or out}: {reason} while packing. Nothing valid was lost: the shards "
                      f"completed so far are kept and the cut-short file was removed; free space and re-run the "
                      f"same command to resume")


def pack(input_dir: str | Path, tokenizer: str, out: str | Path, cfg: PackConfig) -> dict:
    """Run the pack stage; return the index (with a `report` of the run added, not written).

    Refuses an `out` that holds anything but an earlier pack's files, a seq_len shorter than the prepared
    token budget, and (after packing, before the index is written) a stream with more than
    `max_split_fraction` of its documents cut. A full disk is reported by path; re-running resumes.
    """
    cfg.validate()
    input_dir, out = Path(input_dir), Path(out)
    prepared = Prepared(input_dir)
    manifest, streams = prepared.manifest, prepared_streams(prepared)
    folder = resolve_tokenizer(tokenizer)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker: the worker count is the core count
    tok = load_tokenizer(folder)
    if tok.eos_token_id is None:
        raise CPRecError(f"tokenizer {folder} has no EOS token; documents need one")
    ident = tokenizer_identity(folder, tok, tokenizer if tokenizer == "smollm2" else Path(folder).name)
    prepared.check_row_length(ident["hash"], cfg.seq_len)
    try:
        return _pack(input_dir, folder, tok, ident, out, cfg, manifest, streams)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise _disk_full(exc, out) from None
        raise
    finally:
        staging.unlock_folder(out)  # taken by _claim_output


def _pack(input_dir: Path, folder, tok, ident: dict, out: Path, cfg: PackConfig, manifest: dict, streams) -> dict:
    dtype = shards.token_dtype(len(tok))
    ratio = chars_per_token(tok, [s[1] for s in streams])
    settings = {"packer": PACKER_VERSION, "format": shards.FORMAT_VERSION, "seq_len": cfg.seq_len,
                "tokenizer_hash": ident["hash"], "dtype": dtype.name, "eos_id": tok.eos_token_id,
                "pad_id": tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
                "zstd_level": cfg.zstd_level}
    task_settings = {**settings, "out": str(out), "tokenizer": str(folder), "batch_size": cfg.batch_size,
                     "line_cache": cfg.line_cache}
    _claim_output(out)
    for name, _, _ in streams:
        (out / name).mkdir(exist_ok=True)

    entries: dict[str, list[dict]] = {name: [] for name, _, _ in streams}
    reused = 0
    tasks = plan_tasks(streams, task_settings, cfg.shard_rows * cfg.seq_len * ratio)
    with tqdm(desc="pack", unit=" shards", mininterval=1.0) as bar:
        for task, entry in _run_tasks(tasks, cfg.workers):
            reused += bool(entry.pop("reused", False))
            entry.pop("input_hash", None)
            entries[task["stream"]].append(entry)
            bar.update(1)
    _remove_stale(out, {name: {Path(e["file"]).name for e in es} | {Path(e["file"]).stem + ".json" for e in es}
                        for name, es in entries.items()})

    kinds = {name: kind for name, _, kind in streams}
    index = {
        "format": shards.FORMAT_NAME, "version": shards.FORMAT_VERSION, "seq_len": cfg.seq_len,
        "dtype": dtype.name, "pad_id": settings["pad_id"], "eos_id": settings["eos_id"],
        # where the tokenizer was (a folder's name alone resolves only from pack's working folder): the trainer
        # copies it into a run of a model built from model.config, `inspect --row` decodes with it
        "tokenizer": {**ident, **({"path": str(Path(folder).resolve())} if ident["name"] != "smollm2" else {})},
        "template_version": manifest["template_version"], "cprec_version": __version__,
        "source": {"prepared": str(input_dir), "manifest_sha256": hashlib.sha256(
            (input_dir / MANIFEST).read_bytes()).hexdigest()[:32]},
        "settings": {"packer": PACKER_VERSION, "shard_rows": cfg.shard_rows, "chars_per_token": ratio,
                     "zstd_level": cfg.zstd_level},
        "streams": {name: _stream_totals(kinds[name], es, cfg.seq_len) for name, es in entries.items()},
    }
    check_splits(index["streams"], cfg.seq_len, cfg.max_split_fraction)
    shards.write_index(out, index)
    index["report"] = {"shards": sum(len(es) for es in entries.values()), "reused_shards": reused}
    return index


def _stream_totals(kind: str, entries: list[dict], seq_len: int) -> dict:
    rows = sum(e["rows"] for e in entries)
    tokens = sum(e["tokens"] for e in entries)
    return {"kind": kind, "rows": rows, "tokens": tokens, "documents": sum(e["documents"] for e in entries),
            "split_documents": sum(e.get("split_documents", 0) for e in entries),
            # input documents (a cut one counts once); `documents` counts what the rows hold, pieces included
            "source_documents": sum(e.get("source_documents", e["documents"]) for e in entries),
            "slot_use": round(tokens / (rows * seq_len), 6) if rows else 0.0,
            "bytes": sum(e["bytes"] for e in entries),
            "shards": [{k: e[k] for k in ("file", "rows", "tokens", "documents", "bytes", "checksum")}
                       for e in entries]}
