"""The embedded default's task and its benchmark (the RL loop is verl's trainer, everywhere):

- `task.py`       the toy task (2-digit addition in the paper's answer format) and its cold-start
                  model, made in code and cached (the `perl.toy` block of examples/toy.yaml);
- `pretrained.py` a real pretrained model (a HF directory, a GGUF file, a pip package shipping one)
                  as a HF directory for the same task (examples/smollm2_arith.yaml);
- `bench.py`      `perl bench toy`: every method trained on the toy through verl, Table 3 + Figure 1.
"""

from .task import TOY_TEMPLATE, ToyConfig, ToyTask, cold_start, cold_start_dir

__all__ = ["TOY_TEMPLATE", "ToyConfig", "ToyTask", "cold_start", "cold_start_dir"]
