"""Evaluation speed on one GPU: users/s of SmolLM2-135M on a generated 10,000-title catalogue, with its ranks
checked against the CPU path. Goal (issue 14): >= 50 users/s full ranking on one H100-class GPU.

Users are generated: a history of 3-12 catalogue titles (the prompt, within a 511-token budget as MovieLens
is prepared), a target title outside it, and 99 sampled negatives. Prints, for the GPU in its evaluation
precision (bf16 by default): users/s of full ranking (exact top-20 by best-first search) and of sampled ranking
(100 candidates) for each --beam and --batch-users (users per forward pass; each pass feeds up to 256 tree
nodes per user, --tokens-per-pass-per-user) side by side, with fed nodes per user, the search's peak frontier
and fallbacks; the first setting is `cprec evaluate`'s default on a GPU. Then, on
--check-users users, the same ranks recomputed by the CPU path (fp32, the same batched scorer on the CPU)
and by the GPU in fp32: the fp32 ranks must be identical to the CPU's; bf16's agreement is reported (its
rounding can reorder near-ties, so it is a figure, not a check).

Also, on --exhaustive-users users, full ranking by scoring every title (the cost of the exact path without a
search, which does not depend on the weights).

--model random:DIR builds SmolLM2's architecture from DIR/config.json with random weights, its head scaled
x10 so that its next-token distributions are peaked as a trained model's are (as bench_eval's 20k catalogue),
and DIR's tokenizer: for a GPU machine without the weights (they can travel: gpu_experiment_prepare.sh). Its search figures are a
stand-in (a search's work depends on the weights); its exhaustive figures are not.

--decoders runs benchmarks/bench_decoders.py's comparison instead (issue 27: CPRec's search against transformers'
constrained beam search with 10, 20 and 50 beams and exhaustive scoring, on MovieLens-1M's held-out genres with
SmolLM2-135M and a generated catalogue), on this GPU in bf16 with the GPU batch sizes; the arguments after it go
to bench_decoders.py:
      python benchmarks/gpu_eval.py --decoders --users 64 --catalogue 20000 --catalogue-users 32 --out DIR

Run:  python benchmarks/gpu_eval.py [--users 1024] [--catalogue 10000] [--batch-users 256 512] [--out gpu_eval.json]
Smoke test on a CPU (tiny sizes):
      python benchmarks/gpu_eval.py --device cpu --catalogue 300 --users 4 --check-users 2 --batch-users 2
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cprec.data.synthetic import SyntheticConfig, SyntheticWorld  # noqa: E402
from cprec.data.template import render_example  # noqa: E402
from cprec.eval.batched import BatchScorer  # noqa: E402
from cprec.eval.search import PrefixTree  # noqa: E402
from cprec.backbone import load_model  # noqa: E402
from cprec.eval.config import TOP_K, node_cache_default, resolve_device  # noqa: E402
from cprec.eval.metrics import rank_against_ties  # noqa: E402

BUDGET = 511  # prompt tokens, as `cprec quickstart` prepares MovieLens for SmolLM2


def users(titles: list[str], n: int, tok, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    cost = lambda line: len(tok(line, add_special_tokens=False)["input_ids"])  # noqa: E731
    out = []
    for _ in range(n):
        picks = rng.choice(len(titles), int(rng.integers(3, 13)) + 100, replace=False)
        history, target, negatives = picks[:-100], picks[-100], picks[-99:]
        out.append({"prompt": render_example("Books", [titles[i] for i in history], None, BUDGET, cost)[0],
                    "target": int(target), "candidates": [titles[target]] + [titles[i] for i in negatives]})
    return out


def synchronizer(device):
    """Waits for the device's queued work, so that a timer stops when the work is done."""
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def sized(scorer: BatchScorer, args, batch_users: int) -> None:
    """Give `scorer` passes of --tokens-per-pass-per-user positions per user of a batch of `batch_users`."""
    scorer.tokens_per_pass = args.tokens_per_user * batch_users


def rank_all(scorer: BatchScorer, tree: PrefixTree, rows: list[dict], args, beam: int, batch_users: int) -> dict:
    """Full-ranking and sampled ranks of `rows` in batches of `batch_users`, with seconds of each protocol."""
    sync = synchronizer(scorer.device)
    sized(scorer, args, batch_users)
    full, sampled, seconds = [], [], {"full": 0.0, "sampled": 0.0}
    for lo in range(0, len(rows), batch_users):
        batch = rows[lo:lo + batch_users]
        sync()
        started = time.perf_counter()
        tops = scorer.top_k_users([r["prompt"] for r in batch], tree, TOP_K, beam, frontier=args.frontier)
        sync()
        seconds["full"] += time.perf_counter() - started
        full += [[i for i, _ in top] for top in tops]
        started = time.perf_counter()
        titles = [r["candidates"] for r in batch]
        sampled += [rank_against_ties(s, 0) for s in scorer.score_users([r["prompt"] for r in batch], titles)]
        sync()
        seconds["sampled"] += time.perf_counter() - started
    return {"full": full, "sampled": sampled, "seconds": seconds}


