"""Evaluation metrics on hand-made sample tables, and per-sample seed independence."""

from itertools import combinations
from math import comb

import pytest

from perl.eval import avg_at_k, benchmark_metrics, pass_at_k, sample_seed, unbiased_pass_at_k


def test_avg_and_pass_on_a_hand_made_table():
    table = {"p1": [1, 0, 0, 1], "p2": [0, 0, 0, 0], "p3": [1, 1, 1, 1]}
    m = benchmark_metrics(table)
    assert m["avg"] == pytest.approx((0.5 + 0.0 + 1.0) / 3)
    assert m["pass"] == pytest.approx(2 / 3)
    assert avg_at_k([True, False]) == 0.5 and pass_at_k([False, False]) == 0.0
    with pytest.raises(ValueError):
        avg_at_k([])


@pytest.mark.parametrize("n,c,k", [(10, 3, 1), (10, 3, 4), (8, 0, 3), (8, 8, 2), (16, 5, 16), (32, 1, 8), (5, 2, 4)])
def test_unbiased_estimator_matches_closed_form_and_enumeration(n, c, k):
    closed = 1 - comb(n - c, k) / comb(n, k)
    assert unbiased_pass_at_k(n, c, k) == pytest.approx(closed, abs=1e-12)
    if comb(n, k) <= 5000:  # brute force: fraction of k-subsets containing a correct sample
        samples = [1] * c + [0] * (n - c)
        subsets = list(combinations(samples, k))
        assert unbiased_pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))


def test_unbiased_estimator_k1_is_accuracy_and_kn_is_pass():
    assert unbiased_pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert unbiased_pass_at_k(10, 3, 10) == 1.0 and unbiased_pass_at_k(10, 0, 10) == 0.0
    m = benchmark_metrics({"a": [1, 0, 0, 0], "b": [0, 0, 0, 0]}, k=1)
    assert m["pass@1"] == pytest.approx(m["avg"])
    with pytest.raises(ValueError):
        unbiased_pass_at_k(4, 5, 1)


def test_every_sample_gets_its_own_seed():
    seeds = {sample_seed(42, pid, i) for pid in range(50) for i in range(32)}
    assert len(seeds) == 50 * 32  # no two samples share a stream
    assert sample_seed(42, "aime-3", 5) == sample_seed(42, "aime-3", 5)  # reproducible
    assert sample_seed(42, "aime-3", 5) != sample_seed(43, "aime-3", 5)
    assert all(0 <= s < 2**63 for s in seeds)
