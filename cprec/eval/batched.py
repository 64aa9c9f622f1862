"""Scoring titles for many users at once: the evaluation's scorer. The only owner of batching across users.

Contract: every score is what `TitleScorer`'s one-user path computes for the same user and title (the summed
log-probability of the title's line given the user's prompt) up to floating-point rounding, because every
token is fed at the same position with the same context; a sampled rank is the rank among those scores (ties
count against the target); full ranking returns exactly the top K of scoring every title. Tests check all
three against the one-user path and against brute force.

How (the spec, beside the code):

* **Prompts.** The prompts of a batch of users run in one forward pass, right-padded: positions 0..n-1,
  padding masked. A pad only ever follows real tokens, so no real token attends to it and no query row is
  fully masked. The KV cache holds every prompt; the distribution after each prompt is read at its last
  real token (the language-model head runs on those rows only).
* **Trees.** A user's titles (candidates, or the catalogue) form a prefix tree of their lines' tokens
  (`PrefixTree`). A title's score is the sum of the log-probabilities along its path, so each node is fed
  once however many titles share it (tree attention, as in speculative decoding's token trees): a node
  attends to its user's prompt and to its ancestors, at position prompt length + depth - 1. Expanding a
  node means feeding it: the distribution after it scores all its children at once; the distribution after
  the prompt scores the first tokens. Titles whose lines have the same tokens end at one node; each of
  them is ranked (tied, in title order).
* **Rows and passes.** A row is one user's nodes on a copy of that user's prompt cache: at most `row_nodes`
  fed nodes, plus context. Nodes are numbered in pre-order, so node a is v or an ancestor of v exactly when
  a <= v < stop[a] (the end of a's subtree): a row's attention mask is that one comparison, for all its
  rows at once. A forward pass takes rows of many users up to `tokens_per_pass` fed positions
  (padding counted), which bounds its memory; the head runs on the expanded nodes only, in chunks.
* **Searches keep K/V** (`NodeCache`): the keys and values of every node fed during a search are kept, so a
  later row takes a node's ancestors as context instead of feeding them again: each node is fed once. The
  cache holds at most `node_cache_bytes`; when full, ancestors are fed again as context (slower, as exact).
* **Full ranking.** Exhaustive: every title's score from the catalogue's tree, cut in pre-order into slices
  (a run of consecutive nodes needs, besides itself, only the ancestors of its first node), slices of all
  users batched. Best-first (`BestFirst`): log-probabilities are <= 0, so a prefix's score bounds all its
  completions and a finished title is final once every open prefix scores lower (an equal one may end in an
  equal title that comes first in title order); each step pops up to `beam` open prefixes of every
  unfinished user and expands all of them in the same passes.
* **Sampled ranks** (`rank_users`): the target's path is expanded first; then, level by level, only the
  prefixes that score at least the target, since no completion of a lower one can rank above it.
* **Bounded memory.** A user's open prefixes (the frontier) are cut back to the best `frontier` after every
  step, and the best score cut away is remembered: a finished title is final only when it also beats that.
  When a search can no longer certify its next title (every remaining prefix scores below what was cut),
  the user is scored exhaustively instead, in slices, and counted, so the result stays exact. Finished
  titles beyond the K still to be found are dropped (they can never enter the top K).
* **No Python per node.** A search step's bookkeeping (the frontier, the rows, the masks, the cache's
  slots) is numpy over arrays of nodes, per user or per pass: on a GPU, whose passes take milliseconds, a
  loop over nodes in Python was what bound the search.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers.cache_utils import DynamicLayer

from cprec.data.template import item_line
from cprec.errors import CPRecError
from cprec.eval.scoring import TitleScorer

HEAD_CHUNK = 1024  # rows of logits materialised at once: at a 152k vocabulary in bf16, ~1.5 GB with the
# fp32 copy and the fp32 log-probabilities
NO_NODES = np.zeros(0, dtype=np.int64)
PASS_OVERHEAD_CPU = 64  # positions a pass costs beyond its own on a CPU (measured: `pass_bounds`)
PASS_OVERHEAD_GPU = 10**9  # on a GPU, bound by the host's launches: the fewest passes, then the least padding


def sorted_unique(values: np.ndarray) -> np.ndarray:
    """np.unique by sorting: numpy 2.3+'s hash-based unique is ~40x slower on large int arrays of many
    distinct values, which a search step's (row, ancestor) pairs are."""
    values = np.sort(values)
    return values[np.concatenate([[True], values[1:] != values[:-1]])] if len(values) else values


