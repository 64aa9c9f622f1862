"""Peak memory of one training step: the loss over whole logits against the chunked loss, on this CPU.

Each variant is the real trainer (`cprec.train.loop.Trainer`, DeepSpeed ZeRO-3, one rank, fp32) in a fresh
process, taking optimizer steps of `--rows` rows x 1024 tokens (one micro-batch) on random packed rows with
SmolLM2's 49,152-token vocabulary. The figure is the process's peak resident memory during its second step
minus its resident memory just before it (model, optimizer state and loader already built by the first),
read from the kernel: the peak is reset through /proc/self/clear_refs and read as VmHWM. Printed side by side with the step's loss; goal: chunked <= 1/3 of whole
logits, loss equal within 1e-5.

Run: python benchmarks/bench_loss_memory.py [--rows 4] [--chunks 0,4096,1024]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SEQ = 1024
MODEL = {"model_type": "llama", "vocab_size": 49152, "hidden_size": 256, "intermediate_size": 768,
         "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": SEQ}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak resident set size (VmHWM) to the current one


def peak_bytes() -> int:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def child(shards: str, run_dir: str, rows: int, chunk: int) -> None:
    """One step of the trainer; prints a JSON line with the step's extra peak memory and its loss."""
    import torch

    from cprec.config import from_dict
    from cprec.train.config import TrainConfig
    from cprec.train.loop import Trainer

    torch.set_num_threads(2)
    cfg = from_dict(TrainConfig, {
        "run_dir": run_dir, "shards": shards, "model": {"name": None, "config": MODEL}, "global_batch": rows,
        "micro_batch": rows, "loss_chunk_tokens": chunk, "mixture": {"a": 1.0}, "plots": False,
        "schedule": {"peak_lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 2, "stable_steps": 0, "anneal_steps": 0},
        "checkpoint": {"every": 10**9, "keep_last": 1}})
    trainer = Trainer(cfg)
    batches = trainer._batches()
    trainer._one_step("warmup", batches)  # allocates the optimizer's moments and DeepSpeed's buffers
    reset_peak()
    before = rss_bytes()
    record = trainer._one_step("warmup", batches)
    peak = peak_bytes()
    print(json.dumps({"chunk": chunk, "step_peak_mb": (peak - before) / 2**20, "rss_before_mb": before / 2**20,
                      "loss": record["loss"], "seconds": record["seconds"]}), flush=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=4, help="rows of 1024 tokens in the step's micro-batch")
    parser.add_argument("--chunks", default="0,4096,1024", help="loss_chunk_tokens values; 0 = whole logits")
    parser.add_argument("--child", nargs=4, metavar=("SHARDS", "RUN", "ROWS", "CHUNK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        shards, run, rows, chunk = args.child
        return child(shards, run, int(rows), int(chunk))
    from cprec.data.shards import write_random_shardset

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        write_random_shardset(Path(tmp) / "shards", {"a": 64}, seq_len=SEQ, shard_rows=64, vocab=49152)
        for chunk in map(int, args.chunks.split(",")):
            out = subprocess.run([sys.executable, __file__, "--child", str(Path(tmp) / "shards"),
                                  str(Path(tmp) / f"run{chunk}"), str(args.rows), str(chunk)],
                                 capture_output=True, text=True, check=False)
            lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
            if out.returncode or not lines:
                raise SystemExit(f"chunk={chunk} failed:\n{out.stderr[-3000:]}")
            results.append(json.loads(lines[-1]))
    base = results[0]
    print(f"\none step, {args.rows} rows x {SEQ} tokens, vocabulary 49,152, tiny Llama (hidden 256, 4 layers), "
          f"ZeRO-3 fp32 on the CPU")
    print("| loss | step's peak memory above the resident set (MB) | vs whole logits | loss | |loss - whole| |")
    print("|---|---|---|---|---|")
    for r in results:
        name = "whole logits (loss_chunk_tokens: 0)" if r["chunk"] == 0 else f"chunked, {r['chunk']} tokens"
        print(f"| {name} | {r['step_peak_mb']:,.0f} | {r['step_peak_mb'] / base['step_peak_mb']:.2f} | "
              f"{r['loss']:.6f} | {abs(r['loss'] - base['loss']):.1e} |")


if __name__ == "__main__":
    main()
