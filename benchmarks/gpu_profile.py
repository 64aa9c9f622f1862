"""Where a GPU training step of the trainer goes, against a bare bf16 torch loop on the same rows.

    python benchmarks/gpu_profile.py [--steps 6] [--seq-len 2048] [--micro-batch 8] [--attn sdpa]

On one GPU, SmolLM2-135M's architecture (random weights), random packed rows:
  1. a bare loop (bf16 weights, torch's fused AdamW, the trainer's loss) -> tokens/s;
  2. the trainer (DeepSpeed ZeRO-3 bf16) after 3 warm-up steps -> tokens/s, then the same steps under
     cProfile (host time by Python function) and torch.profiler (GPU kernel time against wall time: a GPU
     busy well under 100% of the wall means the host, not the kernels, sets the pace).
Without CUDA it runs the same code on a tiny config in fp32 as a smoke test.
"""

import argparse
import cProfile
import io
import pstats
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_check import REPO, SMOLLM2_135M, TINY, bare_loop, train_config  # noqa: E402

sys.path.insert(0, str(REPO))


def trainer_profile(tmp: Path, shards: Path, config: dict, micro: int, steps: int, cuda: bool, attn: str) -> None:
    from cprec.config import load_config
    from cprec.train.config import TrainConfig
    from cprec.train.loop import Trainer

    # enough schedule for the warm-up and the three measured passes; the first fit() stops after 3 steps
    path = train_config(tmp, "run", {"name": None, "config": config, "attn": attn}, shards, 3 * steps + 11,
                        micro, cuda)
    trainer = Trainer(load_config(TrainConfig, str(path), ["max_steps=3"]))
    trainer.save = lambda: "not saved"  # checkpoints are not part of a step
    trainer.fit()  # warm-up
    trainer.cfg.max_steps = steps
    began = time.perf_counter()
    last = trainer.fit()
    print(f"trainer: {last['tokens_per_s']:,.0f} tokens/s (last step), {steps} steps in "
          f"{time.perf_counter() - began:.2f} s", flush=True)
    profiler = cProfile.Profile()
    profiler.enable()
    trainer.fit()
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
    print("\n== host time by function (cProfile, tottime) ==\n" + text.getvalue()[-6000:], flush=True)
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    began = time.perf_counter()
    with profile(activities=activities) as prof:
        trainer.fit()
        if cuda:
            torch.cuda.synchronize()
    wall = time.perf_counter() - began
    events = prof.key_averages()
    if cuda:
        # kernels only (device-type events), as torch's own table totals them: aten ops carry their
        # kernels' time too and would count it twice
        gpu = sum(e.self_device_time_total for e in events
                  if e.device_type == torch.autograd.DeviceType.CUDA and not e.is_user_annotation) / 1e6
        print(f"\n== GPU kernels busy {gpu:.2f} s of {wall:.2f} s wall ({gpu / wall:.0%}) ==")
        print(events.table(sort_by="self_device_time_total", row_limit=15, max_name_column_width=60))
    print(events.table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=60), flush=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--seq-len", dest="seq_len", type=int, default=2048)
    parser.add_argument("--micro-batch", dest="micro", type=int, default=8)
    parser.add_argument("--attn", default="sdpa")
    args = parser.parse_args()
    from cprec.data.shards import write_random_shardset

    cuda = torch.cuda.is_available()
    config, seq_len, micro = (SMOLLM2_135M, args.seq_len, args.micro) if cuda else (TINY, 256, 2)
    print(f"device: {torch.cuda.get_device_name() if cuda else 'CPU (smoke test)'}; torch {torch.__version__}; "
          f"{micro} x {seq_len} tokens per step, attn {args.attn}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_random_shardset(tmp / "shards", {"a": (4 * args.steps + 20) * micro}, seq_len=seq_len,
                              shard_rows=256, vocab=49152)
        print(f"bare loop: {bare_loop(tmp / 'shards', config, micro, args.steps, cuda, args.attn):,.0f} tokens/s",
              flush=True)
        trainer_profile(tmp, tmp / "shards", config, micro, args.steps, cuda, args.attn)


if __name__ == "__main__":
    main()
