"""The report of `cprec experiment`: OUT/results.json, OUT/report.md and OUT/plots/, from the finished stages.

It reads each evaluation's per-user ranks (`ranks.jsonl`, full ranking) and its `results.json`, refuses
results of different splits (`cprec.data.prepared.check_same_split`), and computes with `cprec.eval.stats`:
per model, domain and metric the mean and 95% interval over seeds; per comparison (CPT+SFT vs SFT only, CPT+SFT
vs SASRec, CPT zero-shot vs the backbone zero-shot), domain and metric (HR@10, NDCG@10) the paired bootstrap
over users of the seed-averaged per-user metric. The report says in words which differences are significant.
"""

from __future__ import annotations

import json
from pathlib import Path

from cprec.data.cleaning import markdown_text
from cprec.data.prepared import LEAVE_ONE_OUT, check_same_split, read_manifest, split_kind
from cprec.errors import CPRecError
from cprec.eval import stats
from cprec.tables import markdown_table
from cprec.train.metrics_log import read_metrics

MODELS = {  # name -> label in the report; the order of the tables
    "base": "backbone, zero-shot",
    "cpt": "continual pre-training (CPT), zero-shot",
    "sft": "fine-tuning only (SFT)",
    "cpt_sft": "CPT, then SFT",
    "sasrec": "SASRec",
}
COMPARISONS = [("cpt_sft", "sft"), ("cpt_sft", "sasrec"), ("cpt", "base")]  # (A, B): A - B is tested
TESTED_METRICS = ["HR@10", "NDCG@10"]

PROTOCOL = "full"  # the primary protocol: the statistics are computed on it


def read_full_ranks(folder: Path) -> dict[str, int | None]:
    """user -> the target's rank under full ranking, in test order, from an evaluation folder's ranks.jsonl."""
    from cprec.eval.ranks import RANKS_FILE, read_final

    path = folder / RANKS_FILE
    if not path.is_file():
        raise CPRecError(f"{path}: missing; the evaluation did not finish (run the experiment again)")
    return {str(rec["user"]): rec["rank"] for rec in read_final(folder) if rec["protocol"] == PROTOCOL}


def collect(exp) -> tuple[dict, dict, str]:
    """ranks[model][domain] = [per seed: {user: rank}], seeds[model] = [seed...], and the one split kind."""
    ranks: dict = {}
    seeds: dict = {}
    splits = {"prepared": split_kind(read_manifest(exp.prepared))}
    domains = exp.domains()
    for model, runs in exp.runs().items():
        seeds[model] = [s for s, _ in runs]
        for domain, slug in domains:
            for seed, _ in runs:
                folder = exp.eval_dir(model, seed, slug)
                if not (folder / "results.json").is_file():
                    raise CPRecError(f"{folder}/results.json is missing: that evaluation did not finish; re-run "
                                     f"the experiment to finish it")
                result = json.loads((folder / "results.json").read_text())
                splits[str(folder.relative_to(exp.out))] = result.get("split_kind", LEAVE_ONE_OUT)
                ranks.setdefault(model, {}).setdefault(domain, []).append(read_full_ranks(folder))
    return ranks, seeds, check_same_split(splits)


def compute(exp) -> dict:
    """Everything results.json holds (see the module docstring)."""
    ranks, seeds, split = collect(exp)
    domains = [d for d, _ in exp.domains()]
    users = {d: list(ranks["base"][d][0]) for d in domains}  # the test order
    table: dict = {}
    for model, per_domain in ranks.items():
        for domain, runs in per_domain.items():
            for run in runs:
                if set(run) != set(users[domain]):
                    raise CPRecError(f"{model} was scored on other users of {domain} than the backbone: the "
                                     f"comparison needs the same users")
            entry = table.setdefault(model, {}).setdefault(domain, {})
            for metric in stats.metric_names():
                values = [float(stats.per_user([run[u] for u in users[domain]], metric).mean()) for run in runs]
                entry[metric] = {"values": values, **stats.seed_interval(values)}
    tests = []
    for a, b in exp.comparisons():
        for domain in domains:
            for metric in TESTED_METRICS:
                per = [stats.seed_averaged_per_user([[run[u] for u in users[domain]] for run in ranks[m][domain]],
                                                    metric) for m in (a, b)]
                test = stats.paired_bootstrap(per[0], per[1], exp.cfg.bootstrap, seed=0)
                tests.append({"a": a, "b": b, "domain": domain, "metric": metric, **test,
                              "significant": stats.significant(test)})
    moves = [{"a": a, "b": b, "domain": d, **rank_moves(ranks[a][d][0], ranks[b][d][0], users[d])}
             for a, b in exp.comparisons() for d in domains]
    return {"name": exp.cfg.name, "size": exp.size, "split": split, "protocol": PROTOCOL, "domains": domains,
            "users": {d: len(users[d]) for d in domains}, "seeds": seeds, "metrics": table, "comparisons": tests,
            "rank_moves": moves, "cpt_runs": cpt_summaries(exp),
            "alpha": stats.ALPHA, "bootstrap_resamples": exp.cfg.bootstrap, "stage_seconds": exp.stages.seconds()}


