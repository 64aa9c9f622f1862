"""CPRec's full-ranking search against the decoders of the field, side by side, in one run (issue 27).

The language-model recommenders users compare with (BIGRec, D3, LC-Rec, MiniOneRec, the GENRE line) rank items
with transformers' `generate`: a beam search constrained by `prefix_allowed_tokens_fn` to a trie of the item
titles' tokens, the beams returned as the ranked list. Paths, on the same users and prompts:

  * exhaustive: every title of the catalogue scored (`BatchScorer.top_k_users(exhaustive=True)`): the reference;
  * cprec: `cprec evaluate`'s default full ranking (`sized_for`: exhaustive below `exhaustive_below` titles,
    else the exact best-first search);
  * beam B (B = 10, 20, 50): `model.generate(num_beams=B, num_return_sequences=B, prefix_allowed_tokens_fn=trie)`.

The objective is the same for every path, so that a difference is the search's alone: a title's score is the
summed log-probability of its item line's tokens (the line ends with the template's end marker), no length
normalisation (`length_penalty=0`). At a complete line the trie allows only the end-of-sequence token, whose
log-probability is set to 0 there (those repositories add the model's log-probability of ending; here it would
change the objective, not the search).

Figures per path: users/s; recall of each user's exact top-10 and top-20 (the share of the exhaustive top-K that
the path's top K holds; a beam of B returns at most B titles); HR@10 / NDCG@10 of the held-out item, beside the
exact values. Data: MovieLens-1M's held-out genres with SmolLM2-135M (`--users` per genre, leave-one-out test
users, the prompts `cprec evaluate` renders, at the experiment's cpu size: `--window-tokens 255`), and a generated catalogue of `--catalogue` titles with a tiny
random Llama made peaked (logits x10, as trained models are; no trained model, so recall only).

    python benchmarks/bench_decoders.py [--users 12] [--catalogue 20000] [--catalogue-users 4]
                                        [--beams 10,20,50] [--device cpu] [--out DIR]

On a GPU (`--device cuda`) the model runs in bf16 with the GPU batch sizes (`sized_for`); benchmarks/gpu_eval.py
`--parts decoders` calls this module there.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
TOP = (10, 20)


# ---------------------------------------------------------------- constrained beam search, as the field runs it

class TitleTrie:
    """Allowed next tokens after each prefix of the item lines' tokens; at a complete line, only the end."""

    def __init__(self, lines: list[list[int]], eos: int):
        self.eos, self.next, self.titles_of = eos, {}, {}
        for index, line in enumerate(lines):
            for depth in range(len(line)):
                self.next.setdefault(tuple(line[:depth]), set()).add(line[depth])
            self.titles_of.setdefault(tuple(line), []).append(index)
        self.next = {prefix: sorted(tokens) for prefix, tokens in self.next.items()}

    def allowed(self, generated: tuple) -> list[int]:
        if generated and generated[-1] == self.eos:
            return [self.eos]  # a finished beam (padding)
        return self.next.get(generated, [self.eos] if generated in self.titles_of else [])


class EndAtCompleteLine:
    """Logits processor: the end token scores 0 after a complete line (see the module docstring)."""

    def __init__(self, trie: TitleTrie, prompt_len: int):
        self.trie, self.prompt_len = trie, prompt_len

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for row, ids in enumerate(input_ids.tolist()):
            if tuple(ids[self.prompt_len:]) in self.trie.titles_of:
                scores[row, self.trie.eos] = 0.0
        return scores


