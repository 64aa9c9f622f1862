"""The shard format: writer and reader side by side. This module is its only owner.

Specification (format `cprec-shards`, version 1)
-------------------------------------------------
A shard directory holds `index.json`, the marker `.cprec-shards` and one sub-directory per stream with
shard files `NNNNN.zst` (plus a `NNNNN.json` sidecar holding the shard's index entry, used to resume an
interrupted pack). Pack writes the marker first and the index last, so a directory with the marker and no
index is an unfinished pack; pack writes only into an empty directory or one of its own, and deletes only
names it writes (`NNNNN.zst`, `NNNNN.json`, their `.tmpPID` temporaries) in stream sub-directories.

A shard file, all integers little-endian:

    header, 40 bytes, uncompressed:
        magic      8 bytes  b"CPRSHRD\\0"
        version    u32      1
        itemsize   u32      2 (uint16 tokens) or 4 (uint32 tokens)
        seq_len    u32      tokens per row
        rows       u32
        documents  u64
        reserved   u64      0
    body: one zstd frame holding, back to back,
        tokens       [rows, seq_len] of the token dtype; a row is its documents back to back
                     (each ending with EOS), then padding up to seq_len
        row_docs     u32[rows]       documents in each row
        doc_lens     u32[documents]  tokens of each document (EOS included), in row order
        prompt_lens  u32[documents]  leading tokens of each document that carry no loss (0 for pre-training)
        doc_index    u64[documents]  position of the document in its stream's input file (for tracing)

`index.json` records the format name and version, `seq_len`, the token dtype, pad and EOS ids, the
tokenizer (name, vocab size, hash of its files), the template version, the source manifest, and per stream
the totals and the list of shards: file, rows, tokens (real, not padding), documents, bytes, checksum
(BLAKE2b-128 of the whole file). Its `index_checksum` is the BLAKE2b-128 of the index's canonical JSON
without that key (keys sorted, no whitespace, UTF-8, as Python's json writes it): a reader refuses an index
that was edited, and one without the key (written before it existed; readers that predate it ignore it, so
the version stays 1), with the fix: re-run pack, which keeps every shard and rewrites the index. A stream's
totals are the sums of its shards' entries and every `NNNNN.zst` in a stream directory is listed;
`ShardSet.verify` checks both, and every shard. A reader verifies a shard's checksum before decompressing,
and every error names the shard or the index and what is wrong. Writes go to a temporary name and are
renamed when complete.
"""

from __future__ import annotations

import bisect
import collections
import hashlib
import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zstandard

from cprec.data.prepared import check_name
from cprec import staging
from cprec.errors import CPRecError

FORMAT_NAME = "cprec-shards"
FORMAT_VERSION = 1
MAGIC = b"CPRSHRD\x00"
HEADER = struct.Struct("<8sIIIIQQ")
DTYPES = {2: np.dtype("<u2"), 4: np.dtype("<u4")}
INDEX_FILE = "index.json"
MARKER_FILE = ".cprec-shards"
MARKER = (json.dumps({"format": FORMAT_NAME, "writer": "cprec pack"}) + "\n").encode()
PACK_FILE = re.compile(r"\d{5}\.(zst|json)(\.tmp\d+)?")  # every name pack writes in a stream directory


class ShardError(CPRecError):
    """A shard or index that is missing, damaged or inconsistent; the message names it."""


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every token id fits, else uint32."""
    return DTYPES[2] if vocab_size <= 2**16 else DTYPES[4]


def checksum(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


@dataclass
class Shard:
    tokens: np.ndarray  # [rows, seq_len]
    row_docs: np.ndarray
    doc_lens: np.ndarray
    prompt_lens: np.ndarray
    doc_index: np.ndarray

    def __post_init__(self):
        self.row_start = np.concatenate([[0], np.cumsum(self.row_docs, dtype=np.int64)])

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tokens, document lengths, prompt lengths) of row i."""
        a, b = self.row_start[i], self.row_start[i + 1]
        return self.tokens[i], self.doc_lens[a:b], self.prompt_lens[a:b]


def encode_shard(tokens: np.ndarray, row_docs, doc_lens, prompt_lens, doc_index, level: int = 3) -> bytes:
    rows, seq_len = tokens.shape
    itemsize = tokens.dtype.itemsize
    if itemsize not in DTYPES:
        raise ValueError(f"unsupported token dtype {tokens.dtype}")
    arrays = [np.ascontiguousarray(tokens, dtype=DTYPES[itemsize]), np.asarray(row_docs, "<u4"),
              np.asarray(doc_lens, "<u4"), np.asarray(prompt_lens, "<u4"), np.asarray(doc_index, "<u8")]
    body = zstandard.ZstdCompressor(level=level).compress(b"".join(a.tobytes() for a in arrays))
    return HEADER.pack(MAGIC, FORMAT_VERSION, itemsize, seq_len, rows, len(doc_lens), 0) + body


