"""The pack stage and the shard format: round trip, packing guarantees, determinism, corruption, resume."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cprec.backbone import load_tokenizer
from cprec.cli import main
from cprec.data import shards
from cprec.data.pack import PackConfig, best_fit_decreasing, pack
from cprec.data.shards import ShardError, ShardSet
from cprec.errors import CPRecError

SEQ_LEN = 128


def run_pack(prepared, tokenizer, out, **kw):
    cfg = PackConfig(**{"seq_len": SEQ_LEN, "shard_rows": 16, **kw})
    return pack(prepared, str(tokenizer), out, cfg)


def tree_bytes(root: Path) -> dict:
    """Every file's bytes, less the folder lock (`staging.LOCK_FILE`: it names the last command that held it)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".cprec.lock"}


def documents_from_shards(data: ShardSet, stream: str) -> dict[int, tuple[list[int], int]]:
    """doc_index -> (token ids, prompt tokens), joining the pieces of documents that were cut."""
    docs: dict[int, tuple[list[int], int]] = {}
    for k in range(len(data.streams[stream]["shards"])):
        shard = data.shard(stream, k)
        for r in range(shard.tokens.shape[0]):
            a, b = shard.row_start[r], shard.row_start[r + 1]
            pos = 0
            for n, p, idx in zip(shard.doc_lens[a:b], shard.prompt_lens[a:b], shard.doc_index[a:b]):
                ids, prompt = docs.get(int(idx), ([], 0))
                docs[int(idx)] = (ids + shard.tokens[r, pos:pos + n].tolist(), prompt + int(p))
                pos += int(n)
            assert (shard.tokens[r, pos:] == data.index["pad_id"]).all()
    return docs


