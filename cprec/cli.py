"""The `cprec` command: one subcommand per stage."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

from cprec.config import ConfigError, load_config
from cprec.tables import format_table, stream_table
from cprec.errors import CPRecError


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. k_core=10")


def prepare_config(args):
    from cprec.data.prepare import PrepareConfig

    overrides = list(args.overrides)
    if args.source:
        overrides.append(f"source={args.source}")
    if args.input:
        overrides.append(f"input.path={args.input}")
    return load_config(PrepareConfig, args.config, overrides)


def cmd_prepare(args) -> int:
    from cprec.data.prepare import prepare, summary_rows

    manifest = prepare(prepare_config(args), args.out, overwrite=args.overwrite)
    print(format_table(["domain", "role", "users", "items", "interactions", "documents"], summary_rows(manifest)))
    rejects = manifest["rejects"]
    print(f"\nprepared {manifest['counts']['interactions']:,} interactions of {manifest['counts']['users']:,} users "
          f"in {manifest['seconds']:.1f} s -> {args.out} ({rejects['total']:,} rejected rows of "
          f"{rejects['rows_read']:,} read)")
    short = {s: st["short_windows_dropped"] for s, st in manifest["streams"].items() if st.get("short_windows_dropped")}
    if short:
        print(f"left out {sum(short.values()):,} windows with fewer than min_doc_items items (a title that fills a "
              f"document's budget alone): " + ", ".join(f"{s} {n:,}" for s, n in short.items()) +
              " (manifest.json: streams.*.short_windows_dropped)")
    return 0


def pack_config(args):
    from cprec.data.pack import PackConfig

    overrides = list(args.overrides)
    for key in ("seq_len", "workers", "shard_rows"):
        if getattr(args, key) is not None:
            overrides.append(f"{key}={getattr(args, key)}")
    return load_config(PackConfig, args.config, overrides)


def cmd_pack(args) -> int:
    from cprec.data.pack import pack

    index = pack(args.input, args.tokenizer, args.out, pack_config(args))
    print(format_table(*stream_table(index)))
    report = index["report"]
    print(f"\npacked {report['shards']} shards ({report['reused_shards']} kept from an earlier run) -> {args.out}")
    return 0


def cmd_inspect(args) -> int:
    from cprec.data.shards import ShardSet

    data = ShardSet(args.shards)
    idx = data.index
    if args.row is not None:  # before any output or the tokenizer's load: a bad --stream/--row fails fast
        if not args.stream:
            raise CPRecError("--row needs --stream")
        data.locate(args.stream, args.row)  # names the stream and its number of rows when out of range
    print(f"{data.root}: {idx['format']} v{idx['version']}, seq_len {idx['seq_len']}, {idx['dtype']}, tokenizer "
          f"{idx['tokenizer']['name']} (vocab {idx['tokenizer']['vocab_size']:,}), template {idx['template_version']}, "
          f"fingerprint {data.fingerprint}")
    print(format_table(*stream_table(idx)))
    if args.verify:
        print(f"\nverified {data.verify()} shards: every checksum and table is consistent, the stream totals "
              f"match the shard entries and every shard file on disk is listed")
    if args.row is not None:
        from cprec.backbone import load_tokenizer, packed_tokenizer

        tok = load_tokenizer(packed_tokenizer(idx, args.tokenizer, f"the shards of {data.root}"))
        tokens, lens, prompts = data.row(args.stream, args.row)
        pos = 0
        print(f"\nrow {args.row} of '{args.stream}': {len(lens)} documents, {int(lens.sum())} tokens, "
              f"{data.seq_len - int(lens.sum())} padding")
        for k, (n, p) in enumerate(zip(lens.tolist(), prompts.tolist())):
            ids = tokens[pos:pos + n].tolist()
            prompt, target = tok.decode(ids[:p]), tok.decode(ids[p:])
            print(f"--- document {k}: {n} tokens" + (f", {p} prompt tokens (no loss)" if p else ""))
            print((f"{prompt}<<<PROMPT ENDS>>>" if p else "") + target)
            pos += n
    return 0


def cmd_train(args) -> int:
    """The one-process case of launch/train.py (use deepspeed/torchrun for several ranks)."""
    from cprec.train.arguments import run, split_mixture_overrides

    return run(split_mixture_overrides(args))


def cmd_sft(args) -> int:
    """Fine-tuning in this process on the packed downstream streams; the result is exported to OUT/hf."""
    from cprec.finetune import finetune, sft_config

    cfg = sft_config(args.model, args.shards, args.out, args.overrides, args.domains, args.epochs, args.config)
    print(f"fine-tuning {args.model} on {', '.join(cfg.mixture) or 'every sft stream'}: "
          f"{cfg.schedule.total_steps} steps of {cfg.global_batch} rows", flush=True)
    last, hf = finetune(cfg, resume=args.resume)
    if hf is None:
        print(f"stopped at step {last.get('step', 0)}; continue with `cprec sft ... --resume`")
        return 0
    loss = f"loss {last['loss']:.4f}; " if last else "already complete; "  # a --resume of a finished run
    print(f"step {cfg.schedule.total_steps}: {loss}exported -> {hf} (evaluate with `cprec evaluate "
          f"--model {hf} --data PREPARED_DIR --out DIR`)")
    return 0


def cmd_export(args) -> int:
    from cprec.export import export

    out = export(args.checkpoint, args.out, args.dtype, overwrite=args.overwrite)
    print(f"exported {args.checkpoint} -> {out} (AutoModelForCausalLM.from_pretrained('{out}') loads it)")
    return 0


def _add_eval_args(p: argparse.ArgumentParser, overrides_help: str) -> None:
    """What `evaluate` and `baseline` share: data, output, domains, protocol, users and candidates."""
    p.add_argument("--data", required=True, help="a directory written by `cprec prepare`")
    p.add_argument("--out", required=True, help="results directory")
    p.add_argument("--domains", nargs="*", help="downstream domains (default: all)")
    p.add_argument("--protocol", default="both", choices=["full", "sampled", "both"])
    p.add_argument("--users", type=int, help="a seeded sample of this many test users per domain (default: all); "
                   "the same seed gives every model the same users")
    p.add_argument("--candidates", help="score on the candidates saved by an earlier run (DIR/candidates)")
    p.add_argument("--device", help="auto (default: this rank's GPU when there is one, else cpu), cpu, cuda, cuda:N")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto (default): bfloat16 on a GPU, float32 on the CPU")
    p.add_argument("overrides", nargs="*", metavar="key=value", help=overrides_help)


def _eval_overrides(args, overrides: list[str]) -> list[str]:
    out = list(overrides) + [f"protocol={args.protocol}"]
    out += [f"{name}={getattr(args, name)}" for name in ("device", "dtype") if getattr(args, name)]
    if args.domains:
        out.append(f"domains={json.dumps(args.domains)}")
    if args.users is not None:
        out.append(f"users={args.users}")
    return out


def eval_config(args):
    from cprec.eval.config import EvalConfig

    return load_config(EvalConfig, None, _eval_overrides(args, args.overrides))


def baseline_configs(args):
    """(evaluation config, SASRec config): the overrides are split by the key they name."""
    from cprec.eval.config import EvalConfig
    from cprec.eval.sasrec import SASRecConfig

    eval_keys = {f.name for f in __import__("dataclasses").fields(EvalConfig)}
    eval_over = _eval_overrides(args, [o for o in args.overrides if o.split("=", 1)[0] in eval_keys])
    model_over = [o for o in args.overrides if o.split("=", 1)[0] not in eval_keys]
    return load_config(EvalConfig, None, eval_over), load_config(SASRecConfig, None, model_over)


def cmd_evaluate(args) -> int:
    """One process, or one rank of `torchrun launch/evaluate.py` (the same command line)."""
    from cprec.eval.evaluate import evaluate

    results = evaluate(args.model, args.data, args.out, eval_config(args), args.candidates)
    if results is None:  # not rank 0: rank 0 reports
        return 0
    print((Path(args.out) / "results.md").read_text())
    print(f"results in {args.out}/results.json and results.md ({len(results['domains'])} domains)")
    return 0


def cmd_baseline(args) -> int:
    from cprec.eval.sasrec import evaluate_sasrec

    results = evaluate_sasrec(args.data, args.out, *baseline_configs(args), args.candidates)
    print((Path(args.out) / "results.md").read_text())
    print(f"results in {args.out}/results.json and results.md ({len(results['domains'])} domains)")
    return 0


def cmd_sweep(args) -> int:
    """Anneal branches from a run's branch points, each exported and evaluated (`cprec.sweep`)."""
    from cprec.eval.config import EvalConfig
    from cprec.sweep import spec_from_args, sweep

    keys = {f.name for f in __import__("dataclasses").fields(EvalConfig)}  # --mixture's nargs took them
    args.overrides += [w for w in args.mixture if w.partition("=")[0] in keys]
    args.mixture = [w for w in args.mixture if w.partition("=")[0] not in keys]
    summary = sweep(spec_from_args(args), args.branch)
    if summary is not None:
        out = Path(args.out) if args.out else Path(args.run) / "sweep"
        print("\n" + (out / "sweep.md").read_text())
        print(f"sweep in {out}: sweep.json, sweep.md, plots/sweep.png")
    return 0


