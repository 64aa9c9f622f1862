"""HR@K and NDCG@K from the rank of each user's target (0 = first; None = not in the ranked list)."""

from __future__ import annotations

import math

import numpy as np

HR_KS = (1, 5, 10, 20)
NDCG_KS = (5, 10, 20)


def rank_against_ties(scores, target: int) -> int:
    """0-based rank of candidate `target` among `scores`; every other candidate scoring at least as high
    as the target counts above it (ties count against the target)."""
    scores = np.asarray(scores, dtype=np.float64)
    return int(np.sum(scores >= scores[target])) - 1


def ranking_metrics(ranks: list[int | None], hr_ks=HR_KS, ndcg_ks=NDCG_KS) -> dict:
    """Mean HR@K and NDCG@K over users. With one relevant item NDCG@K = 1 / log2(rank + 2) if rank < K."""
    if not ranks:
        raise ValueError("no users to average over")
    out = {}
    for k in hr_ks:
        out[f"HR@{k}"] = sum(r is not None and r < k for r in ranks) / len(ranks)
    for k in ndcg_ks:
        out[f"NDCG@{k}"] = sum(1.0 / math.log2(r + 2) for r in ranks if r is not None and r < k) / len(ranks)
    return out
