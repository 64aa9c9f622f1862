"""Evaluation speed on this CPU: the one-user path against the batched path, side by side, in one run.

Prints:
  * SmolLM2-135M on MovieLens-1M test users of one genre (prepared by `cprec prepare`'s own code): users/s
    of sampled scoring (target + up to 99 negatives) and of full ranking (exact top-20 of the genre's
    catalogue, both paths scoring every title as `cprec evaluate` does below exhaustive_below=500), one user
    at a time (`TitleScorer`, what `cprec evaluate` ran before batching; batch_size=64 candidates) and
    batched (`BatchScorer`, all the users at once), in fp32, with how many users get the same rank; also the
    batched paths that expand fewer prefixes (pruned sampled ranking, best-first search) and bf16 on this
    CPU (AMX; `--dtype bfloat16`);
  * a generated 20,000-title catalogue with a tiny random model (peaked, as trained models are): seconds
    per user of exhaustive scoring and of best-first search, uncapped and with a frontier cap, with the
    peak frontier, how many users the cap sent to exhaustive scoring, and whether every top-20 agrees.

Run: python benchmarks/bench_eval.py [--users 8] [--domain Thriller] [--threads 2] [--large-users 2]
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


def matmul_gflops(threads: int) -> float:
    """This CPU's fp32 matmul rate on SmolLM2's MLP shape ([2048, 576] x [576, 1536]), GFLOP/s."""
    a, b = torch.randn(2048, 576), torch.randn(576, 1536)
    for _ in range(3):
        a @ b
    _, seconds = timed(lambda: [a @ b for _ in range(20)])
    return 20 * 2 * 2048 * 576 * 1536 / seconds / 1e9


def linear_gflop_per_user(model, tokens: float) -> float:
    """GFLOP of the linear layers (decoder weights and the head; attention scores left out) for `tokens`."""
    body = sum(p.numel() for name, p in model.named_parameters() if "embed" not in name)
    head = model.get_output_embeddings().weight.numel()
    return 2 * (body + head) * tokens / 1e9


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
    scorer.score_users(prompts[:1], cands[:1])  # warm-up (first-call allocations)
    trie = TitleTrie([scorer.line_ids(t) for t in ds.titles], ds.titles)
    tree = PrefixTree(scorer.lines_ids(ds.titles))
    targets = [ds.index[r["target"]] for r in ds.test]
    sampled_ranks = lambda scores: [rank_against_ties(s, 0) for s in scores]  # noqa: E731
    top_ids = lambda tops: [[i for i, _ in top] for top in tops]  # noqa: E731
    target_ranks = lambda tops: [ids.index(t) if t in ids else None  # noqa: E731
                                 for ids, t in zip(top_ids(tops), targets)]
    one_s, t_one_s = timed(lambda: [scorer.score(p, c) for p, c in zip(prompts, cands)])
    batch_s, t_batch_s = timed(lambda: scorer.score_users(prompts, cands))
    pruned_s, t_pruned_s = timed(lambda: scorer.rank_users(prompts, cands))
    one_f, t_one_f = timed(lambda: [scorer.top_k(p, trie, TOP_K, exhaustive_below=500) for p in prompts])
    batch_f, t_batch_f = timed(lambda: scorer.top_k_users(prompts, tree, TOP_K, exhaustive=True))
    search_f, t_search_f = timed(lambda: scorer.top_k_users(prompts, tree, TOP_K, beam=20))
    diff = max(float(np.abs(a - b).max()) for a, b in zip(one_s, batch_s))
    model16, _ = load_model("smollm2", dtype=torch.bfloat16)
    bf16 = BatchScorer(model16, tok, row_nodes=args.row_nodes, tokens_per_pass=args.tokens_per_pass)
    bf16.score_users(prompts[:1], cands[:1])
    bf16_s, t_bf16_s = timed(lambda: bf16.score_users(prompts, cands))
    bf16_f, t_bf16_f = timed(lambda: bf16.top_k_users(prompts, tree, TOP_K, exhaustive=True))
    tokens = np.mean([len(scorer.prompt_ids(p)) for p in prompts])
    title_tokens = sum(map(len, scorer.lines_ids(ds.titles)))
    work = linear_gflop_per_user(model, tokens + title_tokens)  # the one-user path feeds every title's line
    peak = matmul_gflops(torch.get_num_threads())
    row = lambda what, t_one, t_new, same: (  # noqa: E731
        f"| {what} | {n / t_one:.3f} | {n / t_new:.3f} | {t_one / t_new:.1f}x | {same} |")
    same = lambda a, b: f"{sum(x == y for x, y in zip(a, b))}/{n}"  # noqa: E731
    return [
        f"SmolLM2-135M, {torch.get_num_threads()} threads, MovieLens-1M {args.domain} ({len(ds.titles)} items, "
        f"{tree.size - 1} prefix-tree nodes for {sum(map(len, scorer.lines_ids(ds.titles)))} title tokens), {n} "
        f"test users, mean prompt {tokens:.0f} tokens; batched: all {n} users at once, row_nodes={args.row_nodes}, "
        f"tokens_per_pass={args.tokens_per_pass}", "",
        "| what | one user at a time, fp32, every title (users/s) | batched (users/s) | speed-up | same target rank |",
        "|---|---|---|---|---|",
        row(f"sampled ({np.mean([len(c) for c in cands]):.0f} candidates), every candidate scored, fp32", t_one_s,
            t_batch_s, same(sampled_ranks(one_s), sampled_ranks(batch_s))),
        row("sampled, batched: only prefixes scoring at least the target expanded, fp32", t_one_s, t_pruned_s,
            same(sampled_ranks(one_s), pruned_s)),
        row(f"full ranking, exact top-20 of {len(ds.titles)} by scoring every title, fp32", t_one_f, t_batch_f,
            same(target_ranks(one_f), target_ranks(batch_f))),
        row("full ranking, batched best-first search (beam 20), fp32", t_one_f, t_search_f,
            same(target_ranks(one_f), target_ranks(search_f))),
        row("sampled, bf16 on this CPU (`--dtype bfloat16`)", t_one_s, t_bf16_s,
            same(sampled_ranks(one_s), sampled_ranks(bf16_s))),
        row("full ranking, every title, bf16 on this CPU", t_one_f, t_bf16_f,
            same(target_ranks(one_f), target_ranks(bf16_f))),
        "", "whole top-20 lists identical to the one-user path's: batched fp32 "
        f"{same(top_ids(one_f), top_ids(batch_f))}, best-first fp32 {same(top_ids(one_f), top_ids(search_f))}, "
        f"bf16 {same(top_ids(one_f), top_ids(bf16_f))}; "
        f"largest |score difference| one-user vs batched, fp32 (sampled): {diff:.2e}", "",
        f"compute bound: the one-user full ranking's linear layers do {work:.0f} GFLOP per user (prompt + "
        f"{title_tokens} title tokens; attention scores not counted), i.e. {work * n / t_one_f:.0f} GFLOP/s, "
        f"{work * n / t_one_f / peak:.0%} of this CPU's fp32 matmul rate ({peak:.0f} GFLOP/s at SmolLM2's MLP "
        f"shape, {torch.get_num_threads()} threads): in fp32 a path that feeds the same tokens can be at most "
        f"{peak / (work * n / t_one_f):.1f}x faster; 3x needs 3x fewer tokens fed (a search that prunes)"]


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
    for frontier in (10**9, *args.frontier):
        scorer.reset_stats()
        found, t = timed(lambda: scorer.top_k_users(prompts, tree, TOP_K, beam=64, frontier=frontier))
        same = all([i for i, _ in a] == [i for i, _ in b] for a, b in zip(found, exact))
        label = "best-first, no cap" if frontier == 10**9 else f"best-first, frontier={frontier:,}"
        lines.append(f"| {label} | {t / n:.2f} | {scorer.stats['peak_frontier']:,} | {scorer.stats['fallbacks']} | "
                     f"{same} |")
    return lines


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--users", type=int, default=8, help="MovieLens test users (default 8)")
    parser.add_argument("--domain", default="Thriller")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--row-nodes", dest="row_nodes", type=int, default=256)
    parser.add_argument("--tokens-per-pass", dest="tokens_per_pass", type=int, default=4096)
    parser.add_argument("--catalogue", type=int, default=20_000, help="titles of the generated catalogue")
    parser.add_argument("--large-users", dest="large_users", type=int, default=2)
    parser.add_argument("--frontier", type=int, nargs="*", default=[4000, 500], help="caps of the capped searches")
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
