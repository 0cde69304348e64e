"""Single-machine path: the embedded toy task and a one-process RLVR engine (CPU or one GPU).

`perl train --config examples/toy.yaml` (README's main job) runs it through `recipe.train`;
`perl bench toy` runs every method on it (`bench_toy.py`); `examples/smollm2_arith.yaml` runs the
same engine on a real pretrained model (SmolLM2-135M-Instruct).
"""

from .engine import ALGORITHMS, LocalRL, RLConfig, run
from .toy import TOY_TEMPLATE, ToyConfig, cold_start

__all__ = ["ALGORITHMS", "TOY_TEMPLATE", "LocalRL", "RLConfig", "ToyConfig", "cold_start", "run"]
