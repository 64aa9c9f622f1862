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
  the prompt scores the first tokens.
* **Rows and passes.** A row is one user's nodes on a copy of that user's prompt cache: at most `row_nodes`
  fed nodes, plus context. A forward pass takes rows of many users up to `tokens_per_pass` fed positions
  (padding counted), which bounds its memory; the head runs on the expanded nodes only, in chunks.
* **Searches keep K/V** (`NodeCache`): the keys and values of every node fed during a search are kept, so a
  later row takes a node's ancestors as context instead of feeding them again: each node is fed once. The
  cache holds at most `node_cache_bytes`; when full, ancestors are fed again as context (slower, as exact).
* **Full ranking.** Exhaustive: every title's score from the catalogue's tree, cut in pre-order into slices
  (a run of consecutive nodes needs, besides itself, only the ancestors of its first node), slices of all
  users batched. Best-first (`BestFirst`): log-probabilities are <= 0, so a prefix's score bounds all its
  completions and a finished title is final once no open prefix scores higher; each step pops up to `beam`
  open prefixes of every unfinished user and expands all of them in the same passes.
* **Sampled ranks** (`rank_users`): the target's path is expanded first; then, level by level, only the
  prefixes that score at least the target, since no completion of a lower one can rank above it.
* **Bounded memory.** A user's open prefixes (the frontier) are cut back to the best `frontier` after every
  step, and the best score cut away is remembered: a finished title is final only when it also beats that.
  When a search can no longer certify its next title (every remaining prefix scores below what was cut),
  the user is scored exhaustively instead, in slices, and counted, so the result stays exact. Finished
  titles beyond the K still to be found are dropped (they can never enter the top K).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from cprec.data.template import item_line
from cprec.errors import CPRecError
from cprec.eval.scoring import TitleScorer

HEAD_CHUNK = 1024  # rows of logits materialised at once: 1024 x a 152k vocabulary in fp32 is 0.6 GB
NO_NODES = np.zeros(0, dtype=np.int64)


class PrefixTree:
    """The token prefix tree of title lines as flat arrays, nodes numbered in pre-order (parents first).

    Node 0 is the root (the empty prefix); node v > 0 spells its parent's tokens then `token[v]`.
    `title_node[i]` is the node that spells title i; `end[v]` the first title a node spells, or -1 (two
    titles with one token sequence get the same score; the search names the first).
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
        self.end = np.full(len(token), -1, dtype=np.int64)
        for i in sorted(range(len(sequences)), reverse=True):  # the first title naming a node wins
            self.end[title_node[i]] = i
        counts = np.bincount(self.parent[1:], minlength=len(token))
        self.child_ptr = np.concatenate([[0], np.cumsum(counts)])
        self.children = np.argsort(self.parent[1:], kind="stable") + 1  # grouped by parent, pre-order within
        self.has_children = counts > 0
        self.inner = np.flatnonzero(self.has_children[1:]) + 1  # the nodes that are ever fed, in pre-order
        self.levels = [np.flatnonzero(self.depth == d) for d in range(1, int(self.depth.max()) + 1)]

    @property
    def size(self) -> int:
        return len(self.token)

    def children_of(self, nodes: np.ndarray) -> np.ndarray:
        """The children of each node of `nodes`, concatenated in that order."""
        nodes = np.asarray(nodes, dtype=np.int64)
        starts, counts = self.child_ptr[nodes], self.child_ptr[nodes + 1] - self.child_ptr[nodes]
        if len(nodes) == 0:
            return NO_NODES
        offsets = np.repeat(starts - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
        return self.children[np.arange(int(counts.sum())) + offsets]

    def ancestors(self, node: int) -> list[int]:
        """Strict ancestors of `node`, root excluded, nearest last."""
        out = []
        node = int(self.parent[node])
        while node > 0:
            out.append(node)
            node = int(self.parent[node])
        return out[::-1]

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

    def cover(self, nodes, row_nodes: int, kept=frozenset()) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(fed, expanded, context) rows that expand `nodes`: each row feeds some of them and those of their
        ancestors not in `kept` (at most `row_nodes` fed), and takes the `kept` ancestors as context."""
        rows, fed, context, expanded = [], set(), set(), []
        for node in sorted(int(n) for n in nodes):
            above = self.ancestors(node)
            need = ({node} | {a for a in above if a not in kept}) - fed
            if expanded and len(fed) + len(need) > row_nodes:
                rows.append(_row(fed, expanded, context))
                fed, context, expanded = set(), set(), []
                need = {node} | {a for a in above if a not in kept}
            if len(need) > row_nodes:
                raise CPRecError(f"row_nodes={row_nodes} is below the longest title line; raise row_nodes")
            fed |= need
            context |= {a for a in above if a in kept}
            expanded.append(node)
        if expanded:
            rows.append(_row(fed, expanded, context))
        return rows

    def path_scores(self, edge: np.ndarray) -> np.ndarray:
        """[..., nodes] log-probability of each node's token after its parent -> summed along each path."""
        total = np.zeros_like(edge)
        for level in self.levels:
            total[..., level] = total[..., self.parent[level]] + edge[..., level]
        return total


