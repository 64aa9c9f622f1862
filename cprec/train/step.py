"""One optimizer step: micro-batches through the engine with the exact token-mean loss, then the step's
statistics summed over ranks.

Loss. Each rank computes per-token cross-entropy itself (no loss across documents: see `collate`) and
scales its sum by world * accumulation / (labelled tokens in the global batch). DeepSpeed divides by the
accumulation steps and averages over ranks, so the gradient is the exact token mean of the global batch,
whatever the world size or micro-batch split.

Memory. The plain loss materialises the (rows x seq x vocab) logits and their fp32 copy: 6.4 GB for 32 x 1024
tokens of a 49,152-token vocabulary, the largest tensor of a small model's step. With `loss_chunk_tokens: N`
the LM head's forward is replaced (`ChunkedLossHead`) by one that returns per-token losses, computing the
logits N tokens at a time under activation checkpointing: each chunk's logits live only while its loss (and,
in backward, its gradient) is computed. Same loss and gradients within fp32 rounding; one more head matmul
per token (the recomputation in backward). It goes through the head module's call, so ZeRO-3's hooks gather
and release its weight as they do for the plain head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from cprec.data.collate import IGNORE_INDEX
from cprec.errors import CPRecError


@dataclass
class StepStats:
    """A step's statistics over every rank: what metrics.jsonl records of it."""
    loss: float
    loss_per_stream: dict[str, float]
    tokens_per_stream: dict[str, int]


LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")  # applied after the head


def check_chunkable(model_config) -> None:
    """The chunked loss replaces the head's output, so a model that transforms the logits after the head
    (Gemma-2's soft-capping, Cohere's and Granite's scaling) would apply that to losses: refused."""
    found = [a for a in LOGIT_TRANSFORMS if getattr(model_config, a, None) not in (None, 1, 1.0)]
    if found:
        raise CPRecError(f"loss_chunk_tokens cannot be used with a model that transforms its logits after the "
                         f"head ({found[0]}={getattr(model_config, found[0])}); set loss_chunk_tokens: 0")


class ChunkedLossHead:
    """Replaces `head.forward` (the model's output embedding, an nn.Linear) for training: given the hidden
    states, returns the per-token cross-entropy against `self.targets` (rows x seq, IGNORE_INDEX where no
    label), computed `chunk_tokens` tokens at a time. The model's forward then returns these losses where it
    returned logits."""

    def __init__(self, head: torch.nn.Module, chunk_tokens: int):
        if chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
        self.head, self.chunk = head, chunk_tokens
        self.targets: torch.Tensor | None = None
        head.forward = self.forward  # an instance attribute: Module.__call__ (and its hooks) call it

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.targets is None:
            raise RuntimeError("ChunkedLossHead called without targets: it computes losses, not logits")
        flat_hidden = hidden.reshape(-1, hidden.shape[-1])
        flat_targets = self.targets.reshape(-1)
        losses = [checkpoint(self._chunk_loss, flat_hidden[i:i + self.chunk], flat_targets[i:i + self.chunk],
                             use_reentrant=False)
                  for i in range(0, flat_hidden.shape[0], self.chunk)]
        return torch.cat(losses).view(self.targets.shape)

    def _chunk_loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = torch.nn.functional.linear(hidden, self.head.weight, self.head.bias)
        return torch.nn.functional.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX,
                                                 reduction="none")


def token_losses(model, ids, positions, targets, chunked: ChunkedLossHead | None = None) -> torch.Tensor:
    """Per-token cross-entropy (rows x seq, 0 where the target is IGNORE_INDEX) of a causal LM (a Hugging Face
    model or a DeepSpeed engine around one); `chunked` when its head was replaced by a ChunkedLossHead."""
    if chunked is None:
        logits = model(input_ids=ids, position_ids=positions, use_cache=False).logits
        return torch.nn.functional.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1),
                                                 ignore_index=IGNORE_INDEX, reduction="none").view(targets.shape)
    chunked.targets = targets
    try:
        return model(input_ids=ids, position_ids=positions, use_cache=False).logits
    finally:
        chunked.targets = None


class TrainStep:
    def __init__(self, engine, world: int, stream_names: list[str], loss_chunk_tokens: int = 0):
        self.engine, self.world, self.names = engine, world, stream_names
        self.accum = engine.gradient_accumulation_steps()
        self.device = engine.device
        self.chunked = ChunkedLossHead(engine.module.get_output_embeddings(), loss_chunk_tokens) \
            if loss_chunk_tokens else None

    def all_reduce(self, tensor: torch.Tensor, op=None) -> torch.Tensor:
        """All-reduce a small CPU tensor on the engine's device (NCCL reduces CUDA tensors only); CPU back."""
        on_device = tensor.to(self.device)
        torch.distributed.all_reduce(on_device, op=op or torch.distributed.ReduceOp.SUM)
        return on_device.cpu()

    def sum_over_ranks(self, fields: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Named float64 fields summed over ranks in one collective."""
        sizes = [t.numel() for t in fields.values()]
        total = self.all_reduce(torch.cat([t.double().reshape(-1) for t in fields.values()]))
        return dict(zip(fields, total.split(sizes)))

    def __call__(self, batch: dict) -> StepStats:
        labels = batch["labels"][:, 1:]
        # position t predicts token t + 1: shift the labels, not the logits, so that the (rows x seq x vocab)
        # logits are never copied into a sliced contiguous tensor
        targets = torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)
        labelled = labels != IGNORE_INDEX
        n = len(self.names)
        total_labelled = self.all_reduce(labelled.sum().double())
        scale = self.world * self.accum / max(total_labelled.item(), 1.0)
        local = {"loss": torch.zeros(1, dtype=torch.float64), "labelled": labelled.sum().double().reshape(1),
                 "stream_loss": torch.zeros(n, dtype=torch.float64),
                 "stream_labelled": torch.zeros(n, dtype=torch.float64)}
        micro = batch["input_ids"].shape[0] // self.accum
        for m in range(self.accum):
            sl = slice(m * micro, (m + 1) * micro)
            row_loss = self._micro_step(batch["input_ids"][sl], batch["position_ids"][sl], targets[sl], scale)
            stream_ids = batch["stream_ids"][sl]
            local["loss"] += row_loss.sum()
            local["stream_loss"].index_add_(0, stream_ids, row_loss)
            local["stream_labelled"].index_add_(0, stream_ids, labelled[sl].sum(1).double())
        total = self.sum_over_ranks({**local, "stream_tokens": batch["stream_tokens"]})
        return StepStats(
            loss=total["loss"].item() / max(total["labelled"].item(), 1.0),
            loss_per_stream={self.names[i]: total["stream_loss"][i].item() / total["stream_labelled"][i].item()
                             for i in range(n) if total["stream_labelled"][i] > 0},
            tokens_per_stream={self.names[i]: int(total["stream_tokens"][i].item()) for i in range(n)
                               if total["stream_tokens"][i] > 0})

    def _micro_step(self, ids, positions, targets, scale: float) -> torch.Tensor:
        """Forward, backward and (at the last micro-batch, inside DeepSpeed) the optimizer step; per-row loss."""
        ids, positions, targets = ids.to(self.device), positions.to(self.device), targets.to(self.device)
        token_loss = token_losses(self.engine, ids, positions, targets, self.chunked)
        self.engine.backward(token_loss.sum() * scale)
        self.engine.step()
        return token_loss.detach().sum(1).double().cpu()
