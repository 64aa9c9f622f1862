"""The fault suite: what a hostile but fair user does to CPRec, and what CPRec must do in return.

Each test is one fault case (issue 12 and the cases found since): it fails on the code before its fix. Fast,
CPU only; tiny random models and small generated data. The README's "Faults" table summarises the cases.
"""

from __future__ import annotations


# ================================================================ prepare: readers, inputs and configs
# (section A)



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
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_pack_refuses_an_out_that_holds_other_things(prepared_small, tiny_tokenizer, tmp_path, capsys):
    """Fault: `pack --out PROJECT` deleted the prepared manifest, a run's lineage.json and unrelated files."""
    from cprec.errors import CPRecError

    project = tmp_path / "project"
    for rel in ("prepared/manifest.json", "run/lineage.json", "notes/todo.txt", "notes/00001.json", "notes/a.zst",
                "notes/b.json.tmp1"):
        (project / rel).parent.mkdir(parents=True, exist_ok=True)
        (project / rel).write_text(rel)
    before = _b_files(project)
    with pytest.raises(CPRecError, match=r"project: not empty and not a pack output \(it holds 'notes/' and 2 more"):
        _b_pack(prepared_small, tiny_tokenizer, project)
    assert _b_files(project) == before
    rc, _, err = _b_cli(["pack", "--input", prepared_small, "--tokenizer", tiny_tokenizer, "--out", project,
                         "--seq-len", 128], capsys)
    assert rc == 2 and err.count("\n") == 1 and "not a pack output" in err and "Traceback" not in err
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
