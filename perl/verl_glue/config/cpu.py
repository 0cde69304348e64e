"""trainer.device=cpu: verl's trainer on a machine without an accelerator.

The CPU platform (perl.verl_glue.cpu_platform) and vLLM's CPU build are the only differences from a
GPU node; these are the settings they need. `CPU_REQUIRED` (here, in code) a CPU run cannot do
without; `cpu.yaml` holds the CPU profile's defaults, which a recipe may change. Anything that
drives verl's engine on CPU outside the trainer (tests, benches) reads the same layer
(`cpu_defaults`).
"""

from __future__ import annotations

import os
from typing import Any

from omegaconf import DictConfig, OmegaConf

from .layers import UserLayers, merge, nested
from .errors import ConfigError

CPU_DEVICE = "cpu"
PLATFORM_ENV = "VERL_PLATFORM"  # verl's explicit platform choice (plugin/platform/platform_manager.py)
CPU_YAML = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu.yaml")
# How often the dynamic-sampling buffer looks for finished groups (s): verl's default on a GPU node;
# a CPU step generates in about a second, and a 2 s poll would round every step up to 2 s. Each
# poll is one TransferQueue listing; the toy's generation measured 1.19 s a step polling every
# 0.2 s, 1.02-1.29 s every 0.05 s and 1.03 s every 0.02 s (A/B pairs, docs/benchmarks.md).
GPU_POLL_S, CPU_POLL_S = 2.0, 0.02
CPU_REQUIRED: dict[str, Any] = {
    "actor_rollout_ref.rollout.enable_sleep_mode": False,  # vLLM's sleep mode is CUDA-only
    "actor_rollout_ref.rollout.free_cache_engine": False,  # frees the KV cache through sleep mode
    "actor_rollout_ref.rollout.enforce_eager": True,  # no CUDA graphs on CPU
    "actor_rollout_ref.model.use_remove_padding": False,  # flash-attn's varlen kernels are CUDA-only
}


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict) and node and not (prefix.endswith("mixed_precision")):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: node}


def cpu_defaults() -> dict[str, Any]:
    """The CPU profile's defaults (cpu.yaml) as dotted keys; a mixed-precision block stays whole."""
    return _flatten(OmegaConf.to_container(OmegaConf.load(CPU_YAML)))


def cpu_settings(cfg: DictConfig, users: UserLayers) -> DictConfig:
    """`CPU_REQUIRED`, and the CPU profile's defaults where the recipe and the overrides leave them
    unset; Ray gets one logical "GPU" slot per worker (the CPU platform's placement tokens, see
    perl.verl_glue.cpu_platform), and VERL_PLATFORM=cpu in its processes' environment."""
    layer: dict[str, Any] = {}
    for key, required in CPU_REQUIRED.items():
        value, where = users.value(key)
        if value is not None and value != required:
            raise ConfigError(f"{key}={value} (in the {where}) cannot run with trainer.device=cpu: it must be "
                              f"{required} there (vLLM's CPU build has no CUDA graphs, sleep mode or flash-attn)")
        layer[key] = required
    for key, default in cpu_defaults().items():
        if users.value(key)[0] is None:
            layer[key] = default
    if users.value(AGENT_WORKERS_KEY)[0] is None:
        layer[AGENT_WORKERS_KEY] = agent_loop_workers(cfg)
    layer["ray_kwargs.ray_init.num_gpus"] = int(cfg.trainer.n_gpus_per_node) * int(cfg.trainer.nnodes)
    for name, value in thread_env().items():
        key = f"ray_kwargs.ray_init.runtime_env.env_vars.{name}"
        if users.value(key)[0] is None and name not in os.environ:  # a local Ray inherits the driver's
            layer[key] = value
    # the user asked for the CPU platform: every Ray process of the run selects it (request_cpu_platform)
    layer[f"ray_kwargs.ray_init.runtime_env.env_vars.{PLATFORM_ENV}"] = CPU_DEVICE
    return merge(cfg, nested(layer), "trainer.device=cpu settings", allow_new=True)


AGENT_WORKERS_KEY = "actor_rollout_ref.rollout.agent.num_workers"
# Completions per step (prompts x G, before dynamic sampling's refills) up to which one agent-loop
# worker is enough on the CPU profile; above, two.
ONE_AGENT_WORKER_UP_TO = 32


def agent_loop_workers(cfg: DictConfig) -> int:
    """The CPU profile's agent-loop workers (verl's default is 8), where the recipe names none: one
    for up to `ONE_AGENT_WORKER_UP_TO` completions a step, two above. Each completion costs a few ms
    of Python in its worker (the server call, scoring, the TransferQueue record), so on the toy's
    128 a step one worker is the generation's bottleneck; but each worker is a process that spends
    ~9 s of CPU importing verl and vLLM before the first step, on the same 2 cores as everything else
    starting then. Measured (docs/benchmarks.md, "Start-up work per launch"): 16 completions a step, one
    worker: the same steps, first step 5 s sooner; the toy's 128, two workers: steps 3% faster
    (generation 0.1-0.15 s), first step 4 s later. The SmolLM2 example (64 a step) keeps two: one
    made its test no faster (its steps are vLLM's and the update's compute), and its held-out gains
    were measured with two (+0.242/+0.246/+0.258 in 5 steps; with one +0.188/+0.223, unseeded runs)."""
    completions = int(cfg.data.train_batch_size) * int(cfg.actor_rollout_ref.rollout.n)
    return 1 if completions <= ONE_AGENT_WORKER_UP_TO else 2


def torch_threads() -> int:
    """The threads torch would use here by itself: the physical cores this process may run on."""
    import psutil

    return max(1, min(len(os.sched_getaffinity(0)), psutil.cpu_count(logical=False) or 1))


def thread_env() -> dict[str, str]:
    """Thread counts for every Ray process of a CPU run. Ray gives an actor without `num_cpus`
    OMP_NUM_THREADS=1 (ray/_private/utils.py, set_omp_num_threads_if_unset): verl's FSDP actor and
    vLLM's engine core (spawned by its server actor, inheriting that) would run torch on one core while
    the other waits. TransferQueue sets torch to TQ_NUM_THREADS (8) around every put and get, warns
    each time that there are fewer cores (hundreds of log lines a step), and then restores the count
    torch had when it was imported; with both set to the cores, the count stays what it is."""
    threads = torch_threads()
    return {"OMP_NUM_THREADS": str(threads), "TQ_NUM_THREADS": str(min(8, threads))}


def request_cpu_platform(cfg: DictConfig) -> None:
    """trainer.device=cpu asks for verl's CPU platform (perl.verl_glue.cpu_platform): in this process
    (the driver; a local Ray inherits it) unless VERL_PLATFORM is set already. Elsewhere the CPU
    platform claims a machine only when torch is a CPU build. Call before verl resolves its platform."""
    if cfg.trainer.device == CPU_DEVICE:
        os.environ.setdefault(PLATFORM_ENV, CPU_DEVICE)


def poll_interval(cfg: DictConfig) -> float:
    return CPU_POLL_S if cfg.trainer.device == CPU_DEVICE else GPU_POLL_S
