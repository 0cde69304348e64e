"""Single-process batched sampling with a HF model (the HF backend of `perl eval`, the toy's cold-start
checks) and the character tokenizer of the toy and the tests' tiny models. Rollouts for training are
vLLM's, inside verl's trainer."""

from .sampling import SamplingConfig, sample

__all__ = ["SamplingConfig", "sample"]
