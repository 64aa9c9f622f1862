"""The sample order of training: which row of which stream is the n-th row of a phase. The only owner.

The order of a phase is a pure function of (shard fingerprint, phase name and mixture, seed, position):

* **Interleave.** Stream s with weight w_s has its k-th row due at time (k + 1/2) / w_s; rows are taken in
  order of due time, ties by the stream's place in the mixture. The stream furthest behind its quota goes
  first (largest deficit first), and after n rows every stream has n * w_s rows within about one row. Weights
  are made exact integers, so the comparison is exact on every machine. Position n is reached without
  replaying: a binary search finds how many rows each stream has given by then (O(streams * log n)).
* **Epochs.** Stream s's rows form an endless sequence of epochs. Epoch e shuffles the stream's shards,
  groups them into windows of `window_shards` shards and shuffles the rows inside each window, all seeded by
  (seed, fingerprint, phase, stream, epoch), so a reader decompresses each shard once per epoch and the
  k-th row is found in O(window) time whatever k is.
* **Ranks.** Global batch b is positions [b*G, (b+1)*G); data-parallel rank r of W takes the contiguous
  slice [r*G/W, (r+1)*G/W). The union of the slices is the global batch for any W, so a run resumes on a
  different number of ranks and sees the same rows.

Training state is counters only (`StreamState`): phase, steps consumed in the phase (rows = steps * G),
tokens consumed per stream; the trainer advances it after a step, never the loader.
"""

from __future__ import annotations

import bisect
import hashlib
import heapq
import itertools
import math
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np
import torch

from cprec.data.collate import collate_rows
from cprec.data.shards import ShardSet
from cprec.errors import CPRecError


def stable_key(*parts) -> int:
    """A stable 64-bit integer from strings and ints (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest(), "little")


def normalize_mixture(weights: dict[str, float], available: list[str]) -> dict[str, int]:
    """Exact integer weights for the streams with a positive weight; errors name the stream at fault."""
    if not weights:
        raise CPRecError(f"the mixture is empty; give weights to some of: {', '.join(available)}")
    fractions = {}
    for name, w in weights.items():
        if name not in available:
            raise CPRecError(f"mixture names unknown stream '{name}' (streams: {', '.join(available)})")
        if not isinstance(w, (int, float)) or isinstance(w, bool) or not math.isfinite(w) or w < 0:
            raise CPRecError(f"mixture weight of stream '{name}' must be a finite number >= 0, got {w!r}")
        if w > 0:
            fractions[name] = Fraction(w).limit_denominator(10**6)
    if not fractions:
        raise CPRecError(f"mixture weights {weights} do not sum to a positive number")
    scale = math.lcm(*(f.denominator for f in fractions.values()))
    ints = {name: int(f * scale) for name, f in fractions.items()}
    g = math.gcd(*ints.values())
    return {name: v // g for name, v in ints.items()}


def default_mixture(streams: dict, kind: str = "pretrain") -> dict[str, float]:
    """The streams of one kind (pretrain or sft) of a shard index, weighted by their rows (the corpus's own
    proportions)."""
    mixture = {name: float(st["rows"]) for name, st in streams.items() if st["kind"] == kind and st["rows"]}
    if not mixture:
        raise CPRecError(f"the shards hold no {kind} stream with rows (streams: {', '.join(streams) or 'none'})")
    return mixture


class Interleave:
    """Deterministic weighted interleave of streams with O(S log n) seeking to position n."""

    def __init__(self, weights: dict[str, int]):
        self.names = list(weights)
        lcm = math.lcm(*weights.values())
        self.period = [lcm // w for w in weights.values()]  # row k of stream s is due at (2k+1) * period[s]

    def _given_by(self, t: int) -> list[int]:
        """Rows each stream has given by time t (due time <= t)."""
        return [0 if t < p else (t // p - 1) // 2 + 1 for p in self.period]

    def counts_at(self, n: int) -> list[int]:
        """Rows each stream has given among the first n rows of the interleave."""
        lo, hi = 0, (2 * n + 1) * max(self.period)  # by time hi every stream has given >= n rows
        while lo < hi:  # largest t with sum(given_by(t)) <= n
            mid = (lo + hi + 1) // 2
            if sum(self._given_by(mid)) <= n:
                lo = mid
            else:
                hi = mid - 1
        counts = self._given_by(lo)
        it = self._merge(counts)
        for _ in range(n - sum(counts)):  # fewer than one row per stream remain to place
            s, k = next(it)
            counts[s] = k + 1
        return counts

    def _merge(self, counts: list[int]):
        heap = [((2 * k + 1) * p, s, k) for s, (p, k) in enumerate(zip(self.period, counts))]
        heapq.heapify(heap)
        while True:
            _, s, k = heap[0]
            heapq.heapreplace(heap, ((2 * k + 3) * self.period[s], s, k + 1))
            yield s, k

    def iterate(self, n: int):
        """(stream index, k-th row of that stream) for positions n, n+1, ..."""
        return self._merge(self.counts_at(n))


class EpochOrder:
    """Row k of a stream's endless sequence of shuffled epochs -> (shard, row in shard)."""

    def __init__(self, shard_rows: list[int], entropy: list[int], window_shards: int):
        self.shard_rows = np.asarray(shard_rows, dtype=np.int64)
        self.total = int(self.shard_rows.sum())
        if self.total == 0:
            raise CPRecError("a stream with a positive weight has no rows")
        self.entropy, self.window_shards = entropy, window_shards
        self._epoch = None
        self._window = None

    def _epoch_plan(self, epoch: int):
        if self._epoch is None or self._epoch[0] != epoch:
            order = np.random.default_rng(self.entropy + [epoch]).permutation(len(self.shard_rows))
            windows = [order[i:i + self.window_shards] for i in range(0, len(order), self.window_shards)]
            starts = np.cumsum([0] + [int(self.shard_rows[w].sum()) for w in windows]).tolist()
            self._epoch = (epoch, windows, starts)
            self._window = None
        return self._epoch

    def locate(self, k: int) -> tuple[int, int]:
        epoch, i = divmod(k, self.total)
        _, windows, starts = self._epoch_plan(epoch)
        w = bisect.bisect_right(starts, i) - 1
        if self._window is None or self._window[0] != w:
            shards = windows[w]
            perm = np.random.default_rng(self.entropy + [epoch, w + 1]).permutation(starts[w + 1] - starts[w])
            bounds = np.cumsum([0] + [int(self.shard_rows[s]) for s in shards]).tolist()
            self._window = (w, shards, bounds, perm)
        _, shards, bounds, perm = self._window
        j = int(perm[i - starts[w]])
        q = bisect.bisect_right(bounds, j) - 1
        return int(shards[q]), j - bounds[q]


