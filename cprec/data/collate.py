"""Packed rows -> model inputs, with no attention and no loss across documents.

For every row: `input_ids`; `labels` equal to the tokens except the ignore index at each document's first
position (its first token would be predicted from the previous document), on the prompt tokens of
fine-tuning documents, and on padding; `position_ids` restarting at 0 at every document (transformers then
attends block-diagonally with SDPA or eager attention, and flash-attention-2 derives its varlen boundaries
from them); `cu_seqlens` / `max_seqlen` of the flattened batch for flash-attention varlen kernels; no
`attention_mask`. Call the model with `use_cache=False`: with the cache on, transformers attends across
documents.
"""

from __future__ import annotations

import numpy as np
import torch

IGNORE_INDEX = -100


def row_segments(doc_lens: np.ndarray, seq_len: int) -> np.ndarray:
    """Segment lengths of a row: its documents, then the padding (if any) as one more segment."""
    lens = np.asarray(doc_lens, dtype=np.int64)
    pad = seq_len - int(lens.sum())
    return np.append(lens, pad) if pad > 0 else lens


def collate_rows(rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]], stream_ids: list[int] | None = None) -> dict:
    """rows: (tokens [seq_len], document lengths, prompt lengths) as `ShardSet.row` gives them."""
    seq_len = len(rows[0][0])
    batch = len(rows)
    input_ids = np.empty((batch, seq_len), dtype=np.int64)
    labels = np.empty((batch, seq_len), dtype=np.int64)
    position_ids = np.empty((batch, seq_len), dtype=np.int64)
    segments = []
    for r, (tokens, doc_lens, prompt_lens) in enumerate(rows):
        input_ids[r] = tokens
        labels[r] = tokens
        seg = row_segments(doc_lens, seq_len)
        starts = np.concatenate([[0], np.cumsum(seg)[:-1]])
        position_ids[r] = np.arange(seq_len) - np.repeat(starts, seg)
        n_docs = len(doc_lens)
        for start, prompt in zip(starts[:n_docs], prompt_lens):
            labels[r, start:start + max(int(prompt), 1)] = IGNORE_INDEX  # first token, and the prompt
        used = int(np.sum(doc_lens))
        labels[r, used:] = IGNORE_INDEX
        segments.append(seg)
    seg_all = np.concatenate(segments)
    cu_seqlens = np.concatenate([[0], np.cumsum(seg_all)]).astype(np.int32)
    out = {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels),
           "position_ids": torch.from_numpy(position_ids), "cu_seqlens": torch.from_numpy(cu_seqlens),
           "max_seqlen": int(seg_all.max())}
    if stream_ids is not None:
        out["stream_ids"] = torch.tensor(stream_ids, dtype=torch.long)
    return out


def model_inputs(batch: dict) -> dict:
    """The keys a Hugging Face causal LM takes (flash-attention varlen derives its boundaries itself)."""
    return {"input_ids": batch["input_ids"], "labels": batch["labels"], "position_ids": batch["position_ids"],
            "use_cache": False}
