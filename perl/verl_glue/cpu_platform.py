"""verl on a machine without an accelerator: a CPU platform for verl 0.9.1's whole trainer.

verl 0.9.1 has no CPU platform: on a machine without an accelerator it falls back to "nvidia" and
every `get_device_id()` ends in `torch.cuda.current_device()`. This module registers one through
verl's own hooks, and is loaded in every process that imports verl (the driver, the task runner,
the FSDP workers, the vLLM server actors) by PeRL's `verl.plugins` entry point (setup.py).

What the trainer needs on CPU, and where each piece is answered:

- device calls (`get_torch_device()`, `current_device()`, seeds, memory stats): `PlatformCPU`
  with a device module that is `torch.cpu` plus the calls verl makes on it;
- Ray placement: verl asks Ray for accelerator slots (`num_gpus` per worker) and reads their ids
  (`get_accelerator_ids()["GPU"]`) when it lays out the vLLM servers. On CPU the run declares as
  many logical "GPU" slots as it has workers (`ray_kwargs.ray_init.num_gpus`, set by
  perl.verl_glue.config.cpu_settings): they are placement tokens, nothing runs on them;
- the process group: verl initialises `cpu:gloo,<device>:<backend>`, which on CPU would name the
  cpu device twice; `initialize_global_process_group_ray` is wrapped to use `gloo` alone when this
  platform is active (the one change to a verl function; patches/README.md);
- the vLLM server: `rollout_env_vars()` (KV-cache size, thread binding) and PeRL's vLLM plugin
  (perl.verl_glue.vllm_cpu_plugin) that keeps weights updatable.

Selection (`cpu_claims_machine`): explicitly with `VERL_PLATFORM=cpu` (trainer.device=cpu sets it
for the run's processes, perl.verl_glue.config.cpu), or where torch is a CPU build (no CUDA, no
ROCm) and no other registered platform claims the machine. Not where torch is a CUDA build: verl's
CUDA probe looks for nvidia-smi on fixed paths (plugin/platform/platform_cuda.py) and a container
without it is still a GPU node; there verl falls back to its CUDA platform, and the config check
says so plainly if torch then sees no GPU. A GPU node is never run on CPU by accident.
"""

from __future__ import annotations

import functools
import os
import types
from contextlib import contextmanager
from typing import Any, Optional

import torch
from verl.plugin.platform.platform_base import PlatformBase
from verl.plugin.platform.platform_manager import PlatformRegistry, get_platform

PLATFORM_NAME = "cpu"
# vLLM CPU: GiB of KV cache per server (vLLM's default is 4; the toy needs far less). Kept if set.
DEFAULT_KVCACHE_GIB = "1"


class _CPUDeviceModule(types.ModuleType):
    """`torch.cpu` plus the memory/RNG calls verl makes on its device module."""

    def __init__(self) -> None:
        super().__init__("perl_cpu_device")

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cpu, name)

    @staticmethod
    def is_available() -> bool:
        return True

    @staticmethod
    def current_device() -> str:
        return "cpu"

    @staticmethod
    def device_count() -> int:
        return 1

    @staticmethod
    def set_device(device: Any) -> None:
        return None

    @staticmethod
    def synchronize(device: Any = None) -> None:
        return None

    @staticmethod
    def empty_cache() -> None:
        return None

    @staticmethod
    def ipc_collect() -> None:
        return None

    @staticmethod
    def get_device_name(device: Any = None) -> str:
        return "CPU"  # verl's FLOPs table has no CPU entry: MFU is reported as 0

    @staticmethod
    def get_rng_state(device: Any = None) -> torch.Tensor:
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(state: torch.Tensor, device: Any = None) -> None:
        torch.set_rng_state(state)

    @staticmethod
    def manual_seed(seed: int) -> None:
        torch.manual_seed(seed)

    manual_seed_all = manual_seed

    @staticmethod
    def memory_allocated(device: Any = None) -> int:
        return 0

    memory_reserved = max_memory_allocated = max_memory_reserved = memory_allocated

    @staticmethod
    def mem_get_info(device: Any = None) -> tuple[int, int]:
        """Host memory (free, total): verl's memory logging divides by the total."""
        try:
            pages, free = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_AVPHYS_PAGES")
            size = os.sysconf("SC_PAGE_SIZE")
            return free * size, pages * size
        except (ValueError, OSError):
            return 1, 1

    @staticmethod
    def reset_peak_memory_stats(device: Any = None) -> None:
        return None

    @staticmethod
    def set_per_process_memory_fraction(fraction: float, device: Any = None) -> None:
        return None


_DEVICE_MODULE = _CPUDeviceModule()


def torch_is_cpu_build() -> bool:
    """torch was built without CUDA and without ROCm (the CPU wheel)."""
    return torch.version.cuda is None and getattr(torch.version, "hip", None) is None


def cpu_claims_machine() -> bool:
    """Whether verl's auto-detection picks the CPU platform here. (With VERL_PLATFORM set, verl takes
    that platform without asking; the check here keeps this function's answer the same.)"""
    if os.environ.get("VERL_PLATFORM", "").strip().lower() == PLATFORM_NAME:
        return True
    return torch_is_cpu_build() and not _other_platform_claims_machine()


def _other_platform_claims_machine() -> bool:
    """Whether a platform registered before this one (CUDA, ROCm, NPU, ...) finds its hardware."""
    for name in PlatformRegistry.registered_names():
        if name == PLATFORM_NAME:
            continue
        cls = PlatformRegistry.get(name)
        try:
            if cls is not None and cls().is_platform_available(use_smi_check=True):
                return True
        except Exception:  # a platform's probe failing means it is not there
            continue
    return False


