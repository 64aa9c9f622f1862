"""Cleaning of interaction logs: title normalisation, timestamp units, time order, de-duplication, k-core.

The log is held as parallel numpy arrays (user index, item index, timestamp) so that ten million
interactions cost ~200 MB and every pass is vectorised.

Timestamp units. Files disagree (Amazon 2018 and MovieLens count seconds, Amazon 2023 milliseconds), and a
user's history across files is ordered by comparing them, so every file's unit is detected and its
timestamps are turned into seconds. The rule: a timestamp above 1e11 is in milliseconds (1e11 ms is March
1973; 1e11 s is the year 5138), any other in seconds. A file must be in one unit: one that mixes both is
refused, naming a line of each.
"""

from __future__ import annotations

import html
import re
import unicodedata

import numpy as np

from cprec.errors import CPRecError

_TAG = re.compile(r"<[^>]*>")
_SPACE = re.compile(r"\s+")


def normalize_title(raw: str, max_chars: int) -> str | None:
    """HTML-unescape, strip tags and control characters, collapse whitespace, cap the length.

    Returns None for a title with nothing usable left. A capped title is cut at a word boundary.
    """
    text = html.unescape(html.unescape(raw))  # Amazon metadata is often escaped twice
    text = _TAG.sub(" ", text)
    text = "".join(" " if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") else ch for ch in text)
    text = _SPACE.sub(" ", text).strip()
    if len(text) > max_chars:
        cut = text[:max_chars + 1].rsplit(" ", 1)[0]
        text = (cut if len(cut) >= max_chars // 2 else text[:max_chars]).rstrip()
    return text or None


def normalize_domain(raw: str | None) -> str | None:
    """A domain name as read (None stays None): control characters (a newline, a terminal escape) become
    spaces and whitespace collapses, so a name never splits a document line or a report row; other text,
    HTML included, is kept as written (reports escape it)."""
    if raw is None:
        return None
    text = "".join(" " if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") else ch for ch in raw)
    return _SPACE.sub(" ", text).strip() or None


def markdown_text(text: str) -> str:
    """`text` safe in a markdown table cell or heading: HTML escaped (a name like `<script>` shows as text),
    `|` escaped (it would open a cell)."""
    return html.escape(str(text), quote=False).replace("|", "\\|")


MILLISECONDS_ABOVE = 1e11  # the timestamp unit rule of the module docstring


class TimestampUnits:
    """The unit of each interaction file's timestamps, found while the log is read, and their scaling to seconds.

    `see` every interaction as it is read, with the log row it lands on (the rows kept so far): spans of
    rows are recorded per file, so scaling never needs a file name per row.
    """

    def __init__(self):
        self.first: dict[tuple[str, str], tuple[int, float]] = {}  # (file, unit) -> its first (line, timestamp)
        self.spans: list[tuple[str, int]] = []  # (file, first log row), in reading order
        self._file, self._millis = None, None  # the previous interaction's file and unit

    def see(self, file: str, line: int, stamp: float, row: int) -> None:
        millis = stamp > MILLISECONDS_ABOVE
        if millis is self._millis and file == self._file:  # the common case, kept cheap: nothing new
            return
        self._file, self._millis = file, millis
        self.first.setdefault((file, "ms" if millis else "s"), (line, stamp))
        if not self.spans or self.spans[-1][0] != file:
            self.spans.append((file, row))

    def units(self) -> dict[str, str]:
        """{file: 's' or 'ms'}; an error naming the file when one mixes both."""
        units: dict[str, str] = {}
        for file, unit in self.first:
            if file in units:
                (ls, s), (lm, ms) = self.first[(file, "s")], self.first[(file, "ms")]
                raise CPRecError(f"{file}: timestamps mix units: line {ls} has {s:.0f} (seconds) and line {lm} "
                                 f"has {ms:.0f} (milliseconds: above 1e11); convert the file to one unit")
            units[file] = unit
        return units

    def to_seconds(self, stamps: np.ndarray) -> None:
        """Divide, in place, the timestamps of every file in milliseconds by 1000."""
        units = self.units()
        ends = [row for _, row in self.spans[1:]] + [len(stamps)]
        for (file, start), end in zip(self.spans, ends):
            if units.get(file) == "ms":
                stamps[start:end] /= 1000.0


def time_order(users: np.ndarray, stamps: np.ndarray) -> np.ndarray:
    """Permutation sorting by (user, timestamp); ties keep input order (lexsort is stable)."""
    return np.lexsort((stamps, users))


def first_occurrences(users: np.ndarray, items: np.ndarray) -> np.ndarray:
    """Mask keeping the first occurrence of every (user, item) pair, in array order."""
    keys = users.astype(np.int64) * (int(items.max(initial=0)) + 1) + items
    _, first = np.unique(keys, return_index=True)
    mask = np.zeros(len(keys), dtype=bool)
    mask[first] = True
    return mask


def k_core(users: np.ndarray, items: np.ndarray, k: int) -> np.ndarray:
    """Mask of the iterative k-core: every kept user and item has at least k kept interactions.

    To take the core per domain, pass users as (user, domain) pair indices and items that belong to one
    domain each.
    """
    keep = np.ones(len(users), dtype=bool)
    if k <= 1 or len(users) == 0:
        return keep
    n_users, n_items = int(users.max()) + 1, int(items.max()) + 1
    while True:
        user_count = np.bincount(users[keep], minlength=n_users)
        item_count = np.bincount(items[keep], minlength=n_items)
        new_keep = keep & (user_count[users] >= k) & (item_count[items] >= k)
        if np.array_equal(new_keep, keep):
            return keep
        keep = new_keep
