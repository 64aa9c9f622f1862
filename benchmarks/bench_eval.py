"""Evaluation speed on this CPU: the one-user path against the batched path, side by side, in one run.

Prints:
  * SmolLM2-135M on MovieLens-1M test users of one genre (prepared by `cprec prepare`'s own code), in the
    batches `cprec evaluate` forms (`plan`: users grouped by prompt length, `batch_users` of them per batch,
    the CPU defaults of `sized_for`; `--units` of these batches drawn at random): users/s of sampled scoring
    (target + up to 99 negatives) and of full ranking (exact top-20 of the genre's catalogue), one user at a
    time (`TitleScorer`, what `cprec evaluate` ran before batching: transformers' SDPA, 64 candidates per
    pass) and batched (`BatchScorer`, on the attention `load_model` picks: `sdpa_gqa` on a CPU), in fp32,
    with how many users get the same rank: every title (candidate) scored, and only the prefixes that can
    matter expanded (pruned sampled ranking, best-first search), the row `cprec evaluate` runs by default
    marked (`exhaustive_below`); and bf16 on this CPU (AMX; `--dtype bfloat16`);
  * the compute bound, measured in the same run: each path's linear-layer GFLOP per user (from the tokens
    it fed), the rate it reached against this CPU's fp32 matmul rate, and the largest speed-up over the
    one-user path that the fewest FLOPs of any exact batched path here would allow at the full matmul rate;
  * a generated 20,000-title catalogue with a tiny random model (peaked, as trained models are): seconds
    per user of exhaustive scoring and of best-first search, uncapped and with a frontier cap, with the
    peak frontier, how many users the cap sent to exhaustive scoring, and whether every top-20 agrees.

The MovieLens paths take turns batch by batch (`interleaved`): on this VM a path timed minutes after another
met another machine speed (an earlier version timed each path over all batches in turn: the pruned sampled
path measured 2.5x at 9bd68fa and 2.1x at ecc8e0e, whose scoring differs only by a refactor).

Run: python benchmarks/bench_eval.py [--units 2] [--domain Thriller] [--threads 2] [--large-users 2]
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cprec.data.prepare import PrepareConfig, prepare
from cprec.data.template import render_example
from cprec.eval.batched import BatchScorer
from cprec.eval.search import PrefixTree
from cprec.backbone import load_model
from cprec.eval.config import TOP_K, EvalConfig, sized_for
from cprec.eval.downstream import Downstream
from cprec.eval.evaluate import plan
from cprec.eval.metrics import rank_against_ties
from cprec.eval.scoring import TitleTrie


def timed(fn):
    started = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - started


def interleaved(paths: dict, slices: list, prompts: list, cands: list):
    """Each path on each drawn batch, the paths taking turns batch by batch (in their order on even batches,
    reversed on odd ones), so that the VM's drift over minutes (identical runs differed by up to 1.5x here)
    falls on all of them alike rather than on whichever ran last. Returns each path's outputs in user order,
    its seconds, and the tree nodes it fed and expanded (`BatchScorer.stats`)."""
    out = {name: [] for name in paths}
    seconds = dict.fromkeys(paths, 0.0)
    fed = {name: [0, 0] for name in paths}
    names = list(paths)
    for b, at in enumerate(slices):
        for name in names if b % 2 == 0 else names[::-1]:
            fn, scorer, attention = paths[name]
            scorer.model.set_attn_implementation(attention)
            scorer.reset_stats()
            result, took = timed(lambda: fn(prompts[at], cands[at]))
            out[name] += result
            seconds[name] += took
            fed[name][0] += scorer.stats["fed_nodes"]
            fed[name][1] += scorer.stats["expanded_nodes"]
    return out, seconds, fed


def matmul_gflops(threads: int) -> float:
    """This CPU's fp32 matmul rate on SmolLM2's MLP shape ([2048, 576] x [576, 1536]), GFLOP/s."""
    a, b = torch.randn(2048, 576), torch.randn(576, 1536)
    for _ in range(3):
        a @ b
    _, seconds = timed(lambda: [a @ b for _ in range(20)])
    return 20 * 2 * 2048 * 576 * 1536 / seconds / 1e9


class LinearWork:
    """GFLOP of a model's linear layers (decoder weights and head; attention scores left out)."""

    def __init__(self, model):
        self.body = sum(p.numel() for name, p in model.named_parameters() if "embed" not in name)
        self.head = model.get_output_embeddings().weight.numel()

    def gflop(self, decoder_tokens: float, head_tokens: float) -> float:
        return 2 * (self.body * decoder_tokens + self.head * head_tokens) / 1e9


def one_user_tokens(scorer, prompt_ids: list[int], lines: list[list[int]]) -> tuple[int, int]:
    """(decoder positions, head positions) the one-user path feeds: the prompt, then each batch of 64 lines
    right-padded to its longest, the head on every position."""
    fed = len(prompt_ids)
    for lo in range(0, len(lines), scorer.batch_size):
        chunk = lines[lo:lo + scorer.batch_size]
        fed += len(chunk) * (max(map(len, chunk)) - 1)
    return fed, fed