def write_shard(path: Path, tokens: np.ndarray, row_docs, doc_lens, prompt_lens, doc_index,
                level: int = 3) -> dict:
    """Write one shard atomically; return its index entry (file name relative to the shard directory)."""
    data = encode_shard(tokens, row_docs, doc_lens, prompt_lens, doc_index, level)
    staging.write_atomic(path, data)
    return {"file": f"{path.parent.name}/{path.name}", "rows": int(tokens.shape[0]),
            "tokens": int(np.sum(doc_lens, dtype=np.int64)), "documents": int(len(doc_lens)),
            "bytes": len(data), "checksum": checksum(data)}


def decode_shard(data: bytes, entry: dict, seq_len: int, dtype: np.dtype, name: str) -> Shard:
    """Check `data` against its index entry and decode it; every failure names the shard."""
    if len(data) != entry["bytes"]:
        raise ShardError(f"shard {name}: {len(data)} bytes on disk, the index says {entry['bytes']} (truncated "
                         f"or overwritten)")
    if checksum(data) != entry["checksum"]:
        raise ShardError(f"shard {name}: checksum mismatch (the file is corrupt or does not belong to this index)")
    if len(data) < HEADER.size:
        raise ShardError(f"shard {name}: shorter than its header")
    magic, version, itemsize, file_seq_len, rows, docs, _ = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise ShardError(f"shard {name}: not a CPRec shard (bad magic {magic!r})")
    if version != FORMAT_VERSION:
        raise ShardError(f"shard {name}: format version {version}, this reader reads {FORMAT_VERSION}")
    if itemsize not in DTYPES or DTYPES[itemsize] != dtype:
        raise ShardError(f"shard {name}: token dtype of {itemsize} bytes, the index says {dtype.name}")
    if file_seq_len != seq_len or rows != entry["rows"] or docs != entry["documents"]:
        raise ShardError(f"shard {name}: header (seq_len={file_seq_len}, rows={rows}, documents={docs}) "
                         f"disagrees with the index (seq_len={seq_len}, rows={entry['rows']}, "
                         f"documents={entry['documents']})")
    expected = rows * seq_len * itemsize + rows * 4 + docs * 4 * 2 + docs * 8
    try:
        body = zstandard.ZstdDecompressor().decompress(data[HEADER.size:], max_output_size=expected)
    except zstandard.ZstdError as exc:
        raise ShardError(f"shard {name}: cannot decompress ({exc})") from None
    if len(body) != expected:
        raise ShardError(f"shard {name}: body holds {len(body)} bytes, expected {expected}")
    offsets = np.cumsum([0, rows * seq_len * itemsize, rows * 4, docs * 4, docs * 4, docs * 8])
    view = memoryview(body)
    tokens = np.frombuffer(view[offsets[0]:offsets[1]], dtype=dtype).reshape(rows, seq_len)
    row_docs = np.frombuffer(view[offsets[1]:offsets[2]], dtype="<u4")
    doc_lens = np.frombuffer(view[offsets[2]:offsets[3]], dtype="<u4")
    prompt_lens = np.frombuffer(view[offsets[3]:offsets[4]], dtype="<u4")
    doc_index = np.frombuffer(view[offsets[4]:offsets[5]], dtype="<u8")
    if int(row_docs.sum()) != docs or np.any(prompt_lens > doc_lens):
        raise ShardError(f"shard {name}: inconsistent document tables")
    return Shard(tokens, row_docs, doc_lens, prompt_lens, doc_index)


def read_shard_file(root: Path, entry: dict, seq_len: int, dtype: np.dtype) -> Shard:
    path = root / entry["file"]
    if not path.is_file():
        raise ShardError(f"shard {path}: missing")
    return decode_shard(path.read_bytes(), entry, seq_len, dtype, str(path))


def index_checksum(index: dict) -> str:
    """BLAKE2b-128 of the index's canonical JSON, `index_checksum` itself left out."""
    body = {k: v for k, v in index.items() if k != "index_checksum"}
    return checksum(json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode())


def write_index(root: Path, index: dict) -> None:
    """Seal the index (set its `index_checksum`) and write it."""
    index["index_checksum"] = index_checksum(index)
    staging.write_atomic(root / INDEX_FILE, (json.dumps(index, indent=2, ensure_ascii=False) + "\n").encode())


