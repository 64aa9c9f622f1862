"""Evaluation cost with SmolLM2-135M on this CPU, on MovieLens-1M test users.

Prints, in one run:
  * sampled scoring (target + up to 99 negatives; MovieLens genres have fewer items) with the prompt's KV cache shared across candidates against a
    naive full forward pass per candidate, on the same users and candidates (goal: >= 5x), and the largest
    score difference between the two;
  * time per user of the full-ranking search (exact top-20 over the domain's catalogue).

Run: python benchmarks/bench_eval.py [--users 5] [--domain Sci-Fi]
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cprec.data.prepare import PrepareConfig, prepare
from cprec.eval.evaluate import Downstream, EvalConfig, load_model
from cprec.eval.scoring import TitleScorer, TitleTrie


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--users", type=int, default=5)
    parser.add_argument("--domain", default="Thriller")
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        manifest = prepare(PrepareConfig(tokenizer="smollm2", window_tokens=511), Path(tmp) / "ml")
        model, tok = load_model("smollm2")
        scorer = TitleScorer(model, tok, batch_size=100)
        cost = lambda line: len(tok(line, add_special_tokens=False)["input_ids"])  # noqa: E731
        ds = Downstream(Path(tmp) / "ml", manifest, args.domain, EvalConfig(users=args.users), cost)
        prompts = [ds.prompt(r) for r in ds.test]
        cands = [ds.candidates(r, 99, 0) for r in ds.test]
        t = time.perf_counter()
        cached = [scorer.score(p, c) for p, c in zip(prompts, cands)]
        t_cached = (time.perf_counter() - t) / len(prompts)
        t = time.perf_counter()
        naive = [scorer.score_naive(p, c) for p, c in zip(prompts, cands)]
        t_naive = (time.perf_counter() - t) / len(prompts)
        diff = max(float(np.abs(a - b).max()) for a, b in zip(cached, naive))
        trie = TitleTrie([scorer.line_ids(t) for t in ds.titles], ds.titles)
        t = time.perf_counter()
        searched = [scorer.top_k(p, trie, 20, beam=20) for p in prompts]
        t_full = (time.perf_counter() - t) / len(prompts)
        t = time.perf_counter()
        exhaustive = [scorer.top_k(p, trie, 20, exhaustive_below=10**9) for p in prompts]
        t_exh = (time.perf_counter() - t) / len(prompts)
        same = all([i for i, _ in a] == [i for i, _ in b] for a, b in zip(searched, exhaustive))
        prompt_tokens = np.mean([len(scorer.prompt_ids(p)) for p in prompts])
    print(f"SmolLM2-135M fp32, 2 threads, MovieLens-1M {args.domain} ({len(ds.titles)} items), {len(prompts)} test "
          f"users, mean prompt {prompt_tokens:.0f} tokens\n")
    print("| what | seconds per user | relative |")
    print("|---|---|---|")
    n = np.mean([len(c) for c in cands])
    print(f"| sampled, naive forward per candidate ({n:.0f} candidates) | {t_naive:.2f} | 1.00 |")
    print(f"| sampled, shared prompt KV cache (one batch) | {t_cached:.2f} | {t_naive / t_cached:.1f}x faster |")
    print(f"| full ranking, exact top-20 by prefix-tree search over {len(ds.titles)} titles | {t_full:.2f} | |")
    print(f"| full ranking, exact top-20 by scoring every title (shared cache) | {t_exh:.2f} | |")
    print(f"\nthe two full-ranking methods return the same top-20 for every user: {same}")
    print(f"\nlargest |score difference| cached vs naive: {diff:.2e}")


if __name__ == "__main__":
    main()
