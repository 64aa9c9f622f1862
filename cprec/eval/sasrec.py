"""SASRec (Kang & McAuley, 2018) with a cross-entropy loss over all items: the ID-based baseline.

Trained on the downstream training prefixes only (next item at every position), scored on the same test
users as the language models: full ranking over the domain's whole catalogue, and the sampled protocol on
the candidates `cprec evaluate` saved. Ties count against the target in both. It runs where `cprec evaluate`
would (the GPU when there is one; `device`/`dtype`), bf16 by autocast with fp32 weights, and writes the same
`ranks.jsonl` (its full-ranking ranks are exact over the whole catalogue, never null).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from cprec.eval import ranks as rank_files
from cprec.eval.metrics import rank_against_ties, ranking_metrics

SCORE_USERS = 1024  # users scored at once: bounds the [users, items] score matrix


@dataclass
class SASRecConfig:
    hidden: int = 64  # embedding and model width
    layers: int = 2  # self-attention blocks
    heads: int = 2  # attention heads
    max_len: int = 50  # the newest items of a history that it reads
    dropout: float = 0.2  # dropout rate
    lr: float = 1e-3  # Adam learning rate
    epochs: int = 40  # passes over the training prefixes
    batch_size: int = 128  # sequences per step
    seed: int = 0  # initialisation and order


class SASRec(nn.Module):
    def __init__(self, n_items: int, cfg: SASRecConfig):
        super().__init__()
        self.cfg = cfg
        self.items = nn.Embedding(n_items + 1, cfg.hidden, padding_idx=0)  # item i is index i + 1
        self.positions = nn.Embedding(cfg.max_len, cfg.hidden)
        layer = nn.TransformerEncoderLayer(cfg.hidden, cfg.heads, 4 * cfg.hidden, cfg.dropout, batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.hidden)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        """seq: [B, L] item indices + 1, left-padded with 0 -> scores [B, L, n_items] for the next item."""
        length = seq.shape[1]
        h = self.items(seq) * self.cfg.hidden ** 0.5 + self.positions(torch.arange(length, device=seq.device))
        causal = torch.triu(torch.full((length, length), float("-inf"), device=seq.device), diagonal=1)
        h = self.encoder(self.drop(h), mask=causal)
        h = self.norm(h)
        return h @ self.items.weight[1:].T


def _left_pad(seqs: list[list[int]], length: int) -> torch.Tensor:
    out = torch.zeros(len(seqs), length, dtype=torch.long)
    for r, s in enumerate(seqs):
        s = s[-length:]
        if s:
            out[r, length - len(s):] = torch.tensor(s) + 1
    return out


def _autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision in `dtype` (weights stay fp32), or nothing for fp32."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def train_sasrec(sequences: list[list[int]], n_items: int, cfg: SASRecConfig, device: torch.device | None = None,
                 dtype: torch.dtype = torch.float32) -> SASRec:
    """Next-item cross-entropy at every position of every training sequence (item indices 0..n_items-1)."""
    device = device or torch.device("cpu")
    torch.manual_seed(cfg.seed)
    model = SASRec(n_items, cfg).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    data = [s[-(cfg.max_len + 1):] for s in sequences if len(s) >= 2]
    inputs = _left_pad([s[:-1] for s in data], cfg.max_len).to(device)
    targets = _left_pad([s[1:] for s in data], cfg.max_len).to(device) - 1  # -1 where padded
    gen = torch.Generator().manual_seed(cfg.seed)
    model.train()
    for _ in tqdm(range(cfg.epochs), desc="SASRec", unit=" epochs", leave=False):
        order = torch.randperm(len(data), generator=gen)
        for start in range(0, len(data), cfg.batch_size):
            idx = order[start:start + cfg.batch_size].to(device)
            with _autocast(device, dtype):
                logits = model(inputs[idx])
            loss = nn.functional.cross_entropy(logits.float().reshape(-1, n_items), targets[idx].reshape(-1),
                                               ignore_index=-1)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def next_item_scores(model: SASRec, histories: list[list[int]], dtype: torch.dtype = torch.float32) -> np.ndarray:
    """[users, n_items] scores of the next item after each history."""
    device = next(model.parameters()).device
    with _autocast(device, dtype):
        return model(_left_pad(histories, model.cfg.max_len).to(device))[:, -1].float().cpu().numpy()


def evaluate_sasrec(prepared: str | Path, out: str | Path, eval_cfg, cfg: SASRecConfig,
                    candidates: str | Path | None = None) -> dict:
    """The SASRec baseline on the same test users (and saved candidates) as `cprec evaluate`."""
    from cprec.eval.config import protocols, resolve_device
    from cprec.eval.downstream import Downstream, downstream_domains, read_jsonl, sampled_candidates
    from cprec.eval.evaluate import results_markdown

    prepared, out = Path(prepared), Path(out)
    manifest, domains = downstream_domains(prepared, eval_cfg)
    device, dtype = resolve_device(eval_cfg.device, eval_cfg.dtype)
    out.mkdir(parents=True, exist_ok=True)
    from cprec.data.prepared import split_kind

    results = {"model": "SASRec", "prepared": str(prepared), "protocol": eval_cfg.protocol,
               "split": "test", "split_kind": split_kind(manifest),
               "config": {**eval_cfg.__dict__, "sasrec": cfg.__dict__}, "domains": {}}
    records = []
    for domain in domains:
        ds = Downstream(prepared, manifest, domain, eval_cfg, len)
        train = read_jsonl(prepared / "downstream" / ds.slug / "train.jsonl")
        started = time.perf_counter()
        model = train_sasrec([[ds.index[t] for t in r["items"]] for r in train], len(ds.titles), cfg, device, dtype)
        entry = {"users": len(ds.test), "items": len(ds.titles), "train_seconds": time.perf_counter() - started}
        cands = sampled_candidates(ds, eval_cfg, out, Path(candidates) if candidates else None) \
            if "sampled" in protocols(eval_cfg) else None
        found = {"sampled": [], "full": []}
        for lo in range(0, len(ds.test), SCORE_USERS):
            rows = ds.test[lo:lo + SCORE_USERS]
            scores = next_item_scores(model, [[ds.index[t] for t in r["history"]] for r in rows], dtype)
            for row, s, i in zip(rows, scores, range(lo, lo + len(rows))):
                found["full"].append((rank_against_ties(s, ds.index[row["target"]]), len(ds.titles)))
                if cands is not None:
                    found["sampled"].append((rank_against_ties(s[[ds.index[c] for c in cands[i]]], 0), len(cands[i])))
        for protocol in protocols(eval_cfg):
            records += [rank_files.record(domain, protocol, row["user"], r, n)
                        for row, (r, n) in zip(ds.test, found[protocol])]
            metrics = ranking_metrics([r for r, _ in found[protocol]])
            if protocol == "sampled":
                metrics.update(candidates=eval_cfg.negatives + 1,
                               mean_candidates=float(np.mean([len(c) for c in cands])))
            entry[protocol] = metrics
        results["domains"][domain] = entry
    rank_files.finish(out, records)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(results_markdown({"SASRec": results}))
    return results
