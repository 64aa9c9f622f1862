"""The fault suite: what a hostile but fair user does to CPRec, and what CPRec must do in return.

Each test is one fault case (issue 12 and the cases found since): it fails on the code before its fix. Fast,
CPU only; tiny random models and small generated data. docs/faults.md summarises the cases.
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
    from cprec.experiment import load_experiment_config  # `cprec experiment` reads its file the same way

    with pytest.raises(ConfigError, match=r"prepare\.yaml: not valid YAML at line 3, column 7"):
        load_experiment_config(config)
    config.with_name("list.yaml").write_text("- prepare\n- train\n")
    with pytest.raises(ConfigError, match=r"list\.yaml: the top level must be a mapping"):
        load_experiment_config(config.with_name("list.yaml"))
    config.with_name("sizes.yaml").write_text("sizes:\n  small: 3\n")  # an overlay that is not a mapping
    with pytest.raises(ConfigError, match=r"sizes\.yaml: 'sizes\.small' must be a mapping, got int"):
        load_experiment_config(config.with_name("sizes.yaml"), "small")
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
    with pytest.raises(CPRecError, match=r"notes\.txt: exists and is not a folder; choose a new one"):
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
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


def _b_pack(prepared, tokenizer, out, **kw):
    """Pack as tests/test_pack.py does: rows of 128 tokens (prepared_small's budget), small shards."""
    from cprec.data.pack import PackConfig, pack

    return pack(prepared, str(tokenizer), out, PackConfig(**{"seq_len": 128, "shard_rows": 16, **kw}))


def _b_cli(argv, capsys) -> tuple[int, str, str]:
    from cprec.cli import main

    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _b_files(root: Path) -> dict[str, bytes]:
    """Every file's bytes, less the folder lock (`staging.LOCK_FILE`: it names the last command that held it)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".cprec.lock"}


def test_pack_refuses_an_out_that_holds_other_things(prepared_small, tiny_tokenizer, tmp_path, capsys):
    """Fault: `pack --out PROJECT` deleted the prepared manifest, a run's lineage.json and unrelated files."""
    from cprec.errors import CPRecError

    project = tmp_path / "project"
    for rel in ("prepared/manifest.json", "run/lineage.json", "notes/todo.txt", "notes/00001.json", "notes/a.zst",
                "notes/b.json.tmp1"):
        (project / rel).parent.mkdir(parents=True, exist_ok=True)
        (project / rel).write_text(rel)
    before = _b_files(project)
    with pytest.raises(CPRecError, match=r"project: a non-empty folder that no pack made \(it holds 'notes/' and 2 more"):
        _b_pack(prepared_small, tiny_tokenizer, project)
    assert _b_files(project) == before
    rc, _, err = _b_cli(["pack", "--input", prepared_small, "--tokenizer", tiny_tokenizer, "--out", project,
                         "--seq-len", 128], capsys)
    assert rc == 2 and err.count("\n") == 1 and "no pack made" in err and "Traceback" not in err
    assert _b_files(project) == before


def test_repack_removes_only_what_pack_wrote(prepared_small, tiny_tokenizer, tmp_path):
    """Inside its own output pack deletes stale shards, sidecars and temporaries, and nothing else."""
    from cprec.data.shards import ShardSet

    out = tmp_path / "shards"
    _b_pack(prepared_small, tiny_tokenizer, out)
    foreign = {"README.md": "mine", "mixed/notes.txt": "mine", "mixed/summary.json": "mine",
               "extra/keep.json": "mine", "extra/keep.zst": "mine"}
    for rel, text in foreign.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text(text)
    (out / "mixed" / "00999.zst").write_bytes(b"stale")  # pack-shaped: an earlier run's, removed
    (out / "mixed" / "00999.json.tmp77").write_bytes(b"stale")
    again = _b_pack(prepared_small, tiny_tokenizer, out)
    assert again["report"]["reused_shards"] == again["report"]["shards"]
    assert all((out / rel).read_text() == text for rel, text in foreign.items())
    assert not (out / "mixed" / "00999.zst").exists() and not (out / "mixed" / "00999.json.tmp77").exists()
    assert ShardSet(out).verify() == again["report"]["shards"]


@pytest.fixture
def _b_packed_copy(prepared_small, tiny_tokenizer, tmp_path):
    out = tmp_path / "shards"
    _b_pack(prepared_small, tiny_tokenizer, out)
    return out


def test_inspect_verify_refuses_an_edited_index(_b_packed_copy, capsys):
    """Fault: `inspect --verify` said "consistent" after a stream's totals were edited in index.json."""
    from cprec.data.shards import ShardError, ShardSet

    out = _b_packed_copy
    index = json.loads((out / "index.json").read_text())
    index["streams"]["mixed"]["rows"] *= 3  # the mixture weighs streams by these totals
    (out / "index.json").write_text(json.dumps(index, indent=2))
    rc, _, err = _b_cli(["inspect", out, "--verify"], capsys)
    assert rc == 2 and err.count("\n") == 1 and "index.json: index checksum mismatch" in err
    with pytest.raises(ShardError, match=r"index\.json: index checksum mismatch"):
        ShardSet(out)  # what training loads: refused too
    del index["index_checksum"]  # an unsealed index (older CPRec, or the key removed) is refused as well
    (out / "index.json").write_text(json.dumps(index))
    with pytest.raises(ShardError, match=r"index\.json: no index_checksum .* re-run the same `cprec pack`"):
        ShardSet(out)


def test_verify_recomputes_totals_and_finds_unlisted_shards(_b_packed_copy):
    """An index that checks out but disagrees with its shards (edited, then re-sealed) still fails verify."""
    from cprec.data import shards
    from cprec.data.shards import ShardError, ShardSet

    out = _b_packed_copy
    index = json.loads((out / "index.json").read_text())
    edited = json.loads(json.dumps(index))
    edited["streams"]["mixed"]["tokens"] += 1000
    shards.write_index(out, edited)
    with pytest.raises(ShardError, match=r"index\.json: stream 'mixed' tokens total is \d+, its shard entries sum"):
        ShardSet(out).verify()
    st = index["streams"]["mixed"]
    gone = st["shards"].pop(1)  # a shard's entry removed, the totals made to agree
    for key in ("rows", "tokens", "documents", "bytes"):
        st[key] -= gone[key]
    shards.write_index(out, index)
    with pytest.raises(ShardError, match=f"lists no entry for 1 shard file.*: {gone['file']}"):
        ShardSet(out).verify()


def test_pack_refuses_seq_len_below_the_prepared_budget(prepared_small, tiny_tokenizer, tmp_path, capsys):
    """Fault: --seq-len shorter than the prepared documents cut every full window and exited 0."""
    from cprec.errors import CPRecError

    with pytest.raises(CPRecError, match=r"seq_len=64 is shorter .* window_tokens=127 .* need seq_len=128"):
        _b_pack(prepared_small, tiny_tokenizer, tmp_path / "s", seq_len=64)
    assert not (tmp_path / "s").exists()  # refused before anything is written
    rc, _, err = _b_cli(["pack", "--input", prepared_small, "--tokenizer", tiny_tokenizer, "--out", tmp_path / "s",
                         "--seq-len", 100], capsys)
    assert rc == 2 and err.count("\n") == 1 and "seq_len=100" in err and "seq_len=128" in err


def test_pack_fails_past_max_split_fraction(tiny_tokenizer, tmp_path):
    """Without a token budget to check up front, the documents cut while packing decide."""
    from cprec.config import from_dict
    from cprec.data.pack import PackConfig
    from cprec.data.prepare import PrepareConfig, prepare
    from cprec.data.shards import ShardSet
    from cprec.errors import CPRecError
    from tests.conftest import SMALL_WORLD

    prepared = tmp_path / "p"  # budgeted in characters: nothing to compare seq_len with before packing
    prepare(from_dict(PrepareConfig, {"source": "synthetic", "synthetic": SMALL_WORLD, "k_core": 2}), prepared)
    with pytest.raises(CPRecError, match=r"stream '.+': [\d,]+ of [\d,]+ documents \(.*%\) are longer than "
                                         r"seq_len=32 .* max_split_fraction=0.01; no index was written"):
        _b_pack(prepared, tiny_tokenizer, tmp_path / "s", seq_len=32)
    assert not (tmp_path / "s" / "index.json").exists()
    accepted = _b_pack(prepared, tiny_tokenizer, tmp_path / "s", seq_len=32, max_split_fraction=1.0)
    assert accepted["report"]["reused_shards"] == accepted["report"]["shards"]  # the shards were kept
    assert ShardSet(tmp_path / "s").verify() == accepted["report"]["shards"]
    with pytest.raises(CPRecError, match=r"max_split_fraction must be in \[0, 1\], got 2"):
        PackConfig(max_split_fraction=2).validate()


def test_inspect_row_out_of_range_names_the_stream(_b_packed_copy, capsys):
    """Fault: `inspect --row N` past the end (or an unknown --stream) ended in a bare traceback."""
    out = _b_packed_copy
    rows = json.loads((out / "index.json").read_text())["streams"]["mixed"]["rows"]
    for row in (rows, -1):
        rc, printed, err = _b_cli(["inspect", out, "--stream", "mixed", "--row", row], capsys)
        assert rc == 2 and err.count("\n") == 1 and printed == ""
        assert f"row {row} is out of range: stream 'mixed' has {rows:,} rows (0 to {rows - 1:,})" in err
    rc, _, err = _b_cli(["inspect", out, "--stream", "no-such", "--row", 0], capsys)
    assert rc == 2 and err.count("\n") == 1 and "no stream 'no-such' (streams: " in err and "mixed" in err


def test_full_disk_while_packing_names_the_path_and_resumes(prepared_small, tiny_tokenizer, tmp_path, monkeypatch):
    """Fault: ENOSPC while writing a shard or the index. The error names the file, says nothing valid was
    lost, and a re-run resumes from the completed shards."""
    from cprec.data.shards import ShardSet
    from cprec.errors import CPRecError

    real_fsync, writes, failed = os.fsync, [], []

    def full_disk(target):
        def fsync(fd):
            path = os.readlink(f"/proc/self/fd/{fd}")
            writes.append(path)
            if target(path, writes):
                failed.append(path)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as write(2) reports it: no file name
            return real_fsync(fd)
        return fsync

    out = tmp_path / "s"
    third_shard = lambda path, w: ".zst.tmp" in path and sum(".zst.tmp" in p for p in w) == 3
    monkeypatch.setattr(os, "fsync", full_disk(third_shard))
    with pytest.raises(CPRecError) as exc:
        _b_pack(prepared_small, tiny_tokenizer, out, workers=1)
    shard = failed[0].rsplit(".tmp", 1)[0]
    assert str(exc.value).startswith(f"{shard}: no space left on device")
    assert "Nothing valid was lost" in str(exc.value) and "re-run the same command to resume" in str(exc.value)
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]  # the cut-short write does not take space
    assert not (out / "index.json").exists()

    monkeypatch.setattr(os, "fsync", full_disk(lambda path, w: "index.json.tmp" in path))
    with pytest.raises(CPRecError, match=r"index\.json: no space left on device .* Nothing valid was lost"):
        _b_pack(prepared_small, tiny_tokenizer, out, workers=1)

    monkeypatch.setattr(os, "fsync", real_fsync)
    done = _b_pack(prepared_small, tiny_tokenizer, out, workers=1)
    assert done["report"]["reused_shards"] == done["report"]["shards"]  # every shard survived the failed index
    assert ShardSet(out).verify() == done["report"]["shards"]


