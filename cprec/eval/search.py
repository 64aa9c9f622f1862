"""The search over title prefix trees: which prefixes to feed, in what order, and when a result is exact.
Pure numpy: the forward passes that score a prefix's children are `cprec.eval.batched.BatchScorer`'s, called
through its `run` (the drivers here take the scorer as their first argument).

Contract: full ranking (`top_k_users`) returns exactly the top K of scoring every title (`tree_scores`); a
sampled rank (`rank_users`) is the target's rank among every candidate's score, ties counting against it.
Tests check both against brute force and the one-user path.

How (the spec, beside the code):

* **Trees.** A user's titles (candidates, or the catalogue) form a prefix tree of their lines' tokens
  (`PrefixTree`), nodes numbered in pre-order, so node a is v or an ancestor of v exactly when
  a <= v < stop[a] (the end of a's subtree). A title's score is the sum of the log-probabilities along its
  path; expanding a node (feeding it) scores all its children at once. Titles whose lines have the same
  tokens end at one node; each of them is ranked (tied, in title order).
* **Full ranking.** Exhaustive (`tree_scores`): every title's score from the catalogue's tree, cut in
  pre-order into slices (a run of consecutive nodes needs, besides itself, only the ancestors of its first
  node), slices of all users batched. Best-first (`BestFirst`): log-probabilities are <= 0, so a prefix's
  score bounds all its completions and a finished title is final once every open prefix scores lower (an
  equal one may end in an equal title that comes first in title order); each step pops up to `beam` open
  prefixes of every unfinished user and expands all of them in the same passes.
* **Sampled ranks** (`rank_users`): the target's path is expanded first; then, level by level, only the
  prefixes that score at least the target, since no completion of a lower one can rank above it.
* **Bounded memory.** A user's open prefixes (the frontier) are cut back to the best `frontier` after every
  step, and the best score cut away is remembered: a finished title is final only when it also beats that.
  When a search can no longer certify its next title (every remaining prefix scores below what was cut),
  the user is scored exhaustively instead, in slices, and counted, so the result stays exact. Finished
  titles beyond the K still to be found are dropped (they can never enter the top K).
* **No Python per node.** A search step's bookkeeping (the frontier, the rows, the cache's slots) is numpy
  over arrays of nodes, per user or per pass: on a GPU, whose passes take milliseconds, a loop over nodes
  in Python was what bound the search.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from cprec.errors import CPRecError

if TYPE_CHECKING:
    import torch

NO_NODES = np.zeros(0, dtype=np.int64)


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


# ---------------------------------------------------------------- the drivers (scorer: a BatchScorer)

def tree_scores(scorer, prompts: Prompts, trees: list[PrefixTree]) -> list[np.ndarray]:
    """Every title's score in user u's tree `trees[u]` (one tree object may serve many users)."""
    edges, rows, slices = [], [], {}
    for u, tree in enumerate(trees):
        edges.append(_first_edges(prompts, u, tree))
        if id(tree) not in slices:
            slices[id(tree)] = tree.slices(scorer.row_nodes)
        rows += [Row(u, tree, fed, expanded) for fed, expanded in slices[id(tree)]]
    for row, logp in scorer.run(prompts, rows):
        edges[row.user][row.tree.children_of(row.expanded)] = logp
    return [tree.path_scores(edge)[tree.title_node] for tree, edge in zip(trees, edges)]

def _first_edges(prompts: Prompts, user: int, tree: PrefixTree) -> np.ndarray:
    """Edge log-probabilities of a user's tree, known so far: the first tokens, from the prompt pass."""
    edge = np.zeros(tree.size)
    firsts = tree.children_of(np.array([0]))
    edge[firsts] = prompts.first[user, tree.token[firsts]]
    return edge

def rank_users(scorer, prompts: list[str], titles: list[list[str]], target: int = 0) -> list[int]:
    """Sampled protocol: the rank of `titles[u][target]` among `titles[u]` for each user (0 = first; ties
    count against it), as ranking `score_users`' scores would give, expanding only the prefixes that
    score at least the target."""
    batch = scorer.prompts([scorer.prompt_ids(p) for p in prompts])
    trees = scorer.trees(titles)
    cache = scorer.node_cache(batch, trees)
    scores = []  # path score of every node whose parent was expanded; -inf for the others
    for u, tree in enumerate(trees):
        known = np.full(tree.size, -np.inf)
        known[0] = 0.0
        firsts = tree.children_of(np.array([0]))
        known[firsts] = batch.first[u, tree.token[firsts]]
        scores.append(known)
    paths = {u: np.asarray(tree.ancestors(int(tree.title_node[target])), dtype=np.int64)
             for u, tree in enumerate(trees)}
    _expand_all(scorer, batch, trees, paths, cache, scores)  # the target's own path first
    bar = [float(s[tree.title_node[target]]) for s, tree in zip(scores, trees)]
    todo = {u: _worth_expanding(tree, tree.children_of(np.concatenate([[0], paths[u]])), scores[u], bar[u],
                                     paths[u]) for u, tree in enumerate(trees)}
    while any(len(nodes) for nodes in todo.values()):
        _expand_all(scorer, batch, trees, todo, cache, scores)
        todo = {u: _worth_expanding(trees[u], trees[u].children_of(nodes), scores[u], bar[u])
                for u, nodes in todo.items()}
    # a title never reached has a prefix below the target, so it scores below it too
    return [int(np.sum(score[np.delete(tree.title_node, target)] >= b))
            for tree, score, b in zip(trees, scores, bar)]

