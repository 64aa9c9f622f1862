"""The rejects log: every input row that could not be used, with its file, line and reason.

Rows are written to `rejects.jsonl` as they are found (never held in memory), counted per file and reason,
and checked against a bound on the reject fraction once reading is done.
"""

from __future__ import annotations

import collections
import json
from pathlib import Path

from cprec.errors import CPRecError

EXCERPT_CHARS = 200


class RejectLog:
    def __init__(self, path: Path):
        self.path = Path(path)
        self._fh = open(self.path, "w", encoding="utf-8")
        self.counts: collections.Counter = collections.Counter()  # (file, reason) -> rows
        self.first_line: dict = {}  # (file, reason) -> first line number seen
        self.rows_read: collections.Counter = collections.Counter()  # file -> rows read (good or bad)

    def reject(self, file: str, line: int, reason: str, excerpt: str | bytes) -> None:
        if isinstance(excerpt, bytes):
            excerpt = excerpt.decode("utf-8", errors="backslashreplace")
        record = {"file": file, "line": line, "reason": reason, "excerpt": excerpt[:EXCERPT_CHARS]}
        self._fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.counts[(file, reason)] += 1
        self.first_line.setdefault((file, reason), line)

    def count_read(self, file: str, rows: int) -> None:
        self.rows_read[file] += rows

    def close(self) -> None:
        self._fh.close()

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> dict:
        by_reason: collections.Counter = collections.Counter()
        by_file: collections.Counter = collections.Counter()
        for (file, reason), n in self.counts.items():
            by_reason[reason] += n
            by_file[file] += n
        return {"total": self.total, "rows_read": sum(self.rows_read.values()),
                "by_reason": dict(sorted(by_reason.items())), "by_file": dict(sorted(by_file.items()))}

    def check(self, max_fraction: float) -> None:
        """Fail when rejected rows exceed `max_fraction` of the rows read, naming the worst offender."""
        read = sum(self.rows_read.values())
        if read == 0 or self.total / read <= max_fraction:
            return
        (file, reason), n = self.counts.most_common(1)[0]
        raise CPRecError(
            f"{self.total} of {read} input rows ({self.total / read:.2%}) were rejected, above the bound "
            f"max_reject_fraction={max_fraction}. Worst offender: {file}: {n} rows with reason '{reason}' "
            f"(first at line {self.first_line[(file, reason)]}). Every rejected row is listed in {self.path}; "
            f"fix the input or raise max_reject_fraction.")
