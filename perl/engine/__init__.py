"""Single-process generation for one CPU or GPU (evaluation today; the CPU RL engine builds on it)."""

from .sampling import SamplingConfig, sample

__all__ = ["SamplingConfig", "sample"]