@pytest.fixture(scope="module")
def packed(prepared_small, tiny_tokenizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("packed") / "shards"
    index = run_pack(prepared_small, tiny_tokenizer, out)
    return out, index


def stream_files(prepared: Path) -> dict[str, Path]:
    files = {p.stem: p for p in (prepared / "documents").glob("*.jsonl")}
    files.update({f"sft-{p.parent.name}": p for p in (prepared / "downstream").glob("*/sft.jsonl")})
    return files


def test_round_trip_every_document(packed, prepared_small, tiny_tokenizer):
    out, index = packed
    data = ShardSet(out)
    tok = load_tokenizer(tiny_tokenizer)
    files = stream_files(prepared_small)
    assert set(files) == set(index["streams"]) and len(files) >= 6
    checked = 0
    for stream, path in files.items():
        prepared = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        docs = documents_from_shards(data, stream)
        assert sorted(docs) == list(range(len(prepared)))  # every document exactly once
        for idx, doc in enumerate(prepared):
            ids, prompt = docs[idx]
            assert ids[-1] == tok.eos_token_id
            assert tok.decode(ids[:-1]) == doc["text"]
            assert tok.decode(ids[:prompt]) == doc["text"][:doc["prompt_chars"]]
            checked += 1
    assert checked == sum(st["documents"] for st in index["streams"].values())
    assert any(st["kind"] == "sft" and st["documents"] for st in index["streams"].values())


def test_no_document_shorter_than_seq_len_is_split(packed):
    out, index = packed
    data = ShardSet(out)
    for stream in index["streams"]:
        seen = set()
        for k in range(len(data.streams[stream]["shards"])):
            for idx in data.shard(stream, k).doc_index.tolist():
                assert idx not in seen, f"document {idx} of {stream} was split"
                seen.add(idx)
        assert index["streams"][stream]["split_documents"] == 0


def prepare_in_chars(out: Path) -> Path:
    """The small synthetic world budgeted in characters: no token budget stops a short seq_len up front."""
    from cprec.config import from_dict
    from cprec.data.prepare import PrepareConfig, prepare
    from tests.conftest import SMALL_WORLD

    prepare(from_dict(PrepareConfig, {"source": "synthetic", "synthetic": SMALL_WORLD, "k_core": 2}), out)
    return out


def test_long_documents_are_cut_only_as_a_last_resort(tiny_tokenizer, tmp_path):
    index = run_pack(prepare_in_chars(tmp_path / "p"), tiny_tokenizer, tmp_path / "s", seq_len=32,
                     max_split_fraction=1.0)  # cutting most documents is accepted only when asked for
    data = ShardSet(tmp_path / "s")
    split = sum(st["split_documents"] for st in index["streams"].values())
    assert split > 0
    for k in range(len(data.streams["mixed"]["shards"])):
        shard = data.shard("mixed", k)
        assert shard.doc_lens.max() <= 32


def test_best_fit_slot_use_on_a_realistic_length_mix():
    rng = np.random.default_rng(0)
    seq_len = 1024
    full_windows = (seq_len - rng.integers(1, 12, 1500)).tolist()  # long histories cut into full windows
    short = np.clip(rng.lognormal(4.8, 0.8, 6000).astype(int), 20, seq_len).tolist()  # the rest
    lengths = full_windows + short
    rows = best_fit_decreasing(lengths, seq_len)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    fills = [sum(lengths[i] for i in r) for r in rows]
    assert max(fills) <= seq_len
    assert sum(lengths) / (len(rows) * seq_len) >= 0.99
    assert fills == sorted(fills, reverse=True)  # the emptiest rows come last


def test_output_is_byte_identical_for_one_and_three_workers(prepared_small, tiny_tokenizer, tmp_path):
    run_pack(prepared_small, tiny_tokenizer, tmp_path / "w1", workers=1)
    run_pack(prepared_small, tiny_tokenizer, tmp_path / "w3", workers=3)
    one, three = tree_bytes(tmp_path / "w1"), tree_bytes(tmp_path / "w3")
    assert one.keys() == three.keys() and len(one) > 10
    assert all(one[k] == three[k] for k in one)


def test_rerun_keeps_complete_shards(prepared_small, tiny_tokenizer, tmp_path):
    first = run_pack(prepared_small, tiny_tokenizer, tmp_path / "s")
    before = tree_bytes(tmp_path / "s")
    again = run_pack(prepared_small, tiny_tokenizer, tmp_path / "s")
    assert again["report"]["reused_shards"] == first["report"]["shards"] > 5
    assert tree_bytes(tmp_path / "s") == before
    changed = run_pack(prepared_small, tiny_tokenizer, tmp_path / "s", seq_len=160)  # new settings: nothing reused
    assert changed["report"]["reused_shards"] == 0
    assert ShardSet(tmp_path / "s").verify() == changed["report"]["shards"]


def test_token_dtype_follows_the_vocabulary(prepared_small, tiny_tokenizer, wide_tokenizer, tmp_path):
    assert shards.token_dtype(65_536) == np.dtype("<u2") and shards.token_dtype(65_537) == np.dtype("<u4")
    narrow = run_pack(prepared_small, tiny_tokenizer, tmp_path / "narrow")
    # a token per byte: documents run past seq_len, and cutting them is accepted here
    wide = run_pack(prepared_small, wide_tokenizer, tmp_path / "wide", max_split_fraction=1.0)
    assert narrow["dtype"] == "uint16" and wide["dtype"] == "uint32"
    data = ShardSet(tmp_path / "wide")
    tokens, lens, _ = data.row("mixed", 0)
    assert tokens.dtype == np.dtype("<u4") and tokens[:lens.sum()].min() >= 70_000
    tok = load_tokenizer(wide_tokenizer)
    first_doc = (Path(data.index["source"]["prepared"]) / "documents" / "mixed.jsonl").open().readline()
    docs = documents_from_shards(data, "mixed")
    assert tok.decode(docs[0][0][:-1]) == json.loads(first_doc)["text"]


@pytest.fixture
def damaged(packed, tmp_path):
    out, _ = packed
    copy = tmp_path / "copy"
    for rel, data in tree_bytes(out).items():
        (copy / rel).parent.mkdir(parents=True, exist_ok=True)
        (copy / rel).write_bytes(data)
    return copy


def first_shard(root: Path) -> tuple[dict, Path]:
    index = json.loads((root / "index.json").read_text())
    entry = index["streams"]["mixed"]["shards"][0]
    return entry, root / entry["file"]


def test_flipped_byte_is_detected_and_named(damaged):
    entry, path = first_shard(damaged)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=f"shard .*{entry['file']}: checksum mismatch"):
        ShardSet(damaged).row("mixed", 0)


def test_truncated_shard_is_detected_and_named(damaged):
    entry, path = first_shard(damaged)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ShardError, match=f"shard .*{entry['file']}: .* bytes on disk, the index says"):
        ShardSet(damaged).verify()


def test_missing_shard_is_detected_and_named(damaged):
    entry, path = first_shard(damaged)
    path.unlink()
    with pytest.raises(ShardError, match=f"shard .*{entry['file']}: missing"):
        ShardSet(damaged).verify()


def test_wrong_index_entry_is_detected(damaged):
    index = json.loads((damaged / "index.json").read_text())
    index["streams"]["mixed"]["shards"][0]["rows"] += 1
    shards.write_index(damaged, index)  # sealed: the index checks out, its entry does not match the shard
    with pytest.raises(ShardError, match="disagrees with the index"):
        ShardSet(damaged).verify()


