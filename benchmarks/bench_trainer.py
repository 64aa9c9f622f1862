"""Trainer throughput against its baselines, on this CPU, world size 1, fp32.

Prints, in one run:
  1. tokens/s of the trainer (`cprec.train.loop.Trainer`, DeepSpeed ZeRO-3 engine, one rank) against a bare
     torch loop (AdamW, the same tiny Llama and initial weights, the same rows in the same order, the same
     loss and micro-batching), in alternating rounds in one process; goal: at most 10% overhead;
  2. non-pad tokens/s of the trainer on packed MovieLens rows against the Hugging Face Trainer on the same
     MovieLens documents padded per batch (DataCollatorForLanguageModeling), same tiny model and tokens per
     step, so the difference is what packing saves.

Run: python benchmarks/bench_trainer.py [--steps 5 --rounds 4] [--deepspeed CONFIG.json] [--no-hf]
(--deepspeed: the trainer's DeepSpeed JSON instead of ds_configs/zero3_fp32_cpu.json, to compare ZeRO
options; --no-hf: part 1 only)
"""

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
TINY = {"model_type": "llama", "vocab_size": 49152, "hidden_size": 256, "intermediate_size": 768,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024}
SEQ, GLOBAL, MICRO = 512, 8, 2


class BareLoop:
    """The same rows, model, initial weights, loss and micro-batching in a plain torch loop (AdamW)."""

    def __init__(self, shards: Path):
        from transformers import AutoConfig, AutoModelForCausalLM

        from cprec.data.shards import ShardSet
        from cprec.data.stream import PackedStream, default_mixture

        torch.manual_seed(0)
        self.model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**TINY))
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
        self.stream = iter(PackedStream(shards, default_mixture(ShardSet(shards).streams), seed=0,
                                        global_batch=GLOBAL, phase="main"))

    def run(self, steps: int) -> tuple[int, float]:
        from cprec.data.collate import IGNORE_INDEX

        tokens, seconds = 0, 0.0
        for _ in range(steps):
            started = time.perf_counter()
            batch = next(self.stream)
            labels = batch["labels"][:, 1:]
            n = (labels != IGNORE_INDEX).sum().item()
            targets = torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)  # as the trainer: no logits copy
            for m in range(0, GLOBAL, MICRO):
                logits = self.model(input_ids=batch["input_ids"][m:m + MICRO],
                                    position_ids=batch["position_ids"][m:m + MICRO], use_cache=False).logits
                loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]),
                                                         targets[m:m + MICRO].reshape(-1), ignore_index=IGNORE_INDEX,
                                                         reduction="sum") / n
                loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            seconds += time.perf_counter() - started
            tokens += int(batch["stream_tokens"].sum())
        return tokens, seconds