def movielens(args) -> list[str]:
    cfg = sized_for(EvalConfig(protocol="full"), torch.device("cpu"))
    with tempfile.TemporaryDirectory() as tmp:
        manifest = prepare(PrepareConfig(tokenizer="smollm2", window_tokens=511), Path(tmp) / "ml")
        model, tok = load_model("smollm2")
        scorer = BatchScorer(model, tok, cfg.row_nodes, cfg.tokens_per_pass, cfg.node_cache_mb << 20)
        scorer.batch_size = 64  # the one-user path's candidates per batch (EvalConfig.batch_size before batching)
        cost = lambda line: len(tok(line, add_special_tokens=False)["input_ids"])  # noqa: E731
        ds = Downstream(Path(tmp) / "ml", manifest, args.domain, cfg, cost)
    every_prompt = [ds.prompt(r) for r in ds.test]
    lengths = [len(scorer.prompt_ids(p)) for p in every_prompt]
    units = plan([args.domain], {args.domain: len(ds.test)}, {args.domain: lengths}, cfg)
    picked = [units[i] for i in sorted(np.random.default_rng(0).choice(len(units), args.units, replace=False))]
    users = [i for unit in picked for i in unit.users]
    prompts = [every_prompt[i] for i in users]
    cands = [ds.candidates(ds.test[i], cfg.negatives, cfg.seed) for i in users]
    n = len(users)
    slices = [slice(lo, lo + len(u.users)) for lo, u in zip(np.cumsum([0] + [len(u.users) for u in picked]), picked)]

    scorer.score_users(prompts[:1], cands[:1])  # warm-up (first-call allocations)
    trie = TitleTrie([scorer.line_ids(t) for t in ds.titles], ds.titles)
    tree = PrefixTree(scorer.lines_ids(ds.titles))
    targets = [ds.index[ds.test[i]["target"]] for i in users]
    sampled_ranks = lambda scores: [rank_against_ties(s, 0) for s in scores]  # noqa: E731
    top_ids = lambda tops: [[i for i, _ in top] for top in tops]  # noqa: E731
    target_ranks = lambda tops: [ids.index(t) if t in ids else None  # noqa: E731
                                 for ids, t in zip(top_ids(tops), targets)]
    work = LinearWork(model)
    loaded = model.config._attn_implementation  # what `cprec evaluate` runs (sdpa_gqa on a CPU)
    model16, _ = load_model("smollm2", dtype=torch.bfloat16)
    bf16 = BatchScorer(model16, tok, cfg.row_nodes, cfg.tokens_per_pass, cfg.node_cache_mb << 20)
    bf16.score_users(prompts[:1], cands[:1])
    paths = {  # name: (fn(prompts, candidates) of one batch, its scorer, the attention it runs on)
        # the one-user path as before batching: transformers' own SDPA, full ranking scored whole below 500
        "one_s": (lambda p, c: [scorer.score(u, cu) for u, cu in zip(p, c)], scorer, "sdpa"),
        "one_f": (lambda p, _: [scorer.top_k(u, trie, TOP_K, exhaustive_below=500) for u in p], scorer, "sdpa"),
        "sampled": (scorer.score_users, scorer, loaded),
        "pruned": (scorer.rank_users, scorer, loaded),
        "full": (lambda p, _: scorer.top_k_users(p, tree, TOP_K, exhaustive=True), scorer, loaded),
        "search": (lambda p, _: scorer.top_k_users(p, tree, TOP_K, beam=cfg.beam), scorer, loaded),
        "bf16_s": (bf16.score_users, bf16, loaded),
        "bf16_f": (lambda p, _: bf16.top_k_users(p, tree, TOP_K, exhaustive=True), bf16, loaded)}
    out, seconds, fed = interleaved(paths, slices, prompts, cands)
    fed = {name: (fed[name][0] / n, fed[name][1] / n) for name in ("sampled", "pruned", "full", "search")}
    one_s, one_f, batch_s, pruned_s, batch_f, search_f, bf16_s, bf16_f = (out[k] for k in paths)
    t_one_s, t_one_f, t_batch_s, t_pruned_s, t_batch_f, t_search_f, t_bf16_s, t_bf16_f = (seconds[k] for k in paths)
    diff = max(float(np.abs(a - b).max()) for a, b in zip(one_s, batch_s))
    peak = matmul_gflops(torch.get_num_threads())
    prompt_tokens = np.mean([lengths[i] for i in users])
    title_ids = scorer.lines_ids(ds.titles)
    one_gflop = {  # per user: what the one-user path fed
        "sampled": np.mean([work.gflop(*one_user_tokens(scorer, scorer.prompt_ids(p), scorer.lines_ids(c)))
                            for p, c in zip(prompts, cands)]),
        "full": np.mean([work.gflop(*one_user_tokens(scorer, scorer.prompt_ids(p), title_ids)) for p in prompts])}
    gflop = {name: work.gflop(prompt_tokens + nodes, 1 + expanded) for name, (nodes, expanded) in fed.items()}
    row = lambda what, t_one, t_new, same: (  # noqa: E731
        f"| {what} | {n / t_one:.3f} | {n / t_new:.3f} | {t_one / t_new:.1f}x | {same} |")
    same = lambda a, b: f"{sum(x == y for x, y in zip(a, b))}/{n}"  # noqa: E731
    rate = lambda g, t: f"{g:.0f} GFLOP/user, {g * n / t:.0f} GFLOP/s ({g * n / t / peak:.0%})"  # noqa: E731
    fewest = {"sampled": min(gflop["sampled"], gflop["pruned"]), "full": min(gflop["full"], gflop["search"])}
    bound = {p: (t_one_s if p == "sampled" else t_one_f) / n / (fewest[p] / peak) for p in fewest}
    whole_s, whole_f = max(map(len, cands)) < cfg.exhaustive_below, len(ds.titles) < cfg.exhaustive_below
    mark = lambda default: " (`cprec evaluate`'s default here)" if default else ""  # noqa: E731
    spread = [f"{min(lengths[i] for i in u.users)}-{max(lengths[i] for i in u.users)}" for u in picked]
    return [
        f"SmolLM2-135M, {torch.get_num_threads()} threads, MovieLens-1M {args.domain} ({len(ds.titles)} items, "
        f"{tree.size - 1} prefix-tree nodes for {sum(map(len, title_ids))} title tokens), {len(ds.test)} test "
        f"users in {len(units)} batches of {cfg.batch_users} as `cprec evaluate` plans them; {len(picked)} "
        f"batches drawn ({n} users, prompts of {', '.join(spread)} tokens, mean {prompt_tokens:.0f}); "
        f"row_nodes={cfg.row_nodes}, tokens_per_pass={cfg.tokens_per_pass}, beam={cfg.beam}, "
        f"exhaustive_below={cfg.exhaustive_below}; attention: one user `sdpa`, batched `{loaded}`", "",
        "| what | one user at a time, fp32, every title (users/s) | batched (users/s) | speed-up | same target rank |",
        "|---|---|---|---|---|",
        row(f"sampled ({np.mean([len(c) for c in cands]):.0f} candidates), every candidate scored{mark(whole_s)}, "
            f"fp32", t_one_s, t_batch_s, same(sampled_ranks(one_s), sampled_ranks(batch_s))),
        row(f"sampled, only prefixes scoring at least the target expanded{mark(not whole_s)}, fp32", t_one_s,
            t_pruned_s, same(sampled_ranks(one_s), pruned_s)),
        row(f"full ranking, exact top-20 of {len(ds.titles)} by scoring every title{mark(whole_f)}, fp32",
            t_one_f, t_batch_f, same(target_ranks(one_f), target_ranks(batch_f))),
        row(f"full ranking, best-first search (beam {cfg.beam}){mark(not whole_f)}, fp32", t_one_f, t_search_f,
            same(target_ranks(one_f), target_ranks(search_f))),
        row("sampled, bf16 on this CPU (`--dtype bfloat16`)", t_one_s, t_bf16_s,
            same(sampled_ranks(one_s), sampled_ranks(bf16_s))),
        row("full ranking, every title, bf16 on this CPU", t_one_f, t_bf16_f,
            same(target_ranks(one_f), target_ranks(bf16_f))),
        "", "whole top-20 lists identical to the one-user path's: batched fp32 "
        f"{same(top_ids(one_f), top_ids(batch_f))}, best-first fp32 {same(top_ids(one_f), top_ids(search_f))}, "
        f"bf16 {same(top_ids(one_f), top_ids(bf16_f))}; "
        f"largest |score difference| one-user vs batched, fp32 (sampled): {diff:.2e}", "",
        f"compute bound (linear layers; attention scores not counted; this CPU's fp32 matmul rate {peak:.0f} "
        f"GFLOP/s at SmolLM2's MLP shape, {torch.get_num_threads()} threads):", "",
        "| path | tree nodes fed per user | work and rate |", "|---|---|---|",
        f"| one user, sampled | (every candidate's line, padded) | {rate(one_gflop['sampled'], t_one_s)} |",
        f"| one user, full ranking | (every title's line, padded) | {rate(one_gflop['full'], t_one_f)} |",
        f"| batched, sampled, every candidate | {fed['sampled'][0]:.0f} | {rate(gflop['sampled'], t_batch_s)} |",
        f"| batched, sampled, pruned | {fed['pruned'][0]:.0f} | {rate(gflop['pruned'], t_pruned_s)} |",
        f"| batched, full, every title | {fed['full'][0]:.0f} | {rate(gflop['full'], t_batch_f)} |",
        f"| batched, full, best-first | {fed['search'][0]:.0f} | {rate(gflop['search'], t_search_f)} |", "",
        f"at the full fp32 matmul rate, the fewest FLOPs of an exact batched path here would make it at most "
        f"{bound['sampled']:.1f}x (sampled) and {bound['full']:.1f}x (full ranking) faster than the one-user path"]


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
    parser.add_argument("--units", type=int, default=2,
                        help="batches of MovieLens test users, as cprec evaluate forms them, to time (default 2)")
    parser.add_argument("--domain", default="Thriller")
    parser.add_argument("--threads", type=int, default=2)
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
