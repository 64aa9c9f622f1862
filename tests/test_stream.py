"""The sample order, resume and collation."""

import collections
import itertools

import numpy as np
import pytest
import torch

from cprec.data.collate import IGNORE_INDEX, collate_rows
from cprec.data.shards import write_random_shardset
from cprec.data.stream import Interleave, PackedStream, normalize_mixture
from cprec.errors import CPRecError

MIX = {"books": 0.5, "music": 0.3, "mixed": 0.2}


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("random_shards")
    write_random_shardset(root, {"books": 230, "music": 70, "mixed": 41, "sft-games": 25}, seq_len=32,
                          shard_rows=16, kinds={"sft-games": "sft"})
    return root


def stream(shard_dir, **kw):
    args = {"mixture": MIX, "seed": 7, "global_batch": 8, **kw}
    return PackedStream(shard_dir, **args)


def test_realized_proportions_within_one_percent_and_reproducible(shard_dir):
    a, b = stream(shard_dir), stream(shard_dir)
    rows = a.rows_at(0, 10_000)
    assert rows == b.rows_at(0, 10_000)
    counts = collections.Counter(name for name, _, _ in rows)
    for name, w in MIX.items():
        assert abs(counts[name] / 10_000 - w) < 0.01
    assert counts["sft-games"] == 0


def test_interleave_seeks_without_replaying():
    il = Interleave(normalize_mixture({"a": 0.55, "b": 0.3, "c": 0.15}, ["a", "b", "c"]))
    full = list(itertools.islice(il.iterate(0), 3000))
    for n in (0, 1, 2, 7, 100, 1234, 2999):
        assert list(itertools.islice(il.iterate(n), 1)) == full[n:n + 1]
    prefix = collections.Counter(s for s, _ in full[:1777])
    assert il.counts_at(1777) == [prefix[0], prefix[1], prefix[2]]
    for n in range(0, 3000, 97):  # every stream stays within about a row of its quota
        counts = il.counts_at(n)
        assert all(abs(c - n * w) <= 1.5 for c, w in zip(counts, (0.55, 0.3, 0.15)))


def test_each_epoch_is_a_fresh_permutation_of_the_stream(shard_dir):
    s = stream(shard_dir, mixture={"mixed": 1.0})
    total = 41
    rows = s.rows_at(0, 3 * total)
    epochs = [rows[i * total:(i + 1) * total] for i in range(3)]
    everything = {(sh, r) for sh, n in enumerate([16, 16, 9]) for r in range(n)}
    for epoch in epochs:
        assert {(sh, r) for _, sh, r in epoch} == everything
    assert epochs[0] != epochs[1] != epochs[2]


def test_resume_at_any_step_sees_the_same_rows(shard_dir):
    straight = stream(shard_dir)
    it = iter(straight)
    reference = [next(it) for _ in range(12)]
    for cut in (0, 1, 5, 11):
        first = stream(shard_dir)
        for _ in range(cut):
            first.advance({"books": 10})
        saved = first.state_dict()
        resumed = stream(shard_dir)
        resumed.load_state_dict(saved)
        assert resumed.state.step == cut and resumed.state.tokens == ({"books": 10 * cut} if cut else {})
        it = iter(resumed)
        for step in range(cut, 12):
            batch = next(it)
            assert batch["step"] == step
            for key in ("input_ids", "labels", "position_ids", "cu_seqlens", "stream_ids"):
                assert torch.equal(batch[key], reference[step][key])


@pytest.mark.parametrize("world", [2, 4])
def test_global_batches_do_not_depend_on_the_world_size(shard_dir, world):
    one = stream(shard_dir)
    for step in (0, 3, 40):
        union = []
        for rank in range(world):
            union += stream(shard_dir, rank=rank, world_size=world).rank_rows(step)
        assert union == one.rank_rows(step)


def test_dataloader_workers_give_the_same_batches_in_order(shard_dir):
    direct = iter(stream(shard_dir))
    want = [next(direct) for _ in range(6)]
    for workers in (0, 2):
        loader = torch.utils.data.DataLoader(stream(shard_dir), batch_size=None, num_workers=workers,
                                             prefetch_factor=2 if workers else None)
        got = list(itertools.islice(loader, 6))
        assert [b["step"] for b in got] == list(range(6))
        assert all(torch.equal(g["input_ids"], w["input_ids"]) for g, w in zip(got, want))