_B_SLOW_PACK = '''
import os, sys, time
from pathlib import Path

import cprec.data.pack as pack_module
from cprec.cli import main

marks = Path(sys.argv[1])


def pack_shard(task):  # the workers' task, made slow: they are busy when pack is killed
    (marks / str(os.getpid())).touch()
    time.sleep(120)


pack_module.pack_shard = pack_shard
sys.exit(main(sys.argv[2:]))
'''


def _b_alive(pid: int) -> bool:
    """Running (a zombie that nobody reaps is dead)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux's")
def test_pack_workers_die_with_a_killed_pack(prepared_small, tiny_tokenizer, tmp_path):
    """Fault: after kill -9 of `cprec pack --workers 2` its workers stayed alive for minutes."""
    import cprec

    script, marks = tmp_path / "slow_pack.py", tmp_path / "marks"
    script.write_text(_B_SLOW_PACK)
    marks.mkdir()
    env = {**os.environ, "PYTHONPATH": str(Path(cprec.__file__).parents[1])}
    proc = subprocess.Popen([sys.executable, str(script), str(marks), "pack", "--input", str(prepared_small),
                             "--tokenizer", str(tiny_tokenizer), "--out", str(tmp_path / "s"), "--seq-len", "128",
                             "--shard-rows", "16", "--workers", "2"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while len(workers) < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
            workers = [int(p.name) for p in marks.iterdir()]
        assert len(workers) == 2, "the workers did not start"
        for pid in workers:  # children of pack, busy in their task
            assert int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]) == proc.pid
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        deadline = time.monotonic() + 3
        while any(map(_b_alive, workers)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [pid for pid in workers if _b_alive(pid)], "a pack worker outlived the killed pack"
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in workers:
            if _b_alive(pid):
                os.kill(pid, signal.SIGKILL)



# ================================================================ train, checkpoints, export, sft, evaluate
# (section C)

import json as _json
import os as _os
import shutil as _shutil
import signal as _signal
import subprocess as _subprocess
import sys as _sys
import time as _time

import pytest

from cprec import checkpoint as _ckpt
from tests.helpers import REPO, file_tree, metrics, refused, run_cli

def _copy_run(tiny, name):
    _shutil.copytree(tiny / "done", tiny / name)
    return tiny / name


@pytest.mark.slow
def test_a_refused_command_destroys_its_process_group_before_exiting(tiny):
    """A refusal raised after the process group opened still destroys the group before the interpreter's
    teardown: left open, gloo's threads aborted that teardown once in CI (exit -6, not 2)."""
    run = _copy_run(tiny, "refused_group")
    script = ("import sys, torch.distributed as dist; from cprec.cli import main; code = main(sys.argv[1:]); "
              "print('open' if dist.is_initialized() else 'destroyed', code, flush=True); sys.exit(code)")
    proc = _subprocess.run([_sys.executable, "-c", script, "train", "--config", str(tiny / "tiny.yaml"),
                            f"run_dir={run}", "--resume", "schedule.peak_lr=0.1"],
                           capture_output=True, text=True, timeout=600)
    assert proc.stdout.split()[-2:] == ["destroyed", "2"], proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.returncode == 2, proc.stderr[-3000:]


