"""Export: a DeepSpeed ZeRO checkpoint -> a Hugging Face folder (safetensors, config, tokenizer).

The ZeRO-3 shards are consolidated on the CPU with DeepSpeed's own `zero_to_fp32` tools, loaded into a
model built from the run's saved config (`run/model/config.json`), and saved with `save_pretrained`, next
to the tokenizer files the run kept. `AutoModelForCausalLM.from_pretrained(out)` loads the result.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from cprec import checkpoint as ckpt
from cprec.errors import CPRecError


def export(checkpoint: str | Path, out: str | Path, dtype: str = "float32") -> Path:
    import torch
    import transformers
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    checkpoint, out = Path(checkpoint), Path(out)
    state = ckpt.read_state(checkpoint)  # refuses an incomplete checkpoint
    run = checkpoint.parent.parent
    model_dir = run / "model"
    if not (model_dir / "config.json").is_file():
        raise CPRecError(f"{model_dir / 'config.json'} is missing: is {checkpoint} inside a CPRec run directory?")
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    transformers.logging.set_verbosity_error()
    unset_hf_deepspeed_config()  # a trainer in this process must not turn the model build into zero.Init
    weights = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name)
    config = transformers.AutoConfig.from_pretrained(model_dir)
    config.use_cache = True  # the exported model serves generation
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise CPRecError(f"{checkpoint}: weights do not fit the model (missing {sorted(set(missing) - tied)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]})")
    if tied:
        model.tie_weights()
    model = model.to(getattr(torch, dtype))
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    for f in model_dir.iterdir():
        if f.name != "config.json" and f.is_file():
            shutil.copy(f, tmp / f.name)
    (tmp / "cprec_export.json").write_text(json.dumps({"checkpoint": str(checkpoint), "step": state["step"],
                                                       "phase": state["phase"], "lineage": state["lineage"],
                                                       "config_hash": state["config_hash"]}, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