def trainer_and_bare(tmp: Path, shards: Path, steps: int, rounds: int,
                     deepspeed: str = "auto") -> list[tuple[float, float]]:
    """Rounds of `steps` steps of each, alternating in one process, so that both see the same machine load
    (this shared CPU drifts by 10-20% over minutes); per round (trainer tokens/s, bare tokens/s)."""
    from cprec.config import from_dict
    from cprec.train.config import TrainConfig
    from cprec.train.loop import Trainer

    bare = BareLoop(shards)  # built before the trainer: its DeepSpeed config turns model builds into zero.Init
    cfg = from_dict(TrainConfig, {
        "run_dir": str(tmp / "run"), "shards": str(shards), "model": {"name": None, "config": TINY},
        "global_batch": GLOBAL, "micro_batch": MICRO, "seed": 0, "plots": False, "max_steps": 1, "deepspeed": deepspeed,
        "schedule": {"peak_lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 1, "stable_steps": 10**6, "anneal_steps": 0},
        "checkpoint": {"every": 10**9, "keep_last": 1}})
    trainer = Trainer(cfg)
    trainer.fit()
    bare.run(1)  # both past their first (slower) step
    out = []
    for _ in range(rounds):
        trainer.cfg.max_steps = steps
        trainer.fit()
        records = [json.loads(line) for line in (tmp / "run" / "metrics.jsonl").read_text().splitlines()][-steps:]
        ours = sum(sum(r["tokens_per_stream"].values()) for r in records) / sum(r["seconds"] for r in records)
        tokens, seconds = bare.run(steps)
        out.append((ours, tokens / seconds))
    torch.distributed.destroy_process_group()
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()  # later model builds (the HF Trainer's) are plain again
    return out


def hf_trainer_tokens_per_s(prepared: Path, steps: int, tmp: Path) -> tuple[float, float]:
    """transformers.Trainer on the prepared documents, padded to the longest in each batch."""
    import datasets
    from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling,
                              Trainer, TrainerCallback, TrainingArguments)

    from cprec.backbone import resolve_tokenizer

    tok = AutoTokenizer.from_pretrained(resolve_tokenizer("smollm2"))
    tok.pad_token = tok.pad_token or tok.eos_token
    files = sorted(str(p) for p in (prepared / "documents").glob("*.jsonl"))
    ds = datasets.load_dataset("json", data_files=files, split="train", cache_dir=str(tmp / "hf_cache"))
    ds = ds.shuffle(seed=0).select(range(8000))
    ds = ds.map(lambda b: tok([t + tok.eos_token for t in b["text"]], add_special_tokens=False, truncation=True,
                              max_length=SEQ), batched=True, remove_columns=ds.column_names)
    # as many tokens per step as a packed step holds: GLOBAL * SEQ / mean document length
    mean_len = sum(len(x) for x in ds["input_ids"]) / len(ds)
    docs_per_step = max(2, round(GLOBAL * SEQ / mean_len))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**TINY))
    seen = {"tokens": 0, "times": []}

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            seen["t"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            seen["times"].append(time.perf_counter() - seen["t"])

    args = TrainingArguments(output_dir=str(tmp / "hf_out"), per_device_train_batch_size=docs_per_step,
                             max_steps=steps + 1, learning_rate=1e-3, report_to=[], save_strategy="no",
                             logging_strategy="no", use_cpu=True, dataloader_num_workers=0, seed=0)
    collator = DataCollatorForLanguageModeling(tok, mlm=False)
    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=collator, callbacks=[Clock()])
    loader = trainer.get_train_dataloader()
    real = [int(b["attention_mask"].sum()) for _, b in zip(range(steps + 1), loader)]
    padded = [b["attention_mask"].numel() for _, b in zip(range(steps + 1), loader)]
    trainer.train()
    return sum(real[3:]) / sum(seen["times"][3:]), sum(real) / sum(padded)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=5, help="steps per round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--deepspeed", default="auto", help="the trainer's DeepSpeed JSON (default: the CPU config)")
    parser.add_argument("--no-hf", dest="hf", action="store_false", help="skip the Hugging Face Trainer comparison")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count())
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count()))
    from cprec.data.pack import PackConfig, pack
    from cprec.data.prepare import PrepareConfig, prepare

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        prepare(PrepareConfig(tokenizer="smollm2", window_tokens=SEQ - 1), tmp / "prepared")
        pack(tmp / "prepared", "smollm2", tmp / "shards", PackConfig(seq_len=SEQ, workers=os.cpu_count()))
        rounds = trainer_and_bare(tmp, tmp / "shards", args.steps, args.rounds, args.deepspeed)
        if args.hf:
            hf, hf_use = hf_trainer_tokens_per_s(tmp / "prepared", args.steps * args.rounds, tmp)

    params = sum(p.numel() for p in __import__("transformers").AutoModelForCausalLM.from_config(
        __import__("transformers").AutoConfig.for_model(**TINY)).parameters()) / 1e6
    print(f"tiny Llama {params:.1f}M params, rows of {SEQ} tokens, global batch {GLOBAL} rows, micro-batch {MICRO}, "
          f"world size 1, fp32, {os.cpu_count()} threads, MovieLens-1M shards (SmolLM2 tokenizer); "
          f"{args.rounds} alternating rounds of {args.steps} steps; DeepSpeed config {args.deepspeed}\n")
    print("| round | bare torch loop tokens/s | CPRec trainer tokens/s | trainer / bare |")
    print("|---|---|---|---|")
    for k, (ours, bare) in enumerate(rounds, 1):
        print(f"| {k} | {bare:,.0f} | {ours:,.0f} | {ours / bare:.3f} |")
    ratio = statistics.median(o / b for o, b in rounds)
    ours, bare = statistics.mean(o for o, _ in rounds), statistics.mean(b for _, b in rounds)
    print(f"\ntrainer overhead against the bare loop (median over rounds): {1 - ratio:.1%} (goal: at most 10%)")
    print("\n| loop | real tokens/s | relative |")
    print("|---|---|---|")
    print(f"| bare torch loop (AdamW) | {bare:,.0f} | 1.00 |")
    print(f"| CPRec trainer (DeepSpeed ZeRO-3, 1 rank) | {ours:,.0f} | {ours / bare:.2f} |")
    if args.hf:
        print(f"| HF Trainer, padded batches (slot use {hf_use:.1%}) | {hf:,.0f} | {hf / bare:.2f} |")
        print(f"\nnon-pad tokens/s, CPRec packed vs HF Trainer padded: {ours / hf:.2f}x")


if __name__ == "__main__":
    main()