def random_model(folder: str, device, dtype):
    import transformers

    torch.manual_seed(0)
    config = transformers.AutoConfig.from_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    with torch.no_grad():
        model.get_output_embeddings().weight *= 10  # tied: the embeddings too, as in bench_eval
    return model.to(device=device, dtype=dtype).eval(), transformers.AutoTokenizer.from_pretrained(folder)


def scorer_for(device, dtype, args) -> BatchScorer:
    if args.model.startswith("random:"):
        model, tok = random_model(args.model.removeprefix("random:"), device, dtype)
    else:
        model, tok = load_model(args.model, device, dtype)
    return BatchScorer(model, tok, row_nodes=args.row_nodes,
                       node_cache_bytes=(args.node_cache_mb or node_cache_default(device)) << 20)


def profile_batch(scorer: BatchScorer, tree: PrefixTree, rows: list[dict], args, batch_users: int,
                  out: Path) -> None:
    """Where one batch's search spends its time: the model's kernels, or the host's bookkeeping between them."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if scorer.device.type == "cuda" else [])
    rows = rows[:batch_users]
    sized(scorer, args, batch_users)
    sync = synchronizer(scorer.device)
    sync()
    started = time.perf_counter()
    with profile(activities=activities) as prof:
        scorer.top_k_users([r["prompt"] for r in rows], tree, TOP_K, args.beam[0], frontier=args.frontier)
        sync()
    wall = time.perf_counter() - started
    averages = prof.key_averages()
    device_sort = "self_cuda_time_total" if scorer.device.type == "cuda" else "self_cpu_time_total"
    out.write_text(f"one batch of {len(rows)} users, beam {args.beam[0]}, {wall:.2f} s under the profiler\n\n"
                   + averages.table(sort_by="self_cpu_time_total", row_limit=30) + "\n\n"
                   + averages.table(sort_by=device_sort, row_limit=30) + "\n")
    print(f"profile of one batch ({wall:.2f} s) written to {out}")


def host_profile(scorer: BatchScorer, tree: PrefixTree, rows: list[dict], args, batch_users: int, out: Path) -> None:
    """The host's side of one batch's search, by Python function (cProfile): what the GPU waits for."""
    import cProfile
    import io
    import pstats

    sized(scorer, args, batch_users)
    profiler = cProfile.Profile()
    profiler.enable()
    scorer.top_k_users([r["prompt"] for r in rows[:batch_users]], tree, TOP_K, args.beam[0], frontier=args.frontier)
    synchronizer(scorer.device)()
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(35)
    out.write_text(f"one batch of {batch_users} users, beam {args.beam[0]}\n" + text.getvalue())
    print(f"host profile of one batch written to {out}")


def agreement(a: dict, b: dict, rows: list[dict]) -> dict:
    target_rank = lambda top, r: top.index(r["target"]) if r["target"] in top else None  # noqa: E731
    return {"full_top20_identical": sum(x == y for x, y in zip(a["full"], b["full"])),
            "full_target_rank_identical": sum(target_rank(x, r) == target_rank(y, r)
                                              for x, y, r in zip(a["full"], b["full"], rows)),
            "sampled_rank_identical": sum(x == y for x, y in zip(a["sampled"], b["sampled"])), "users": len(rows)}


def main():
    if sys.argv[1:2] == ["--decoders"]:  # issue 27's comparison, on this GPU
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_decoders import main as decoders

        decoders(["--device", "cuda", *sys.argv[2:]])
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("--users", type=int, default=1024)
    parser.add_argument("--catalogue", type=int, default=10_000)
    parser.add_argument("--batch-users", dest="batch_users", type=int, nargs="+", default=[256],
                        help="users per batch to time, side by side")
    parser.add_argument("--beam", type=int, nargs="+", default=[256, 64], help="beams to time, side by side; the "
                        "first beam's ranks at the first batch size are checked")
    parser.add_argument("--frontier", type=int, default=50_000)
    parser.add_argument("--row-nodes", dest="row_nodes", type=int, default=256)
    parser.add_argument("--tokens-per-pass-per-user", dest="tokens_per_user", type=int, default=256,
                        help="a pass's fed positions: this times the batch's users (cprec evaluate: 65536 for 256)")
    parser.add_argument("--node-cache-mb", dest="node_cache_mb", type=int, default=None,
                        help="default: cprec evaluate's (a third of the GPU's free memory)")
    parser.add_argument("--check-users", dest="check_users", type=int, default=4)
    parser.add_argument("--exhaustive-users", dest="exhaustive_users", type=int, default=128)
    parser.add_argument("--model", default="smollm2", help="smollm2, a Hugging Face folder, or random:DIR")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--out", help="also write the figures to this JSON file")
    parser.add_argument("--host-profile", dest="host_profile", help="also profile one batch of the first size on "
                        "the host with cProfile (time by Python function) and write it to this file")
    parser.add_argument("--profile", help="also profile one batch's full ranking (first beam) with torch.profiler "
                        "and write its operator table, by self CPU time and by device time, to this file")
    args = parser.parse_args()

    device, dtype = resolve_device(args.device, args.dtype)
    scorer = scorer_for(device, dtype, args)
    titles = SyntheticWorld(SyntheticConfig(domains=1, items_per_domain=args.catalogue, themes=8,
                                            users=1)).titles[0]
    tree = PrefixTree(scorer.lines_ids(titles))
    rows = users(titles, args.users, scorer.tok)
    batch_users = args.batch_users[0]
    rank_all(scorer, tree, rows[:min(len(rows), batch_users)], args, args.beam[0], batch_users)  # warm-up
    by_setting = []
    for size in args.batch_users:
        for beam in args.beam:
            scorer.reset_stats()
            run = rank_all(scorer, tree, rows, args, beam, size)
            by_setting.append({"beam": beam, "batch_users": size,
                               "full_users_per_s": len(rows) / run["seconds"]["full"],
                               "sampled_users_per_s": len(rows) / run["seconds"]["sampled"],
                               "fed_nodes_per_user": scorer.stats["fed_nodes"] / len(rows), **scorer.stats})
            if not by_setting[1:]:
                main_run, stats = run, dict(scorer.stats)
            elif beam == args.beam[0]:  # bf16 rounds other batch shapes differently: near-ties reorder
                by_setting[-1]["full_top20_differs_from_first_setting"] = sum(
                    a != b for a, b in zip(run["full"], main_run["full"]))
    if args.host_profile:
        host_profile(scorer, tree, rows, args, batch_users, Path(args.host_profile))
    if args.profile:  # the last batch size: where its time goes
        profile_batch(scorer, tree, rows, args, args.batch_users[-1], Path(args.profile))
    sized(scorer, args, batch_users)
    exhaustive_rows = rows[:args.exhaustive_users]
    sync = synchronizer(device)
    sync()
    started = time.perf_counter()
    exhaustive = []
    for lo in range(0, len(exhaustive_rows), batch_users):
        batch = [r["prompt"] for r in exhaustive_rows[lo:lo + batch_users]]
        exhaustive += [[i for i, _ in top] for top in scorer.top_k_users(batch, tree, TOP_K, exhaustive=True)]
    sync()
    exhaustive_seconds = time.perf_counter() - started
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "dtype": str(dtype).removeprefix("torch."), "catalogue": len(titles), "tree_nodes": tree.size - 1,
              "users": len(rows), "batch_users": batch_users, "beam": args.beam[0],
              "full_users_per_s": len(rows) / main_run["seconds"]["full"], "by_setting": by_setting,
              "sampled_users_per_s": len(rows) / main_run["seconds"]["sampled"], "search": stats,
              "model": args.model, "exhaustive_users": len(exhaustive_rows),
              "exhaustive_users_per_s": len(exhaustive_rows) / exhaustive_seconds if exhaustive_rows else None,
              "search_top20_equals_exhaustive": sum(a == b for a, b in zip(main_run["full"], exhaustive))}

    check = rows[:args.check_users]
    del scorer
    cpu = rank_all(scorer_for(torch.device("cpu"), torch.float32, args), tree, check, args, args.beam[0], batch_users)
    mine = {"full": main_run["full"][:len(check)], "sampled": main_run["sampled"][:len(check)]}
    report[f"{report['dtype']}_vs_cpu_fp32"] = agreement(mine, cpu, check)
    if device.type == "cuda" and dtype != torch.float32:
        fp32 = rank_all(scorer_for(device, torch.float32, args), tree, check, args, args.beam[0], batch_users)
        report["gpu_fp32_vs_cpu_fp32"] = agreement(fp32, cpu, check)
    fp32 = report.get("gpu_fp32_vs_cpu_fp32") or (report[f"{report['dtype']}_vs_cpu_fp32"]
                                                   if dtype == torch.float32 else None)
    report["fp32_ranks_identical"] = None if fp32 is None else \
        fp32["full_top20_identical"] == len(check) and fp32["sampled_rank_identical"] == len(check)

    print(json.dumps(report, indent=2))
    print(f"\n{'beam':>5} {'users per batch':>15} {'full users/s':>12} {'sampled users/s':>15} {'fed nodes/user':>14}")
    for r in by_setting:
        print(f"{r['beam']:>5} {r['batch_users']:>15} {r['full_users_per_s']:>12.1f} {r['sampled_users_per_s']:>15.1f} "
              f"{r['fed_nodes_per_user']:>14,.0f}")
    print(f"{report['device']} {report['dtype']}: ({len(rows)} users, {len(titles):,} titles, peak frontier "
          f"{stats['peak_frontier']:,}, {stats['fallbacks']} fallbacks); fp32 ranks identical to the CPU path on "
          f"{len(check)} users: {report['fp32_ranks_identical']}; every title scored: "
          f"{report['exhaustive_users_per_s'] or 0:.1f} users/s ({len(exhaustive_rows)} users; search's top-20 equal "
          f"on {report['search_top20_equals_exhaustive']}); model {args.model}")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