def _worth_expanding(tree: PrefixTree, nodes: np.ndarray, scores: np.ndarray, bar: float,
                     done: np.ndarray = NO_NODES) -> np.ndarray:
    """The inner nodes among `nodes` that score at least `bar` and were not expanded (`done`)."""
    keep = tree.has_children[nodes] & (scores[nodes] >= bar) & ~np.isin(nodes, done)
    return nodes[keep]

def _expand_all(scorer, batch: Prompts, trees: list[PrefixTree], todo: dict, cache,
                scores: list[np.ndarray]) -> None:
    """Expand every node of `todo[u]` (whose ancestors are all expanded) for each user: the path scores
    of their children."""
    rows = []
    for u, nodes in todo.items():
        if len(nodes):
            rows += [Row(u, trees[u], fed, expanded, context) for fed, expanded, context in
                     trees[u].cover(nodes, scorer.row_nodes, cache.kept(u))]
    found: dict[int, list] = {}
    for row, logp in scorer.run(batch, rows, cache):
        found.setdefault(row.user, []).append((row.tree.children_of(row.expanded), logp))
    for u, parts in found.items():  # parents before children: a row may expand a node and its parent
        children = np.concatenate([c for c, _ in parts])
        logp = np.concatenate([lp for _, lp in parts])
        depth = trees[u].depth[children]
        for d in np.unique(depth):
            at = depth == d
            scores[u][children[at]] = scores[u][trees[u].parent[children[at]]] + logp[at]

def top_k_users(scorer, prompts: list[str], tree: PrefixTree, k: int, beam: int = 20,
                exhaustive: bool = False, frontier: int = 50_000) -> list[list[tuple[int, float]]]:
    """Full ranking: the exact k best titles of `tree` for each user as (title index, score), best
    first; by scoring every title, or by best-first search with at most `frontier` open prefixes per
    user (a user whose search the cap blocks is scored exhaustively and counted in `stats`)."""
    batch = scorer.prompts([scorer.prompt_ids(p) for p in prompts])
    if exhaustive:
        return [_best(scores, k) for scores in tree_scores(scorer, batch, [tree] * len(prompts))]
    cache = scorer.node_cache(batch, [tree] * len(prompts))
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
        for row, logp in scorer.run(batch, _search_rows(scorer, tree, users, nodes, cache), cache):
            at = row.first + np.searchsorted(nodes[row.first:row.first + len(row.expanded)], row.expanded)
            searches[row.user].expand(row.expanded, scores[at], logp)
        for u in steps:
            searches[u].trim()
        steps = {u: searches[u].advance(beam) for u in steps}
    scorer.stats["peak_frontier"] = max([scorer.stats["peak_frontier"]] + [s.peak for s in searches])
    blocked = [u for u, s in enumerate(searches) if s.blocked]
    results = [s.results for s in searches]
    if blocked:
        scorer.stats["fallbacks"] += len(blocked)
        exact = tree_scores(scorer, scorer.subset(batch, blocked), [tree] * len(blocked))
        for u, scores in zip(blocked, exact):
            results[u] = _best(scores, k)
    return results

def _search_rows(scorer, tree: PrefixTree, users: np.ndarray, nodes: np.ndarray, cache) -> list[Row]:
    """Rows that expand `nodes[i]` for `users[i]` (sorted by user, then node), all users at once. Each
    popped prefix's ancestors were fed in earlier steps; while the cache holds them all, a row feeds
    only its user's next `row_nodes` prefixes and takes the union of their ancestors as context. A row's
    `first` is the position of its first node in `nodes`."""
    index, above = tree.ancestors_of(nodes)
    if not cache.all_kept(users[index], above):  # the cache is full: rows feed the ancestors it lacks
        rows = []
        for u in np.unique(users).tolist():
            at = np.flatnonzero(users == u)
            for fed, expanded, context in tree.cover(nodes[at], scorer.row_nodes, cache.kept(u)):
                rows.append(Row(u, tree, fed, expanded, context, first=int(at[0]) + int(
                    np.searchsorted(nodes[at], expanded[0]))))
        return rows
    user_start = np.flatnonzero(np.concatenate([[True], users[1:] != users[:-1]]))
    rank = np.arange(len(nodes)) - np.repeat(user_start, np.diff(np.append(user_start, len(nodes))))
    new_row = (rank % scorer.row_nodes) == 0  # a user's first node, and every row_nodes-th after it
    starts = np.append(np.flatnonzero(new_row), len(nodes))
    contexts = tree.row_contexts(nodes, np.cumsum(new_row) - 1, index, above)
    return [Row(int(users[lo]), tree, nodes[lo:hi], nodes[lo:hi], context, first=lo)
            for lo, hi, context in zip(starts[:-1], starts[1:], contexts)]


def _best(scores: np.ndarray, k: int) -> list[tuple[int, float]]:
    """The k best (index, score), best first; equal scores in index order."""
    order = np.argsort(-scores, kind="stable")[:k]
    return [(int(i), float(scores[i])) for i in order]