def is_shard_directory(root: Path) -> bool:
    """True when `root` was written by pack: it holds the marker, or an index of this format (from before
    the marker existed)."""
    if (root / MARKER_FILE).is_file():
        return True
    try:
        return json.loads((root / INDEX_FILE).read_text(encoding="utf-8")).get("format") == FORMAT_NAME
    except (OSError, ValueError, AttributeError):
        return False


def unlisted_shards(root: Path, index: dict) -> list[str]:
    """Shard files (`stream/NNNNN.zst`) on disk that the index does not list, in any sub-directory."""
    listed = {e["file"] for st in index["streams"].values() for e in st["shards"]}
    return sorted(f"{sub.name}/{f.name}" for sub in root.iterdir() if sub.is_dir() for f in sub.iterdir()
                  if PACK_FILE.fullmatch(f.name) and f.suffix == ".zst" and f"{sub.name}/{f.name}" not in listed)


def fingerprint(index: dict) -> str:
    """Identity of the data: what a training run's sample order and resume are tied to."""
    ident = {"format": index["format"], "version": index["version"], "seq_len": index["seq_len"],
             "dtype": index["dtype"], "tokenizer": index["tokenizer"]["hash"],
             "streams": {name: [s["checksum"] for s in st["shards"]] for name, st in sorted(index["streams"].items())}}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:32]


def read_index(root: Path) -> dict:
    """The index of a shard directory, checked against its own `index_checksum`; errors name index.json."""
    path = root / INDEX_FILE
    if not path.is_file():
        if (root / MARKER_FILE).is_file():
            raise ShardError(f"{path}: missing: {root} holds an unfinished pack; re-run the same `cprec pack` "
                             f"command to finish it")
        raise ShardError(f"{path}: missing (is {root} a pack output directory?)")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ShardError(f"{path}: not valid JSON ({exc})") from None
    fmt = index.get("format") if isinstance(index, dict) else None
    if fmt != FORMAT_NAME:
        raise ShardError(f"{path}: format {fmt!r}, expected {FORMAT_NAME!r}")
    if index.get("version") != FORMAT_VERSION:
        raise ShardError(f"{path}: format version {index.get('version')}, this reader reads {FORMAT_VERSION}")
    repack = "re-run the same `cprec pack` command: it keeps every complete shard and rewrites the index"
    if "index_checksum" not in index:
        raise ShardError(f"{path}: no index_checksum (written by an older CPRec, or edited); {repack}")
    if index["index_checksum"] != index_checksum(index):
        raise ShardError(f"{path}: index checksum mismatch: the index was edited or damaged after pack wrote it "
                         f"(its totals, shard list or settings cannot be trusted); {repack}")
    for name, stream in index["streams"].items():  # the checksum is anyone's to recompute: names become paths
        check_name(name, f"{path}: streams")
        for shard in stream.get("shards", []):
            folder, _, file = str(shard.get("file")).partition("/")
            if folder != name or not re.fullmatch(r"\d{5,}\.zst", file):
                raise ShardError(f"{path}: stream {name}: shard file {shard.get('file')!r} is not {name}/NNNNN.zst; "
                                 f"the index was edited or written by something else")
    return index