@pytest.mark.slow
def test_export_never_removes_a_folder_that_is_not_an_earlier_export(tiny):
    run = _copy_run(tiny, "export_target")
    before = file_tree(run)
    last = run / "checkpoints" / _ckpt.tag_for(4)
    refused(run_cli("export", last, "--out", run, check=False), "no export made")
    assert file_tree(run) == before  # every checkpoint and the metrics are still there
    run_cli("export", last, "--out", tiny / "hf_once")
    refused(run_cli("export", last, "--out", tiny / "hf_once", check=False), "--overwrite")
    run_cli("export", run / "checkpoints" / _ckpt.tag_for(2), "--out", tiny / "hf_once", "--overwrite")
    assert _json.loads((tiny / "hf_once" / "cprec_export.json").read_text())["step"] == 2
    mine = tiny / "hf_once.partial"  # a folder of the user's, named like export's staging folder
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    refused(run_cli("export", last, "--out", tiny / "hf_once", "--overwrite", check=False),
             "hf_once.partial exists and is not a folder CPRec set aside")
    assert (mine / "notes.txt").read_text() == "mine"
    assert _json.loads((tiny / "hf_once" / "cprec_export.json").read_text())["step"] == 2


@pytest.mark.slow
def test_a_refused_resume_writes_nothing_and_names_the_changed_keys(tiny):
    run = _copy_run(tiny, "refused")
    before = file_tree(run)
    refused(run_cli("train", "--config", tiny / "tiny.yaml", f"run_dir={run}", "--resume", "schedule.peak_lr=0.1",
                  check=False), "schedule.peak_lr: 0.003 -> 0.1")
    refused(run_cli("train", "--config", tiny / "tiny.yaml", f"run_dir={run}", "--resume",
                  "model.config.hidden_size=64", check=False), "hidden_size")
    assert file_tree(run) == before  # config.yaml, model/config.json and lineage.json untouched
    run_cli("train", "--resume", f"run_dir={run}")  # a plain resume is still accepted (the run is finished)
    run_cli("export", run / "checkpoints" / _ckpt.tag_for(4), "--out", tiny / "hf_refused")  # and still exports


