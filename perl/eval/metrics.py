"""Avg@k, Pass@k and the unbiased pass@k estimator; per-sample seeds for k-sample evaluation."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence


def avg_at_k(correct: Sequence[bool | float]) -> float:
    """Mean accuracy over the k samples of one problem (the paper's Avg@k, per problem)."""
    if not correct:
        raise ValueError("avg_at_k: no samples")
    return sum(float(c) for c in correct) / len(correct)


def pass_at_k(correct: Sequence[bool | float]) -> float:
    """1 if any of the k samples is correct (the paper's 'Pass@1 in k')."""
    if not correct:
        raise ValueError("pass_at_k: no samples")
    return float(any(float(c) > 0 for c in correct))


def unbiased_pass_at_k(n: int, c: int, k: int) -> float:
    """Chen et al. (2021): P(at least one of k drawn without replacement from n is correct),
    1 - C(n-c, k) / C(n, k), computed as a stable product."""
    if not (0 <= c <= n) or not (1 <= k <= n):
        raise ValueError(f"unbiased_pass_at_k: need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def sample_seed(seed: int, problem_id: str | int, sample_index: int) -> int:
    """A seed of its own for every (run seed, problem, sample): the k samples are independent
    draws, not one random stream replayed k times (a public eval suite sends one seed to all k)."""
    digest = hashlib.sha256(f"{seed}|{problem_id}|{sample_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def benchmark_metrics(samples: dict[str, Sequence[bool | float]], k: int | None = None) -> dict[str, float]:
    """Avg@k and Pass@k over problems ({problem_id: per-sample correctness}); with `k` < n also the
    unbiased pass@k estimate."""
    if not samples:
        raise ValueError("benchmark_metrics: no problems")
    avg = sum(avg_at_k(v) for v in samples.values()) / len(samples)
    pas = sum(pass_at_k(v) for v in samples.values()) / len(samples)
    out = {"avg": avg, "pass": pas, "problems": float(len(samples))}
    if k is not None:
        out[f"pass@{k}"] = sum(unbiased_pass_at_k(len(v), int(sum(float(x) > 0 for x in v)), k)
                               for v in samples.values()) / len(samples)
    return out
