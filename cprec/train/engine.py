"""The engine: the process group, the DeepSpeed config and the model, built once per rank.

`build_ds_config` fills a DeepSpeed JSON with the run's batch arithmetic and optimizer, checking that
global_batch = world x micro_batch x grad_accum. `build_model` builds the model the Hugging Face way under
ZeRO-3 (weights initialised, then partitioned); the packaged SmolLM2 is converted from GGUF first, before any
ZeRO-3 config exists (under one, every model transformers builds is partitioned and empty).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from cprec import resources
from cprec.errors import CPRecError
from cprec.train.config import ZERO_STAGES, TrainConfig


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def build_ds_config(cfg: TrainConfig, world: int, cuda: bool) -> dict:
    path = Path(cfg.deepspeed) if cfg.deepspeed != "auto" else \
        resources.ds_config("zero3_bf16.json" if cuda else "zero3_fp32_cpu.json")
    if not path.is_file() and not path.is_absolute():  # a recipe's `ds_configs/X.json`, from a wheel
        with contextlib.suppress(CPRecError):
            path = resources.shipped_file(str(path))
    if not path.is_file():
        raise CPRecError(f"DeepSpeed config not found: {path}")
    ds = json.loads(path.read_text())
    rows_per_rank, rem = divmod(cfg.global_batch, world)
    accum = cfg.grad_accum if cfg.grad_accum is not None else rows_per_rank // cfg.micro_batch
    if rem or world * cfg.micro_batch * accum != cfg.global_batch:
        fits = [m for m in range(1, rows_per_rank + 1) if not rem and rows_per_rank % m == 0]
        how = (f"pass micro_batch= one of {', '.join(map(str, fits))} (it may change on a resume: the global batch "
               f"decides the math), and leave grad_accum unset" if fits else
               f"run on a number of ranks that divides global_batch={cfg.global_batch}")
        raise CPRecError(f"global_batch={cfg.global_batch} must equal world size ({world}) x micro_batch "
                         f"({cfg.micro_batch}) x grad_accum ({accum}) = {world * cfg.micro_batch * accum}: {how}")
    if cfg.zero_stage is not None:
        # ZeRO-3 partitions the parameters too, which only pays where the model does not fit per GPU; stages 1
        # and 2 keep every parameter resident and skip ZeRO-3's per-module hooks on every micro-batch
        ds.setdefault("zero_optimization", {})["stage"] = cfg.zero_stage
    if zero_stage(ds) not in ZERO_STAGES:
        raise CPRecError(f"{path}: zero_optimization.stage is {zero_stage(ds)}; CPRec trains with ZeRO stage 1, 2 "
                         f"or 3 (set zero_stage)")
    ds.update(train_batch_size=cfg.global_batch, train_micro_batch_size_per_gpu=cfg.micro_batch,
              gradient_accumulation_steps=accum, gradient_clipping=cfg.optim.grad_clip)
    if world == 1 and ds.get("zero_optimization", {}).get("stage") == 3:
        # one rank has nothing to partition: keeping every parameter resident skips ZeRO-3's per-layer
        # gather/release (a 40% slowdown on a CPU) while the checkpoints keep the ZeRO-3 format; and
        # averaging in place on the contiguous gradient bucket skips reduce-scatter's flatten-and-copy of every
        # micro-batch's gradients (the same numbers on one rank)
        ds["zero_optimization"].setdefault("stage3_param_persistence_threshold", 10**12)
        ds["zero_optimization"].setdefault("reduce_scatter", False)
    ds["optimizer"] = {"type": "AdamW", "params": {
        "lr": cfg.schedule.peak_lr, "betas": [cfg.optim.beta1, cfg.optim.beta2], "eps": cfg.optim.eps,
        "weight_decay": cfg.optim.weight_decay, "torch_adam": cfg.optim.torch_adam, "adam_w_mode": True}}
    left = [k for k, v in _flatten(ds).items() if v == "auto"]
    if left:
        raise CPRecError(f"{path}: key '{left[0]}' is 'auto' and CPRec does not fill it")
    return ds


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def build_model(cfg: TrainConfig, ds_config: dict, cuda: bool, rank: int):
    """The model under ZeRO-3, built the Hugging Face way (weights initialised, then partitioned)."""
    import torch
    import transformers
    from transformers.integrations import HfDeepSpeedConfig

    from cprec import attention, kernels
    from cprec.backbone import SMOLLM2, load_pretrained, smollm2_folder

    transformers.logging.set_verbosity_error()
    dtype = torch.bfloat16 if ds_config.get("bf16", {}).get("enabled") else torch.float32
    attn = attention.choose(cfg.model.attn, cuda)
    folder = None
    if cfg.model.config is None and cfg.model.name == SMOLLM2:
        # converted from GGUF before the ZeRO-3 config below exists (under it every model transformers builds,
        # the conversion's too, is partitioned and empty), once per node's cache; the other ranks wait
        if int(os.environ.get("LOCAL_RANK", rank)) == 0:
            smollm2_folder()
        torch.distributed.barrier()
        folder = smollm2_folder()
    elif cfg.model.config is None:
        folder = Path(cfg.model.name)
        if not (folder / "config.json").is_file():
            raise CPRecError(f"model.name={cfg.model.name}: not a Hugging Face model folder (no config.json)")
    keep_alive = HfDeepSpeedConfig(ds_config)  # noqa: F841  (zero.Init while it lives)
    torch.manual_seed(cfg.seed)
    if folder is None:
        try:
            config = transformers.AutoConfig.for_model(**cfg.model.config)
        except (ValueError, KeyError) as exc:
            raise CPRecError(f"model.config: transformers cannot build it ({exc})") from None
        config._attn_implementation = attn
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        model = load_pretrained(folder, dtype=dtype, attn_implementation=attn)
    kernels.apply(model, cfg.model.kernels, cfg.model.compile_blocks)  # checked by run.open_run
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.config.use_cache = False
    return model, folder, keep_alive
