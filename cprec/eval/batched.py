"""Scoring titles for many users at once: the forward passes of the evaluation's search. The only owner of
batching across users; what to feed is `cprec.eval.search`'s.

Contract: every score is what `TitleScorer`'s one-user path computes for the same user and title (the summed
log-probability of the title's line given the user's prompt) up to floating-point rounding, because every
token is fed at the same position with the same context. Tests check it against the one-user path.

How (the spec, beside the code):

* **Prompts.** The prompts of a batch of users run in one forward pass, right-padded: positions 0..n-1,
  padding masked. A pad only ever follows real tokens, so no real token attends to it and no query row is
  fully masked. The KV cache holds every prompt; the distribution after each prompt is read at its last
  real token (the language-model head runs on those rows only).
* **Tree attention.** Each node of a user's prefix tree is fed once however many titles share it (as in
  speculative decoding's token trees): a node attends to its user's prompt and to its ancestors, at position
  prompt length + depth - 1; the distribution after it scores all its children at once.
* **Rows and passes.** A row is one user's nodes on a copy of that user's prompt cache: at most `row_nodes`
  fed nodes, plus context. A node sees a key exactly when a <= v < stop[a] (pre-order numbering): a row's
  attention mask is that one comparison, for all its rows at once. A forward pass takes rows of many users
  up to `tokens_per_pass` fed positions (padding counted), which bounds its memory; the head runs on the
  expanded nodes only, in chunks.
* **Searches keep K/V** (`NodeCache`): the keys and values of every node fed during a search are kept, so a
  later row takes a node's ancestors as context instead of feeding them again: each node is fed once. The
  cache holds at most `node_cache_bytes`; when full, ancestors are fed again as context (slower, as exact).
"""

from __future__ import annotations


import numpy as np
import torch
from transformers.cache_utils import DynamicLayer

from cprec.data.template import item_line
from cprec.errors import CPRecError
from cprec.eval import search
from cprec.eval.scoring import TitleScorer
from cprec.eval.search import PrefixTree, Prompts, Row

HEAD_CHUNK = 1024  # rows of logits materialised at once: at a 152k vocabulary in bf16, ~1.5 GB with the
# fp32 copy and the fp32 log-probabilities
PASS_OVERHEAD_CPU = 64  # positions a pass costs beyond its own on a CPU (measured: `pass_bounds`)
PASS_OVERHEAD_GPU = 10**9  # on a GPU, bound by the host's launches: the fewest passes, then the least padding


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
        check_head(model, self.decoder, self.head, self.device)

    def reset_stats(self) -> None:
        """Counters since the last reset: users the frontier cap sent to exhaustive scoring, the largest
        frontier of a search, tree nodes fed to the model, and those of them expanded (the rest are ancestors
        fed again because the node cache was full, or context of exhaustive slices)."""
        self.stats = {"fallbacks": 0, "peak_frontier": 0, "fed_nodes": 0, "expanded_nodes": 0}

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

    # ---- the searches (`cprec.eval.search`), over this scorer's passes
    def tree_scores(self, prompts: Prompts, trees: list[PrefixTree]) -> list[np.ndarray]:
        return search.tree_scores(self, prompts, trees)

    def rank_users(self, prompts: list[str], titles: list[list[str]], target: int = 0) -> list[int]:
        return search.rank_users(self, prompts, titles, target)

    def top_k_users(self, prompts: list[str], tree: PrefixTree, k: int, beam: int = 20, exhaustive: bool = False,
                    frontier: int = 50_000) -> list[list[tuple[int, float]]]:
        return search.top_k_users(self, prompts, tree, k, beam, exhaustive, frontier)

    def score_users(self, prompts: list[str], titles: list[list[str]]) -> list[np.ndarray]:
        """The score of each user's titles (in their order), every title scored."""
        batch = self.prompts([self.prompt_ids(p) for p in prompts])
        return self.tree_scores(batch, self.trees(titles))

    def trees(self, titles: list[list[str]]) -> list[PrefixTree]:
        self.lines_ids([t for user_titles in titles for t in user_titles])
        return [PrefixTree([self.line_ids(t) for t in user_titles]) for user_titles in titles]

    def subset(self, prompts: Prompts, users: list[int]) -> Prompts:
        index = torch.tensor(users, device=self.device)
        return Prompts([(k[index], v[index]) for k, v in prompts.layers], prompts.lengths[index],
                       prompts.mask[index], prompts.first[users])


@torch.no_grad()
def check_head(model, decoder, head, device) -> None:
    """The head is applied to chosen rows of the decoder's output: refuse a model whose logits are something
    else (a soft-cap, a scale), which would silently change every score."""
    ids = torch.tensor([[1, 2, 3]], device=device)
    full = model(input_ids=ids, use_cache=False).logits.float()
    mine = head(decoder(input_ids=ids, use_cache=False).last_hidden_state).float()
    if not torch.allclose(full, mine, rtol=1e-3, atol=1e-3):
        raise CPRecError(f"{type(model).__name__}: its logits are not the output embedding of its decoder's last "
                         f"hidden state; batched evaluation does not support it")


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