def _row(fed: set, expanded: list, context: set) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (np.asarray(sorted(fed), dtype=np.int64), np.asarray(expanded, dtype=np.int64),
            np.asarray(sorted(context), dtype=np.int64))


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


class NodeCache:
    """Keys and values of the tree nodes fed during one search of a batch of users, by (user, node), so that
    later rows take them as context. At most `capacity` nodes; when full, nodes are no longer kept."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.slot: dict[tuple[int, int], int] = {}
        self.by_user: dict[int, set] = {}
        self.keys: list[torch.Tensor] = []  # per layer [capacity, kv heads, head dim]
        self.values: list[torch.Tensor] = []

    def kept(self, user: int) -> set:
        return self.by_user.get(user, set())

    def slots(self, user: int, nodes: np.ndarray) -> list[int]:
        return [self.slot[(user, int(n))] for n in nodes]

    def keep(self, owners: list[tuple[int, int]], keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Store the per-layer [n, kv heads, head dim] K/V of `owners` (user, node) while there is room."""
        new, seen = [], set()
        for i, owner in enumerate(owners):
            if owner not in self.slot and owner not in seen:  # a node fed in two rows is kept once
                seen.add(owner)
                new.append(i)
        take = new[:self.capacity - len(self.slot)]
        if not take:
            return
        if not self.keys:
            self.keys = [k.new_empty((self.capacity, *k.shape[1:])) for k in keys]
            self.values = [v.new_empty((self.capacity, *v.shape[1:])) for v in values]
        start = len(self.slot)
        index = torch.tensor(take, device=keys[0].device)
        for store, src in zip(self.keys + self.values, keys + values):
            store[start:start + len(take)] = src[index]
        for offset, i in enumerate(take):
            self.slot[owners[i]] = start + offset
            self.by_user.setdefault(owners[i][0], set()).add(owners[i][1])


