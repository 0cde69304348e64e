"""Single-machine path: the embedded toy task and a one-process RLVR engine (CPU or one GPU).

Status: the engine and the toy cold start work and are tested; the `perl train` entry point,
resume, plots and the README main job built on them are not wired yet (issue 6).
"""

from .engine import ALGORITHMS, LocalRL, RLConfig, run
from .toy import TOY_TEMPLATE, ToyConfig, cold_start

__all__ = ["ALGORITHMS", "TOY_TEMPLATE", "LocalRL", "RLConfig", "ToyConfig", "cold_start", "run"]
