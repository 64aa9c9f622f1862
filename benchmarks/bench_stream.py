"""The training data stream: loader throughput against what a training step consumes, and resume cost.

Prints, in one run:
  * rows/s the loader delivers (PackedStream through a DataLoader with 0 and 2 worker processes, global
    batch 8 rows of 1024 tokens, a random shard set) next to the rows/s a training step consumes
    (forward + backward + AdamW, fp32, this CPU) for a tiny Llama and for SmolLM2-135M;
  * time to resume (build the stream, load a state, deliver the first batch) at row 0 and at row 1,000,000
    of a 1.2M-row shard set: O(1) resume means the two are equal within noise.

Run: python benchmarks/bench_stream.py
"""

import itertools
import statistics
import tempfile
import time
from pathlib import Path

import torch

from cprec.data.collate import model_inputs
from cprec.data.shards import write_random_shardset
from cprec.data.stream import PackedStream

SEQ_LEN, BATCH = 1024, 8
MIX = {"a": 0.5, "b": 0.3, "c": 0.2}


def loader_rows_per_s(root: Path, workers: int, steps: int = 150) -> float:
    ds = PackedStream(root, MIX, seed=0, global_batch=BATCH)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers,
                                         prefetch_factor=4 if workers else None)
    it = iter(loader)
    next(it)  # start-up (worker processes) is not throughput
    t = time.perf_counter()
    for _ in itertools.islice(it, steps):
        pass
    return steps * BATCH / (time.perf_counter() - t)


def step_rows_per_s(model, batch: dict, rows: int, repeats: int = 2) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    inputs = {k: v[:rows] if torch.is_tensor(v) else v for k, v in model_inputs(batch).items()}

    def step():
        loss = model(**inputs).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up
    t = time.perf_counter()
    for _ in range(repeats):
        step()
    return repeats * rows / (time.perf_counter() - t)


def resume_seconds(root: Path, row: int, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        ds = PackedStream(root, {"big": 1.0}, seed=0, global_batch=BATCH)
        state = ds.state_dict()
        state["step"] = row // BATCH
        ds.load_state_dict(state)
        batch = next(iter(ds))
        assert batch["step"] == row // BATCH
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from cprec.backbone import smollm2_folder

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_random_shardset(tmp / "small", {"a": 3000, "b": 2000, "c": 1000}, SEQ_LEN, shard_rows=512,
                              vocab=49_152)
        loader = {w: loader_rows_per_s(tmp / "small", w) for w in (0, 2)}
        batch = next(iter(PackedStream(tmp / "small", MIX, seed=0, global_batch=BATCH)))
        tiny = LlamaForCausalLM(LlamaConfig(vocab_size=49_152, hidden_size=64, intermediate_size=128,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                            max_position_embeddings=SEQ_LEN))
        tiny_rate = step_rows_per_s(tiny, batch, BATCH)
        smol = AutoModelForCausalLM.from_pretrained(smollm2_folder(), dtype=torch.float32)
        smol_rate = step_rows_per_s(smol, batch, 2)

        write_random_shardset(tmp / "large", {"big": 1_200_000}, 16, shard_rows=8192)
        resume = {row: resume_seconds(tmp / "large", row) for row in (0, 1_000_000)}

    print(f"rows of {SEQ_LEN} tokens, global batch {BATCH}, torch threads 2, {torch.__version__}\n")
    print("| what | rows/s |")
    print("|---|---|")
    print(f"| loader, 0 workers | {loader[0]:,.0f} |")
    print(f"| loader, 2 workers | {loader[2]:,.0f} |")
    tiny_params = sum(p.numel() for p in tiny.parameters()) / 1e6
    print(f"| training step, tiny Llama ({tiny_params:.1f}M params, vocab 49,152, fp32) | {tiny_rate:,.1f} |")
    print(f"| training step, SmolLM2-135M (fp32, micro-batch 2) | {smol_rate:,.2f} |")
    print(f"\nthe loader with 0 workers outpaces the tiny model's step {loader[0] / tiny_rate:,.0f}x and "
          f"SmolLM2's {loader[0] / smol_rate:,.0f}x\n")
    print("| resume at | seconds to first batch (median of 5) |")
    print("|---|---|")
    for row, sec in resume.items():
        print(f"| row {row:,} | {sec:.3f} |")


if __name__ == "__main__":
    main()
