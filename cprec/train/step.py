"""One optimizer step: micro-batches through the engine with the exact token-mean loss, then the step's
statistics summed over ranks.

Loss. Each rank computes per-token cross-entropy itself (no loss across documents: see `collate`) and
scales its sum by world * accumulation / (labelled tokens in the global batch). DeepSpeed divides by the
accumulation steps and averages over ranks, so the gradient is the exact token mean of the global batch,
whatever the world size or micro-batch split.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cprec.data.collate import IGNORE_INDEX


@dataclass
class StepStats:
    """A step's statistics over every rank: what metrics.jsonl records of it."""
    loss: float
    loss_per_stream: dict[str, float]
    tokens_per_stream: dict[str, int]


class TrainStep:
    def __init__(self, engine, world: int, stream_names: list[str]):
        self.engine, self.world, self.names = engine, world, stream_names
        self.accum = engine.gradient_accumulation_steps()
        self.device = engine.device

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
        logits = self.engine(input_ids=ids, position_ids=positions, use_cache=False).logits
        token_loss = torch.nn.functional.cross_entropy(logits.float().view(-1, logits.shape[-1]),
                                                       targets.reshape(-1), ignore_index=IGNORE_INDEX,
                                                       reduction="none").view(targets.shape)
        self.engine.backward(token_loss.sum() * scale)
        self.engine.step()
        return token_loss.detach().sum(1).double().cpu()