def cmd_quickstart(args) -> int:
    """The README's main job (`cprec.quickstart`)."""
    from cprec.quickstart import run_quickstart

    return run_quickstart(args)


def cmd_experiment(args) -> int:
    """The paper's comparison with its uncertainty (`cprec.experiment`)."""
    from cprec.experiment import run_experiment

    report = run_experiment(args.config, args.out, args.size, args.overrides)
    print("\n" + report.read_text())
    print(f"report: {report}; results.json and plots/ beside it")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from cprec.train.arguments import add_train_arguments

    parser = argparse.ArgumentParser(prog="cprec", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="raw logs -> cleaned behaviour, documents and downstream splits")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--source", help="movielens-1m (default), amazon2018, amazon2023, csv, parquet, synthetic")
    p.add_argument("--input", help="input directory (sets input.path)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    _add_config_args(p)
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("pack", help="tokenize and pack prepared documents into compressed shards")
    p.add_argument("--input", required=True, help="a directory written by `cprec prepare`")
    p.add_argument("--tokenizer", default="smollm2", help="a Hugging Face tokenizer folder, or smollm2 (default)")
    p.add_argument("--out", required=True, help="shard directory")
    p.add_argument("--seq-len", dest="seq_len", type=int, help="tokens per row (default 1024)")
    p.add_argument("--workers", type=int, help="tokenizer processes (default 1)")
    p.add_argument("--shard-rows", dest="shard_rows", type=int, help="about this many rows per shard (default 2048)")
    _add_config_args(p)
    p.set_defaults(func=cmd_pack)

    p = sub.add_parser("inspect", help="show a shard directory; decode a row")
    p.add_argument("shards", help="shard directory")
    p.add_argument("--stream", help="stream of --row")
    p.add_argument("--row", type=int, help="decode this row back to text")
    p.add_argument("--tokenizer", help="tokenizer folder for --row (default: the one the index names)")
    p.add_argument("--verify", action="store_true", help="read every shard and check its checksum; check the "
                   "index's totals against its shards and look for shard files it does not list")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("train", help="continual pre-training in this process (launch/train.py for several)")
    add_train_arguments(p)  # the same command line as launch/train.py
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sft", help="fine-tune on the packed downstream streams (loss on the target item only)")
    p.add_argument("--model", default="smollm2", help="a Hugging Face folder (a `cprec export` of a pre-training "
                   "run: the CPRec recipe) or smollm2 (the base model: the fine-tuning-only ablation)")
    p.add_argument("--shards", required=True, help="a `cprec pack` output (holds the sft-* streams)")
    p.add_argument("--out", required=True, help="run directory; the final model is exported to OUT/hf")
    p.add_argument("--domains", nargs="*", help="downstream domains to fine-tune on (default: all)")
    p.add_argument("--epochs", type=float, help="size the schedule to this many passes over the chosen streams")
    p.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint")
    p.add_argument("--config", help="training config (default: launch/configs/sft.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. schedule.peak_lr=1e-4 global_batch=16")
    p.set_defaults(func=cmd_sft)

    p = sub.add_parser("export", help="a checkpoint -> a Hugging Face folder")
    p.add_argument("checkpoint", help="RUN/checkpoints/stepNNNNNNNN")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out (never any "
                   "other folder)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("evaluate", help="next-item recommendation on the held-out downstream domains")
    p.add_argument("--model", required=True, help="a Hugging Face model folder (e.g. cprec export's), or smollm2")
    _add_eval_args(p, "e.g. beam=10 negatives=99 seed=0 batch_users=16")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("baseline", help="ID-based baselines on the same users and candidates")
    p.add_argument("kind", choices=["sasrec"])
    _add_eval_args(p, "SASRec (hidden, layers, epochs, ...) and evaluation (seed, negatives) settings")
    p.set_defaults(func=cmd_baseline)

    p = sub.add_parser("sweep", help="anneal from each branch point of a run, evaluate each on the validation split")
    from cprec.sweep import add_sweep_arguments

    add_sweep_arguments(p)
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("experiment", help="base, CPT, SFT, CPT+SFT and SASRec over seeds, with intervals and "
                       "paired bootstraps; resumable")
    p.add_argument("--config", required=True, help="e.g. launch/configs/experiment_ml1m.yaml")
    p.add_argument("--out", required=True, help="experiment folder (a re-run resumes it)")
    p.add_argument("--size", help="a named size of the config (its sizes.<name> overlay), e.g. smoke")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. seeds=[0,1] eval.users=100")
    p.set_defaults(func=cmd_experiment)

    p = sub.add_parser("quickstart", help="the whole pipeline on MovieLens-1M with the embedded defaults")
    p.add_argument("--out", default="runs/quickstart", help="output directory (default: runs/quickstart)")
    p.add_argument("--seq-len", dest="seq_len", type=int, default=256, help="tokens per packed row (default 256)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="pack workers (default: all cores)")
    p.add_argument("--eval-users", dest="eval_users", type=int, default=10,
                   help="test users per downstream domain to evaluate (default 10: minutes on a CPU)")
    p.add_argument("--sft-steps", dest="sft_steps", type=int, default=0,
                   help="also fine-tune the base and the pre-trained model for this many steps of 4 examples "
                   "and evaluate both (default 0: skip; each step costs ~25 s per model on a 2-core CPU)")
    p.add_argument("--sweep", action="store_true", help="also anneal from two branch points of the run and add "
                   "the sweep's table to report.md (`cprec sweep`)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="training overrides on launch/configs/quickstart.yaml, e.g. schedule.stable_steps=4")
    p.set_defaults(func=cmd_quickstart)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse like argparse, but let `key=value` overrides stand anywhere on the line, as users write them:
    after an option (`--resume k=v`, which argparse rejects once the positionals were taken) or after a list
    option (`--domains Sci-Fi k=v`, whose nargs='*' would swallow them; no domain name holds '=')."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    stray = [w for w in extra if "=" in w and not w.startswith("-")]
    if len(stray) < len(extra) or (stray and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    overrides = list(getattr(args, "overrides", None) or [])
    if getattr(args, "domains", None):
        overrides += [d for d in args.domains if "=" in d]
        args.domains = [d for d in args.domains if "=" not in d]
    if hasattr(args, "overrides"):
        args.overrides = overrides + stray
    return args


def main(argv: list[str] | None = None) -> int:
    from cprec.process_group import close_process_group

    args = parse_args(argv)
    clean = False
    try:
        code, clean = args.func(args), True
        return code
    except (CPRecError, ConfigError) as exc:
        print(f"cprec {args.command}: error: {exc}", file=sys.stderr)
        return 2
    finally:
        with contextlib.suppress(Exception):  # a failed teardown must not hide the command's own exit
            close_process_group(clean)  # also after a refusal: see close_process_group


if __name__ == "__main__":
    sys.exit(main())
