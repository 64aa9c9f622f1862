"""Export: a DeepSpeed ZeRO checkpoint -> a Hugging Face folder (safetensors, config, tokenizer).

The ZeRO-3 shards are consolidated on the CPU with DeepSpeed's own `zero_to_fp32` tools, loaded into a
model built from the run's saved config (`run/model/config.json`), and saved with `save_pretrained`, next
to the tokenizer files the run kept. `AutoModelForCausalLM.from_pretrained(out)` loads the result.

The output folder is CPRec's only when it holds `cprec_export.json` (an earlier export): such a folder is
replaced with `overwrite=True` and refused otherwise; any other non-empty folder is refused before any work,
never removed. The new folder is written beside it and renamed into place (`cprec.staging`), so a failed
export leaves the old one as it was.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from cprec import checkpoint as ckpt
from cprec import staging
from cprec.errors import CPRecError


EXPORT_MARKER = "cprec_export.json"


def is_export(folder: Path) -> bool:
    return (folder / EXPORT_MARKER).is_file()


def check_output(out: Path, overwrite: bool) -> None:
    """Refuse an output folder that is not CPRec's to replace (see the module docstring)."""
    staging.refuse_foreign(out, is_export, "export")
    if out.is_dir() and staging.entries(out) and not overwrite:
        raise CPRecError(f"--out {out} holds an earlier export; pass --overwrite to replace it")


def export(checkpoint: str | Path, out: str | Path, dtype: str = "float32", overwrite: bool = False) -> Path:
    import torch
    import transformers
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    checkpoint, out = Path(checkpoint), Path(out)
    check_output(out, overwrite)
    staging.check(out)  # before the consolidation: its siblings must be CPRec's too
    state = ckpt.read_state(checkpoint)  # refuses an incomplete checkpoint
    ckpt.verify_files(checkpoint)  # names a truncated or corrupted file
    ckpt.refuse_unsafe_pickles(checkpoint)  # before DeepSpeed unpickles them with weights_only=False
    run = checkpoint.parent.parent
    model_dir = run / "model"
    if not (model_dir / "config.json").is_file():
        raise CPRecError(f"{model_dir / 'config.json'} is missing: is {checkpoint} inside a CPRec run directory?")
    links = sorted(str(f) for f in model_dir.iterdir() if f.is_symlink())
    if links:  # the export publishes model/'s files: a link would publish whatever it points to
        raise CPRecError(f"{', '.join(links)}: a symbolic link in the run's model folder, which holds only files "
                         f"the trainer wrote; the export would publish what it points to. Replace it with the file")
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
    tmp = staging.begin(out)
    model.save_pretrained(str(tmp), safe_serialization=True)
    for f in model_dir.iterdir():
        if f.name != "config.json" and f.is_file():
            shutil.copy(f, tmp / f.name)
    (tmp / EXPORT_MARKER).write_text(json.dumps({"checkpoint": str(checkpoint), "step": state["step"],
                                                 "phase": state["phase"], "lineage": state["lineage"],
                                                 "config_hash": state["config_hash"]}, indent=2) + "\n")
    check_output(out, overwrite)  # again: the folder may have been filled while the weights were consolidated
    staging.commit(tmp, out, is_export)
    return out
