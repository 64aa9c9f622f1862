"""Scoring item titles as continuations of a prompt with a causal LM, one user at a time.

This is the one-user path: the reference that `cprec.eval.batched` (what `cprec evaluate` runs) is tested
against, and the baseline of `benchmarks/bench_eval.py`.

A candidate is an item line of the template: the title and the end marker "\\n". Its score is the summed
log-probability of its tokens given the prompt (no length normalisation). The prompt is run once and its
KV cache shared by every candidate:

* `score` (sampled protocol): candidates in batches, each batch on a copy of the prompt cache;
* `top_k` (full ranking): an exact best-first search over the prefix tree of all catalogue titles. Log-
  probabilities are <= 0, so a prefix's score bounds every completion of it: a finished title is final as
  soon as no open prefix scores higher, which makes the result the exact top K (the beam width only sets
  how many prefixes are expanded per batched forward pass), and only catalogue titles can come out.
  Two corners where it differs from scoring every title, kept as the baseline was: titles whose lines have
  the same tokens yield only the first of them, and a title tied with an open prefix is final at once
  (`cprec.eval.search.BestFirst` handles both; `cprec evaluate` no longer calls this search).
"""

from __future__ import annotations

import copy
import heapq
import itertools

import numpy as np
import torch

from cprec.data.template import item_line


class TitleTrie:
    """Prefix tree of token sequences; `end` marks the title a path spells."""

    def __init__(self, sequences: list[list[int]], titles: list[str] | None = None):
        self.titles = titles or []  # the titles themselves, for exhaustive scoring of small catalogues
        self.root: dict = {}
        for index, seq in enumerate(sequences):
            if not seq:
                raise ValueError(f"title {index} has no tokens")
            node = self.root
            for token in seq:
                node = node.setdefault(token, {})
            node.setdefault("end", index)  # two titles with one token sequence: the first names it


class TitleScorer:
    def __init__(self, model, tokenizer, batch_size: int = 64):
        self.model = model.eval()
        self.tok = tokenizer
        self.batch_size = batch_size
        self.device = next(model.parameters()).device
        self._line_ids: dict[str, list[int]] = {}

    # ---- tokens
    def line_ids(self, title: str) -> list[int]:
        """Tokens of the item line (title + end marker), tokenized on its own as pack tokenizes lines."""
        ids = self._line_ids.get(title)
        if ids is None:
            ids = self._line_ids[title] = self.tok(item_line(title), add_special_tokens=False)["input_ids"]
        return ids

    def prompt_ids(self, prompt: str) -> list[int]:
        return self.tok(prompt, add_special_tokens=False)["input_ids"]

    def _prompt(self, prompt_ids: list[int]):
        out = self.model(input_ids=torch.tensor([prompt_ids], device=self.device), use_cache=True)
        return out.cache, torch.log_softmax(out.logits[0, -1].float(), dim=-1)

    def _continue(self, cache, first_logp, sequences: list[list[int]]) -> list[torch.Tensor]:
        """Log-probabilities of every token of each sequence after the prompt (batched, shared cache)."""
        width = max(len(s) for s in sequences)
        out = [first_logp[[s[0] for s in sequences]].unsqueeze(1)]
        if width > 1:
            pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
            ids = torch.tensor([s + [pad] * (width - len(s)) for s in sequences], device=self.device)
            # right padding only follows real tokens, so causal attention never lets a real token see it
            batch_cache = copy.deepcopy(cache)
            batch_cache.batch_repeat_interleave(len(sequences))
            logits = self.model(input_ids=ids[:, :-1], cache=batch_cache, use_cache=True).logits
            logp = torch.log_softmax(logits.float(), dim=-1).gather(2, ids[:, 1:, None]).squeeze(2)
            out.append(logp)
        return list(torch.cat(out, dim=1))

    # ---- sampled protocol
    @torch.no_grad()
    def score(self, prompt: str, titles: list[str]) -> np.ndarray:
        """Summed log-probability of each title's line given the prompt."""
        cache, first = self._prompt(self.prompt_ids(prompt))
        seqs = [self.line_ids(t) for t in titles]
        scores = []
        for start in range(0, len(seqs), self.batch_size):
            chunk = seqs[start:start + self.batch_size]
            for seq, logp in zip(chunk, self._continue(cache, first, chunk)):
                scores.append(float(logp[:len(seq)].sum()))
        return np.array(scores)

    @torch.no_grad()
    def score_naive(self, prompt: str, titles: list[str]) -> np.ndarray:
        """The same scores with one full forward pass per candidate (the reference and the baseline)."""
        p = self.prompt_ids(prompt)
        scores = []
        for title in titles:
            seq = self.line_ids(title)
            logits = self.model(input_ids=torch.tensor([p + seq], device=self.device), use_cache=False).logits[0]
            logp = torch.log_softmax(logits[len(p) - 1:-1].float(), dim=-1)
            scores.append(float(logp.gather(1, torch.tensor(seq, device=self.device)[:, None]).sum()))
        return np.array(scores)

    # ---- full ranking
    @torch.no_grad()
    def top_k(self, prompt: str, trie: TitleTrie, k: int, beam: int = 20,
              exhaustive_below: int = 0) -> list[tuple[int, float]]:
        """The exact k best titles of the trie as (title index, score), best first.

        A catalogue smaller than `exhaustive_below` is scored title by title on the shared cache instead
        (the same exact result; cheaper when the search would open most prefixes anyway).
        """
        if len(trie.titles) < exhaustive_below:
            scores = self.score(prompt, trie.titles)
            order = np.argsort(-scores, kind="stable")[:k]
            return [(int(i), float(scores[i])) for i in order]
        cache, first = self._prompt(self.prompt_ids(prompt))
        counter = itertools.count()
        open_heap: list = []  # (-score, order, prefix, node)
        finished: list = []  # (-score, order, title index)

        def expand(score: float, prefix: tuple, node: dict, logp: torch.Tensor) -> None:
            for token, child in node.items():
                if token == "end":
                    continue
                s = score + float(logp[token])
                if "end" in child:
                    heapq.heappush(finished, (-s, next(counter), child["end"]))
                if len(child) > ("end" in child):
                    heapq.heappush(open_heap, (-s, next(counter), prefix + (token,), child))

        expand(0.0, (), trie.root, first)
        results: list[tuple[int, float]] = []
        while len(results) < k and (open_heap or finished):
            bound = -open_heap[0][0] if open_heap else -float("inf")
            while finished and -finished[0][0] >= bound and len(results) < k:
                neg, _, index = heapq.heappop(finished)
                results.append((index, -neg))
            if len(results) >= k or not open_heap:
                continue
            popped = [heapq.heappop(open_heap) for _ in range(min(beam, len(open_heap)))]
            by_length: dict[int, list] = {}
            for entry in popped:
                by_length.setdefault(len(entry[2]), []).append(entry)
            for group in by_length.values():
                logps = self._next_logp(cache, [list(e[2]) for e in group])
                for (neg, _, prefix, node), logp in zip(group, logps):
                    expand(-neg, prefix, node, logp)
        return results

    def _next_logp(self, cache, prefixes: list[list[int]]) -> list[torch.Tensor]:
        """Next-token log-probabilities after prompt + each prefix (all prefixes of one length)."""
        batch_cache = copy.deepcopy(cache)
        batch_cache.batch_repeat_interleave(len(prefixes))
        ids = torch.tensor(prefixes, device=self.device)
        logits = self.model(input_ids=ids, cache=batch_cache, use_cache=True).logits[:, -1]
        return list(torch.log_softmax(logits.float(), dim=-1))
