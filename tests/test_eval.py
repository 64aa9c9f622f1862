"""Evaluation: metrics, shared-cache candidate scoring, exact constrained top-K."""

import math

import numpy as np
import pytest
import torch

from cprec.data.template import render_example
from cprec.eval.metrics import rank_against_ties, ranking_metrics
from cprec.eval.scoring import TitleScorer, TitleTrie


def test_metrics_against_hand_computed_cases():
    ranks = [0, 3, None, 12, 25]
    m = ranking_metrics(ranks)
    assert m["HR@1"] == 1 / 5 and m["HR@5"] == 2 / 5 and m["HR@10"] == 2 / 5 and m["HR@20"] == 3 / 5
    assert m["NDCG@5"] == pytest.approx((1 + 1 / math.log2(5)) / 5)
    assert m["NDCG@20"] == pytest.approx((1 + 1 / math.log2(5) + 1 / math.log2(14)) / 5)
    # K larger than the ranked list: a target not in the list never counts
    assert ranking_metrics([None, None], hr_ks=(100,), ndcg_ks=(100,)) == {"HR@100": 0.0, "NDCG@100": 0.0}
    with pytest.raises(ValueError):
        ranking_metrics([])


def test_ties_count_against_the_target():
    assert rank_against_ties([0.5, 0.1, 0.2], 0) == 0
    assert rank_against_ties([0.5, 0.5, 0.2], 0) == 1  # one tie: ranked below it
    assert rank_against_ties([0.2, 0.5, 0.5, 0.2, 0.1], 0) == 3
    assert rank_against_ties([-1.0] * 100, 0) == 99


@pytest.fixture(scope="module")
def tiny(tiny_tokenizer):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=48, intermediate_size=96,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=256)).eval()
    return TitleScorer(model, tok, batch_size=7)


TITLES = [f"{w} Quest No. {i}" for w in ("Crimson", "Azure", "Golden", "Emerald", "Ivory") for i in range(1, 9)]
PROMPT = render_example("Games", ["Crimson Quest No. 2", "Azure Quest No. 5", "Crimson Quest No. 7"], None, 2000)[0]


def test_shared_cache_scores_equal_one_forward_per_candidate(tiny):
    cached = tiny.score(PROMPT, TITLES)
    naive = tiny.score_naive(PROMPT, TITLES)
    np.testing.assert_allclose(cached, naive, rtol=1e-5, atol=1e-5)
    assert len(set(np.round(cached, 4))) > 10  # the scores really differ between titles


def test_constrained_top_k_is_exact_and_only_yields_catalogue_titles(tiny):
    trie = TitleTrie([tiny.line_ids(t) for t in TITLES], TITLES)
    brute = tiny.score_naive(PROMPT, TITLES)
    order = np.argsort(-brute, kind="stable")
    for beam in (1, 4, 20):
        top = tiny.top_k(PROMPT, trie, k=10, beam=beam)
        assert [i for i, _ in top] == order[:10].tolist()
        np.testing.assert_allclose([s for _, s in top], brute[order[:10]], rtol=1e-5, atol=1e-5)
    exhaustive = tiny.top_k(PROMPT, trie, k=10, exhaustive_below=1000)
    assert [i for i, _ in exhaustive] == order[:10].tolist()
    everything = tiny.top_k(PROMPT, trie, k=len(TITLES) + 5, beam=8)  # K above the catalogue size
    assert sorted(i for i, _ in everything) == list(range(len(TITLES)))


def test_evaluate_end_to_end_with_shared_candidates(tiny, tiny_tokenizer, prepared_small, tmp_path, capsys):
    import json

    from cprec.cli import main

    model_dir = tmp_path / "model"
    tiny.model.save_pretrained(model_dir)
    tiny.tok.save_pretrained(model_dir)
    args = ["evaluate", "negatives=20", "--model", str(model_dir), "--data", str(prepared_small), "--users", "12",
            "--domains", "Games"]  # negatives=20: the small world has 40 items per domain
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    assert "### Games — full ranking, 12 test users" in capsys.readouterr().out
    results = json.loads((tmp_path / "a" / "results.json").read_text())
    games = results["domains"]["Games"]
    assert games["users"] == 12 and set(games) >= {"full", "sampled"}
    assert 0.0 <= games["full"]["HR@20"] <= 1.0 and games["sampled"]["candidates"] == 21
    rows = [json.loads(line) for line in (tmp_path / "a" / "candidates" / "games.jsonl").read_text().splitlines()]
    test = {json.loads(line)["user"]: json.loads(line) for line in
            (prepared_small / "downstream" / "games" / "test.jsonl").read_text().splitlines()}
    for row in rows:
        cands = row["candidates"]
        assert cands[0] == row["target"] and len(set(cands)) == 21
        assert not set(cands[1:]) & (set(test[row["user"]]["history"]) | {row["target"]})
    # a second model (here the same) scored on the saved candidates gets the same sampled numbers
    assert main(args + ["--out", str(tmp_path / "b"), "--protocol", "sampled",
                        "--candidates", str(tmp_path / "a" / "candidates")]) == 0
    again = json.loads((tmp_path / "b" / "results.json").read_text())["domains"]["Games"]["sampled"]
    assert {k: v for k, v in again.items() if k != "seconds_per_user"} == \
        {k: v for k, v in games["sampled"].items() if k != "seconds_per_user"}


def test_sasrec_learns_a_planted_order():
    from cprec.eval.sasrec import SASRecConfig, next_item_scores, train_sasrec

    rng = np.random.default_rng(0)
    n = 30  # every user walks the items in the cycle 0 -> 1 -> ... -> 29 -> 0 from a random start
    seqs = [[(s + i) % n for i in range(int(rng.integers(6, 15)))] for s in rng.integers(0, n, 300)]
    model = train_sasrec(seqs, n, SASRecConfig(hidden=32, epochs=100, dropout=0.1, max_len=20))
    histories = [[(s + i) % n for i in range(5)] for s in range(n)]
    ranks = [rank_against_ties(scores, (s + 5) % n) for s, scores in enumerate(next_item_scores(model, histories))]
    assert ranking_metrics(ranks)["HR@1"] >= 0.9


def test_sasrec_baseline_command_writes_results(prepared_small, tmp_path, capsys):
    import json

    from cprec.cli import main

    assert main(["baseline", "sasrec", "epochs=3", "negatives=20", "--data", str(prepared_small), "--out",
                 str(tmp_path / "s"), "--users", "12"]) == 0
    results = json.loads((tmp_path / "s" / "results.json").read_text())
    assert set(results["domains"]) == {"Games", "Toys"}
    assert results["domains"]["Games"]["users"] == 12 and "HR@10" in results["domains"]["Games"]["full"]
    assert "### Games — full ranking, 12 test users" in capsys.readouterr().out
    rows = [json.loads(line) for line in (tmp_path / "s" / "ranks.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 2 * 12 and {r["protocol"] for r in rows} == {"full", "sampled"}
    assert all(r["rank"] is not None and r["candidates"] in (21, 40) for r in rows)  # SASRec ranks everything