@pytest.mark.slow
def test_resume_does_not_inherit_max_steps_from_the_saved_config(tiny):
    run = tiny / "max_steps"
    run_cli("train", "--config", tiny / "tiny.yaml", f"run_dir={run}", "max_steps=1")
    assert _ckpt.latest_complete(run / "checkpoints") == _ckpt.tag_for(1)
    run_cli("train", "--resume", f"run_dir={run}")  # no --config: the saved one, without its max_steps
    assert [r["step"] for r in metrics(run)] == [1, 2, 3, 4]
    assert [r["loss"] for r in metrics(run)] == [r["loss"] for r in metrics(tiny / "done")]


@pytest.mark.slow
def test_a_truncated_checkpoint_file_is_named_and_resume_falls_back(tiny):
    run = _copy_run(tiny, "truncated")
    damaged = run / "checkpoints" / _ckpt.tag_for(4)
    victim = sorted(damaged.glob("*model_states.pt"))[0]
    victim.write_bytes(victim.read_bytes()[:100])
    from cprec.errors import CPRecError
    from cprec.export import export

    with pytest.raises(CPRecError, match=f"{victim.name} has 100 bytes"):
        export(damaged, tiny / "hf_truncated")
    proc = run_cli("train", "--resume", f"run_dir={run}")
    assert f"checkpoint {_ckpt.tag_for(4)} is damaged" in proc.stdout and victim.name in proc.stdout
    assert "resumed" in proc.stdout and f"at step 3 from {_ckpt.tag_for(3)}" in proc.stdout
    assert [r["loss"] for r in metrics(run)] == [r["loss"] for r in metrics(tiny / "done")]


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [1, 2])
def test_sigterm_to_the_whole_process_group_with_loader_workers_still_saves(tiny, ranks):
    run = tiny / f"pgroup{ranks}"
    if ranks == 1:
        cmd = [_sys.executable, "-m", "cprec.cli", "train"]
    else:
        from tests.helpers import free_port

        cmd = [_sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), str(REPO / "launch" / "train.py")]
    cmd += ["--config", str(tiny / "tiny.yaml"), f"run_dir={run}", "loader_workers=2",
            "schedule.stable_steps=100000", "checkpoint.every=100000"]
    proc = _subprocess.Popen(cmd, stdout=_subprocess.PIPE, stderr=_subprocess.STDOUT, text=True,
                             start_new_session=True)
    deadline = _time.time() + 300
    while _time.time() < deadline and not ((run / "metrics.jsonl").is_file() and len(metrics(run)) >= 3):
        _time.sleep(0.2)
    _os.killpg(proc.pid, _signal.SIGTERM)  # what scancel or a pre-emption delivers: every process of the job
    out, _ = proc.communicate(timeout=300)
    if ranks == 1:
        assert proc.returncode == 0, out[-4000:]
    assert "SIGTERM: saved" in out, out[-4000:]
    tag = _ckpt.latest_complete(run / "checkpoints")
    assert tag is not None and _ckpt.read_state(run / "checkpoints" / tag)["step"] == metrics(run)[-1]["step"]