class PrefixTree:
    """The token prefix tree of title lines as flat arrays, nodes numbered in pre-order (parents first).

    Node 0 is the root (the empty prefix); node v > 0 spells its parent's tokens then `token[v]`.
    `title_node[i]` is the node that spells title i; `titles_of(nodes)` the titles each node spells (several
    when titles' lines have the same tokens: they get the same score, and rank in title order).
    """

    def __init__(self, sequences: list[list[int]]):
        for index, seq in enumerate(sequences):
            if not seq:
                raise ValueError(f"title {index} has no tokens")
        # sorted insertion creates nodes in pre-order: a sequence shares its prefix with the previous one
        order = sorted(range(len(sequences)), key=lambda i: (sequences[i], i))
        token, parent, depth = [-1], [-1], [0]
        title_node = np.zeros(len(sequences), dtype=np.int64)
        path, previous = [0], []
        for i in order:
            seq = sequences[i]
            common = 0
            while common < min(len(seq), len(previous)) and seq[common] == previous[common]:
                common += 1
            del path[common + 1:]
            for t in seq[common:]:
                token.append(t)
                parent.append(path[-1])
                depth.append(len(path))
                path.append(len(token) - 1)
            title_node[i] = path[-1]
            previous = seq
        self.token = np.asarray(token, dtype=np.int64)
        self.parent = np.asarray(parent, dtype=np.int64)
        self.depth = np.asarray(depth, dtype=np.int64)
        self.title_node = title_node
        # the titles ending at each node, in title order: titles whose lines are identical end at one node
        self.titles_at = np.lexsort((np.arange(len(sequences)), title_node))
        self.title_ptr = np.concatenate([[0], np.cumsum(np.bincount(title_node, minlength=len(token)))])
        counts = np.bincount(self.parent[1:], minlength=len(token))
        self.child_ptr = np.concatenate([[0], np.cumsum(counts)])
        self.children = np.argsort(self.parent[1:], kind="stable") + 1  # grouped by parent, pre-order within
        self.has_children = counts > 0
        self.inner = np.flatnonzero(self.has_children[1:]) + 1  # the nodes that are ever fed, in pre-order
        self.levels = [np.flatnonzero(self.depth == d) for d in range(1, int(self.depth.max()) + 1)]
        # pre-order numbering: node v's subtree is the range [v, stop[v]), so "a is v or an ancestor of v" is
        # a <= v < stop[a], one comparison (the attention mask of a row is built from it)
        size = np.ones(len(token), dtype=np.int64)
        for level in reversed(self.levels):
            np.add.at(size, self.parent[level], size[level])
        self.stop = np.arange(len(token)) + size

    @property
    def size(self) -> int:
        return len(self.token)

    def children_of(self, nodes: np.ndarray) -> np.ndarray:
        """The children of each node of `nodes`, concatenated in that order."""
        return self.children_and_counts(nodes)[0]

    def children_and_counts(self, nodes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`children_of(nodes)`, and how many children each node of `nodes` has."""
        return _ranges(self.child_ptr, self.children, nodes)

    def titles_of(self, nodes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The titles ending at each node of `nodes` (concatenated in that order), and how many at each."""
        return _ranges(self.title_ptr, self.titles_at, nodes)

    def ancestors(self, node: int) -> list[int]:
        """Strict ancestors of `node`, root excluded, nearest last."""
        out = []
        node = int(self.parent[node])
        while node > 0:
            out.append(node)
            node = int(self.parent[node])
        return out[::-1]

    def ancestors_of(self, nodes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Every (i, a) such that `a` is a strict ancestor of `nodes[i]`, the root excluded."""
        index, above = np.arange(len(nodes)), self.parent[np.asarray(nodes, dtype=np.int64)]
        out_index, out_above = [NO_NODES], [NO_NODES]
        while len(above):
            real = above > 0
            index, above = index[real], above[real]
            out_index.append(index)
            out_above.append(above)
            above = self.parent[above]
        return np.concatenate(out_index), np.concatenate(out_above)

    def slices(self, row_nodes: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Every inner node, cut into (fed, expanded) rows of at most `row_nodes` fed nodes: a run of
        consecutive inner nodes (expanded) plus the ancestors of its first node (fed as context)."""
        out, start = [], 0
        while start < len(self.inner):
            context = self.ancestors(int(self.inner[start]))
            room = row_nodes - len(context)
            if room < 1:
                raise CPRecError(f"row_nodes={row_nodes} is below the longest title line ({len(context) + 1} "
                                 f"tokens before its last); raise row_nodes")
            run = self.inner[start:start + room]
            out.append((np.concatenate([np.asarray(context, dtype=np.int64), run]), run))
            start += len(run)
        return out

    def cover(self, nodes, row_nodes: int, kept: np.ndarray | None = None
              ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(fed, expanded, context) rows that expand `nodes`: each row feeds some of them and those of their
        ancestors not `kept` (a mask over the nodes; None: none), at most `row_nodes` fed, and takes the
        kept ancestors as context."""
        nodes = np.unique(np.asarray(nodes, dtype=np.int64))
        index, above = self.ancestors_of(nodes)
        if kept is not None and kept[above].all():
            # a search's usual case, vectorised: every ancestor's K/V is kept, so a row feeds only its nodes
            contexts = self.row_contexts(nodes, np.arange(len(nodes)) // row_nodes, index, above)
            return [(nodes[r * row_nodes:(r + 1) * row_nodes],) * 2 + (context,) for r, context in enumerate(contexts)]
        is_kept = (lambda a: False) if kept is None else (lambda a: bool(kept[a]))
        rows, fed, context, expanded = [], set(), set(), []
        for node in nodes.tolist():
            above = self.ancestors(node)
            need = ({node} | {a for a in above if not is_kept(a)}) - fed
            if expanded and len(fed) + len(need) > row_nodes:
                rows.append(_row(fed, expanded, context))
                fed, context, expanded = set(), set(), []
                need = {node} | {a for a in above if not is_kept(a)}
            if len(need) > row_nodes:
                raise CPRecError(f"row_nodes={row_nodes} is below the longest title line; raise row_nodes")
            fed |= need
            context |= {a for a in above if is_kept(a)}
            expanded.append(node)
        if expanded:
            rows.append(_row(fed, expanded, context))
        return rows

    def row_contexts(self, nodes: np.ndarray, row_of: np.ndarray, index: np.ndarray, above: np.ndarray
                     ) -> list[np.ndarray]:
        """For rows that feed only their own nodes (`nodes[i]` in row `row_of[i]`, rows numbered 0, 1, ... in
        order; (index, above) = `ancestors_of(nodes)`), each row's context: the distinct ancestors of its
        nodes that it does not feed itself, sorted."""
        if not len(nodes):
            return []
        pairs = sorted_unique(row_of[index] * self.size + above)
        pairs = pairs[~np.isin(pairs, row_of * self.size + nodes, assume_unique=True)]
        context_row, context_node = np.divmod(pairs, self.size)
        bounds = np.searchsorted(context_row, np.arange(int(row_of[-1]) + 2))
        return [context_node[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:])]

    def path_scores(self, edge: np.ndarray) -> np.ndarray:
        """[..., nodes] log-probability of each node's token after its parent -> summed along each path."""
        total = np.zeros_like(edge)
        for level in self.levels:
            total[..., level] = total[..., self.parent[level]] + edge[..., level]
        return total


def _ranges(ptr: np.ndarray, values: np.ndarray, nodes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """values[ptr[n]:ptr[n + 1]] for each node n of `nodes`, concatenated in that order, and their lengths."""
    nodes = np.asarray(nodes, dtype=np.int64)
    starts, counts = ptr[nodes], ptr[nodes + 1] - ptr[nodes]
    if len(nodes) == 0:
        return NO_NODES, NO_NODES
    offsets = np.repeat(starts - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
    return values[np.arange(int(counts.sum())) + offsets], counts


def _row(fed: set, expanded: list, context: set) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (np.asarray(sorted(fed), dtype=np.int64), np.asarray(expanded, dtype=np.int64),
            np.asarray(sorted(context - fed), dtype=np.int64))


@dataclass
class Prompts:
    """The prompt pass of a batch of users: its KV cache (right-padded), lengths, padding mask, and the
    log-probabilities of the first title token after each prompt."""
    layers: list[tuple[torch.Tensor, torch.Tensor]]
    lengths: torch.Tensor  # [users]
    mask: torch.Tensor  # [users, longest prompt] bool, True on real tokens
    first: np.ndarray  # [users, vocab] float32, on the CPU


@dataclass
class Row:
    user: int  # index into the prompt batch
    tree: PrefixTree
    fed: np.ndarray  # node ids, sorted; with `context`, every ancestor (but the root) of each is present
    expanded: np.ndarray  # the fed nodes whose children are scored
    context: np.ndarray = field(default_factory=lambda: NO_NODES)  # nodes whose K/V the NodeCache holds
    first: int = 0  # a search's row: where its expanded nodes start in that step's list of nodes


class RowLayer(DynamicLayer):
    """One layer's keys and values of a pass, allocated at their final length: the prompt's and the context's
    filled in, the last `width` positions left for the model to write its fed nodes' into. transformers'
    DynamicCache concatenates when it is filled and on every update: with the concatenation of prompt and
    context, every row's whole cache was copied three times more per layer and pass (`aten::cat`, 9% of a
    best-first search's time on a CPU, profiled; 1% after)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, width: int):
        super().__init__()
        self.full = (keys, values)
        self.known = keys.shape[2] - width
        self.keys, self.values = keys[:, :, :self.known], values[:, :, :self.known]
        self.device, self.is_initialized = keys.device, True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        keys, values = self.full
        keys[:, :, self.known:], values[:, :, self.known:] = key_states, value_states
        self.keys, self.values = keys, values
        return keys, values


class NodeCache:
    """Keys and values of the tree nodes fed during one search of a batch of users, by (user, node), so that
    later rows take them as context. At most `capacity` nodes; when full, nodes are no longer kept. User u's
    node v has the slot `slot[offset[u] + v]` (-1: not kept): one flat array, so that lookups and stores
    are vectorised over all the nodes of a pass."""

    def __init__(self, capacity: int, tree_sizes: list[int]):
        self.capacity, self.used = capacity, 0
        self.offset = np.concatenate([[0], np.cumsum(tree_sizes)]).astype(np.int64)
        self.slot = np.full(int(self.offset[-1]), -1, dtype=np.int32)  # users x tree nodes: 4 bytes each
        self.keys: list[torch.Tensor] = []  # per layer [capacity, kv heads, head dim]
        self.values: list[torch.Tensor] = []

    def kept(self, user: int) -> np.ndarray:
        """A mask over the user's tree: the nodes whose K/V are kept."""
        return self.slot[self.offset[user]:self.offset[user + 1]] >= 0

    def slots(self, user: int, nodes: np.ndarray) -> np.ndarray:
        return self.slot[self.offset[user] + nodes]

    def all_kept(self, users: np.ndarray, nodes: np.ndarray) -> bool:
        return bool((self.slot[self.offset[users] + nodes] >= 0).all())

    def keep(self, users: np.ndarray, nodes: np.ndarray, keys: list[torch.Tensor], values: list[torch.Tensor]
             ) -> None:
        """Store the per-layer [n, kv heads, head dim] K/V of (users[i], nodes[i]) while there is room."""
        where = self.offset[users] + nodes
        _, first = np.unique(where, return_index=True)  # a node fed in two rows is kept once
        take = first[self.slot[where[first]] < 0][:self.capacity - self.used]
        if not len(take):
            return
        if not self.keys:
            self.keys = [k.new_empty((self.capacity, *k.shape[1:])) for k in keys]
            self.values = [v.new_empty((self.capacity, *v.shape[1:])) for v in values]
        start, stop = self.used, self.used + len(take)
        index = torch.from_numpy(take).to(keys[0].device)
        for store, src in zip(self.keys + self.values, keys + values):
            store[start:stop] = src[index]
        self.slot[where[take]] = np.arange(start, stop)
        self.used = stop


class BestFirst:
    """One user's exact best-first search for the K best titles of a tree (see the module docstring). The
    open prefixes and the finished titles are numpy arrays: a step touches each once, vectorised, however
    many children the expanded nodes have (a heap touched each from Python and bound a GPU's search)."""

    def __init__(self, tree: PrefixTree, k: int, frontier: int):
        self.tree, self.k, self.frontier = tree, k, frontier
        self.open_nodes, self.open_scores = NO_NODES, np.zeros(0)  # prefixes not expanded yet
        self.done_titles, self.done_scores = NO_NODES, np.zeros(0)  # finished titles not yet final
        self.results: list[tuple[int, float]] = []
        self.cut = -math.inf  # best score of a prefix cut from the frontier
        self.peak = 0  # largest frontier after a step
        self.blocked = False

    def expand(self, nodes: np.ndarray, scores: np.ndarray, logp: np.ndarray) -> None:
        """Children of `nodes` (whose prefix scores are `scores`), given `logp` of those children."""
        children, counts = self.tree.children_and_counts(nodes)
        child_scores = np.repeat(scores, counts) + logp
        titles, per_child = self.tree.titles_of(children)  # several where titles' lines are identical
        inner = self.tree.has_children[children]
        self.done_titles = np.concatenate([self.done_titles, titles])
        self.done_scores = np.concatenate([self.done_scores, np.repeat(child_scores, per_child)])
        self.open_nodes = np.concatenate([self.open_nodes, children[inner]])
        self.open_scores = np.concatenate([self.open_scores, child_scores[inner]])

    def trim(self) -> None:
        """Cut the frontier back to its best `frontier` prefixes, and the finished titles to the K still
        needed (the others can never enter the top K)."""
        if len(self.open_nodes) > self.frontier:
            order = np.argpartition(-self.open_scores, self.frontier)
            self.cut = max(self.cut, float(self.open_scores[order[self.frontier]]))  # the best one cut
            self._keep_open(order[:self.frontier])
        need = self.k - len(self.results)
        if len(self.done_titles) > 2 * need:  # amortised: trim when twice over
            self._keep_done(self._best_done(np.arange(len(self.done_titles)))[:need])
        self.peak = max(self.peak, len(self.open_nodes))

    def advance(self, beam: int) -> tuple[np.ndarray, np.ndarray]:
        """Take every title now final; return up to `beam` prefixes to expand next and their scores (none:
        finished or blocked)."""
        best_open = float(self.open_scores.max()) if len(self.open_scores) else -math.inf
        bound = max(best_open, self.cut)
        # a title tied with an open (or cut) prefix waits: that prefix may end in an equal title that comes
        # first in title order (its remaining tokens at log-probability exactly 0.0, as a peaked model gives)
        nothing_left = not len(self.open_nodes) and self.cut == -math.inf
        final = np.flatnonzero((self.done_scores > bound) | nothing_left)
        final = self._best_done(final)[:self.k - len(self.results)]
        if len(final):
            self.results += list(zip(self.done_titles[final].tolist(), self.done_scores[final].tolist()))
            rest = np.ones(len(self.done_titles), dtype=bool)
            rest[final] = False
            self._keep_done(rest)
        if len(self.results) >= self.k or nothing_left:
            return NO_NODES, np.zeros(0)  # done, or the whole tree is ranked (K above the catalogue size)
        if best_open <= self.cut:  # nothing left can beat what was cut: the next title is uncertain
            self.blocked = True
            return NO_NODES, np.zeros(0)
        take = min(beam, len(self.open_nodes))
        order = np.argpartition(-self.open_scores, take - 1) if take < len(self.open_nodes) else \
            np.arange(take)
        popped = self.open_nodes[order[:take]], self.open_scores[order[:take]]
        self._keep_open(order[take:])
        return popped

    def _best_done(self, at: np.ndarray) -> np.ndarray:
        """`at` (finished titles' positions) best first, equal scores in title order, as `_best` ranks."""
        return at[np.lexsort((self.done_titles[at], -self.done_scores[at]))]

    def _keep_open(self, at: np.ndarray) -> None:
        self.open_nodes, self.open_scores = self.open_nodes[at], self.open_scores[at]

    def _keep_done(self, at: np.ndarray) -> None:
        self.done_titles, self.done_scores = self.done_titles[at], self.done_scores[at]


class BatchScorer(TitleScorer):
    """Scores the titles of many users per forward pass. The one-user methods of `TitleScorer` stay
    available: they are the reference the batched results are tested against, and the benchmark's
    baseline."""

    def __init__(self, model, tokenizer, row_nodes: int = 256, tokens_per_pass: int = 4096,
                 node_cache_bytes: int = 1 << 30):
        super().__init__(model, tokenizer)
        self.decoder, self.head = model.get_decoder(), model.get_output_embeddings()
        self.row_nodes, self.tokens_per_pass = row_nodes, max(tokens_per_pass, row_nodes)
        self.node_cache_bytes = node_cache_bytes
        self.dtype = next(model.parameters()).dtype
        # what a pass costs beyond its positions, in positions: a CPU's pass is compute-bound (a split that
        # saves padding pays), a GPU's is bound by the host's launches: there the fewest passes are kept,
        # as before `pass_bounds`, with the least padding among them (not measured on a GPU)
        self.pass_overhead = PASS_OVERHEAD_CPU if self.device.type == "cpu" else PASS_OVERHEAD_GPU
        self.reset_stats()
        self._check_head()

    def reset_stats(self) -> None:
        """Counters since the last reset: users the frontier cap sent to exhaustive scoring, the largest
        frontier of a search, tree nodes fed to the model, and those of them expanded (the rest are ancestors
        fed again because the node cache was full, or context of exhaustive slices)."""
        self.stats = {"fallbacks": 0, "peak_frontier": 0, "fed_nodes": 0, "expanded_nodes": 0}

    @torch.no_grad()
    def _check_head(self) -> None:
        """The head is applied to chosen rows of the decoder's output: refuse a model whose logits are
        something else (a soft-cap, a scale), which would silently change every score."""
        ids = torch.tensor([[1, 2, 3]], device=self.device)
        full = self.model(input_ids=ids, use_cache=False).logits.float()
        mine = self.head(self.decoder(input_ids=ids, use_cache=False).last_hidden_state).float()
        if not torch.allclose(full, mine, rtol=1e-3, atol=1e-3):
            raise CPRecError(f"{type(self.model).__name__}: its logits are not the output embedding of its "
                             f"decoder's last hidden state; batched evaluation does not support it")

    def lines_ids(self, titles: list[str]) -> list[list[int]]:
        """`line_ids` of many titles, tokenized in one batched call (a 20k catalogue in a fraction of a second)."""
        new = [t for t in dict.fromkeys(titles) if t not in self._line_ids]
        if new:
            encoded = self.tok([item_line(t) for t in new], add_special_tokens=False)["input_ids"]
            self._line_ids.update(zip(new, encoded))
        return [self._line_ids[t] for t in titles]

    # ---- forward passes
    @torch.no_grad()
    def prompts(self, prompt_ids: list[list[int]]) -> Prompts:
        lengths = torch.tensor([len(p) for p in prompt_ids], device=self.device)
        width = int(lengths.max())
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        ids = torch.tensor([p + [pad] * (width - len(p)) for p in prompt_ids], device=self.device)
        mask = torch.arange(width, device=self.device)[None, :] < lengths[:, None]
        positions = torch.arange(width, device=self.device).expand(len(prompt_ids), width)
        out = self.decoder(input_ids=ids, attention_mask=mask.long(), position_ids=positions, use_cache=True)
        last = out.last_hidden_state[torch.arange(len(prompt_ids), device=self.device), lengths - 1]
        first = torch.log_softmax(self.head(last).float(), dim=-1).cpu().numpy()
        layers = [(layer.keys, layer.values) for layer in out.cache.layers]
        return Prompts(layers, lengths, mask, first)

    def node_cache(self, prompts: Prompts, trees: list[PrefixTree]) -> NodeCache:
        """A cache for the nodes of one search of user u in `trees[u]`: as many as `node_cache_bytes` holds,
        at most every inner node."""
        per_node = sum(2 * k.shape[1] * k.shape[3] * k.element_size() for k, _ in prompts.layers)
        most_nodes = sum(len(tree.inner) for tree in trees)
        return NodeCache(max(0, min(most_nodes, self.node_cache_bytes // per_node)), [t.size for t in trees])

    def run(self, prompts: Prompts, rows: list[Row], cache: NodeCache | None = None):
        """Yield (row, log-probabilities of the children of its expanded nodes, concatenated in order), rows
        packed into passes of at most `tokens_per_pass` fed positions (`pass_bounds`)."""
        order = sorted(range(len(rows)), key=lambda r: -len(rows[r].fed))
        bounds = pass_bounds([len(rows[r].fed) for r in order], self.tokens_per_pass, self.pass_overhead)
        for start, stop in zip(bounds, bounds[1:]):
            batch = [rows[r] for r in order[start:stop]]
            yield from zip(batch, self._pass(prompts, batch, cache))

    @torch.no_grad()
    def _pass(self, prompts: Prompts, rows: list[Row], cache: NodeCache | None) -> list[np.ndarray]:
        n_rows, width = len(rows), max(len(r.fed) for r in rows)
        n_context = max(len(r.context) for r in rows)
        users = torch.tensor([r.user for r in rows], device=self.device)
        ids = np.zeros((n_rows, width), dtype=np.int64)
        positions = np.zeros((n_rows, width), dtype=np.int64)
        # each position's node and the end of its subtree (-1: padding); a query sees a key whose subtree
        # holds it, i.e. itself and its ancestors (fed or context), never the root, never padding
        fed, fed_stop = np.full((n_rows, width), -1), np.full((n_rows, width), -1)
        context, context_stop = np.full((n_rows, n_context), -1), np.full((n_rows, n_context), -1)
        slots = np.zeros((n_rows, n_context), dtype=np.int64)
        lengths = prompts.lengths.cpu().numpy()
        for r, row in enumerate(rows):
            n, m = len(row.fed), len(row.context)
            ids[r, :n] = row.tree.token[row.fed]
            positions[r, :n] = lengths[row.user] + row.tree.depth[row.fed] - 1
            fed[r, :n], fed_stop[r, :n] = row.fed, row.tree.stop[row.fed]
            if m:
                context[r, :m], context_stop[r, :m] = row.context, row.tree.stop[row.context]
                slots[r, :m] = cache.slots(row.user, row.context)
        if n_context and slots.min() < 0:  # -1 would silently read another node's keys
            raise AssertionError("a row's context node has no keys and values in the cache")
        # the mask is built where the model runs: rows x width x (context + width) is large, its inputs small
        fed, fed_stop, context, context_stop = (torch.from_numpy(a).to(self.device)
                                                for a in (fed, fed_stop, context, context_stop))
        query = fed[:, :, None]
        sees_fed = (fed[:, None, :] <= query) & (query < fed_stop[:, None, :])
        sees_context = (context[:, None, :] <= query) & (query < context_stop[:, None, :])
        sees_fed.diagonal(dim1=1, dim2=2).logical_or_(fed < 0)  # padding sees itself: never a row of all -inf
        seen = torch.cat([prompts.mask[users][:, None, :].expand(n_rows, width, -1), sees_context, sees_fed], dim=2)
        mask = torch.zeros(seen.shape, dtype=self.dtype, device=self.device)
        mask.masked_fill_(~seen, torch.finfo(self.dtype).min)
        kv = self._kv(prompts, users, cache, torch.from_numpy(slots).to(self.device) if n_context else None, width)
        hidden = self.decoder(input_ids=torch.from_numpy(ids).to(self.device), attention_mask=mask[:, None],
                              position_ids=torch.from_numpy(positions).to(self.device), cache=kv,
                              use_cache=True).last_hidden_state
        self.stats["fed_nodes"] += sum(len(r.fed) for r in rows)
        self.stats["expanded_nodes"] += sum(len(r.expanded) for r in rows)
        if cache is not None and cache.capacity:
            self._keep(rows, kv, cache, width)
        return self._children_logp(rows, hidden)

    def _kv(self, prompts: Prompts, users: torch.Tensor, cache: NodeCache | None, slots: torch.Tensor | None,
            width: int):
        """Each row's cache: its user's prompt, then the kept K/V of its context nodes, then room for the
        pass's `width` fed positions (`RowLayer`)."""
        from transformers import Cache

        n_prompt, n_context = prompts.mask.shape[1], 0 if slots is None else slots.shape[1]
        layers = []
        for index, (k, v) in enumerate(prompts.layers):
            shape = (len(users), k.shape[1], n_prompt + n_context + width, k.shape[3])
            keys, values = k.new_empty(shape), v.new_empty(shape)
            keys[:, :, :n_prompt], values[:, :, :n_prompt] = k[users], v[users]
            if n_context:  # kept as [slot, heads, dim]: gathered [rows, context, heads, dim], then transposed
                keys[:, :, n_prompt:n_prompt + n_context] = cache.keys[index][slots].transpose(1, 2)
                values[:, :, n_prompt:n_prompt + n_context] = cache.values[index][slots].transpose(1, 2)
            layers.append(RowLayer(keys, values, width))
        return Cache(layers=layers)

    def _keep(self, rows: list[Row], kv, cache: NodeCache, width: int) -> None:
        at_row = np.concatenate([np.full(len(r.fed), i) for i, r in enumerate(rows)])
        at_pos = np.concatenate([np.arange(len(r.fed)) for r in rows])
        users = np.concatenate([np.full(len(r.fed), r.user) for r in rows])
        at_row_t, at_pos_t = torch.from_numpy(at_row).to(self.device), torch.from_numpy(at_pos).to(self.device)
        keys, values = [], []
        for layer in kv.layers:  # the fed nodes are the last `width` positions of every row
            fed_k, fed_v = layer.keys[:, :, -width:], layer.values[:, :, -width:]
            keys.append(fed_k[at_row_t, :, at_pos_t])
            values.append(fed_v[at_row_t, :, at_pos_t])
        cache.keep(users, np.concatenate([r.fed for r in rows]), keys, values)

    def _children_logp(self, rows: list[Row], hidden: torch.Tensor) -> list[np.ndarray]:
        """The head on the expanded nodes only, in chunks; each scores its children."""
        at_row, at_pos, child_tokens, child_of = [], [], [], []
        so_far = 0
        for r, row in enumerate(rows):
            where = np.searchsorted(row.fed, row.expanded)
            children, counts = row.tree.children_and_counts(row.expanded)
            child_of.append(np.repeat(np.arange(len(where)) + so_far, counts))
            child_tokens.append(row.tree.token[children])
            at_row.append(np.full(len(where), r))
            at_pos.append(where)
            so_far += len(where)
        states = hidden[torch.from_numpy(np.concatenate(at_row)).to(self.device),
                        torch.from_numpy(np.concatenate(at_pos)).to(self.device)]
        child_of = np.concatenate(child_of)
        # children come grouped by parent, parents in order: a chunk of parents owns one slice of children,
        # found here on the host (a boolean mask per chunk made the GPU wait for the host at every chunk)
        chunk_starts = list(range(0, len(states), HEAD_CHUNK))
        bounds = np.searchsorted(child_of, chunk_starts + [len(states)]).tolist()
        child_of_t = torch.from_numpy(child_of).to(self.device)
        tokens_t = torch.from_numpy(np.concatenate(child_tokens)).to(self.device)
        logp = torch.empty(len(tokens_t), dtype=torch.float32, device=self.device)
        for lo, a, b in zip(chunk_starts, bounds, bounds[1:]):
            # the one-user path's log_softmax in fp32: a cast, then one kernel (logsumexp, then a subtraction,
            # took several passes over the fp32 logits: with the cast, a third of a GPU search's device time)
            chunk_logp = torch.log_softmax(self.head(states[lo:lo + HEAD_CHUNK]), dim=-1, dtype=torch.float32)
            logp[a:b] = chunk_logp[child_of_t[a:b] - lo, tokens_t[a:b]]
        sizes = [len(t) for t in child_tokens]
        return np.split(logp.cpu().numpy().astype(np.float64), np.cumsum(sizes)[:-1])

    # ---- scoring
    def tree_scores(self, prompts: Prompts, trees: list[PrefixTree]) -> list[np.ndarray]:
        """Every title's score in user u's tree `trees[u]` (one tree object may serve many users)."""
        edges, rows, slices = [], [], {}
        for u, tree in enumerate(trees):
            edges.append(self._first_edges(prompts, u, tree))
            if id(tree) not in slices:
                slices[id(tree)] = tree.slices(self.row_nodes)
            rows += [Row(u, tree, fed, expanded) for fed, expanded in slices[id(tree)]]
        for row, logp in self.run(prompts, rows):
            edges[row.user][row.tree.children_of(row.expanded)] = logp
        return [tree.path_scores(edge)[tree.title_node] for tree, edge in zip(trees, edges)]

    @staticmethod
    def _first_edges(prompts: Prompts, user: int, tree: PrefixTree) -> np.ndarray:
        """Edge log-probabilities of a user's tree, known so far: the first tokens, from the prompt pass."""
        edge = np.zeros(tree.size)
        firsts = tree.children_of(np.array([0]))
        edge[firsts] = prompts.first[user, tree.token[firsts]]
        return edge

    def score_users(self, prompts: list[str], titles: list[list[str]]) -> list[np.ndarray]:
        """The score of each user's titles (in their order), every title scored."""
        batch = self.prompts([self.prompt_ids(p) for p in prompts])
        return self.tree_scores(batch, self._trees(titles))

    def _trees(self, titles: list[list[str]]) -> list[PrefixTree]:
        self.lines_ids([t for user_titles in titles for t in user_titles])
        return [PrefixTree([self.line_ids(t) for t in user_titles]) for user_titles in titles]

    def rank_users(self, prompts: list[str], titles: list[list[str]], target: int = 0) -> list[int]:
        """Sampled protocol: the rank of `titles[u][target]` among `titles[u]` for each user (0 = first; ties
        count against it), as ranking `score_users`' scores would give, expanding only the prefixes that
        score at least the target."""
        batch = self.prompts([self.prompt_ids(p) for p in prompts])
        trees = self._trees(titles)
        cache = self.node_cache(batch, trees)
        scores = []  # path score of every node whose parent was expanded; -inf for the others
        for u, tree in enumerate(trees):
            known = np.full(tree.size, -np.inf)
            known[0] = 0.0
            firsts = tree.children_of(np.array([0]))
            known[firsts] = batch.first[u, tree.token[firsts]]
            scores.append(known)
        paths = {u: np.asarray(tree.ancestors(int(tree.title_node[target])), dtype=np.int64)
                 for u, tree in enumerate(trees)}
        self._expand_all(batch, trees, paths, cache, scores)  # the target's own path first
        bar = [float(s[tree.title_node[target]]) for s, tree in zip(scores, trees)]
        todo = {u: self._worth_expanding(tree, tree.children_of(np.concatenate([[0], paths[u]])), scores[u], bar[u],
                                         paths[u]) for u, tree in enumerate(trees)}
        while any(len(nodes) for nodes in todo.values()):
            self._expand_all(batch, trees, todo, cache, scores)
            todo = {u: self._worth_expanding(trees[u], trees[u].children_of(nodes), scores[u], bar[u])
                    for u, nodes in todo.items()}
        # a title never reached has a prefix below the target, so it scores below it too
        return [int(np.sum(score[np.delete(tree.title_node, target)] >= b))
                for tree, score, b in zip(trees, scores, bar)]

    @staticmethod
    def _worth_expanding(tree: PrefixTree, nodes: np.ndarray, scores: np.ndarray, bar: float,
                         done: np.ndarray = NO_NODES) -> np.ndarray:
        """The inner nodes among `nodes` that score at least `bar` and were not expanded (`done`)."""
        keep = tree.has_children[nodes] & (scores[nodes] >= bar) & ~np.isin(nodes, done)
        return nodes[keep]

    def _expand_all(self, batch: Prompts, trees: list[PrefixTree], todo: dict, cache: NodeCache,
                    scores: list[np.ndarray]) -> None:
        """Expand every node of `todo[u]` (whose ancestors are all expanded) for each user: the path scores
        of their children."""
        rows = []
        for u, nodes in todo.items():
            if len(nodes):
                rows += [Row(u, trees[u], fed, expanded, context) for fed, expanded, context in
                         trees[u].cover(nodes, self.row_nodes, cache.kept(u))]
        found: dict[int, list] = {}
        for row, logp in self.run(batch, rows, cache):
            found.setdefault(row.user, []).append((row.tree.children_of(row.expanded), logp))
        for u, parts in found.items():  # parents before children: a row may expand a node and its parent
            children = np.concatenate([c for c, _ in parts])
            logp = np.concatenate([lp for _, lp in parts])
            depth = trees[u].depth[children]
            for d in np.unique(depth):
                at = depth == d
                scores[u][children[at]] = scores[u][trees[u].parent[children[at]]] + logp[at]

    def top_k_users(self, prompts: list[str], tree: PrefixTree, k: int, beam: int = 20,
                    exhaustive: bool = False, frontier: int = 50_000) -> list[list[tuple[int, float]]]:
        """Full ranking: the exact k best titles of `tree` for each user as (title index, score), best
        first; by scoring every title, or by best-first search with at most `frontier` open prefixes per
        user (a user whose search the cap blocks is scored exhaustively and counted in `stats`)."""
        batch = self.prompts([self.prompt_ids(p) for p in prompts])
        if exhaustive:
            return [_best(scores, k) for scores in self.tree_scores(batch, [tree] * len(prompts))]
        cache = self.node_cache(batch, [tree] * len(prompts))
        searches = [BestFirst(tree, k, frontier) for _ in prompts]
        firsts = tree.children_of(np.array([0]))
        for u, search in enumerate(searches):
            search.expand(np.array([0]), np.zeros(1), batch.first[u, tree.token[firsts]].astype(np.float64))
            search.trim()
        steps = {u: search.advance(beam) for u, search in enumerate(searches)}
        while steps := {u: (nodes, scores) for u, (nodes, scores) in steps.items() if len(nodes)}:
            users = np.concatenate([np.full(len(nodes), u) for u, (nodes, _) in steps.items()])
            nodes = np.concatenate([nodes for nodes, _ in steps.values()])
            scores = np.concatenate([scores for _, scores in steps.values()])
            order = np.lexsort((nodes, users))  # by user, then node: rows' expanded nodes are sorted
            users, nodes, scores = users[order], nodes[order], scores[order]
            for row, logp in self.run(batch, self._search_rows(tree, users, nodes, cache), cache):
                at = row.first + np.searchsorted(nodes[row.first:row.first + len(row.expanded)], row.expanded)
                searches[row.user].expand(row.expanded, scores[at], logp)
            for u in steps:
                searches[u].trim()
            steps = {u: searches[u].advance(beam) for u in steps}
        self.stats["peak_frontier"] = max([self.stats["peak_frontier"]] + [s.peak for s in searches])
        blocked = [u for u, s in enumerate(searches) if s.blocked]
        results = [s.results for s in searches]
        if blocked:
            self.stats["fallbacks"] += len(blocked)
            exact = self.tree_scores(self._subset(batch, blocked), [tree] * len(blocked))
            for u, scores in zip(blocked, exact):
                results[u] = _best(scores, k)
        return results

    def _search_rows(self, tree: PrefixTree, users: np.ndarray, nodes: np.ndarray, cache: NodeCache) -> list[Row]:
        """Rows that expand `nodes[i]` for `users[i]` (sorted by user, then node), all users at once. Each
        popped prefix's ancestors were fed in earlier steps; while the cache holds them all, a row feeds
        only its user's next `row_nodes` prefixes and takes the union of their ancestors as context. A row's
        `first` is the position of its first node in `nodes`."""
        index, above = tree.ancestors_of(nodes)
        if not cache.all_kept(users[index], above):  # the cache is full: rows feed the ancestors it lacks
            rows = []
            for u in np.unique(users).tolist():
                at = np.flatnonzero(users == u)
                for fed, expanded, context in tree.cover(nodes[at], self.row_nodes, cache.kept(u)):
                    rows.append(Row(u, tree, fed, expanded, context, first=int(at[0]) + int(
                        np.searchsorted(nodes[at], expanded[0]))))
            return rows
        user_start = np.flatnonzero(np.concatenate([[True], users[1:] != users[:-1]]))
        rank = np.arange(len(nodes)) - np.repeat(user_start, np.diff(np.append(user_start, len(nodes))))
        new_row = (rank % self.row_nodes) == 0  # a user's first node, and every row_nodes-th after it
        starts = np.append(np.flatnonzero(new_row), len(nodes))
        contexts = tree.row_contexts(nodes, np.cumsum(new_row) - 1, index, above)
        return [Row(int(users[lo]), tree, nodes[lo:hi], nodes[lo:hi], context, first=lo)
                for lo, hi, context in zip(starts[:-1], starts[1:], contexts)]

    def _subset(self, prompts: Prompts, users: list[int]) -> Prompts:
        index = torch.tensor(users, device=self.device)
        return Prompts([(k[index], v[index]) for k, v in prompts.layers], prompts.lengths[index],
                       prompts.mask[index], prompts.first[users])


def pass_bounds(widths: list[int], tokens_per_pass: int, overhead: int) -> list[int]:
    """Where to cut rows of `widths` fed positions (sorted widest first) into passes: a pass pads its rows to
    its widest and holds at most `tokens_per_pass` positions (or one row). The cuts minimise the positions
    computed, padding included, plus `overhead` per pass (dynamic programming over the cut before each row).
    A pruned sampled ranking's rows are a tree level's nodes per user, of very different widths: one pass
    per step padded them by ~60% (38% of the positions computed were padding). On this CPU, one batch of
    16 SmolLM2 users (MovieLens Thriller) took 30.5 s in one pass per step, 25.9 s with an overhead of 64
    positions, 28.6 s with 16 and 27.9 s with 256."""
    w = np.asarray(widths, dtype=np.int64)
    best = np.zeros(len(w) + 1)  # best[j]: cost of the first j rows
    cut = np.zeros(len(w) + 1, dtype=np.int64)  # where the last pass of the first j rows starts
    for j in range(1, len(w) + 1):
        # a pass ending at row j holds at most tokens_per_pass // w[j-1] rows (each at least w[j-1] wide):
        # only those starts are tried, so an every-title run's thousands of rows stay linear
        starts = np.arange(max(0, j - max(1, tokens_per_pass // max(1, int(w[j - 1])))), j)
        cost = best[starts] + (j - starts) * w[starts] + overhead
        cost[(j - starts) * w[starts] > tokens_per_pass] = np.inf
        cost[-1] = best[j - 1] + w[j - 1] + overhead  # a row alone always fits
        cut[j] = int(starts[np.argmin(cost)])
        best[j] = cost[cut[j] - starts[0]]
    bounds = [len(w)]
    while bounds[-1]:
        bounds.append(int(cut[bounds[-1]]))
    return bounds[::-1]


def _best(scores: np.ndarray, k: int) -> list[tuple[int, float]]:
    """The k best (index, score), best first; equal scores in index order."""
    order = np.argsort(-scores, kind="stable")[:k]
    return [(int(i), float(scores[i])) for i in order]
