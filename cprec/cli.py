"""The `cprec` command: one subcommand per stage."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from cprec.config import ConfigError, load_config
from cprec.errors import CPRecError


def format_table(header: list[str], rows: list[list]) -> str:
    """A plain aligned text table (also valid Markdown)."""
    cells = [[str(c) for c in header]] + [[f"{c:,}" if isinstance(c, int) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(cells[0], widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) + " |"
              for r in cells[1:]]
    return "\n".join(lines)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. k_core=10")


def cmd_prepare(args) -> int:
    from cprec.data.prepare import PrepareConfig, prepare, summary_rows

    overrides = list(args.overrides)
    if args.source:
        overrides.append(f"source={args.source}")
    if args.input:
        overrides.append(f"input.path={args.input}")
    cfg = load_config(PrepareConfig, args.config, overrides)
    manifest = prepare(cfg, args.out, overwrite=args.overwrite)
    print(format_table(["domain", "role", "users", "items", "interactions", "documents"], summary_rows(manifest)))
    rejects = manifest["rejects"]
    print(f"\nprepared {manifest['counts']['interactions']:,} interactions of {manifest['counts']['users']:,} users "
          f"in {manifest['seconds']:.1f} s -> {args.out} ({rejects['total']:,} rejected rows of "
          f"{rejects['rows_read']:,} read)")
    return 0


def cmd_quickstart(args) -> int:
    from cprec.data.prepare import PrepareConfig, prepare, summary_rows

    out = Path(args.out)
    timings = {}
    started = time.perf_counter()
    manifest = prepare(PrepareConfig(), out / "prepared", overwrite=True)
    timings["prepare"] = time.perf_counter() - started
    print(format_table(["domain", "role", "users", "items", "interactions", "documents"], summary_rows(manifest)))
    print("\n" + format_table(["stage", "seconds"], [[k, f"{v:.1f}"] for k, v in timings.items()]))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cprec", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="raw logs -> cleaned behaviour, documents and downstream splits")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--source", help="movielens-1m (default), amazon2018, amazon2023, csv, parquet, synthetic")
    p.add_argument("--input", help="input directory (sets input.path)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    _add_config_args(p)
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("quickstart", help="the whole pipeline on MovieLens-1M with the embedded defaults")
    p.add_argument("--out", default="runs/quickstart", help="output directory (default: runs/quickstart)")
    p.set_defaults(func=cmd_quickstart)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CPRecError, ConfigError) as exc:
        print(f"cprec {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