@PlatformRegistry.register(platform=PLATFORM_NAME)
class PlatformCPU(PlatformBase):
    """gloo + CPU tensors; Ray "GPU" slots are placement tokens (see the module docstring)."""

    @property
    def device_name(self) -> str:
        return "cpu"

    @property
    def vendor_name(self) -> str:
        return "cpu"

    @property
    def device_module(self) -> types.ModuleType:
        return _DEVICE_MODULE

    def is_available(self) -> bool:
        return True

    def is_platform_available(self, use_smi_check: bool = False) -> bool:
        return cpu_claims_machine()

    def current_device(self) -> str:
        return "cpu"

    def device_count(self) -> int:
        return 1

    def set_device(self, device_index: int) -> None:
        return None

    def synchronize(self, device_index: Optional[int] = None) -> None:
        return None

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)

    def set_allocator_settings(self, settings: str) -> None:
        return None

    def empty_cache(self) -> None:
        return None

    def get_device_capability(self, device_index: int = 0) -> tuple[Optional[int], Optional[int]]:
        return None, None

    def communication_backend_name(self) -> str:
        return "gloo"

    def visible_devices_envvar(self) -> str:
        # Ray sets it for its "GPU" slots; nothing on CPU reads it.
        return "CUDA_VISIBLE_DEVICES"

    @contextmanager
    def nvtx_range(self, msg: str):
        yield

    def profiler_start(self) -> None:
        return None

    def profiler_stop(self) -> None:
        return None

    def ray_resource_name(self) -> str:
        return "GPU"

    def ray_resource_options(self, num_gpus: float) -> dict[str, Any]:
        return {"num_gpus": num_gpus}

    def ray_noset_envvars(self) -> list[str]:
        return []

    def is_ipc_supported(self) -> bool:
        return False

    def rollout_env_vars(self) -> dict[str, str]:
        """The rollout server's environment (verl passes it to the server actor; vLLM's engine-core
        process inherits it). A value set in the environment stands.

        - the KV cache vLLM's CPU build reserves (`VLLM_CPU_KVCACHE_SPACE`);
        - no torch.compile: vLLM runs the CPU model eagerly (`enforce_eager`), but its sampler still
          compiles two small functions with inductor: the rank of each sampled token's log-prob
          (`batched_count_greater_than`, for every request that asks for log-probs, i.e. every
          rollout) and unseeded sampling (`compiled_random_sample`). The first request then waits for
          a C++ build: 8.8 s on a fresh machine, 1.5 s with inductor's cache warm (measured, 2 cores).
          Eager, both are the same arithmetic on a few rows of logits;
        - torch threads: `rollout_threads()`."""
        return {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", DEFAULT_KVCACHE_GIB),
                "TORCHDYNAMO_DISABLE": os.environ.get("TORCHDYNAMO_DISABLE", "1"),
                "OMP_NUM_THREADS": str(rollout_threads())}

    def cudart(self) -> Any:
        return None


def rollout_threads() -> int:
    """Torch threads of the CPU rollout engine: the physical cores less
    `VLLM_CPU_NUM_OF_RESERVED_CPU` (vLLM's own setting: cores its CPU build keeps free of the model's
    OpenMP threads; 0 here unless set), at least one.

    vLLM's default CPU executor runs the model in a worker process bound to all cores but one, kept
    for the engine core's scheduler (`vllm.utils.ompmultiprocessing`). PeRL's rollout runs the model
    inside the engine-core process (the `uni` executor, cpu.yaml), where vLLM reserves nothing. Which
    is faster depends on the workload, so the default is all cores and a recipe can reserve:
    - a model whose forward dominates generation wants every core: SmolLM2-135M's generation took
      12.3 s a step with 2 threads and 16.0 s with 1 (examples/smollm2_arith.yaml, 2 cores);
    - a tiny model's generation is bound by the Python around each completion (the agent-loop
      workers score and store it, vLLM's front end streams it, TransferQueue takes it), which then
      runs beside the forward; an OpenMP thread that loses its core stalls every parallel region
      (the same 168 toy requests offline: 0.23 s with both cores free, 0.60 s beside one busy core
      with 2 threads, 0.35 s with 1). The toy reserves one core (examples/toy.yaml): its generation
      through verl went from 1.31 to 1.10 s a step (docs/benchmarks.md)."""
    from perl.verl_glue.config.cpu import torch_threads

    reserved = int(os.environ.get("VLLM_CPU_NUM_OF_RESERVED_CPU", "0"))
    return max(1, torch_threads() - reserved)


def on_cpu() -> bool:
    """Whether verl resolved (or will resolve) this process to the CPU platform."""
    return get_platform().device_name == PLATFORM_NAME


def _gloo_process_group(init):
    """verl's `initialize_global_process_group_ray` builds the backend string
    `cpu:gloo,{device}:{backend}`, which names the cpu device twice on this platform; here the
    backend is plain gloo. Elsewhere the call is verl's, unchanged."""

    @functools.wraps(init)
    def initialize(timeout_second=None, backend=None):
        if backend is None and on_cpu():
            backend = "gloo"
        return init(timeout_second=timeout_second, backend=backend)

    initialize.__perl_wrapped__ = True
    return initialize


def install() -> None:
    """verl's `verl.plugins` entry point (idempotent): the platform is registered on import; the
    process-group wrapper is installed before verl's worker modules bind the function."""
    from verl.utils import distributed

    if not getattr(distributed.initialize_global_process_group_ray, "__perl_wrapped__", False):
        distributed.initialize_global_process_group_ray = _gloo_process_group(
            distributed.initialize_global_process_group_ray)


install()
