"""The fault suite: what a hostile but fair user does to CPRec, and what CPRec must do in return.

Each test is one fault case (issue 12 and the cases found since): it fails on the code before its fix. Fast,
CPU only; tiny random models and small generated data. The README's "Faults" table summarises the cases.
"""

from __future__ import annotations


# ================================================================ prepare: readers, inputs and configs
# (section A)
import pytest


def prep_write(path, data: bytes):
    """Write bytes to `path`, gzip-compressed when its name ends in .gz; return the path."""
    import gzip

    if path.suffix == ".gz":
        with gzip.open(path, "wb") as fh:
            fh.write(data)
    else:
        path.write_bytes(data)
    return path


def prep_read(source, tmp_path):
    """(items, interactions, rejects) of a reader; rows without their file and line."""
    import json

    from cprec.data.rejects import RejectLog

    log = RejectLog(tmp_path / "rejects.jsonl")
    items = [row[2:] for row in source.items(log)]
    inter = [row[2:] for row in source.interactions(log)]
    log.close()
    rejects = [json.loads(line) for line in (tmp_path / "rejects.jsonl").read_text().splitlines()]
    return items, inter, rejects


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_csv_reader_parses_rfc4180_quoting_bom_and_crlf(tmp_path, suffix):
    """Fault: a quoted title holding a newline was cut and its rest became a phantom item; a BOM broke the header."""
    from cprec.data.readers import TableSource

    items = prep_write(tmp_path / f"items.csv{suffix}", (
        '\ufeffitem,title\r\n'
        'i1,"Dune,\r\nDeluxe Edition"\r\n'  # lines 2-3: a quoted comma and a CRLF inside quotes
        'i2,"The ""Best"" of Emma"\r\n'  # line 4: doubled quotes
        'i3,"Portal\n2"\r\n').encode("utf-8"))  # lines 5-6: a bare LF inside quotes
    inter = prep_write(tmp_path / f"inter.csv{suffix}", (
        '\ufeffuser,item,timestamp,domain\r\n'
        'u1,i1,100,"Books, used"\r\n'
        'u1,i2,90,Books\r\n').encode("utf-8"))
    items_read, inter_read, rejects = prep_read(TableSource("csv", inter, items), tmp_path)
    assert items_read == [("i1", "Dune,\r\nDeluxe Edition", None), ("i2", 'The "Best" of Emma', None),
                          ("i3", "Portal\n2", None)]
    assert inter_read == [("u1", "i1", 100.0, "Books, used"), ("u1", "i2", 90.0, "Books")]
    assert rejects == []


def test_csv_rejects_name_the_line_where_the_record_starts(tmp_path):
    from cprec.data.readers import TableSource

    items = prep_write(tmp_path / "items.csv", (
        b'item,title\n'
        b'i1,"One\nline two"\n'  # lines 2-3
        b',"no id\nat all"\n'  # lines 4-5: no item id
        b'i2,Two\n'  # line 6
        b'i3,Caf\xe9\n'))  # line 7: Latin-1, not UTF-8
    inter = prep_write(tmp_path / "inter.csv", b'user,item,timestamp,domain\nu1,i1,soon,Books\n')
    items_read, inter_read, rejects = prep_read(TableSource("csv", inter, items), tmp_path)
    assert items_read == [("i1", "One\nline two", None), ("i2", "Two", None)]
    assert inter_read == []
    assert [(r["file"], r["line"], r["reason"].split(" (")[0]) for r in rejects] == [
        (str(items), 4, "missing field 'item'"), (str(items), 7, "bad UTF-8"),
        (str(inter), 2, "missing or non-numeric timestamp")]




def test_amazon_review_file_without_its_meta_file_is_named(fixtures, tmp_path):
    """Fault: a reviews file without its meta file was skipped silently and its domain disappeared."""
    import shutil

    from cprec.data.readers import AmazonReviews
    from cprec.errors import CPRecError

    folder = tmp_path / "amazon"
    shutil.copytree(fixtures / "amazon2018", folder)
    (folder / "Toys_and_Games.json").write_text((fixtures / "amazon2018" / "Books.json").read_text())
    with pytest.raises(CPRecError, match=r"Toys_and_Games\.json: no meta file meta_Toys_and_Games\.json"):
        AmazonReviews.discover(folder)
    assert sorted(AmazonReviews.discover(folder, given={"Toys_and_Games"})) == ["Books", "Movies_and_TV"]
    (folder / "Toys_and_Games.json").unlink()
    (folder / "meta_Books.json").rename(folder / "meta_Toys_and_Games.json")  # now both are unpaired
    with pytest.raises(CPRecError, match=r"Books\.json: no meta file meta_Books\.json"):
        AmazonReviews.discover(folder)