@pytest.mark.slow
def test_a_full_disk_while_saving_names_the_checkpoint_and_keeps_the_previous_one(tiny):
    import resource

    run = _copy_run(tiny, "full_disk")
    run_cli("train", "--config", tiny / "tiny.yaml", f"run_dir={tiny / 'nothing'}", "max_steps=0")  # size of a save
    limit = 64 * 1024  # bytes per file: the run's small files fit, a checkpoint's states do not

    def small_disk():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    _shutil.rmtree(run / "checkpoints" / _ckpt.tag_for(4))
    (run / "checkpoints" / _ckpt.LATEST).write_text(_ckpt.tag_for(3) + "\n")
    proc = run_cli("train", "--resume", f"run_dir={run}", check=False, preexec_fn=small_disk)
    refused(proc, f"could not write checkpoint {run / 'checkpoints' / _ckpt.tag_for(4)}",
             f"previous complete checkpoint ({_ckpt.tag_for(3)}) is intact")
    assert _ckpt.latest_complete(run / "checkpoints") == _ckpt.tag_for(3)
    resumed = run_cli("train", "--resume", f"run_dir={run}")  # room again: the partial save is removed, then redone
    assert "removed incomplete checkpoint(s) step00000004" in resumed.stdout
    assert [r["loss"] for r in metrics(run)] == [r["loss"] for r in metrics(tiny / "done")]


