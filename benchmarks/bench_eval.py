"""Evaluation speed on this CPU: the one-user path against the batched path, side by side, in one run.

Prints:
  * SmolLM2-135M (fp32) on MovieLens-1M test users of one genre (prepared by `cprec prepare`'s own code):
    users/s of sampled scoring (target + up to 99 negatives) and of full ranking (exact top-20 of the
    genre's catalogue, both paths scoring every title as `cprec evaluate` does below exhaustive_below=500),
    one user at a time (`TitleScorer`, what `cprec evaluate` ran before batching; batch_size=64 candidates)
    and batched (`BatchScorer`, all the users at once); the ranks of both paths must be identical;
  * a generated 20,000-title catalogue with a tiny random model (peaked, as trained models are): seconds
    per user of exhaustive scoring and of best-first search, uncapped and with a frontier cap, with the
    peak frontier, how many users the cap sent to exhaustive scoring, and whether every top-20 agrees.

Run: python benchmarks/bench_eval.py [--users 4] [--domain Thriller] [--threads 2] [--large-users 2]
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cprec.data.prepare import PrepareConfig, prepare
from cprec.data.template import render_example
from cprec.eval.batched import BatchScorer, PrefixTree
from cprec.eval.evaluate import TOP_K, Downstream, EvalConfig, load_model
from cprec.eval.metrics import rank_against_ties
from cprec.eval.scoring import TitleTrie


def timed(fn):
    started = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - started


def movielens(args) -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        manifest = prepare(PrepareConfig(tokenizer="smollm2", window_tokens=511), Path(tmp) / "ml")
        model, tok = load_model("smollm2")
        scorer = BatchScorer(model, tok, row_nodes=args.row_nodes, tokens_per_pass=args.tokens_per_pass)
        scorer.batch_size = 64  # the one-user path's candidates per batch (EvalConfig.batch_size before batching)
        cost = lambda line: len(tok(line, add_special_tokens=False)["input_ids"])  # noqa: E731
        ds = Downstream(Path(tmp) / "ml", manifest, args.domain, EvalConfig(users=args.users), cost)
    prompts = [ds.prompt(r) for r in ds.test]
    cands = [ds.candidates(r, 99, 0) for r in ds.test]
    n = len(prompts)
    scorer.score_users(prompts[:1], cands[:1])  # warm-up (first-call allocations) for both paths
    one_sampled, t_one_s = timed(lambda: [scorer.score(p, c) for p, c in zip(prompts, cands)])
    batched_sampled, t_batch_s = timed(lambda: scorer.score_users(prompts, cands))
    same_sampled = all(rank_against_ties(a, 0) == rank_against_ties(b, 0)
                       for a, b in zip(one_sampled, batched_sampled))
    diff = max(float(np.abs(a - b).max()) for a, b in zip(one_sampled, batched_sampled))
    trie = TitleTrie([scorer.line_ids(t) for t in ds.titles], ds.titles)
    tree = PrefixTree(scorer.lines_ids(ds.titles))
    one_full, t_one_f = timed(lambda: [scorer.top_k(p, trie, TOP_K, exhaustive_below=500) for p in prompts])
    batched_full, t_batch_f = timed(lambda: scorer.top_k_users(prompts, tree, TOP_K, exhaustive=True))
    same_full = all([i for i, _ in a] == [i for i, _ in b] for a, b in zip(one_full, batched_full))
    tokens = np.mean([len(scorer.prompt_ids(p)) for p in prompts])
    return [
        f"SmolLM2-135M fp32, {torch.get_num_threads()} threads, MovieLens-1M {args.domain} ({len(ds.titles)} items, "
        f"{tree.size - 1} prefix-tree nodes for {sum(map(len, scorer.lines_ids(ds.titles)))} title tokens), {n} "
        f"test users, mean prompt {tokens:.0f} tokens; batched: {n} users per pass group, row_nodes="
        f"{args.row_nodes}, tokens_per_pass={args.tokens_per_pass}", "",
        "| protocol | one user at a time (users/s) | batched (users/s) | speed-up | identical ranks |",
        "|---|---|---|---|---|",
        f"| sampled ({np.mean([len(c) for c in cands]):.0f} candidates) | {n / t_one_s:.3f} | {n / t_batch_s:.3f} | "
        f"{t_one_s / t_batch_s:.1f}x | {same_sampled} |",
        f"| full ranking (exact top-20 of {len(ds.titles)}) | {n / t_one_f:.3f} | {n / t_batch_f:.3f} | "
        f"{t_one_f / t_batch_f:.1f}x | {same_full} |", "",
        f"largest |score difference| one-user vs batched (sampled): {diff:.2e}"]


def generated_catalogue(args) -> list[str]:
    """20,000 synthetic titles, a tiny random Llama made peaked (logits x10), SmolLM2's tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from cprec.backbone import smollm2_folder
    from cprec.data.synthetic import SyntheticConfig, SyntheticWorld

    tok = AutoTokenizer.from_pretrained(smollm2_folder())
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=1024)).eval()
    with torch.no_grad():
        model.lm_head.weight *= 10
    scorer = BatchScorer(model, tok, row_nodes=512, tokens_per_pass=8192)
    titles = SyntheticWorld(SyntheticConfig(domains=1, items_per_domain=args.catalogue, themes=8,
                                            users=1)).titles[0]
    tree, t_tree = timed(lambda: PrefixTree(scorer.lines_ids(titles)))
    rng = np.random.default_rng(0)
    prompts = [render_example("Books", list(rng.choice(titles, 8)), None, 2000)[0] for _ in range(args.large_users)]
    n = len(prompts)
    exact, t_exh = timed(lambda: scorer.top_k_users(prompts, tree, TOP_K, exhaustive=True))
    lines = [f"generated catalogue: {len(titles):,} titles, {tree.size - 1:,} prefix-tree nodes (built in "
             f"{t_tree:.1f} s); tiny random Llama (2 layers, hidden 64, SmolLM2 vocabulary, logits x10); {n} users",
             "", "| method | seconds per user | peak frontier | users sent to exhaustive | same top-20 |",
             "|---|---|---|---|---|", f"| exhaustive (every title) | {t_exh / n:.2f} | | | |"]
    for frontier in (10**9, args.frontier):
        scorer.reset_stats()
        found, t = timed(lambda: scorer.top_k_users(prompts, tree, TOP_K, beam=64, frontier=frontier))
        same = all([i for i, _ in a] == [i for i, _ in b] for a, b in zip(found, exact))
        label = "best-first, no cap" if frontier == 10**9 else f"best-first, frontier={frontier:,}"
        lines.append(f"| {label} | {t / n:.2f} | {scorer.stats['peak_frontier']:,} | {scorer.stats['fallbacks']} | "
                     f"{same} |")
    return lines


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--users", type=int, default=4, help="MovieLens test users (default 4)")
    parser.add_argument("--domain", default="Thriller")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--row-nodes", dest="row_nodes", type=int, default=512)
    parser.add_argument("--tokens-per-pass", dest="tokens_per_pass", type=int, default=4096)
    parser.add_argument("--catalogue", type=int, default=20_000, help="titles of the generated catalogue")
    parser.add_argument("--large-users", dest="large_users", type=int, default=2)
    parser.add_argument("--frontier", type=int, default=1000, help="the cap of the capped search")
    parser.add_argument("--skip", choices=["movielens", "catalogue"], help="leave one part out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = []
    if args.skip != "movielens":
        out += movielens(args) + [""]
    if args.skip != "catalogue":
        out += generated_catalogue(args)
    print("\n" + "\n".join(out))


if __name__ == "__main__":
    main()
