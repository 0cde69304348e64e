"""Evaluation: metrics (Avg@k, Pass@k, unbiased pass@k) and per-sample seeding."""

from .metrics import avg_at_k, benchmark_metrics, pass_at_k, sample_seed, unbiased_pass_at_k

__all__ = ["avg_at_k", "benchmark_metrics", "pass_at_k", "sample_seed", "unbiased_pass_at_k"]