def beam_search(model, tok, prompts: list[str], trie: TitleTrie, beams: int, batch_users: int,
                longest: int) -> list[list[int]]:
    """Each user's ranked titles (indices) from constrained beam search, `batch_users` prompts per call."""
    from transformers import LogitsProcessorList

    ranked = []
    tok.padding_side = "left"
    for lo in range(0, len(prompts), batch_users):
        batch = tok(prompts[lo:lo + batch_users], return_tensors="pt", padding=True,
                    add_special_tokens=False).to(model.device)
        width = batch["input_ids"].shape[1]
        with torch.no_grad():
            out = model.generate(**batch, num_beams=beams, num_return_sequences=beams, do_sample=False,
                                 max_new_tokens=longest + 1, length_penalty=0.0, early_stopping=False,
                                 prefix_allowed_tokens_fn=lambda _, ids: trie.allowed(tuple(ids[width:].tolist())),
                                 logits_processor=LogitsProcessorList([EndAtCompleteLine(trie, width)]),
                                 pad_token_id=trie.eos, eos_token_id=trie.eos, output_scores=True,
                                 return_dict_in_generate=True)
        sequences = out.sequences[:, width:].tolist()
        for user in range(len(sequences) // beams):
            seen = []  # beams come best first; a line shared by several titles ranks them in title order
            for seq in sequences[user * beams:(user + 1) * beams]:
                line = tuple(seq[:seq.index(trie.eos)] if trie.eos in seq else seq)
                seen += [t for t in trie.titles_of.get(line, []) if t not in seen]
            ranked.append(seen)
    return ranked


# ---------------------------------------------------------------- figures

def hit_ndcg(ranked: list[int], target: int, k: int = 10) -> tuple[float, float]:
    if target in ranked[:k]:
        return 1.0, 1.0 / math.log2(ranked.index(target) + 2)
    return 0.0, 0.0


def figures(ranked: list[list[int]], exact: list[list[int]], targets: list[int] | None, seconds: float) -> dict:
    row = {"users_per_s": len(ranked) / seconds, "seconds": round(seconds, 2)}
    for k in TOP:
        row[f"recall@{k}"] = float(np.mean([len(set(r[:k]) & set(e[:k])) / len(e[:k]) for r, e in zip(ranked, exact)]))
    if targets is not None:
        hits = [hit_ndcg(r, t) for r, t in zip(ranked, targets)]
        row["HR@10"], row["NDCG@10"] = float(np.mean([h for h, _ in hits])), float(np.mean([n for _, n in hits]))
    return row


def compare(scorer, model, tok, prompts: list[str], titles: list[str], targets: list[int] | None, beams: list[int],
            cfg) -> dict:
    """Every path on the same prompts; each path's figures against the exhaustive top-K."""
    from cprec.eval.search import PrefixTree

    lines = scorer.lines_ids(titles)
    tree = PrefixTree(lines)
    k = max(TOP)
    top_ids = lambda tops: [[i for i, _ in top] for top in tops]  # noqa: E731

    def cprec_path(exhaustive: bool):
        out = []
        for lo in range(0, len(prompts), cfg.batch_users):
            out += top_ids(scorer.top_k_users(prompts[lo:lo + cfg.batch_users], tree, k, cfg.beam,
                                              exhaustive=exhaustive, frontier=cfg.frontier))
        return out

    scorer.top_k_users(prompts[:1], tree, k, cfg.beam, exhaustive=True)  # warm-up (first-call allocations)
    results = {}
    started = time.perf_counter()
    exact = cprec_path(True)
    results["exhaustive (every title)"] = figures(exact, exact, targets, time.perf_counter() - started)
    default_exhaustive = len(titles) < cfg.exhaustive_below
    started = time.perf_counter()
    found = cprec_path(default_exhaustive)
    label = "cprec default (" + ("every title" if default_exhaustive else f"best-first, beam {cfg.beam}") + ")"
    results[label] = figures(found, exact, targets, time.perf_counter() - started)
    results[label]["same_top20_as_exhaustive"] = all(a[:k] == b[:k] for a, b in zip(found, exact))
    trie = TitleTrie(lines, tok.eos_token_id)
    for b in beams:
        started = time.perf_counter()
        ranked = beam_search(model, tok, prompts, trie, b, max(1, cfg.batch_users // max(1, b // 10)),
                             max(map(len, lines)))
        results[f"generate, {b} beams"] = figures(ranked, exact, targets, time.perf_counter() - started)
    return results


def table(title: str, results: dict) -> list[str]:
    keys = ["users_per_s", "recall@10", "recall@20", "HR@10", "NDCG@10"]
    shown = [k for k in keys if any(k in r for r in results.values())]
    lines = [f"### {title}", "", "| path | " + " | ".join(shown) + " |", "|---|" + "---|" * len(shown)]
    for path, row in results.items():
        cells = [f"{row[k]:.3f}" if k in row else "" for k in shown]
        lines.append(f"| {path} | " + " | ".join(cells) + " |")
    return lines + [""]


# ---------------------------------------------------------------- the two catalogues

def movielens(args, device, dtype, cfg) -> dict:
    """SmolLM2-135M on the held-out genres of the experiment's MovieLens-1M split (prepared here)."""
    import yaml

    from cprec.backbone import load_model
    from cprec.config import from_dict
    from cprec.data.prepare import PrepareConfig, prepare
    from cprec.eval.batched import BatchScorer
    from cprec.eval.downstream import Downstream, downstream_domains

    recipe = yaml.safe_load((REPO / "launch" / "configs" / "experiment_ml1m.yaml").read_text())
    data = from_dict(PrepareConfig, {**recipe["data"], "window_tokens": args.window_tokens})
    model, tok = load_model("smollm2", device, dtype)
    scorer = BatchScorer(model, tok, cfg.row_nodes, cfg.tokens_per_pass, cfg.node_cache_mb << 20)
    cost = lambda line: len(tok(line, add_special_tokens=False)["input_ids"])  # noqa: E731
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        prepare(data, Path(tmp) / "ml")
        manifest, domains = downstream_domains(Path(tmp) / "ml", cfg)
        for domain in domains:
            ds = Downstream(Path(tmp) / "ml", manifest, domain, cfg, cost)
            rows = ds.test[:args.users]
            prompts = [ds.prompt(r) for r in rows]
            targets = [ds.index[r["target"]] for r in rows]
            print(f"{domain}: {len(ds.titles)} titles, {len(rows)} users", flush=True)
            out[f"MovieLens-1M {domain}: {len(ds.titles)} titles, {len(rows)} users"] = compare(
                scorer, model, tok, prompts, ds.titles, targets, args.beams, cfg)
    return out


def generated(args, device, dtype, cfg) -> dict:
    """`--catalogue` synthetic titles, a tiny random Llama made peaked, SmolLM2's tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from cprec.backbone import smollm2_folder
    from cprec.data.synthetic import SyntheticConfig, SyntheticWorld
    from cprec.data.template import render_example
    from cprec.eval.batched import BatchScorer

    tok = AutoTokenizer.from_pretrained(smollm2_folder())
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=1024, eos_token_id=tok.eos_token_id))
    with torch.no_grad():
        model.lm_head.weight *= 10
    model = model.to(device=device, dtype=dtype).eval()
    scorer = BatchScorer(model, tok, cfg.row_nodes, cfg.tokens_per_pass, cfg.node_cache_mb << 20)
    titles = SyntheticWorld(SyntheticConfig(domains=1, items_per_domain=args.catalogue, themes=8, users=1)).titles[0]
    rng = np.random.default_rng(0)
    prompts = [render_example("Books", list(rng.choice(titles, 8)), None, 2000)[0]
               for _ in range(args.catalogue_users)]
    print(f"generated catalogue: {len(titles):,} titles, {len(prompts)} users", flush=True)
    return {f"generated catalogue: {len(titles):,} titles, tiny random Llama, {len(prompts)} users":
            compare(scorer, model, tok, prompts, titles, None, args.beams, cfg)}


def main(argv: list[str] | None = None) -> dict:
    from cprec.eval.config import EvalConfig, resolve_device, sized_for

    parser = argparse.ArgumentParser()
    parser.add_argument("--users", type=int, default=12, help="test users per MovieLens genre")
    parser.add_argument("--window-tokens", dest="window_tokens", type=int, default=255,
                        help="the prompt budget of the prepared split (255: the experiment's cpu size)")
    parser.add_argument("--catalogue", type=int, default=20_000, help="titles of the generated catalogue")
    parser.add_argument("--catalogue-users", dest="catalogue_users", type=int, default=4)
    parser.add_argument("--beams", type=lambda s: [int(b) for b in s.split(",")], default=[10, 20, 50])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--parts", default="movielens,generated")
    parser.add_argument("--out", type=Path, default=None, help="folder for decoders.json and decoders.md")
    args = parser.parse_args(argv)
    device, dtype = resolve_device(args.device)
    cfg = sized_for(EvalConfig(protocol="full"), device)
    print(f"device {device}, {str(dtype).removeprefix('torch.')}; cprec: beam {cfg.beam}, exhaustive below "
          f"{cfg.exhaustive_below} titles, {cfg.batch_users} users per batch", flush=True)
    results = {}
    if "movielens" in args.parts:
        results.update(movielens(args, device, dtype, cfg))
    if "generated" in args.parts:
        results.update(generated(args, device, dtype, cfg))
    lines = [f"device {device}, {str(dtype).removeprefix('torch.')}, torch {torch.__version__}", ""]
    for title, rows in results.items():
        lines += table(title, rows)
    print("\n".join(lines))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "decoders.json").write_text(json.dumps(results, indent=1))
        (args.out / "decoders.md").write_text("\n".join(lines))
    return results


if __name__ == "__main__":
    main()
