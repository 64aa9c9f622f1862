"""The experiment's statistics (`cprec.eval.stats`) against cases computed by hand."""

import math

import numpy as np
import pytest

from cprec.errors import CPRecError
from cprec.eval import stats
from cprec.eval.metrics import ranking_metrics


def test_per_user_metrics_match_the_reported_means():
    ranks = [0, 4, 9, None, 12]
    assert stats.per_user(ranks, "HR@10").tolist() == [1, 1, 1, 0, 0]
    assert stats.per_user(ranks, "HR@5").tolist() == [1, 1, 0, 0, 0]
    np.testing.assert_allclose(stats.per_user(ranks, "NDCG@10"), [1, 1 / math.log2(6), 1 / math.log2(11), 0, 0])
    means = ranking_metrics(ranks)
    for name in stats.metric_names():
        assert stats.per_user(ranks, name).mean() == pytest.approx(means[name])
    with pytest.raises(CPRecError, match="unknown metric 'MRR@10'"):
        stats.per_user(ranks, "MRR@10")


def test_seed_interval_is_the_student_t_interval():
    out = stats.seed_interval([0.1, 0.2, 0.3])  # mean 0.2, s = 0.1, t(0.975, 2) = 4.3027
    half = 4.3027 * 0.1 / math.sqrt(3)
    assert out["mean"] == pytest.approx(0.2) and out["n"] == 3
    assert out["low"] == pytest.approx(0.2 - half) and out["high"] == pytest.approx(0.2 + half)
    out = stats.seed_interval([0.3, 0.5])  # s = 0.1414, t(0.975, 1) = 12.7062
    assert out["high"] - out["mean"] == pytest.approx(12.7062 * math.sqrt(0.02) / math.sqrt(2))
    assert stats.seed_interval([0.42]) == {"mean": 0.42, "low": None, "high": None, "n": 1}
    assert stats.t975(31) == pytest.approx(2.0395, abs=2e-4)  # tables: t(0.975, 31) = 2.0395
    assert stats.t975(60) == pytest.approx(2.0003, abs=2e-4)
    assert stats.t975(1000) == pytest.approx(1.9623, abs=2e-4)


def test_bootstrap_of_a_constant_difference_is_that_difference_with_the_smallest_p():
    out = stats.paired_bootstrap([1, 1, 1, 0.5], [0, 0, 0, -0.5], resamples=999)
    assert out["diff"] == 1 and out["low"] == 1 and out["high"] == 1
    assert out["p"] == pytest.approx(2 / 1000)  # no resample at or below 0: (0 + 1) / (B + 1), two-sided
    assert stats.significant(out) and "A is significantly better than B" in stats.describe(out, "A", "B", "HR@10")


def test_bootstrap_of_identical_models_has_p_one():
    out = stats.paired_bootstrap([1, 0, 1], [1, 0, 1], resamples=500)
    assert out["diff"] == 0 and out["p"] == 1 and out["low"] == out["high"] == 0
    assert "no significant difference" in stats.describe(out, "A", "B", "HR@10")


def test_bootstrap_matches_the_exact_resampling_distribution():
    # d = [1, 0, 0]: a resample's mean is 0 exactly when none of its 3 draws is user 0, P = (2/3)^3 = 8/27,
    # and it is never below 0; so p = 2 * 8/27 = 0.5926; the 2.5% percentile is 0 (P(mean = 0) = 8/27) and the
    # 97.5% one is 1 (P(mean = 1) = (1/3)^3 = 1/27 = 3.7%, more than 2.5%)
    out = stats.paired_bootstrap([1, 0, 0], [0, 0, 0], resamples=40_000, seed=1)
    assert out["diff"] == pytest.approx(1 / 3)
    assert out["p"] == pytest.approx(16 / 27, abs=0.015)
    assert out["low"] == 0 and out["high"] == 1
    # two users, d = [1, -1]: means -1, 0, 1 with probabilities 1/4, 1/2, 1/4: p = 1, interval [-1, 1]
    out = stats.paired_bootstrap([1, 0], [0, 1], resamples=20_000)
    assert out["p"] == 1 and out["low"] == -1 and out["high"] == 1


def test_bootstrap_refuses_unpaired_inputs():
    with pytest.raises(CPRecError, match="same users on both sides"):
        stats.paired_bootstrap([1, 0], [1, 0, 1])


def test_seed_averaged_per_user():
    out = stats.seed_averaged_per_user([[0, None], [20, 3]], "HR@5")  # user 0: hit, miss; user 1: miss, hit
    assert out.tolist() == [0.5, 0.5]
    with pytest.raises(CPRecError, match="different numbers of users"):
        stats.seed_averaged_per_user([[0], [0, 1]], "HR@5")
