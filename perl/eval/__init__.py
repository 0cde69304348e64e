"""Evaluation: k-sample runs over benchmarks (resumable), Avg@k / Pass@k / unbiased pass@k."""

from .metrics import avg_at_k, benchmark_metrics, pass_at_k, sample_seed, unbiased_pass_at_k
from .runner import PAPER_K, EvalConfig, evaluate, metrics_from_samples

__all__ = ["PAPER_K", "EvalConfig", "avg_at_k", "benchmark_metrics", "evaluate", "metrics_from_samples", "pass_at_k",
           "sample_seed", "unbiased_pass_at_k"]