class BestFirst:
    """One user's exact best-first search for the K best titles of a tree (see the module docstring)."""

    def __init__(self, tree: PrefixTree, k: int, frontier: int):
        self.tree, self.k, self.frontier = tree, k, frontier
        self.open: list[tuple[float, int]] = []  # (-score, node): a min-heap, best prefix first
        self.finished: list[tuple[float, int]] = []  # (-score, title)
        self.results: list[tuple[int, float]] = []
        self.cut = -math.inf  # best score of a prefix cut from the frontier
        self.peak = 0  # largest frontier after a step
        self.blocked = False

    def expand(self, nodes: np.ndarray, scores: np.ndarray, logp: np.ndarray) -> None:
        """Children of `nodes` (whose prefix scores are `scores`), given `logp` of those children."""
        counts = self.tree.child_ptr[nodes + 1] - self.tree.child_ptr[nodes]
        children = self.tree.children_of(nodes)
        for child, s in zip(children.tolist(), (np.repeat(scores, counts) + logp).tolist()):
            title = int(self.tree.end[child])
            if title >= 0:
                heapq.heappush(self.finished, (-s, title))
            if self.tree.has_children[child]:
                heapq.heappush(self.open, (-s, child))

    def trim(self) -> None:
        """Cut the frontier back to its best `frontier` prefixes, and the finished titles to the K still
        needed (the others can never enter the top K)."""
        if len(self.open) > self.frontier:
            ordered = sorted(self.open)
            self.cut = max(self.cut, -ordered[self.frontier][0])
            self.open = ordered[:self.frontier]  # a sorted list is a heap
        need = self.k - len(self.results)
        if len(self.finished) > 2 * need:  # amortised: trim when twice over
            self.finished = heapq.nsmallest(need, self.finished)
        self.peak = max(self.peak, len(self.open))

    def advance(self, beam: int) -> list[tuple[int, float]]:
        """Take every title now final; return up to `beam` prefixes to expand next (none: finished or
        blocked)."""
        while len(self.results) < self.k:
            best_open = -self.open[0][0] if self.open else -math.inf
            bound = max(best_open, self.cut)
            while self.finished and -self.finished[0][0] >= bound and len(self.results) < self.k:
                neg, title = heapq.heappop(self.finished)
                self.results.append((title, -neg))
            if len(self.results) >= self.k or (not self.open and self.cut == -math.inf):
                break  # done, or the whole tree is ranked (K above the catalogue size)
            if best_open <= self.cut:  # nothing left can beat what was cut: the next title is uncertain
                self.blocked = True
                break
            popped = [heapq.heappop(self.open) for _ in range(min(beam, len(self.open)))]
            return [(node, -neg) for neg, node in popped]
        return []


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
        self.reset_stats()
        self._check_head()

    def reset_stats(self) -> None:
        """Counters since the last reset: users the frontier cap sent to exhaustive scoring, the largest
        frontier of a search, tree nodes fed to the model."""
        self.stats = {"fallbacks": 0, "peak_frontier": 0, "fed_nodes": 0}

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

    def node_cache(self, prompts: Prompts, most_nodes: int) -> NodeCache:
        """A cache for the nodes of one search: as many as `node_cache_bytes` holds, at most `most_nodes`."""
        per_node = sum(2 * k.shape[1] * k.shape[3] * k.element_size() for k, _ in prompts.layers)
        return NodeCache(max(0, min(most_nodes, self.node_cache_bytes // per_node)))

    def run(self, prompts: Prompts, rows: list[Row], cache: NodeCache | None = None):
        """Yield (row, log-probabilities of the children of its expanded nodes, concatenated in order), rows
        packed into passes of at most `tokens_per_pass` fed positions."""
        order = sorted(range(len(rows)), key=lambda r: -len(rows[r].fed))
        start = 0
        while start < len(order):
            width = len(rows[order[start]].fed)
            stop = start + max(1, self.tokens_per_pass // width)
            batch = [rows[r] for r in order[start:stop]]
            yield from zip(batch, self._pass(prompts, batch, cache))
            start = stop

    @torch.no_grad()
    def _pass(self, prompts: Prompts, rows: list[Row], cache: NodeCache | None) -> list[np.ndarray]:
        n_rows, width = len(rows), max(len(r.fed) for r in rows)
        n_context = max(len(r.context) for r in rows)
        users = torch.tensor([r.user for r in rows], device=self.device)
        ids = np.zeros((n_rows, width), dtype=np.int64)
        positions = np.zeros((n_rows, width), dtype=np.int64)
        sees_fed = np.zeros((n_rows, width, width), dtype=bool)
        sees_context = np.zeros((n_rows, width, n_context), dtype=bool)
        slots = np.zeros((n_rows, n_context), dtype=np.int64)
        lengths = prompts.lengths.cpu().numpy()
        for r, row in enumerate(rows):
            fed, context, n = row.fed, row.context, len(row.fed)
            ids[r, :n] = row.tree.token[fed]
            positions[r, :n] = lengths[row.user] + row.tree.depth[fed] - 1
            query, node = np.arange(n), fed
            while len(node):  # each fed node sees itself and its ancestors (fed, or context), but the root
                at = np.minimum(np.searchsorted(fed, node), n - 1)
                in_fed = fed[at] == node
                sees_fed[r, query[in_fed], at[in_fed]] = True
                sees_context[r, query[~in_fed], np.searchsorted(context, node[~in_fed])] = True
                up = row.tree.parent[node]
                query, node = query[up > 0], up[up > 0]
            sees_fed[r, np.arange(n, width), np.arange(n, width)] = True  # padding sees itself: never all -inf
            if len(context):
                slots[r, :len(context)] = cache.slots(row.user, context)
        seen = torch.cat([prompts.mask[users][:, None, :].expand(n_rows, width, -1),
                          torch.from_numpy(sees_context).to(self.device),
                          torch.from_numpy(sees_fed).to(self.device)], dim=2)
        mask = torch.zeros(seen.shape, dtype=self.dtype, device=self.device)
        mask.masked_fill_(~seen, torch.finfo(self.dtype).min)
        kv = self._kv(prompts, users, cache, torch.from_numpy(slots).to(self.device) if n_context else None)
        hidden = self.decoder(input_ids=torch.from_numpy(ids).to(self.device), attention_mask=mask[:, None],
                              position_ids=torch.from_numpy(positions).to(self.device), cache=kv,
                              use_cache=True).last_hidden_state
        self.stats["fed_nodes"] += sum(len(r.fed) for r in rows)
        if cache is not None and cache.capacity:
            self._keep(rows, kv, cache, width)
        return self._children_logp(rows, hidden)

    def _kv(self, prompts: Prompts, users: torch.Tensor, cache: NodeCache | None, slots: torch.Tensor | None):
        """Each row's cache: its user's prompt, then the kept K/V of its context nodes."""
        from transformers import DynamicCache

        layers = []
        for index, (k, v) in enumerate(prompts.layers):
            k, v = k[users], v[users]
            if slots is not None:  # [rows, context, heads, dim] -> [rows, heads, context, dim]
                k = torch.cat([k, cache.keys[index][slots].transpose(1, 2)], dim=2)
                v = torch.cat([v, cache.values[index][slots].transpose(1, 2)], dim=2)
            layers.append((k, v))
        return DynamicCache(ddp_cache_data=layers, config=self.model.config)

    def _keep(self, rows: list[Row], kv, cache: NodeCache, width: int) -> None:
        at_row = np.concatenate([np.full(len(r.fed), i) for i, r in enumerate(rows)])
        at_pos = np.concatenate([np.arange(len(r.fed)) for r in rows])
        owners = [(r.user, int(n)) for r in rows for n in r.fed]
        at_row_t, at_pos_t = torch.from_numpy(at_row).to(self.device), torch.from_numpy(at_pos).to(self.device)
        keys, values = [], []
        for layer in kv.layers:  # the fed nodes are the last `width` positions of every row
            fed_k, fed_v = layer.keys[:, :, -width:], layer.values[:, :, -width:]
            keys.append(fed_k[at_row_t, :, at_pos_t])
            values.append(fed_v[at_row_t, :, at_pos_t])
        cache.keep(owners, keys, values)

    def _children_logp(self, rows: list[Row], hidden: torch.Tensor) -> list[np.ndarray]:
        """The head on the expanded nodes only, in chunks; each scores its children."""
        at_row, at_pos, child_tokens, child_of = [], [], [], []
        so_far = 0
        for r, row in enumerate(rows):
            where = np.searchsorted(row.fed, row.expanded)
            counts = row.tree.child_ptr[row.expanded + 1] - row.tree.child_ptr[row.expanded]
            child_of.append(np.repeat(np.arange(len(where)) + so_far, counts))
            child_tokens.append(row.tree.token[row.tree.children_of(row.expanded)])
            at_row.append(np.full(len(where), r))
            at_pos.append(where)
            so_far += len(where)
        states = hidden[torch.from_numpy(np.concatenate(at_row)).to(self.device),
                        torch.from_numpy(np.concatenate(at_pos)).to(self.device)]
        child_of_t = torch.from_numpy(np.concatenate(child_of)).to(self.device)
        tokens_t = torch.from_numpy(np.concatenate(child_tokens)).to(self.device)
        logp = torch.empty(len(tokens_t), dtype=torch.float32, device=self.device)
        for lo in range(0, len(states), HEAD_CHUNK):
            logits = self.head(states[lo:lo + HEAD_CHUNK]).float()
            norm = torch.logsumexp(logits, dim=-1)
            sel = (child_of_t >= lo) & (child_of_t < lo + HEAD_CHUNK)
            local = child_of_t[sel] - lo
            logp[sel] = logits[local, tokens_t[sel]] - norm[local]
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
        cache = self.node_cache(batch, sum(len(t.inner) for t in trees))
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
        cache = self.node_cache(batch, len(prompts) * len(tree.inner))
        searches = [BestFirst(tree, k, frontier) for _ in prompts]
        firsts = tree.children_of(np.array([0]))
        for u, search in enumerate(searches):
            search.expand(np.array([0]), np.zeros(1), batch.first[u, tree.token[firsts]].astype(np.float64))
            search.trim()
        steps = {u: search.advance(beam) for u, search in enumerate(searches)}
        steps = {u: popped for u, popped in steps.items() if popped}
        while steps:
            rows, prefix_scores = [], {}
            for u, popped in steps.items():
                prefix_scores[u] = dict(popped)
                rows += [Row(u, tree, fed, expanded, context) for fed, expanded, context in
                         tree.cover([n for n, _ in popped], self.row_nodes, cache.kept(u))]
            for row, logp in self.run(batch, rows, cache):
                scores = np.array([prefix_scores[row.user][n] for n in row.expanded.tolist()])
                searches[row.user].expand(row.expanded, scores, logp)
            for u in steps:
                searches[u].trim()
            steps = {u: searches[u].advance(beam) for u in steps}
            steps = {u: popped for u, popped in steps.items() if popped}
        self.stats["peak_frontier"] = max([self.stats["peak_frontier"]] + [s.peak for s in searches])
        blocked = [u for u, s in enumerate(searches) if s.blocked]
        results = [s.results for s in searches]
        if blocked:
            self.stats["fallbacks"] += len(blocked)
            exact = self.tree_scores(self._subset(batch, blocked), [tree] * len(blocked))
            for u, scores in zip(blocked, exact):
                results[u] = _best(scores, k)
        return results

    def _subset(self, prompts: Prompts, users: list[int]) -> Prompts:
        index = torch.tensor(users, device=self.device)
        return Prompts([(k[index], v[index]) for k, v in prompts.layers], prompts.lengths[index],
                       prompts.mask[index], prompts.first[users])


def _best(scores: np.ndarray, k: int) -> list[tuple[int, float]]:
    """The k best (index, score), best first; equal scores in index order."""
    order = np.argsort(-scores, kind="stable")[:k]
    return [(int(i), float(scores[i])) for i in order]
