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


@pytest.fixture
def _b_packed_copy(prepared_small, tiny_tokenizer, tmp_path):
    out = tmp_path / "shards"
    _b_pack(prepared_small, tiny_tokenizer, out)
    return out


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



# ================================================================ train, checkpoints, export, sft, evaluate
# (section C)
