"""`ranks.jsonl`: what an evaluation found for each user, and how a stopped evaluation resumes. The only owner.

Specification
-------------
`OUT/ranks.jsonl` holds one JSON line per (domain, protocol, user) of the evaluation:

    {"domain": "Thriller", "protocol": "full", "user": "1m_4242", "rank": 3, "candidates": 92}

`rank` is the 0-based rank of the user's target among the ranked titles (ties count against the target), or
null when full ranking's top K does not hold it; `candidates` is how many titles were ranked (the whole
catalogue for full ranking). Lines are in a fixed order (domains as evaluated, sampled before full, users in
test order), so two runs of the same settings write the same file, and two models' files can be compared
line by line.

While an evaluation runs, rank R appends each finished batch of users to `OUT/ranks.partial-R.jsonl` (one
write, flushed and fsynced). A run that was killed leaves those files; the next run with the same settings
reads them (a torn last line is ignored and cut off), computes only the users they lack, and at the end
writes `ranks.jsonl` from all of them and removes them. The resume may use another number of ranks.

`OUT/eval-settings.json` records what decides the results (model and data fingerprints, protocol, domains,
users, seed, negatives, candidates, dtype): a run finding a different one refuses to mix results and names
each setting that changed. Settings that only change speed (batch sizes, ranks, device) are not in it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from cprec import staging
from cprec.errors import CPRecError

RANKS_FILE = "ranks.jsonl"
SETTINGS_FILE = "eval-settings.json"
PARTIAL_GLOB = "ranks.partial-*.jsonl"


def key(record: dict) -> tuple[str, str, str]:
    return record["domain"], record["protocol"], str(record["user"])


def record(domain: str, protocol: str, user, rank: int | None, candidates: int) -> dict:
    return {"domain": domain, "protocol": protocol, "user": user, "rank": rank, "candidates": candidates}


def _read_lines(path: Path, torn_ok: bool) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    if lines[-1]:  # no final newline: a write cut short by a kill
        if not torn_ok:
            raise CPRecError(f"{path}: the last line is incomplete; the file was cut short")
    out = []
    for number, line in enumerate(lines[:-1], 1):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise CPRecError(f"{path}: line {number} is not JSON ({exc.msg}); delete the evaluation folder "
                             f"and run again") from None
    return out


def read_final(out: Path) -> list[dict]:
    """The records of a finished evaluation's ranks.jsonl (a cut-short or damaged file is named)."""
    return _read_lines(out / RANKS_FILE, torn_ok=False)


def read_done(out: Path) -> dict[tuple, dict]:
    """Every user already ranked in `out` (by key): the final file and the partial files of any rank."""
    done = {}
    paths = ([out / RANKS_FILE] if (out / RANKS_FILE).is_file() else []) + sorted(out.glob(PARTIAL_GLOB))
    for path in paths:
        for rec in _read_lines(path, torn_ok=path.name != RANKS_FILE):
            done.setdefault(key(rec), rec)
    return done


class RankLog:
    """This rank's appends. Opening cuts a torn last line (left by a kill) so that the next line starts clean."""

    def __init__(self, out: Path, rank: int):
        self.path = out / f"ranks.partial-{rank}.jsonl"
        if self.path.is_file():
            data = self.path.read_bytes()
            if data and not data.endswith(b"\n"):
                with open(self.path, "r+b") as fh:
                    fh.truncate(data.rfind(b"\n") + 1)
        self.fh = open(self.path, "a", encoding="utf-8")

    def append(self, records: list[dict]) -> None:
        self.fh.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        self.fh.flush()
        os.fsync(self.fh.fileno())

    def close(self) -> None:
        self.fh.close()


def claim(out: Path, settings: dict) -> None:
    """Start or resume an evaluation in `out`: record its settings, or check them against the recorded ones."""
    if not (out / SETTINGS_FILE).is_file() and ((out / RANKS_FILE).is_file() or any(out.glob(PARTIAL_GLOB))):
        raise CPRecError(f"{out} holds per-user ranks but no {SETTINGS_FILE}, so they cannot be resumed safely: "
                         f"choose another --out, or delete {out} to start over")
    # data_files is recorded since issue 25: an older evaluation resumes as it was
    staging.claim(out, SETTINGS_FILE, settings, "an evaluation", since=("data_files",), lock=False)


def finish(out: Path, records: list[dict]) -> None:
    """Write the final `ranks.jsonl` (records in their final order) and remove the partial files."""
    staging.write_atomic(out / RANKS_FILE, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    for path in out.glob(PARTIAL_GLOB):
        path.unlink()