def test_seeds_change_the_order(shard_dir):
    assert stream(shard_dir, seed=1).rows_at(0, 200) != stream(shard_dir, seed=2).rows_at(0, 200)


def test_resume_refuses_other_data_mixture_seed_or_batch(shard_dir, tmp_path):
    saved = stream(shard_dir).state_dict()
    with pytest.raises(CPRecError, match=r"another mixture \(books: 0.5 -> 0.6"):
        stream(shard_dir, mixture={**MIX, "books": 0.6}).load_state_dict(saved)
    with pytest.raises(CPRecError, match="seed 7 in the checkpoint, 8 now"):
        stream(shard_dir, seed=8).load_state_dict(saved)
    with pytest.raises(CPRecError, match="global batch 8 rows in the checkpoint, 16 now"):
        stream(shard_dir, global_batch=16).load_state_dict(saved)
    other = tmp_path / "other"
    write_random_shardset(other, {"books": 10, "music": 10, "mixed": 10}, seq_len=32, shard_rows=16, seed=3)
    with pytest.raises(CPRecError, match="the shards differ"):
        stream(other).load_state_dict(saved)
    # an anneal branch starts a new phase explicitly: accepted, at step 0 of the new phase's order
    saved["step"], saved["tokens"] = 9, {"books": 99}
    branch = stream(shard_dir)
    branch.load_state_dict(saved)
    branch.enter_phase("anneal", {"books": 1.0})
    assert branch.state.phase == "anneal" and branch.state.step == 0 and branch.state.tokens == {"books": 99}


def test_mixture_errors_name_the_stream(shard_dir):
    with pytest.raises(CPRecError, match="unknown stream 'jazz'"):
        stream(shard_dir, mixture={"jazz": 1.0})
    with pytest.raises(CPRecError, match="do not sum to a positive number"):
        stream(shard_dir, mixture={"books": 0.0})
    with pytest.raises(CPRecError, match="weight of stream 'books' must be a finite number >= 0"):
        stream(shard_dir, mixture={"books": -1})
    with pytest.raises(CPRecError, match="not divisible by the world size 3"):
        stream(shard_dir, world_size=3)


def test_collation_marks_documents_prompts_and_padding():
    tokens = np.array([5, 6, 7, 8, 9, 10, 11, 0, 0], dtype=np.uint16)  # docs of 3 and 4 tokens, 2 padding
    batch = collate_rows([(tokens, np.array([3, 4]), np.array([0, 2]))], [1])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10, 11, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 0, 1]]
    i = IGNORE_INDEX
    assert batch["labels"].tolist() == [[i, 6, 7, i, i, 10, 11, i, i]]  # 2nd doc: 2 prompt tokens
    assert batch["cu_seqlens"].tolist() == [0, 3, 7, 9] and batch["max_seqlen"] == 4
    assert batch["stream_ids"].tolist() == [1]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_row_equals_documents_one_by_one(attn):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    config._attn_implementation = attn
    model = LlamaForCausalLM(config).eval()
    docs = [torch.randint(1, 97, (n,)) for n in (6, 9, 4)]
    prompts = [0, 3, 0]
    seq_len = 24
    tokens = np.zeros(seq_len, dtype=np.uint16)
    tokens[:19] = torch.cat(docs).numpy()
    batch = collate_rows([(tokens, np.array([6, 9, 4]), np.array(prompts))])
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
        logits = packed.logits[0]
        loss_sum = torch.nn.functional.cross_entropy(logits[:-1], batch["labels"][0, 1:], reduction="sum",
                                                     ignore_index=IGNORE_INDEX)
        start, want_sum, want_count = 0, 0.0, 0
        for doc, prompt in zip(docs, prompts):
            alone = model(input_ids=doc[None], use_cache=False).logits[0]
            torch.testing.assert_close(logits[start:start + len(doc)], alone, rtol=1e-5, atol=1e-5)
            labels = doc.clone()
            labels[:max(prompt, 1)] = IGNORE_INDEX
            want_sum += torch.nn.functional.cross_entropy(alone[:-1], labels[1:], reduction="sum",
                                                          ignore_index=IGNORE_INDEX)
            want_count += int((labels[1:] != IGNORE_INDEX).sum())
            start += len(doc)
    assert int((batch["labels"] != IGNORE_INDEX).sum()) == want_count
    torch.testing.assert_close(loss_sum, torch.as_tensor(want_sum), rtol=1e-5, atol=1e-5)
