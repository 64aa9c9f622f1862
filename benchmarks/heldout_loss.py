"""The diagnosis beside a recommendation result: each model's loss on the held-out genres' next items.

For a seeded sample of test users per held-out domain, the test example is rendered exactly as evaluation and
fine-tuning render it (`template.render_example`: the newest history that fits, then the target's line), and
the mean negative log-likelihood per token of the target line is computed under each model. A model that
learned the behaviour text of the pre-training genres scores the held-out genres' true next items as more
likely (a lower loss), whether or not that moves their rank among all titles.

    python benchmarks/heldout_loss.py --data OUT/prepared --models smollm2 OUT/cpt/s0/hf --users 50

Prints one table (domain, model, users, target tokens, mean NLL per target token, and the difference to the
first model) and writes it as JSON with --out.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path


def examples(prepared: Path, users: int, budget_tokens: int, tok) -> dict[str, list[tuple[str, int]]]:
    """domain -> [(text, prompt characters)] of a seeded sample of its test users."""
    from cprec.data import template
    from cprec.data.prepared import Prepared

    data = Prepared(prepared)
    out = {}
    for domain in data.downstream_domains:
        rows = [json.loads(line) for line in data.downstream(domain, "test").open(encoding="utf-8")]
        picked = random.Random(0).sample(rows, min(users, len(rows)))
        out[domain] = [template.render_example(domain, r["history"], r["target"], budget_tokens,
                                               lambda s: len(tok(s, add_special_tokens=False)["input_ids"]))
                       for r in picked]
    return out


def target_nll(model, tok, text: str, prompt_chars: int) -> tuple[float, int]:
    """(summed NLL of the target's tokens, their count) for one example."""
    import torch

    prompt_ids = tok(text[:prompt_chars], add_special_tokens=False)["input_ids"]
    ids = prompt_ids + tok(text[prompt_chars:], add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].float()
    logp = torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    target = logp[len(prompt_ids) - 1:]
    return float(-target.sum()), len(target)


def main() -> None:
    from cprec.backbone import load_model

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="a prepared directory (cprec prepare)")
    p.add_argument("--models", nargs="+", required=True, help="smollm2 or Hugging Face folders; the first is the base")
    p.add_argument("--users", type=int, default=50, help="test users per held-out domain (seeded sample)")
    p.add_argument("--budget", type=int, default=255, help="prompt budget in tokens (the prepared window)")
    p.add_argument("--out", help="write the table as JSON here")
    args = p.parse_args()
    rows = []
    for spec in args.models:
        model, tok = load_model(spec)
        model.eval()
        for domain, items in examples(Path(args.data), args.users, args.budget, tok).items():
            nll = tokens = 0
            for text, prompt_chars in items:
                s, n = target_nll(model, tok, text, prompt_chars)
                nll, tokens = nll + s, tokens + n
            rows.append({"domain": domain, "model": spec, "users": len(items), "tokens": tokens,
                         "nll_per_token": nll / tokens})
        del model
    base = {r["domain"]: r["nll_per_token"] for r in rows if r["model"] == args.models[0]}
    print("| domain | model | users | target tokens | NLL per target token | vs first model |")
    print("|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["domain"], args.models.index(r["model"]))):
        print(f"| {r['domain']} | {r['model']} | {r['users']} | {r['tokens']:,} | {r['nll_per_token']:.4f} | "
              f"{r['nll_per_token'] - base[r['domain']]:+.4f} |")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
