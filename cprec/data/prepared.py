"""The prepared directory: what `cprec prepare` writes and pack, evaluation, SASRec and fine-tuning read.
The one owner of its layout, its manifest and its stream names.

    manifest.json                  what made it (see `prepare`), `stage: prepare`
    items.jsonl                    {domain, title, source_id, interactions}
    documents/<stream>.jsonl       pre-training documents, one stream per pre-training domain plus `mixed`
    downstream/<slug>/{train,valid,test,sft}.jsonl   a held-out domain's splits and fine-tuning examples

A domain's stream name (its slug) is file-system safe: "Children's" -> `children-s`; the manifest records
the mapping under `domains.streams`. A held-out domain's fine-tuning examples pack into the stream
`sft-<slug>`. The manifest's `split` says how the held-out domains were split (`split_kind`: leave-one-out or
chronological, see `cprec.data.prepare`). The manifest's `budget` says how long a document may be: in characters, or in tokens of one
tokenizer, which a packed row (document plus EOS) must hold.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from cprec.errors import CPRecError

MANIFEST = "manifest.json"
MIXED_STREAM = "mixed"
SPLITS = ("train", "valid", "test", "sft")


def stream_name(domain: str) -> str:
    """A file-system-safe stream name for a domain ("Children's" -> "children-s")."""
    # capped so that `sft-<slug>` stays within SAFE_NAME's 128 characters
    return re.sub(r"[^a-z0-9]+", "-", domain.lower()).strip("-")[:120].strip("-") or "domain"


SAFE_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,127}$")  # what stream_name makes: one path component, no dots


def check_name(name, origin: str) -> str:
    """`name`, read from a manifest or an index, if it is safe as one path component (what `stream_name`
    writes); else an error naming where it was read. A name with `/` or `..` would put files outside the
    folder a command writes."""
    if not isinstance(name, str) or not SAFE_NAME.match(name):
        raise CPRecError(f"{origin}: {name!r} is not a stream name (lowercase letters, digits and '-', as prepare "
                         f"writes them); the file was edited or written by something else")
    return name


def sft_stream(slug: str) -> str:
    """The packed stream of a held-out domain's fine-tuning examples."""
    return f"sft-{slug}"


def read_manifest(prepared: str | Path) -> dict:
    """The manifest of a directory written by `prepare`; an error naming the file otherwise."""
    path = Path(prepared) / MANIFEST
    if not path.is_file():
        raise CPRecError(f"{path}: missing; expected a directory written by `cprec prepare`")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("stage") != "prepare":
        raise CPRecError(f"{path}: not a prepare manifest (stage={manifest.get('stage')!r})")
    for domain, slug in (manifest.get("domains", {}).get("streams") or {}).items():
        check_name(slug, f"{path}: domains.streams[{domain!r}]")
    for stream in manifest.get("streams") or {}:
        check_name(stream, f"{path}: streams")
    return manifest


LEAVE_ONE_OUT = "leave-one-out"


def split_kind(manifest: dict) -> str:
    """How the held-out domains were split: `leave-one-out` or `chronological` (`manifest["split"]`; a
    manifest written before the chronological split existed is leave-one-out)."""
    return (manifest.get("split") or {}).get("kind", LEAVE_ONE_OUT)


def check_same_split(splits: dict[str, str]) -> str:
    """The one split kind of several results ({what: split kind}); an error naming both kinds otherwise:
    leave-one-out and chronological numbers measure different things and must never be compared or merged."""
    kinds = sorted(set(splits.values()))
    if len(kinds) > 1:
        named = "; ".join(f"{what}: {kind}" for what, kind in splits.items())
        raise CPRecError(f"results of different splits cannot be compared or mixed ({named}): evaluate every "
                         f"model on one prepared directory")
    return kinds[0]


def is_prepared(path: Path) -> bool:
    try:
        return json.loads((path / MANIFEST).read_text(encoding="utf-8")).get("stage") == "prepare"
    except (OSError, ValueError, AttributeError):
        return False


class Prepared:
    """A prepared directory, opened: its manifest and the paths of its files."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.manifest = read_manifest(self.root)

    @property
    def downstream_domains(self) -> list[str]:
        return list(self.manifest["domains"]["downstream"])

    def slug(self, domain: str) -> str:
        return self.manifest["domains"]["streams"][domain]

    @property
    def items(self) -> Path:
        return self.root / "items.jsonl"

    def documents(self, stream: str) -> Path:
        return self.root / "documents" / f"{stream}.jsonl"

    def downstream(self, domain: str, split: str) -> Path:
        assert split in SPLITS, split
        return self.root / "downstream" / self.slug(domain) / f"{split}.jsonl"

    def pack_streams(self) -> list[tuple[str, Path, str]]:
        """Every stream pack makes: (name, documents file, kind), the pre-training streams then `sft-*`."""
        streams = [(name, self.documents(name), "pretrain") for name in self.manifest["streams"]]
        streams += [(sft_stream(self.slug(d)), self.downstream(d, "sft"), "sft") for d in self.downstream_domains]
        return streams

    def check_row_length(self, tokenizer_hash: str, seq_len: int) -> None:
        """Refuse rows shorter than the prepared documents: prepare budgeted them in this tokenizer's tokens for
        rows of window_tokens + 1 (the document plus EOS), so a shorter row would cut every full window. A
        budget in characters, or in another tokenizer's tokens, says nothing here."""
        budget = self.manifest.get("budget") or {}
        if budget.get("unit") != "tokens" or (budget.get("tokenizer") or {}).get("hash") != tokenizer_hash:
            return
        needed = int(budget["size"]) + 1
        if seq_len < needed:
            raise CPRecError(f"seq_len={seq_len} is shorter than the documents of {self.root}: prepare budgeted "
                             f"them at window_tokens={needed - 1} tokens of this tokenizer, which need "
                             f"seq_len={needed} (EOS included); pack with --seq-len {needed} or more, or re-run "
                             f"prepare with window_tokens={seq_len - 1}")
