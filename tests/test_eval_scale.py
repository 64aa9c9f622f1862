"""Evaluation at scale: batched across users (== one user at a time), exact top-K with batching, the frontier
cap on a 20,000-title catalogue, ranks.jsonl, resume after a kill, and torchrun ranks (== one process)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cprec.attention import register_sdpa_gqa
from cprec.data.template import render_example
from cprec.errors import CPRecError
from cprec.eval import batched
from cprec.eval.batched import BatchScorer, pass_bounds
from cprec.eval.search import BestFirst, PrefixTree
from cprec.eval.metrics import rank_against_ties

REPO = Path(__file__).resolve().parents[1]
TITLES = [f"{w} Quest No. {i}" for w in ("Crimson", "Azure", "Golden", "Emerald", "Ivory") for i in range(1, 9)]


def tiny_llama(vocab: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=256)).eval()


@pytest.fixture(scope="module")
def tiny(tiny_tokenizer):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer)
    model = tiny_llama(len(tok))
    model.set_attn_implementation(register_sdpa_gqa())  # the attention `load_model` gives a CPU evaluation
    # small rows and passes: trees are cut into several rows and rows of several users share passes
    return BatchScorer(model, tok, row_nodes=24, tokens_per_pass=80)


def user_prompts(n: int) -> list[str]:
    """Prompts of different lengths (1 to 8 history items)."""
    rng = np.random.default_rng(1)
    return [render_example("Games", list(rng.choice(TITLES, 1 + (3 * u) % 8)), None, 2000)[0] for u in range(n)]


def test_batched_scores_and_ranks_equal_the_one_user_path(tiny, monkeypatch):
    monkeypatch.setattr(batched, "HEAD_CHUNK", 5)  # the head's chunks end inside rows and passes
    prompts = user_prompts(5)
    assert len({len(tiny.prompt_ids(p)) for p in prompts}) == 5
    rng = np.random.default_rng(2)
    cands = [list(rng.choice(TITLES, int(rng.integers(5, 20)), replace=False)) for _ in prompts]
    together = tiny.score_users(prompts, cands)
    for prompt, titles, scores in zip(prompts, cands, together):
        one = tiny.score(prompt, titles)
        np.testing.assert_allclose(scores, one, rtol=1e-5, atol=1e-5)
        assert [rank_against_ties(scores, i) for i in range(len(titles))] == \
            [rank_against_ties(one, i) for i in range(len(titles))]
    # the sampled protocol's pruned ranking, for several targets, and with a cache too small to keep all
    for target in (0, 3):
        ranks = [rank_against_ties(tiny.score(p, c), target) for p, c in zip(prompts, cands)]
        assert tiny.rank_users(prompts, cands, target) == ranks
    assert len(set(ranks)) > 2  # the targets rank differently
    small = BatchScorer(tiny.model, tiny.tok, row_nodes=24, tokens_per_pass=80, node_cache_bytes=20_000)
    assert small.rank_users(prompts, cands, 3) == ranks
    passes = {}
    for overhead in (0, 10**6):  # passes split wherever that saves padding; packed as full as they go (a GPU's)
        small.pass_overhead = overhead
        counted = count_passes(small, monkeypatch)
        assert small.rank_users(prompts, cands, 3) == ranks
        passes[overhead] = len(counted)
    assert passes[0] > passes[10**6]


def count_passes(scorer: BatchScorer, monkeypatch) -> list:
    """The forward passes `scorer` runs from now on, one entry each."""
    counted, original = [], scorer._pass
    monkeypatch.setattr(scorer, "_pass", lambda *args: counted.append(1) or original(*args))
    return counted


def test_pass_bounds_are_the_cheapest_cuts_that_fit():
    """Against every way of cutting rows into passes: the fewest positions computed (padding included) plus
    the overhead per pass, no pass over the token budget unless it holds one row."""
    rng = np.random.default_rng(5)
    for _ in range(200):
        widths = sorted(rng.integers(1, 40, int(rng.integers(1, 8))).tolist(), reverse=True)
        budget, overhead = int(rng.integers(30, 120)), int(rng.integers(0, 50))

        def cost(bounds):
            passes = list(zip(bounds, bounds[1:]))
            if any(b - a > 1 and (b - a) * widths[a] > budget for a, b in passes):
                return float("inf")
            return sum((b - a) * widths[a] + overhead for a, b in passes)

        n = len(widths)
        every = [[0] + [i for i in range(1, n) if mask >> (i - 1) & 1] + [n] for mask in range(2 ** (n - 1))]
        bounds = pass_bounds(widths, budget, overhead)
        assert bounds[0] == 0 and bounds[-1] == n and bounds == sorted(set(bounds))
        assert cost(bounds) == min(cost(b) for b in every)
    assert pass_bounds([74, 70, 60, 50, 40, 30, 20, 10, 5, 5, 2], 4096, 10**6) == [0, 11]  # one full pass
    widths = [74, 70, 60, 50, 40, 30, 20, 10, 5, 5, 2]
    bounds = pass_bounds(widths, 4096, 0)  # passes are free: none pads a row
    assert all(len(set(widths[a:b])) == 1 for a, b in zip(bounds, bounds[1:]))
    assert pass_bounds([], 4096, 64) == [0]  # no rows (every user's search done): no pass


def test_batched_full_ranking_is_the_exact_top_k(tiny):
    prompts = user_prompts(3)
    tree = PrefixTree([tiny.line_ids(t) for t in TITLES])
    brute = [tiny.score_naive(p, TITLES) for p in prompts]
    best = [np.argsort(-b, kind="stable") for b in brute]
    # a cache for ~40 nodes: later steps' ancestors are partly not kept and are fed again, in other rows
    small = BatchScorer(tiny.model, tiny.tok, row_nodes=24, tokens_per_pass=80, node_cache_bytes=20_000)
    for scorer, kwargs in ((tiny, {"exhaustive": True}), (tiny, {"beam": 1}), (tiny, {"beam": 4, "frontier": 3}),
                           (tiny, {"beam": 256}), (small, {"beam": 3})):
        for top, order, scores in zip(scorer.top_k_users(prompts, tree, 10, **kwargs), best, brute):
            assert_same_top(top, [(int(i), scores[i]) for i in order[:10]])
    everything = tiny.top_k_users(prompts[:2], tree, len(TITLES) + 5, beam=8)  # K above the catalogue size
    assert all(sorted(i for i, _ in top) == list(range(len(TITLES))) for top in everything)


def test_full_ranking_ranks_every_title_of_identical_lines(tiny):
    """Titles whose lines have the same tokens (distinct strings that a normalising tokenizer maps alike;
    `Downstream` merges equal strings) are all ranked, tied, in title order, by every path, as scoring every
    title ranks them (the search once returned only the first of them)."""
    titles = TITLES[:12] + [TITLES[3], TITLES[7]]
    prompts = user_prompts(3)
    tree = PrefixTree([tiny.line_ids(t) for t in titles])
    brute = [tiny.score_naive(p, titles) for p in prompts]
    best = [np.argsort(-scores, kind="stable") for scores in brute]
    for k in (len(titles), 8):  # every title; a K that cuts between ranks
        for kwargs in ({"exhaustive": True}, {"beam": 1}, {"beam": 4}, {"beam": 256}, {"beam": 2, "frontier": 3}):
            for top, order, scores in zip(tiny.top_k_users(prompts, tree, k, **kwargs), best, brute):
                assert_same_top(top, [(int(i), scores[i]) for i in order[:k]])
    assert any(abs(o.tolist().index(3) - o.tolist().index(12)) == 1 for o in best)  # twins rank side by side


def test_best_first_orders_exact_ties_as_scoring_every_title():
    """Title 1 ([1, 4]) finishes at -1.5 while prefix [1, 2] is open at -1.5 and ends in title 0 at -1.5 (a
    last token at log-probability exactly 0.0): equal scores rank in title order, so title 0 comes first."""
    tree = PrefixTree([[1, 2, 3], [1, 4]])
    logp = {(): {1: -1.0}, (1,): {2: -0.5, 4: -0.5}, (1, 2): {3: 0.0}}
    path = {0: ()}  # node -> its tokens
    for node in range(1, tree.size):
        path[node] = path[int(tree.parent[node])] + (int(tree.token[node]),)
    search = BestFirst(tree, k=2, frontier=10)
    nodes, scores = np.array([0]), np.zeros(1)
    while len(nodes):
        children = tree.children_of(nodes)
        search.expand(nodes, scores, np.array([logp[path[int(tree.parent[c])]][int(tree.token[c])]
                                               for c in children]))
        search.trim()
        nodes, scores = search.advance(beam=1)
    assert search.results == [(0, -1.5), (1, -1.5)]


def test_prefix_tree_shares_prefixes_and_keeps_every_title_of_a_node():
    tree = PrefixTree([[5, 6, 7], [5, 6, 8], [5, 9], [5, 6, 7], [4]])
    assert tree.size == 1 + 6  # root, 5, 6, 7, 8, 9, 4
    assert tree.title_node[0] == tree.title_node[3]
    titles, counts = tree.titles_of(np.array([tree.title_node[0], tree.title_node[4], tree.parent[tree.title_node[0]]]))
    assert titles.tolist() == [0, 3, 4] and counts.tolist() == [2, 1, 0]  # both twins, in title order
    assert list(tree.inner) == [i for i in range(1, tree.size) if tree.has_children[i]]
    assert (tree.parent[1:] < np.arange(1, tree.size)).all()  # pre-order: parents first
    for fed, scored in tree.slices(2):
        assert len(fed) <= 2 and set(fed) >= {a for n in scored for a in tree.ancestors(int(n))}


def assert_same_top(a: list[tuple[int, float]], b: list[tuple[int, float]]) -> None:
    assert [i for i, _ in a] == [i for i, _ in b]
    np.testing.assert_allclose([s for _, s in a], [s for _, s in b], rtol=1e-5, atol=1e-5)


def test_frontier_cap_on_a_20k_catalogue_keeps_the_exact_top_k(tiny_tokenizer):
    from transformers import AutoTokenizer

    from cprec.data.synthetic import SyntheticConfig, SyntheticWorld

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer)
    model = tiny_llama(len(tok), seed=3)
    with torch.no_grad():
        model.lm_head.weight *= 10  # a peaked model, as trained ones are: the search opens a small part
    scorer = BatchScorer(model, tok, row_nodes=512, tokens_per_pass=8192)
    titles = SyntheticWorld(SyntheticConfig(domains=1, items_per_domain=20_000, themes=8, users=1)).titles[0]
    assert len(set(titles)) == 20_000
    tree = PrefixTree(scorer.lines_ids(titles))
    assert [scorer.line_ids(t) for t in titles[:50]] == [scorer.tok(t + "\n", add_special_tokens=False)["input_ids"]
                                                       for t in titles[:50]]
    prompt = [render_example("Books", titles[40:45], None, 2000)[0]]
    exact = scorer.top_k_users(prompt, tree, 20, exhaustive=True)[0]
    free = scorer.top_k_users(prompt, tree, 20, beam=64, frontier=10**9)[0]
    uncapped = scorer.stats["peak_frontier"]
    assert_same_top(free, exact)
    assert uncapped > 100
    for cap in (uncapped // 2, 10):
        scorer.reset_stats()
        capped = scorer.top_k_users(prompt, tree, 20, beam=64, frontier=cap)[0]
        assert scorer.stats["peak_frontier"] == cap  # the cap was reached and held
        assert_same_top(capped, exact)
    assert scorer.stats["fallbacks"] == 1  # at 10 the search cannot certify the top 20 and says so


# ---------------------------------------------------------------- the command: ranks.jsonl, resume, ranks

# exhaustive_below=21: the 21 sampled candidates are ranked by the pruned search, the 40 titles by best-first
EVAL_ARGS = ["negatives=20", "batch_users=2", "row_nodes=32", "exhaustive_below=21", "--users", "7", "--domains",
             "Games"]


@pytest.fixture(scope="module")
def model_dir(tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    tiny.model.save_pretrained(folder)
    tiny.tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def straight(model_dir, prepared_small, tmp_path_factory):
    """One uninterrupted evaluation in this process: the reference."""
    from cprec.cli import main

    out = tmp_path_factory.mktemp("straight") / "eval"
    assert main(["evaluate", *EVAL_ARGS, "--model", str(model_dir), "--data", str(prepared_small),
                 "--out", str(out)]) == 0
    return out


def outputs(out: Path) -> dict:
    names = ["ranks.jsonl", "results.json", "results.md", "candidates/games.jsonl"]
    files = {name: (out / name).read_text() for name in names}
    files["results.json"] = json.loads(files["results.json"])
    files["results.json"].pop("prepared")
    return files


def test_every_run_writes_ranks_jsonl(straight, prepared_small):
    rows = [json.loads(line) for line in (straight / "ranks.jsonl").read_text().splitlines()]
    assert [(r["domain"], r["protocol"]) for r in rows] == [("Games", "sampled")] * 7 + [("Games", "full")] * 7
    assert [r["user"] for r in rows[:7]] == [r["user"] for r in rows[7:]]
    assert all(r["candidates"] == 21 for r in rows[:7]) and all(r["candidates"] == 40 for r in rows[7:])
    assert all(0 <= r["rank"] <= 20 for r in rows[:7])  # sampled: among 21
    assert all(r["rank"] is None or 0 <= r["rank"] < 20 for r in rows[7:])  # full: in the top 20, or null
    timing = json.loads((straight / "timing.json").read_text())
    assert timing["device"] == "cpu" and timing["dtype"] == "float32" and timing["scored"]["Games/full"]["users"] == 7
    assert not list(straight.glob("ranks.partial-*"))


@pytest.mark.slow
def test_killed_evaluation_resumes_to_the_same_files(straight, model_dir, prepared_small, tmp_path):
    from cprec.cli import main

    out = tmp_path / "eval"
    argv = ["evaluate", *EVAL_ARGS, "--model", str(model_dir), "--data", str(prepared_small), "--out", str(out)]
    # killed by SIGKILL after its second batch of users, in the middle of writing the third
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "helpers" / "eval_killed.py"), "2", *argv],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == -9, proc.stderr[-3000:]
    partial = (out / "ranks.partial-0.jsonl").read_text()
    assert partial.count("\n") == 4 and not partial.endswith("\n")  # two batches, then a torn line
    assert not (out / "results.json").exists()
    assert main(argv) == 0
    assert outputs(out) == outputs(straight)
    assert not list(out.glob("ranks.partial-*"))
    assert main(argv) == 0  # a finished evaluation re-run: nothing to score, the same files
    assert outputs(out) == outputs(straight)
    assert json.loads((out / "timing.json").read_text())["scored"] == {}


def test_resume_with_other_settings_is_refused(straight, model_dir, prepared_small, tmp_path, capsys):
    from cprec.cli import main

    out = tmp_path / "eval"
    base = ["evaluate", "negatives=20", "--model", str(model_dir), "--data", str(prepared_small), "--out", str(out),
            "--domains", "Games", "--protocol", "sampled"]
    assert main(base + ["--users", "2"]) == 0
    capsys.readouterr()
    assert main(base + ["--users", "3", "seed=1"]) == 2
    err = capsys.readouterr().err
    assert "users: 2 -> 3" in err and "seed: 0 -> 1" in err and "choose another --out" in err
    assert main(base + ["--users", "2", "batch_users=1"]) == 0  # speed settings may change


@pytest.mark.slow
def test_two_gloo_ranks_write_what_one_process_writes(straight, model_dir, prepared_small, tmp_path):
    from tests.helpers import free_port

    out = tmp_path / "eval"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(REPO / "launch" / "evaluate.py"), *EVAL_ARGS, "--model", str(model_dir), "--data",
           str(prepared_small), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert outputs(out) == outputs(straight)  # 7 users in batches of 2: ranks take 2 and 2 batches per protocol
    timing = json.loads((out / "timing.json").read_text())
    assert timing["ranks"] == 2 and timing["scored"]["Games/sampled"]["users"] == 7
    assert proc.stdout.count("### Games — full ranking, 7 test users") == 1  # rank 0 reports


def test_device_and_dtype_resolution():
    from cprec.eval.config import resolve_device

    assert resolve_device("auto", "auto") == (torch.device("cpu"), torch.float32) or torch.cuda.is_available()
    assert resolve_device("cpu", "bfloat16") == (torch.device("cpu"), torch.bfloat16)
    if not torch.cuda.is_available():
        with pytest.raises(CPRecError, match="no GPU is visible"):
            resolve_device("cuda", "auto")
    with pytest.raises(CPRecError, match="dtype must be one of"):
        resolve_device("cpu", "float8")