@pytest.mark.slow
def test_a_read_only_run_directory_is_named(tiny):
    run = tiny / "read_only"
    run.mkdir()
    if _os.geteuid() != 0:
        run.chmod(0o555)
    elif _subprocess.run(["chattr", "+i", str(run)], capture_output=True).returncode:  # root ignores modes
        pytest.skip("as root, a read-only folder needs chattr +i, which this filesystem refuses")
    try:
        proc = run_cli("train", "--config", tiny / "tiny.yaml", f"run_dir={run}", check=False)
    finally:
        if _os.geteuid() == 0:
            _subprocess.run(["chattr", "-i", str(run)], check=True)
        run.chmod(0o755)
    refused(proc, f"cannot write the run directory {run}")


@pytest.mark.slow
def test_bad_training_inputs_get_clear_errors(tiny):
    from cprec.data.shards import write_random_shardset

    write_random_shardset(tiny / "wide_shards", {"a": 16}, seq_len=32, shard_rows=16, vocab=1000)
    refused(run_cli("train", "--config", tiny / "tiny.yaml", f"run_dir={tiny / 'vocab'}",
                  f"shards={tiny / 'wide_shards'}", check=False), "1,000 tokens", "(128)")
    refused(run_cli("train", "--config", tiny / "tiny.yaml", f"run_dir={tiny / 'mt'}", "model.config.model_type=llamma",
                  check=False), "model.config", "llamma")
    refused(run_cli("train", "--config", tiny / "tiny.yaml", f"run_dir={tiny / 'zero'}", "schedule.warmup_steps=0",
                  "schedule.stable_steps=0", "schedule.anneal_steps=0", check=False), "the schedule has no steps")
    parent = _ckpt.tag_for(2)
    refused(run_cli("train", "--anneal-from", tiny / "done" / "checkpoints" / parent, "--anneal-steps", "2",
                  "--mixture", "books=abc", f"run_dir={tiny / 'mix'}", check=False), "--mixture books=abc")


@pytest.mark.slow
def test_a_second_trainer_without_a_launcher_does_not_collide_on_a_port(tiny):
    import socket

    with socket.socket() as busy:  # what a first trainer on the old fixed port 29511 held
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            busy.bind(("127.0.0.1", 29511))
        except OSError:
            pytest.skip("port 29511 is taken on this machine")
        busy.listen()
        run_cli("train", "--config", tiny / "tiny.yaml", f"run_dir={tiny / 'port'}", "max_steps=1",
             env={"MASTER_PORT": ""})  # unset: the trainer picks a free port


@pytest.mark.slow
def test_evaluation_refuses_what_it_cannot_evaluate(tiny, prepared_small, tmp_path):
    run_cli("export", tiny / "done" / "checkpoints" / _ckpt.tag_for(4), "--out", tmp_path / "hf")  # a random model:
    refused(run_cli("evaluate", "--model", tmp_path / "hf", "--data", prepared_small, "--out", tmp_path / "e",
                  check=False), "has no tokenizer")                                           # no tokenizer
    for users in ("0", "-3"):
        refused(run_cli("evaluate", "--model", tmp_path / "hf", "--data", prepared_small, "--out", tmp_path / "e",
                      "--users", users, check=False), "users must be at least 1", f"got {users}")
    from cprec.config import from_dict
    from cprec.data.prepare import PrepareConfig, prepare
    from tests.conftest import SMALL_WORLD

    flat = tmp_path / "no_downstream"  # every domain pre-trained on: nothing held out
    prepare(from_dict(PrepareConfig, {"source": "synthetic", "synthetic": SMALL_WORLD, "k_core": 2,
                                      "downstream_domains": []}), flat)
    refused(run_cli("evaluate", "--model", tmp_path / "hf", "--data", flat, "--out", tmp_path / "e", check=False),
             "no downstream domain to evaluate on")
    assert not (tmp_path / "e" / "results.json").exists()