def test_wrong_version_and_dtype_are_detected(damaged):
    index = json.loads((damaged / "index.json").read_text())
    (damaged / "index.json").write_text(json.dumps({**index, "version": 99}))
    with pytest.raises(ShardError, match="format version 99"):
        ShardSet(damaged)
    shards.write_index(damaged, {**index, "dtype": "uint32"})  # sealed, so the shard check is what fails
    with pytest.raises(ShardError, match="token dtype of 2 bytes, the index says uint32"):
        ShardSet(damaged).verify()


@pytest.mark.slow
def test_pack_killed_mid_write_then_rerun_is_identical(prepared_small, tiny_tokenizer, tmp_path):
    run_pack(prepared_small, tiny_tokenizer, tmp_path / "clean", workers=2)
    args = ["--input", str(prepared_small), "--tokenizer", str(tiny_tokenizer), "--out", str(tmp_path / "s"),
            "--seq-len", str(SEQ_LEN), "--shard-rows", "16", "--workers", "2"]
    cmd = [sys.executable, "-m", "cprec.cli", "pack", *args]
    killer = [sys.executable, str(Path(__file__).parent / "helpers" / "kill_shard_write.py"), *args]
    killed = subprocess.run(killer, env={**os.environ, "KILL_SHARD": "mixed/3"}, capture_output=True, text=True,
                            timeout=300)
    assert killed.returncode == 2 and "a pack worker died" in killed.stderr
    assert any(".tmp" in p.name for p in (tmp_path / "s" / "mixed").iterdir())  # the cut-short write
    assert not (tmp_path / "s" / "index.json").exists()
    resumed = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "kept from an earlier run" in resumed.stdout and "(0 kept" not in resumed.stdout
    assert tree_bytes(tmp_path / "s") == tree_bytes(tmp_path / "clean")


def test_pack_refuses_bad_inputs(tmp_path, tiny_tokenizer, prepared_small):
    with pytest.raises(CPRecError, match="manifest.json: missing"):
        run_pack(tmp_path, tiny_tokenizer, tmp_path / "s")
    with pytest.raises(CPRecError, match="neither 'smollm2' nor a folder"):
        pack(prepared_small, "no-such-tokenizer", tmp_path / "s", PackConfig())


def test_inspect_prints_the_table_and_decodes_a_row(packed, tiny_tokenizer, capsys):
    out, _ = packed
    assert main(["inspect", str(out), "--verify", "--stream", "sft-games", "--row", "0", "--tokenizer",
                 str(tiny_tokenizer)]) == 0
    text = capsys.readouterr().out
    assert "| mixed" in text and "slot use" in text and "verified" in text
    assert "<<<PROMPT ENDS>>>" in text and "User behaviour in Games" in text


def test_line_cache_equals_whole_document_tokenization(prepared_small, tiny_tokenizer, tmp_path):
    run_pack(prepared_small, tiny_tokenizer, tmp_path / "fast", line_cache=True)
    run_pack(prepared_small, tiny_tokenizer, tmp_path / "whole", line_cache=False)
    assert tree_bytes(tmp_path / "fast") == tree_bytes(tmp_path / "whole")


def test_line_cache_falls_back_when_lines_do_not_tokenize_independently(prepared_small, tmp_path):
    """A SentencePiece-style tokenizer (no split at newlines) makes the fast path unsafe: it must notice."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from cprec.data.pack import LineTokenizer

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    texts = [json.loads(line)["text"] for line in (prepared_small / "documents" / "mixed.jsonl").open()][:200]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=600, special_tokens=["<eos>", "<unk>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    line_tok = LineTokenizer(fast, np.dtype("<u2"), verify_every=1)
    got = line_tok(texts[:20], [0] * 20, fast.eos_token_id, 0)
    assert not line_tok.exact  # the mismatch was seen and the fast path switched off
    want = [fast(t, add_special_tokens=False)["input_ids"] + [fast.eos_token_id] for t in texts[:20]]
    assert [list(map(int, ids)) for ids, _ in got] == want
    fast.save_pretrained(str(tmp_path / "sp"))
    run_pack(prepared_small, tmp_path / "sp", tmp_path / "a", line_cache=True)
    run_pack(prepared_small, tmp_path / "sp", tmp_path / "b", line_cache=False)
    assert tree_bytes(tmp_path / "a") == tree_bytes(tmp_path / "b")