def prep_amazon2023(folder, reviews: dict):
    """An Amazon 2023 directory: {domain: [(user, item, timestamp), ...]}, one title per item."""
    import json

    folder.mkdir()
    for domain, rows in reviews.items():
        (folder / f"{domain}.jsonl").write_text("".join(
            json.dumps({"user_id": u, "parent_asin": i, "timestamp": t}) + "\n" for u, i, t in rows))
        (folder / f"meta_{domain}.jsonl").write_text("".join(
            json.dumps({"parent_asin": i, "title": f"Title {i}"}) + "\n" for i in sorted({i for _, i, _ in rows})))
    return folder


def test_timestamps_in_seconds_and_milliseconds_are_put_in_one_order(tmp_path):
    """Fault: one domain in seconds and another in milliseconds reordered every mixed sequence silently."""
    import json

    from cprec.config import from_dict
    from cprec.data import template
    from cprec.data.prepare import PrepareConfig, prepare
    from cprec.errors import CPRecError

    folder = prep_amazon2023(tmp_path / "amazon", {
        "Books": [("u1", "b1", 1_000_000_000), ("u1", "b2", 1_600_000_000)],  # 2001 and 2020, in seconds
        "Toys": [("u1", "t1", 1_500_000_000_000)]})  # 2017, in milliseconds
    cfg = from_dict(PrepareConfig, {"source": "amazon2023", "input": {"path": str(folder)}, "k_core": 1,
                                    "pretrain_domains": ["Books", "Toys"], "downstream_domains": []})
    manifest = prepare(cfg, tmp_path / "out")
    mixed = (tmp_path / "out" / "documents" / "mixed.jsonl").read_text()
    _, lines = template.parse_document(json.loads(mixed)["text"])
    assert [title for _, title in lines] == ["Title b1", "Title t1", "Title b2"]
    assert manifest["source"]["timestamp_units"] == {str(folder / "Books.jsonl"): "s",
                                                     str(folder / "Toys.jsonl"): "ms"}

    with open(folder / "Books.jsonl", "a") as fh:  # line 3: a millisecond stamp among seconds
        fh.write('{"user_id": "u2", "parent_asin": "b1", "timestamp": 1600000000000}\n')
    with pytest.raises(CPRecError, match=r"Books\.jsonl: timestamps mix units: line 1 has 1000000000 "
                                         r"\(seconds\) and line 3 has 1600000000000 \(milliseconds"):
        prepare(cfg, tmp_path / "out2")


