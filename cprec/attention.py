"""Which attention kernel the trainer uses, and `torch_varlen`: packed rows on PyTorch's own FlashAttention.

Packed rows hold several documents; attention must stay inside each. flash-attn's varlen kernels do that
from the per-document position ids, but flash-attn has no wheels on PyPI and takes hours to build. PyTorch
(2.10 and later) ships the same FlashAttention-2 varlen kernel as `torch.nn.attention.varlen.varlen_attn`,
so `torch_varlen` registers it with transformers as one more attention implementation: documents are cut at
every position id 0 (`cprec.data.collate` restarts them per document, padding included), the rows of the
batch flattened into one varlen call. Without it, SDPA attends through a block-diagonal mask (a dense
seq_len x seq_len mask per row and cuDNN's attention).

`auto` does not pick torch_varlen: on an H200 (benchmarks/gpu_check.py, docs/benchmarks.md, "GPU check") it matched
SDPA per document, but trained SmolLM2-135M 20% slower than SDPA (33k vs 42k tokens/s) and a ~0.5B
model 3% faster, at 8 x 2048 tokens per step, where ZeRO-3's host work rather than attention sets the pace.

`sdpa_gqa`, for evaluation on a CPU: SDPA that reads each key/value head for its group of query heads
(`enable_gqa`) also under a mask. transformers' SDPA copies the key/value heads out to one per query head
whenever a mask is given to a pass of several queries (CUDA's fused kernels take grouped heads only without
one); a CPU's SDPA takes both. The batched evaluation's tree passes always carry a mask, and at their shape
(rows of ~20 queries against ~300 keys) those copies cost more than the attention itself. The same
arithmetic: equal outputs where transformers repeats the heads, within fp32 rounding (~1e-6) where it
folds a single query's heads instead.
"""

from __future__ import annotations

import functools
import inspect

import torch

from cprec.errors import CPRecError

TORCH_VARLEN = "torch_varlen"
SDPA_GQA = "sdpa_gqa"
CHOICES = ("auto", "flash_attention_2", TORCH_VARLEN, "sdpa", "eager")


def _varlen_attn():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def torch_varlen_available() -> bool:
    return _varlen_attn() is not None and torch.cuda.is_available()


def choose(choice: str, cuda: bool) -> str:
    """The implementation for `model.attn`: auto is flash-attn on GPUs where installed, else SDPA."""
    if choice not in CHOICES:
        raise CPRecError(f"model.attn={choice!r}: expected one of {', '.join(CHOICES)}")
    if choice == TORCH_VARLEN:
        if not torch_varlen_available():
            raise CPRecError(f"model.attn={TORCH_VARLEN} needs CUDA and torch>=2.10 (torch.nn.attention.varlen); "
                             f"this is torch {torch.__version__}, CUDA {'on' if torch.cuda.is_available() else 'off'}")
        register_torch_varlen()
        return choice
    if choice != "auto":
        return choice
    if cuda:
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def document_boundaries(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """cu_seqlens (int32) and the longest document of the flattened batch: a document starts at position 0."""
    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0).flatten()
    if starts.numel() == 0 or starts[0].item() != 0:
        raise CPRecError("torch_varlen attention: every row must start a document (position id 0 first)")
    cu_seqlens = torch.cat([starts, starts.new_tensor([flat.numel()])]).to(torch.int32)
    return cu_seqlens, int((cu_seqlens[1:] - cu_seqlens[:-1]).max().item())


# One forward pass calls the attention of every layer with the same position_ids tensor: derive the
# boundaries once (it syncs with the GPU) and reuse them until another tensor comes.
_last_boundaries: list = [None, None]


def _boundaries_cached(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    if _last_boundaries[0] is not position_ids:
        _last_boundaries[:] = [position_ids, document_boundaries(position_ids)]
    return _last_boundaries[1]


@functools.lru_cache(maxsize=4)
def _parameters(function) -> frozenset:
    return frozenset(inspect.signature(function).parameters)  # once, not per layer and call


def _call_varlen(q, k, v, cu_seqlens, max_len, scale):
    """varlen_attn, causal, across the signatures of torch 2.10-2.13 (is_causal became window_size; GQA came later)."""
    varlen_attn = _varlen_attn()
    params = _parameters(varlen_attn)
    kwargs = {}
    if "window_size" in params:
        kwargs["window_size"] = (-1, 0)  # (-1, 0) is causal
    else:
        kwargs["is_causal"] = True
    if "scale" in params:
        kwargs["scale"] = scale
    elif abs(scale - q.shape[-1] ** -0.5) > 1e-9:
        raise CPRecError(f"torch_varlen attention: this torch's varlen_attn takes no scale (model uses {scale})")
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, **kwargs)


def torch_varlen_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                         position_ids=None, **kwargs):
    """transformers' attention interface: query [b, heads, s, d] in, output [b, s, heads, d] out."""
    if attention_mask is not None or position_ids is None:
        raise CPRecError("torch_varlen attention takes packed rows: position_ids and no attention_mask "
                         "(use sdpa for padded batches and for generation)")
    if dropout:
        raise CPRecError("torch_varlen attention has no dropout (the model's attention_dropout must be 0)")
    b, heads, s, d = query.shape
    cu_seqlens, max_len = _boundaries_cached(position_ids)
    q = query.transpose(1, 2).reshape(b * s, heads, d)
    k = key.transpose(1, 2).reshape(b * s, key.shape[1], d)
    v = value.transpose(1, 2).reshape(b * s, value.shape[1], d)
    scale = scaling if scaling is not None else d ** -0.5
    out = _call_varlen(q, k, v, cu_seqlens, max_len, scale)
    return out.view(b, s, heads, d), None


def register_torch_varlen() -> None:
    """Make `attn_implementation="torch_varlen"` known to transformers (no mask is built for it)."""
    from transformers import AttentionInterface

    AttentionInterface.register(TORCH_VARLEN, torch_varlen_forward)


def sdpa_gqa_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                     **kwargs):
    """transformers' attention interface: query [b, heads, s, d] in, output [b, s, heads, d] out; the key and
    value heads are not repeated (see the module docstring)."""
    if kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None:
        raise CPRecError("sdpa_gqa attention takes neither softcap nor position_bias (use sdpa or eager)")
    if attention_mask is not None:
        attention_mask = attention_mask[:, :, :, :key.shape[-2]]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # as transformers' SDPA: causal only for a maskless pass of several queries (the mask, else, says it all)
    causal = bool(causal and attention_mask is None and query.shape[2] > 1)
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                           dropout_p=dropout, scale=scaling, is_causal=causal,
                                                           enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2).contiguous(), None


def for_evaluation(device) -> str:
    """The attention implementation an evaluation's model runs on `device` (`cprec evaluate` and the metric
    during training alike, so that their floats agree): sdpa_gqa on a CPU, transformers' sdpa elsewhere."""
    return register_sdpa_gqa() if torch.device(device or "cpu").type == "cpu" else "sdpa"


def register_sdpa_gqa() -> str:
    """Make `attn_implementation="sdpa_gqa"` known to transformers, with SDPA's masks; returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(SDPA_GQA, sdpa_gqa_forward)
    AttentionMaskInterface.register(SDPA_GQA, sdpa_mask)
    return SDPA_GQA