def _readme_command_lines():
    """Every `cprec ...`, `launch/train.py ...` and `preprocess/*.py ...` command in the bash blocks of the
    README and of every page under docs/, as (program, argv)."""
    import re
    import shlex

    text = "\n".join(p.read_text(encoding="utf-8") for p in [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))])
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                words = shlex.split(part, comments=True)
                if words[:1] == ["cprec"]:
                    yield "cprec", words[1:]
                elif "launch/train.py" in words:
                    yield "launch/train.py", words[words.index("launch/train.py") + 1:]
                elif len(words) > 1 and words[1] in ("preprocess/prepare.py", "preprocess/pack.py"):
                    yield "cprec", [words[1].split("/")[1][:-3], *words[2:]]


def test_every_command_line_in_the_readme_parses_and_loads_its_config(monkeypatch):
    """README and CLI cannot drift apart: each command shown is parsed by the real parsers and its config
    loaded by the real loader (what needs an existing run or data is parsed only)."""
    from cprec import cli, finetune, quickstart
    from cprec.train import arguments

    monkeypatch.chdir(REPO)  # the README's paths are relative to the repository
    seen = set()
    for program, argv in _readme_command_lines():
        if program == "launch/train.py":
            args = arguments.parse_args(argv)
        else:
            args = cli.parse_args(argv)
            seen.add(args.command)
            if args.command == "train":
                args = arguments.split_mixture_overrides(args)
        command = getattr(args, "command", "train")
        try:
            if command == "train" and (args.config or not (args.resume or args.anneal_from)):
                arguments.train_config(args)
            elif command == "prepare":
                cli.prepare_config(args)
            elif command == "pack":
                cli.pack_config(args)
            elif command == "sft":
                finetune.load_sft_config(args.model, args.shards, args.out, args.overrides, args.config)
            elif command == "evaluate":
                cli.eval_config(args)
            elif command == "baseline":
                cli.baseline_configs(args)
            elif command == "quickstart":
                quickstart.quickstart_config(args)
            elif command == "experiment":
                from cprec.experiment import load_experiment_config

                load_experiment_config(args.config, args.size, args.overrides)
        except Exception as exc:
            raise AssertionError(f"README: {program} {' '.join(argv)}\n  -> {exc}") from exc
    assert seen >= {"prepare", "pack", "inspect", "train", "sft", "export", "evaluate", "baseline", "quickstart",
                    "sweep", "experiment"}


def test_prepare_overwrite_replaces_only_an_earlier_prepare_output(tmp_path):
    from cprec.config import from_dict
    from cprec.data.prepare import PrepareConfig, prepare
    from cprec.errors import CPRecError
    from tests.conftest import SMALL_WORLD

    cfg = from_dict(PrepareConfig, {"source": "synthetic", "synthetic": SMALL_WORLD, "k_core": 2})
    project = tmp_path / "project"
    (project / "run").mkdir(parents=True)
    (project / "notes.txt").write_text("mine")
    with pytest.raises(CPRecError, match="a non-empty folder that no prepare made"):
        prepare(cfg, project, overwrite=True)
    assert (project / "notes.txt").read_text() == "mine" and (project / "run").is_dir()
    prepare(cfg, tmp_path / "prepared")
    prepare(cfg, tmp_path / "prepared", overwrite=True)  # an earlier output of prepare is replaced
    assert (tmp_path / "prepared" / "manifest.json").is_file()