def test_damaged_or_fake_gzip_input_is_named_with_the_line_reached(fixtures, tmp_path):
    """Fault: a truncated or non-gzip .gz input ended prepare with a bare gzip/zlib/EOFError traceback."""
    import gzip
    import re

    from cprec.cli import main
    from cprec.data.readers import AmazonReviews, TableSource
    from cprec.errors import CPRecError

    rows = "user,item,timestamp,domain\n" + "".join(f"u{i % 7},i{i % 3 + 1},{i},Books\n" for i in range(20000))
    whole = gzip.compress(rows.encode())
    truncated = tmp_path / "truncated.csv.gz"
    truncated.write_bytes(whole[:len(whole) // 2])
    items = fixtures / "csv" / "items.csv"
    with pytest.raises(CPRecError, match=r"truncated\.csv\.gz: not a readable gzip file after line \d+ "):
        prep_read(TableSource("csv", truncated, items), tmp_path)
    fake = tmp_path / "fake.csv.gz"
    fake.write_text(rows)  # plain text behind a .gz name
    with pytest.raises(CPRecError, match=r"fake\.csv\.gz: not a readable gzip file after line 0 "):
        prep_read(TableSource("csv", fake, items), tmp_path)

    reviews = tmp_path / "Books.json.gz"  # JSON lines, read line by line: the line reached is exact
    text = "".join(f'{{"reviewerID": "u{i}", "asin": "a", "unixReviewTime": {i}}}\n' for i in range(20000))
    reviews.write_bytes(gzip.compress(text.encode())[:-100])
    meta = prep_write(tmp_path / "meta_Books.json", b'{"asin": "a", "title": "A"}\n')
    with pytest.raises(CPRecError, match=r"Books\.json\.gz: not a readable gzip file after line \d+ ") as err:
        prep_read(AmazonReviews("amazon2018", {"Books": (reviews, meta)}), tmp_path)
    assert 0 < int(re.search(r"after line (\d+)", str(err.value)).group(1)) < 20000

    assert main(["prepare", "--out", str(tmp_path / "out"), "--source", "csv", f"input.interactions={fake}",
                 f"input.items={items}", "downstream_domains=[]"]) == 2


def test_malformed_yaml_in_a_config_file_or_override_is_named(tmp_path, capsys):
    """Fault: a YAML syntax error in --config or in a key=value override ended in a bare yaml traceback."""
    from cprec.cli import main
    from cprec.config import ConfigError, load_config
    from cprec.data.prepare import PrepareConfig

    config = tmp_path / "prepare.yaml"
    config.write_text("source: synthetic\ndownstream_domains: [Games\nk_core: 3\n")
    with pytest.raises(ConfigError, match=r"prepare\.yaml: not valid YAML at line 3, column 7: expected ',' or "
                                          r"'\]', but got ':' \(while parsing a flow sequence started at line 2, "
                                          r"column 21\)"):
        load_config(PrepareConfig, config)
    with pytest.raises(ConfigError, match=r"override 'downstream_domains=\[Games': not valid YAML .*expected "
                                          r"',' or '\]'.*quote"):
        load_config(PrepareConfig, None, ["k_core=3", "downstream_domains=[Games"])
    assert main(["prepare", "--out", str(tmp_path / "out"), "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cprec prepare: error: ") and "prepare.yaml" in err and len(err.splitlines()) == 1


def test_override_of_a_key_and_of_a_key_under_it_is_a_clear_clash(tmp_path, capsys):
    """Fault: `input=x input.items=y` ended in a TypeError traceback (and the reverse order hid one of them)."""
    from cprec.cli import main
    from cprec.config import ConfigError, parse_overrides

    with pytest.raises(ConfigError, match=r"overrides 'input=x' and 'input\.items=y' clash: .*'input'"):
        parse_overrides(["input=x", "input.items=y"])
    with pytest.raises(ConfigError, match=r"overrides 'input\.items=y' and 'input=x' clash: .*'input'"):
        parse_overrides(["input.items=y", "k_core=3", "input=x"])
    with pytest.raises(ConfigError, match=r"overrides 'input=\{path: a\}' and 'input\.path\.deep=1' clash"):
        parse_overrides(["input={path: a}", "input.path.deep=1"])
    assert parse_overrides(["k_core=3", "input.items=y", "input={path: a}", "input.path=b", "k_core=4"]) == {
        "k_core": 4, "input": {"path": "b"}}  # later wins, as before, where nothing clashes
    assert main(["prepare", "--out", str(tmp_path / "out"), "--source", "csv", "input=x", "input.items=y"]) == 2
    assert "clash" in capsys.readouterr().err


@pytest.mark.parametrize("overwrite", [True, False])
def test_prepare_into_an_existing_file_fails_before_any_work(tmp_path, overwrite):
    """Fault: --out FILE --overwrite failed only after all the work, leaving FILE.partial behind."""
    from cprec.config import from_dict
    from cprec.data.prepare import PrepareConfig, prepare
    from cprec.errors import CPRecError

    out = tmp_path / "notes.txt"
    out.write_text("keep me")
    cfg = from_dict(PrepareConfig, {"source": "synthetic", "synthetic": {"users": 50}, "k_core": 2})
    with pytest.raises(CPRecError, match=r"notes\.txt exists and is not a directory; choose another --out"):
        prepare(cfg, out, overwrite=overwrite)
    assert out.read_text() == "keep me" and not (tmp_path / "notes.txt.partial").exists()


def test_float_keys_accept_exponent_strings_that_yaml_leaves_as_text(tmp_path):
    """Fault: the README's `schedule.peak_lr=1e-4` was refused: YAML 1.1 reads 1e-4 (no dot) as a string."""
    import dataclasses

    from cprec.config import ConfigError, load_config
    from cprec.schedule import ScheduleConfig

    run = dataclasses.make_dataclass("Run", [
        ("schedule", ScheduleConfig, dataclasses.field(default_factory=ScheduleConfig)),
        ("weights", list[float], dataclasses.field(default_factory=list))])
    cfg = load_config(run, None, ["schedule.peak_lr=1e-4", "schedule.min_lr=3E-5", "schedule.warmup_start_lr=.5e-5",
                                  "weights=[1e-3, +2e0, 7]"])
    assert (cfg.schedule.peak_lr, cfg.schedule.min_lr, cfg.schedule.warmup_start_lr) == (1e-4, 3e-5, 0.5e-5)
    assert cfg.weights == [1e-3, 2.0, 7.0] and all(type(w) is float for w in cfg.weights)
    config = tmp_path / "run.yaml"
    config.write_text("schedule:\n  peak_lr: 1e-4\n  min_lr: '3E-5'\n")
    cfg = load_config(run, config)
    assert (cfg.schedule.peak_lr, cfg.schedule.min_lr) == (1e-4, 3e-5)

    for bad in ["schedule.peak_lr=nan", "schedule.peak_lr=inf", "schedule.peak_lr=1e-4x", "schedule.peak_lr=e-4",
                "schedule.peak_lr=ten"]:
        with pytest.raises(ConfigError, match=r"'schedule\.peak_lr' must be a number"):
            load_config(run, None, [bad])
    with pytest.raises(ConfigError, match=r"'schedule\.warmup_steps' must be an integer, got '1e3'"):
        load_config(run, None, ["schedule.warmup_steps=1e3"])  # only float keys read exponent strings


# ================================================================ pack, shards and inspect
# (section B)



# ================================================================ train, checkpoints, export, sft, evaluate
# (section C)