TOP = 20  # the search's exact top-K: a target ranked beyond it has rank None


def rank_moves(ranks_a: dict, ranks_b: dict, users: list) -> dict:
    """How model A moved each user's target against model B (each model's first seed): users whose target A
    ranks better (a better rank, or into the top 20), worse, the same inside the top 20, or beyond the top 20
    for both; and the mean 1-based rank with a target beyond the top 20 counted as 21."""
    def place(rank):  # 1-based; ranks.jsonl holds 0-based ranks, None beyond the exact top 20
        return TOP + 1 if rank is None else rank + 1

    pairs = [(place(ranks_a[u]), place(ranks_b[u])) for u in users]
    return {"better": sum(a < b for a, b in pairs), "worse": sum(a > b for a, b in pairs),
            "same_in_top": sum(a == b <= TOP for a, b in pairs),
            "beyond_both": sum(a == b == TOP + 1 for a, b in pairs),
            "mean_rank_a": sum(a for a, _ in pairs) / len(pairs), "mean_rank_b": sum(b for _, b in pairs) / len(pairs)}


def cpt_summaries(exp) -> list[dict]:
    """Per CPT run: steps, tokens seen, peak learning rate, first and last loss (the diagnosis when CPT does
    not help); empty when CPT was not run."""
    out = []
    for seed in exp.cpt_seeds() if "cpt" in exp.cfg.models else []:
        rows, _ = read_metrics(exp.cpt_dir(seed) / "run")
        if rows:
            tokens = sum(sum(r.get("tokens_per_stream", {}).values()) for r in rows)
            out.append({"seed": seed, "steps": rows[-1]["step"], "tokens": tokens,
                        "peak_lr": max(r["lr"] for r in rows), "first_loss": rows[0]["loss"],
                        "last_loss": rows[-1]["loss"]})
    return out


