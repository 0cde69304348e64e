"""Single-machine path: the embedded toy task and a one-process RLVR engine (CPU or one GPU).

`perl train --config examples/toy.yaml` (README's main job) runs it. Not here yet: the 13-method
toy table (`perl bench toy`) and a real-model example (SmolLM2-135M).
"""

from .engine import ALGORITHMS, LocalRL, RLConfig, run
from .toy import TOY_TEMPLATE, ToyConfig, cold_start

__all__ = ["ALGORITHMS", "TOY_TEMPLATE", "LocalRL", "RLConfig", "ToyConfig", "cold_start", "run"]