def test_prepare_never_removes_a_users_folder_named_like_its_staging_siblings(tmp_path):
    """`<out>.partial` and `<out>.replaced` are removed only when CPRec made them (`cprec.staging`)."""
    from cprec.config import from_dict
    from cprec.data.prepare import PrepareConfig, prepare
    from cprec.errors import CPRecError
    from cprec.staging import STAGING_MARKER
    from tests.conftest import SMALL_WORLD

    cfg = from_dict(PrepareConfig, {"source": "synthetic", "synthetic": SMALL_WORLD, "k_core": 2})
    out, partial, replaced = tmp_path / "prepared", tmp_path / "prepared.partial", tmp_path / "prepared.replaced"
    partial.mkdir()
    (partial / "thesis.tex").write_text("mine")
    with pytest.raises(CPRecError, match="prepared.partial exists and is not a folder CPRec set aside"):
        prepare(cfg, out)
    assert (partial / "thesis.tex").read_text() == "mine" and not out.exists()
    (partial / "thesis.tex").unlink()  # an empty folder (a kill between mkdir and marker) is CPRec's
    prepare(cfg, out)
    assert (out / "manifest.json").is_file() and not partial.exists() and not (out / STAGING_MARKER).exists()
    replaced.mkdir()  # the user's own folder, with a file named like a prepare output's
    (replaced / "manifest.json").write_text('{"stage": "prepare"}')
    with pytest.raises(CPRecError, match="prepared.replaced exists and is not a folder CPRec set aside"):
        prepare(cfg, out, overwrite=True)
    assert (replaced / "manifest.json").is_file() and (out / "manifest.json").is_file()
    # what a replacement killed between its two renames leaves: the old output marked aside, the new one
    # marked in .partial, nothing at out; the next run removes both and writes out again
    (replaced / STAGING_MARKER).touch()
    out.rename(partial)
    (partial / STAGING_MARKER).touch()
    prepare(cfg, out)
    assert not replaced.exists() and not partial.exists() and (out / "manifest.json").is_file()
    link = tmp_path / "link"
    link.symlink_to(out)
    with pytest.raises(CPRecError, match="is a symbolic link"):
        prepare(cfg, link, overwrite=True)
    assert (out / "manifest.json").is_file() and link.is_symlink()


def test_staging_commit_never_replaces_a_folder_filled_while_the_stage_ran(tmp_path):
    from cprec import staging
    from cprec.errors import CPRecError

    out = tmp_path / "out"
    staged = staging.begin(out)
    (staged / "result.txt").write_text("new")
    out.mkdir()  # filled by the user while the stage ran
    (out / "notes.txt").write_text("mine")
    with pytest.raises(CPRecError, match="was filled while this stage ran"):
        staging.commit(staged, out, is_output=lambda folder: (folder / "result.txt").is_file())
    assert (out / "notes.txt").read_text() == "mine" and (staged / "result.txt").read_text() == "new"
    (out / "notes.txt").unlink()
    staging.commit(staged, out, is_output=lambda folder: (folder / "result.txt").is_file())  # an empty out
    assert sorted(p.name for p in out.iterdir()) == ["result.txt"] and not staged.exists()


# ================================================================ anneal sweeps
# (section E; a sweep killed half way is in test_sweep.py, beside the uninterrupted sweep it must equal)

def test_retention_removes_a_pruned_checkpoints_universal_conversion_and_nothing_else(tmp_path):
    """An elastic resume leaves `<tag>_universal` beside its checkpoint (a second full copy); retention
    removes it with its checkpoint, keeps those of kept checkpoints, and leaves foreign folders alone."""
    root = tmp_path / "checkpoints"
    for step in (2, 4, 6, 8):
        (root / _ckpt.tag_for(step)).mkdir(parents=True)
        _ckpt.mark_complete(root, _ckpt.tag_for(step), {"step": step})
        (root / f"{_ckpt.tag_for(step)}_universal").mkdir()
    (root / "notes").mkdir()
    removed = _ckpt.prune(root, keep_last=2, is_branch_point=lambda step: step == 2)
    assert removed == [_ckpt.tag_for(4)]
    left = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert left == sorted(["notes", *(f"{_ckpt.tag_for(s)}{x}" for s in (2, 6, 8) for x in ("", "_universal"))])
