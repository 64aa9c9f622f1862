import numpy as np
import pytest

from cprec.data import cleaning


@pytest.mark.parametrize("raw,expected", [
    ("For Whom the Bell Tolls &amp; Other <b>Stories</b>", "For Whom the Bell Tolls & Other Stories"),
    ("Tom &amp;amp; Jerry", "Tom & Jerry"),  # escaped twice, as Amazon metadata often is
    ("  Portal \t\n  2\x00\u200b ", "Portal 2"),
    ("<span></span>   ", None),
    ("", None),
])
def test_normalize_title(raw, expected):
    assert cleaning.normalize_title(raw, 200) == expected


def test_long_titles_are_capped_at_a_word_boundary():
    title = cleaning.normalize_title("word " * 100, 50)
    assert len(title) <= 50 and title.endswith("word") and "  " not in title


def test_time_order_keeps_input_order_on_ties():
    users = np.array([1, 0, 0, 0, 1])
    stamps = np.array([5.0, 7.0, 3.0, 7.0, 5.0])
    assert cleaning.time_order(users, stamps).tolist() == [2, 1, 3, 0, 4]


def test_first_occurrences_keeps_the_first_pair():
    users = np.array([0, 0, 1, 0, 1])
    items = np.array([3, 4, 3, 3, 3])
    assert cleaning.first_occurrences(users, items).tolist() == [True, True, True, False, False]


def brute_force_k_core(pairs, k):
    """Reference: repeatedly drop any pair whose user or item has fewer than k pairs left."""
    kept = set(range(len(pairs)))
    changed = True
    while changed:
        changed = False
        for idx in sorted(kept):
            u, i = pairs[idx]
            if sum(pairs[j][0] == u for j in kept) < k or sum(pairs[j][1] == i for j in kept) < k:
                kept.discard(idx)
                changed = True
    return kept


@pytest.mark.parametrize("seed", range(12))
def test_k_core_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 150))
    users, items = rng.integers(0, 12, n), rng.integers(0, 15, n)
    k = int(rng.integers(1, 5))
    mask = cleaning.k_core(users, items, k)
    assert set(np.flatnonzero(mask).tolist()) == brute_force_k_core(list(zip(users.tolist(), items.tolist())), k)
    if mask.any():
        assert np.bincount(users[mask]).max(initial=0) >= k
        assert min(c for c in np.bincount(users[mask]) if c) >= k
        assert min(c for c in np.bincount(items[mask]) if c) >= k
