"""The full-ranking search's own cost (its bookkeeping, apart from the model), today's code against a baseline
revision of `cprec/eval/batched.py`, side by side, in one run.

On a GPU a pass of SmolLM2-135M over thousands of tree nodes takes milliseconds, so what the host does per
node between passes decides the search's speed (on one H100 the search ran at ~38k fed nodes/s, while
scoring every title fed ~8x more per second). This benchmark makes the model nearly free (1 layer, hidden
32, a 1,024-token vocabulary: SmolLM2's tokens of a generated catalogue's titles folded modulo 1,024) so
that the time left is the search's: it times the model's calls (decoder and head, through forward hooks:
on a CPU they are synchronous) and reports the rest as bookkeeping, per user and per fed node, for the
baseline (loaded from git, `git show REV:cprec/eval/batched.py`) and for the checkout. Both must return the
same top-20 for every user, which is checked.

Run: python benchmarks/bench_search.py [--baseline 39741c2] [--beam 64] [--users 32] [--repeats 3]
"""

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cprec.data.template import render_example
from cprec.eval.batched import BatchScorer

REPO = Path(__file__).resolve().parents[1]
VOCAB = 1024


def baseline_module(rev: str):
    """`cprec/eval/batched.py` as it was at `rev`, imported under another name."""
    source = subprocess.run(["git", "show", f"{rev}:cprec/eval/batched.py"], cwd=REPO, check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "batched_baseline.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("batched_baseline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["batched_baseline"] = module
    spec.loader.exec_module(module)
    return module


class ModelClock:
    """Seconds spent inside the decoder's and the head's forward calls."""

    def __init__(self, *modules):
        self.seconds, self._started = 0.0, None
        for module in modules:
            module.register_forward_pre_hook(self._start)
            module.register_forward_hook(self._stop)

    def _start(self, *_):
        self._started = time.perf_counter()

    def _stop(self, *_):
        self.seconds += time.perf_counter() - self._started


class FoldedTokenizer:
    """SmolLM2's tokenizer with every id folded into the tiny model's vocabulary (ids modulo 1,024)."""

    def __init__(self, tok):
        self.tok, self.pad_token_id = tok, 0

    def __call__(self, texts, add_special_tokens=False):
        encoded = self.tok(texts, add_special_tokens=add_special_tokens)["input_ids"]
        fold = (lambda ids: [i % VOCAB for i in ids])
        return {"input_ids": [fold(e) for e in encoded] if isinstance(texts, list) else fold(encoded)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--baseline", default="39741c2", help="git revision of the baseline batched.py")
    parser.add_argument("--titles", type=int, default=20_000)
    parser.add_argument("--users", type=int, default=32)
    parser.add_argument("--beam", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each code, interleaved; the median is shown")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from cprec.backbone import smollm2_folder
    from cprec.data.synthetic import SyntheticConfig, SyntheticWorld

    tok = FoldedTokenizer(AutoTokenizer.from_pretrained(smollm2_folder()))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                         max_position_embeddings=2048)).eval()
    with torch.no_grad():
        model.lm_head.weight *= 10  # peaked, as trained models are: the search opens a small part of the tree
    titles = SyntheticWorld(SyntheticConfig(domains=1, items_per_domain=args.titles, themes=8, users=1)).titles[0]
    rng = np.random.default_rng(0)
    prompts = [render_example("Books", list(rng.choice(titles, 8)), None, 2000)[0] for _ in range(args.users)]
    codes = {f"baseline {args.baseline}": baseline_module(args.baseline),
             "this checkout": sys.modules[BatchScorer.__module__]}
    runs = {label: [] for label in codes}  # (wall, model seconds, fed nodes) per repeat
    tops = {}
    for _ in range(args.repeats):  # interleaved, so that both codes meet the same machine (a shared VM)
        for label, module in codes.items():
            scorer = module.BatchScorer(model, tok, row_nodes=512, tokens_per_pass=8192)
            tree = module.PrefixTree(scorer.lines_ids(titles))
            scorer.top_k_users(prompts[:2], tree, 20, beam=args.beam)  # warm-up
            clock = ModelClock(scorer.decoder, scorer.head)
            scorer.reset_stats()
            started = time.perf_counter()
            tops[label] = scorer.top_k_users(prompts, tree, 20, beam=args.beam)
            runs[label].append((time.perf_counter() - started, clock.seconds, scorer.stats["fed_nodes"]))
    nodes = tree.size - 1
    lines = []
    for label, measured in runs.items():
        wall, model_s, fed = sorted(measured)[len(measured) // 2]  # the median run by wall time
        host = wall - model_s
        lines.append(f"| {label} | {wall / args.users * 1000:.1f} | {model_s / args.users * 1000:.1f} | "
                     f"{host / args.users * 1000:.1f} | {host / fed * 1e6:.1f} | {fed / wall:,.0f} |")
    same = sum(a == b for a, b in zip(*tops.values()))
    print(f"\nbest-first search, exact top-20, beam {args.beam}: {args.titles:,} generated titles "
          f"({nodes:,} prefix-tree nodes), "
          f"{args.users} users in one batch, {torch.get_num_threads()} threads, median of {args.repeats} interleaved runs; tiny model (1 layer, hidden 32, "
          f"vocabulary {VOCAB}): fed nodes per user {fed / args.users:,.0f}\n")
    print("| code | ms per user | of which model | of which bookkeeping | bookkeeping µs per fed node | "
          "fed nodes/s |")
    print("|---|---|---|---|---|---|")
    print("\n".join(lines))
    print(f"\nsame top-20 (titles and scores) for {same}/{args.users} users")


if __name__ == "__main__":
    main()