def write_report(exp) -> Path:
    """OUT/results.json, OUT/plots/*.png and OUT/report.md; returns the report's path."""
    results = compute(exp)
    (exp.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plots = draw_plots(exp, results)
    path = exp.out / "report.md"
    path.write_text(markdown(exp, results, plots))
    return path


def _cell(m: dict) -> str:
    if m["n"] == 1:
        return f"{m['mean']:.4f}"
    return f"{m['mean']:.4f} [{m['low']:.4f}, {m['high']:.4f}]"


def results_table(results: dict, metrics: list[str]) -> list[str]:
    """One markdown table: a row per domain and model, a column per metric (mean [95% interval over seeds])."""
    rows = [[markdown_text(domain), label, entry[metrics[0]]["n"], *(_cell(entry[m]) for m in metrics)]
            for domain in results["domains"] for model, label in MODELS.items() if model in results["metrics"]
            for entry in [results["metrics"][model][domain]]]
    return markdown_table(["domain", "model", "seeds", *metrics], rows)


def comparison_table(results: dict) -> list[str]:
    rows = [[markdown_text(t["domain"]), f"{MODELS[t['a']]} − {MODELS[t['b']]}", t["metric"], f"{t['diff']:+.4f}",
             f"[{t['low']:+.4f}, {t['high']:+.4f}]", f"{t['p']:.4f}", "yes" if t["significant"] else "no"]
            for t in results["comparisons"]]
    return markdown_table(["domain", "comparison", "metric", "difference", "95% CI", "p", "significant"], rows)


def moves_table(results: dict) -> list[str]:
    header = ["domain", "comparison (A vs B)", "A ranks the target better", "worse", f"same (top {TOP})",
              f"beyond top {TOP} for both", f"mean rank A / B (beyond = {TOP + 1})"]
    rows = [[markdown_text(m["domain"]), f"{MODELS[m['a']]} vs {MODELS[m['b']]}", m["better"], m["worse"],
             m["same_in_top"], m["beyond_both"], f"{m['mean_rank_a']:.2f} / {m['mean_rank_b']:.2f}"]
            for m in results["rank_moves"]]
    return markdown_table(header, rows)


def in_words(results: dict) -> list[str]:
    lines = [f"* {markdown_text(t['domain'])}: " + stats.describe(t, MODELS[t['a']], MODELS[t['b']], t["metric"], results["alpha"])
             for t in results["comparisons"]]
    found = [t for t in results["comparisons"] if t["significant"]]
    lines.append(f"\n{len(found)} of {len(results['comparisons'])} tests are significant at the {results['alpha']:g} "
                 f"level (uncorrected for the {len(results['comparisons'])} tests; under no true difference about "
                 f"{results['alpha'] * len(results['comparisons']):.1f} would be by chance).")
    return lines


def markdown(exp, results: dict, plots: dict) -> str:
    cfg = exp.cfg
    seeds = ", ".join(map(str, cfg.seeds))
    cpt = "once per seed" if cfg.cpt.per_seed else f"once (seed {cfg.seeds[0]})"
    lines = [f"# CPRec experiment: {results['name']}" + (f" (size: {results['size']})" if results["size"] else ""), "",
             f"**Split: {results['split']}** (numbers from leave-one-out and chronological splits are not comparable). "
             f"Protocol: full ranking over each held-out domain's catalogue (exact top-20). Test users: "
             + ", ".join(f"{markdown_text(d)} {n}" for d, n in results["users"].items())
             + ("" if cfg.eval.users is None else f" (a seeded sample of {cfg.eval.users} per domain)")
             + f". Seeds: {seeds} for fine-tuning and SASRec; continual pre-training {cpt}. The backbone zero-shot "
             "is deterministic (one run).", "",
             *([f"**Size `{results['size']}`**: the config's `sizes.{results['size']}` overlay. "
                + (cfg.description or "Read its numbers as a check that the pipeline runs end to end, not as a "
                   "result about the method."), ""]
               if results["size"] else ([cfg.description, ""] if cfg.description else [])),
             f"Models run: {', '.join(MODELS[m] for m in results['metrics'])}.", "",
             "## Results", "",
             "Mean over seeds, with the two-sided 95% Student-t interval over seeds in brackets (none for a single "
             "run).", "", *results_table(results, TESTED_METRICS), "",
             *results_table(results, ["HR@20", "NDCG@20"]), "",
             f"![HR@10 and NDCG@10]({plots['metrics']})", "",
             "## Which differences are significant", "",
             f"Paired bootstrap over test users ({results['bootstrap_resamples']:,} resamples) of each user's metric "
             "averaged over the model's seeds; two-sided p-value, 95% interval of the difference (first model minus "
             "second). See `cprec/eval/stats.py` for exactly what is computed.", "",
             *comparison_table(results), "", *in_words(results), "",
             "## How the targets' ranks moved", "",
             f"Per test user, the rank of the held-out target under model A against model B (first seed of each; "
             f"the search is exact for the top {TOP}, so a rank beyond it is not known more precisely).", "",
             *moves_table(results), "",
             "## Continual pre-training", ""]
    for run in results["cpt_runs"]:
        lines += [f"CPT seed {run['seed']}: {run['steps']} steps, {run['tokens']:,} tokens seen, "
                  f"peak learning rate {run['peak_lr']:g}, training loss {run['first_loss']:.3f} at step 1 -> "
                  f"{run['last_loss']:.3f} at step {run['steps']}.", ""]
    if plots.get("loss"):
        lines += [f"![pre-training loss]({plots['loss']})", ""]
    lines += ["Stage times (seconds): " + ", ".join(f"{k} {v:.0f}" for k, v in results["stage_seconds"].items()), ""]
    return "\n".join(lines)


def draw_plots(exp, results: dict) -> dict:
    """plots/metrics.png (HR@10 and NDCG@10 per model and domain, 95% seed intervals as error bars) and
    plots/cpt_loss.png (the pre-training loss per step of each CPT run); paths relative to OUT."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    folder = exp.out / "plots"
    folder.mkdir(exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    shown = {m: label for m, label in MODELS.items() if m in results["metrics"]}
    width = 0.8 / len(shown)
    for ax, metric in zip(axes, ["HR@10", "NDCG@10"]):
        x = np.arange(len(results["domains"]))
        for k, (model, label) in enumerate(shown.items()):
            cells = [results["metrics"][model][d][metric] for d in results["domains"]]
            means = [c["mean"] for c in cells]
            # a metric lies in [0, 1]: the drawn interval is clipped there (results.json keeps it whole)
            err = [[c["mean"] - max(0.0, c["low"]) if c["low"] is not None else 0 for c in cells],
                   [min(1.0, c["high"]) - c["mean"] if c["high"] is not None else 0 for c in cells]]
            ax.bar(x + (k - (len(shown) - 1) / 2) * width, means, width, yerr=err, capsize=3, label=label)
        ax.set_xticks(x, results["domains"])
        ax.set_title(f"{metric} ({results['split']}, full ranking; 95% seed intervals, clipped to [0, 1])",
                     fontsize=9)
        ax.set_ylim(bottom=0)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / "metrics.png", dpi=120)
    plt.close(fig)
    out = {"metrics": "plots/metrics.png"}
    fig, ax = plt.subplots(figsize=(6, 4))
    drawn = False
    for seed in exp.cpt_seeds() if "cpt" in exp.cfg.models else []:
        rows, _ = read_metrics(exp.cpt_dir(seed) / "run")  # step records (not the metric during training)
        if rows:
            ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label=f"CPT seed {seed}")
            drawn = True
    if drawn:
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (token mean)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(folder / "cpt_loss.png", dpi=120)
        out["loss"] = "plots/cpt_loss.png"
    plt.close(fig)
    return out