class ShardSet:
    """Reader over a shard directory: random access to row i of a stream, decompressed shards cached."""

    def __init__(self, root: str | Path, cache_shards: int = 4, index: dict | None = None):
        self.root = Path(root)
        self.index = index if index is not None else read_index(self.root)  # given: read once by the caller
        self.seq_len = int(self.index["seq_len"])
        self.dtype = np.dtype(self.index["dtype"]).newbyteorder("<")
        self.streams = self.index["streams"]
        self._starts = {name: np.concatenate([[0], np.cumsum([s["rows"] for s in st["shards"]])]).tolist()
                        for name, st in self.streams.items()}
        self._cache: collections.OrderedDict = collections.OrderedDict()
        self._cache_shards = cache_shards
        self.fingerprint = fingerprint(self.index)

    def rows(self, stream: str) -> int:
        return self._starts[self._check_stream(stream)][-1]

    def _check_stream(self, stream: str) -> str:
        if stream not in self.streams:
            raise ShardError(f"{self.root}: no stream '{stream}' (streams: {', '.join(self.streams)})")
        return stream

    def shard(self, stream: str, k: int) -> Shard:
        key = (stream, k)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        shard = read_shard_file(self.root, self.streams[stream]["shards"][k], self.seq_len, self.dtype)
        self._cache[key] = shard
        if len(self._cache) > self._cache_shards:
            self._cache.popitem(last=False)
        return shard

    def locate(self, stream: str, i: int) -> tuple[int, int]:
        starts = self._starts[self._check_stream(stream)]
        if not 0 <= i < starts[-1]:
            rows = f"{starts[-1]:,} rows (0 to {starts[-1] - 1:,})" if starts[-1] else "no rows"
            raise ShardError(f"{self.root}: row {i} is out of range: stream '{stream}' has {rows}")
        k = bisect.bisect_right(starts, i) - 1
        return k, i - starts[k]

    def row(self, stream: str, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tokens [seq_len], document lengths, prompt lengths) of row i of `stream`."""
        k, j = self.locate(stream, i)
        return self.shard(stream, k).row(j)

    def verify(self) -> int:
        """Check the index against the shards it lists and the files on disk: read and check every shard,
        recompute each stream's totals from its shard entries, and look for shard files the index does not
        list. Return how many shards were checked; the first problem raises a ShardError naming it."""
        n = 0
        for name, st in self.streams.items():
            for entry in st["shards"]:
                read_shard_file(self.root, entry, self.seq_len, self.dtype)
                n += 1
        path = self.root / INDEX_FILE
        for name, st in self.streams.items():
            for key in ("rows", "tokens", "documents", "bytes"):
                total = sum(e[key] for e in st["shards"])
                if st.get(key) != total:
                    raise ShardError(f"{path}: stream '{name}' {key} total is {st.get(key)}, its shard entries sum "
                                     f"to {total} (the index is inconsistent; re-run `cprec pack` to rewrite it)")
        unlisted = unlisted_shards(self.root, self.index)
        if unlisted:
            raise ShardError(f"{path}: lists no entry for {len(unlisted)} shard file(s) on disk: "
                             f"{', '.join(unlisted[:5])}{' ...' if len(unlisted) > 5 else ''} (an entry was removed, "
                             f"or the files are strays; re-run `cprec pack` to rewrite the index)")
        return n


def write_random_shardset(root: str | Path, rows_per_stream: dict[str, int], seq_len: int, shard_rows: int,
                          vocab: int = 1000, seed: int = 0, kinds: dict[str, str] | None = None) -> dict:
    """A valid shard directory of random documents, for tests and benchmarks of the readers and the stream.

    Rows hold 1-4 documents each and 0-2 padding tokens; token values are low-entropy so that large sets
    stay small on disk.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    dtype = token_dtype(vocab)
    streams = {}
    for name, total in rows_per_stream.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        entries = []
        for k, start in enumerate(range(0, total, shard_rows)):
            rows = min(shard_rows, total - start)
            tokens = (np.arange(rows * seq_len, dtype=np.int64).reshape(rows, seq_len) % (vocab - 1) + 1).astype(dtype)
            row_docs = rng.integers(1, 5, rows)
            pad = rng.integers(0, 3, rows)
            doc_lens = _split_rows(row_docs, seq_len - pad)
            prompt_lens = np.zeros_like(doc_lens)
            if (kinds or {}).get(name) == "sft":
                prompt_lens = (doc_lens * rng.random(len(doc_lens))).astype(np.int64)
            entry = write_shard(root / name / f"{k:05d}.zst", tokens, row_docs, doc_lens, prompt_lens,
                                np.arange(len(doc_lens)) + start * 4, level=1)
            entries.append(entry)
        rows = sum(e["rows"] for e in entries)
        tokens = sum(e["tokens"] for e in entries)
        streams[name] = {"kind": (kinds or {}).get(name, "pretrain"), "rows": rows, "tokens": tokens,
                         "documents": sum(e["documents"] for e in entries), "split_documents": 0,
                         "slot_use": tokens / max(rows * seq_len, 1), "bytes": sum(e["bytes"] for e in entries),
                         "shards": entries}
    index = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "seq_len": seq_len, "dtype": dtype.name,
             "pad_id": 0, "eos_id": vocab - 1, "tokenizer": {"name": "random", "vocab_size": vocab, "hash": "random",
                                                               "eos_id": vocab - 1},
             "template_version": "none", "streams": streams}
    write_index(root, index)
    return index


def _split_rows(row_docs: np.ndarray, used: np.ndarray) -> np.ndarray:
    """Document lengths that split each row's `used` tokens into `row_docs` near-equal parts (vectorised)."""
    row = np.repeat(np.arange(len(row_docs)), row_docs)
    part = np.arange(len(row)) - np.repeat(np.cumsum(row_docs) - row_docs, row_docs)
    base = used[row] // row_docs[row]
    return base + (part == row_docs[row] - 1) * (used[row] - base * row_docs[row])
