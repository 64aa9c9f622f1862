"""The trainer's speed levers on the model itself, applied before DeepSpeed wraps it: fused kernels
(`model.kernels`) and `torch.compile` of each decoder block (`model.compile_blocks`).

Contract: a lever either applies as asked or refuses by name before any training, saying what is missing
(no CUDA, no Triton, liger-kernel not installed, a model type without kernels, no C++ compiler); it never
falls back silently to the plain path. Each lever changes how a step is computed, not what: the losses agree
with the plain path within bf16 rounding (tests/test_kernels.py, on a GPU).

* `kernels: liger` swaps in Liger's Triton kernels (`liger-kernel`, on PyPI) for RMSNorm, SwiGLU and RoPE of
  the model's own modules. Its fused linear cross-entropy is not used: the loss is the trainer's
  (`cprec.train.step`, whose `loss_chunk_tokens` already avoids materialising whole logits).
* `compile_blocks: true` compiles each decoder layer in place (`nn.Module.compile`): the blocks are where the
  element-wise work sits, and compiling them keeps DeepSpeed's hooks (ZeRO-3's gathers) outside the compiled
  graphs, where the engine-level `compile: true` (DeepSpeed's `engine.compile()`) ran at 0.38x.
"""

from __future__ import annotations

import importlib.util
import os
import shutil

from cprec.errors import CPRecError

KERNELS = ("none", "liger")
# the model-config keys of the levers: how a step is computed, not what (left out of a run's config hash)
LEVERS = ("kernels", "compile_blocks")
# transformers model types Liger patches by instance (liger_kernel.transformers' apply_liger_kernel_to_*)
LIGER_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")  # with SwiGLU MLPs and the same patch arguments


def check_config(kernels: str, compile_blocks: bool, engine_compile: bool) -> None:
    """Refuse a lever the config cannot take (when the config is loaded)."""
    if kernels not in KERNELS:
        raise CPRecError(f"model.kernels={kernels!r}: expected one of {', '.join(KERNELS)}")
    if compile_blocks and engine_compile:
        raise CPRecError("model.compile_blocks and compile are both set: each decoder block compiled before "
                         "DeepSpeed wraps the model, or the whole engine by DeepSpeed; choose one")


def check(kernels: str, compile_blocks: bool, engine_compile: bool, cuda: bool) -> None:
    """Refuse, before the model is built, a lever this machine or config cannot take, naming what is missing."""
    check_config(kernels, compile_blocks, engine_compile)
    if kernels == "liger":
        if not cuda:
            raise CPRecError("model.kernels=liger needs a CUDA GPU (Liger's kernels are Triton kernels); none is "
                             "visible to this process: use model.kernels=none on a CPU")
        if importlib.util.find_spec("triton") is None:
            raise CPRecError("model.kernels=liger needs Triton (pip install triton), which is not installed")
        if importlib.util.find_spec("liger_kernel") is None:
            raise CPRecError("model.kernels=liger needs liger-kernel (pip install 'cprec[liger]'), which is not "
                             "installed")
    if compile_blocks:
        if cuda and importlib.util.find_spec("triton") is None:
            raise CPRecError("model.compile_blocks on a GPU needs Triton (torch.compile's inductor generates "
                             "Triton kernels), which is not installed")
        if not cuda and not shutil.which(os.environ.get("CXX", "g++")):
            raise CPRecError("model.compile_blocks on a CPU needs a C++ compiler (torch.compile's inductor "
                             f"builds C++ kernels): {os.environ.get('CXX', 'g++')} is not on PATH")


def apply(model, kernels: str, compile_blocks: bool) -> None:
    """Apply the levers to a built model (checked by `check` before it was built)."""
    if kernels == "liger":
        _apply_liger(model)
    if compile_blocks:
        for block in decoder_blocks(model):
            block.compile()


def decoder_blocks(model) -> list:
    layers = getattr(model.get_decoder(), "layers", None)
    if layers is None:
        raise CPRecError(f"model.compile_blocks: {type(model).__name__} has no decoder layers (model.layers) to "
                         f"compile")
    return list(layers)


def _apply_liger(model) -> None:
    from liger_kernel import transformers as liger

    model_type = model.config.model_type
    patch = getattr(liger, f"apply_liger_kernel_to_{model_type}", None)
    if model_type not in LIGER_MODEL_TYPES or patch is None:
        raise CPRecError(f"model.kernels=liger: liger-kernel has no kernels for model_type '{model_type}' "
                         f"(it has: {', '.join(LIGER_MODEL_TYPES)}); use model.kernels=none")
    # the trainer computes the loss itself: no (fused linear) cross-entropy patch
    patch(model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False)