@dataclass
class StreamState:
    """Counters only: what the trainer has consumed. Saved in checkpoints."""

    phase: str
    fingerprint: str
    mixture: dict[str, float]
    seed: int
    step: int = 0  # global batches consumed in this phase
    global_batch: int = 0
    tokens: dict[str, int] = field(default_factory=dict)  # tokens consumed per stream, over all phases

    @property
    def rows(self) -> int:
        return self.step * self.global_batch

    def state_dict(self) -> dict:
        return {"phase": self.phase, "fingerprint": self.fingerprint, "mixture": dict(self.mixture),
                "seed": self.seed, "step": self.step, "global_batch": self.global_batch, "tokens": dict(self.tokens)}


class PackedStream(torch.utils.data.IterableDataset):
    """Rank r's slice of every global batch of a phase, collated, from the step the state says on.

    Each item is one training step's rows for this rank: a dict of tensors (see `collate`) plus `step` and
    `stream_tokens` (real, non-padding tokens per stream, indexed like `stream_names`). DataLoader workers take the steps
    round-robin (worker i makes steps i, i + N, ...), which the DataLoader yields back in order.
    """

    def __init__(self, shards_dir, mixture: dict[str, float], seed: int, global_batch: int, rank: int = 0,
                 world_size: int = 1, phase: str = "stable", window_shards: int = 4, index: dict | None = None):
        if global_batch % world_size:
            raise CPRecError(f"global batch {global_batch} rows is not divisible by the world size {world_size}")
        if not 0 <= rank < world_size:
            raise CPRecError(f"rank {rank} is outside a world of {world_size}")
        self.shards_dir, self.window_shards = shards_dir, window_shards
        self.global_batch, self.rank, self.world_size = global_batch, rank, world_size
        self.data = ShardSet(shards_dir, cache_shards=window_shards + 1, index=index)
        self.stream_names = list(self.data.streams)
        self.state = StreamState(phase=phase, fingerprint=self.data.fingerprint, mixture=dict(mixture), seed=seed,
                                 global_batch=global_batch)
        self._build_order()

    def _build_order(self) -> None:
        weights = normalize_mixture(self.state.mixture, self.stream_names)
        self.interleave = Interleave(weights)
        base = [self.state.seed, stable_key(self.state.fingerprint), stable_key(self.state.phase)]
        self.orders = [EpochOrder([s["rows"] for s in self.data.streams[name]["shards"]], base + [stable_key(name)],
                                  self.window_shards) for name in self.interleave.names]

    # ---- the order
    def rows_at(self, position: int, count: int) -> list[tuple[str, int, int]]:
        """(stream, shard, row in shard) of global positions [position, position + count)."""
        out = []
        for s, k in itertools.islice(self.interleave.iterate(position), count):
            shard, row = self.orders[s].locate(k)
            out.append((self.interleave.names[s], shard, row))
        return out

    def rank_rows(self, step: int) -> list[tuple[str, int, int]]:
        per_rank = self.global_batch // self.world_size
        return self.rows_at(step * self.global_batch + self.rank * per_rank, per_rank)

    def batch(self, step: int) -> dict:
        rows, stream_ids = [], []
        stream_tokens = torch.zeros(len(self.stream_names), dtype=torch.long)
        for name, shard, row in self.rank_rows(step):
            tokens, doc_lens, prompt_lens = self.data.shard(name, shard).row(row)
            rows.append((tokens, doc_lens, prompt_lens))
            stream_ids.append(self.stream_names.index(name))
            stream_tokens[stream_ids[-1]] += int(doc_lens.sum())
        out = collate_rows(rows, stream_ids)
        out["step"] = step
        out["stream_tokens"] = stream_tokens
        return out

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        workers, wid = (info.num_workers, info.id) if info else (1, 0)
        for step in itertools.count(self.state.step + wid, workers):
            yield self.batch(step)

    # ---- the state
    def advance(self, stream_tokens: dict[str, int] | None = None) -> None:
        """Called by the trainer after a step: the step's rows are consumed."""
        self.state.step += 1
        for name, n in (stream_tokens or {}).items():
            self.state.tokens[name] = self.state.tokens.get(name, 0) + int(n)

    def state_dict(self) -> dict:
        return self.state.state_dict()

    def enter_phase(self, phase: str, mixture: dict[str, float]) -> None:
        """Start a data phase with its own mixture (a schedule phase in `phase_mixtures`, or an anneal branch's
        mixture): its order begins at step 0, seeded by its name; the token counters carry over."""
        self.state.phase, self.state.step, self.state.mixture = phase, 0, dict(mixture)
        self._build_order()

    def load_state_dict(self, saved: dict) -> None:
        """Resume from `saved` (O(1): nothing is replayed), in the phase and with the mixture the stream is in
        now (`enter_phase` first for a saved phase of its own). Refuses other shards, seed, global batch,
        phase or mixture, naming the difference."""
        if saved["fingerprint"] != self.state.fingerprint:
            raise CPRecError(f"refusing to resume: the shards differ (fingerprint {saved['fingerprint']} in the "
                             f"checkpoint, {self.state.fingerprint} in {self.shards_dir})")
        if saved["seed"] != self.state.seed:
            raise CPRecError(f"refusing to resume: seed {saved['seed']} in the checkpoint, {self.state.seed} now")
        if saved["mixture"] != self.state.mixture:
            diff = sorted(set(saved["mixture"]) | set(self.state.mixture))
            what = ", ".join(f"{s}: {saved['mixture'].get(s, 0)} -> {self.state.mixture.get(s, 0)}"
                             for s in diff if saved["mixture"].get(s, 0) != self.state.mixture.get(s, 0))
            raise CPRecError(f"refusing to resume phase '{saved['phase']}' with another mixture ({what})")
        if saved["phase"] != self.state.phase:
            raise CPRecError(f"refusing to resume: the checkpoint is in phase '{saved['phase']}', the stream in "
                             f"'{self.state.phase}'")
        if saved["global_batch"] != self.global_batch:
            raise CPRecError(f"refusing to resume: global batch {saved['global_batch']} rows in the checkpoint, "
                             f"{self.global_batch} now (the global batch is fixed for a run)")
        self.state.step = int(saved["step"])
        self.state.tokens = dict(saved["tokens"])
