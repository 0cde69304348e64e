"""The configuration of a PeRL run on verl: verl's hydra `ppo_trainer` + PeRL's `peft:` / `perl:` blocks.

By concern, one module each:

- `compose.py`  layering (verl defaults <- `perl_dapo.yaml` <- algorithm preset <- recipe <-
                overrides <- the method's lr <- derived), recipes with `defaults:`, presets;
- `blocks.py`   PeRL's typed blocks (`peft:`, `perl:`, `perl.heldout`) with a help line per field;
- `derive.py`   translation into the keys verl reads (engine block, reward, sampler, trainer);
- `batches.py`  the batch arithmetic (perl.derived) and the divisibility verl needs;
- `checks.py`   every check that can run before Ray starts (`check`);
- `gpu.py`      the machine: verl's platform, GPU memory, flash-attn or sdpa on a GPU node;
- `gpu_checks.py` a run against its GPU node: parallel sizes, token budgets, the sync backend, the
                memory estimate;
- `cpu.py`      trainer.device=cpu: the settings a CPU run needs, and the CPU profile `cpu.yaml`;
- `toy.py`      the `perl.toy` hook: the only glue module that imports perl.toy.

Nothing here starts Ray, vLLM or a GPU.
"""

from .batches import check_batches, dataset_rows, format_arithmetic, run_arithmetic, updates_per_step
from .blocks import HeldoutBlock, PeftBlock, PerlBlock, read_block
from .checks import (adapted_summary, check, check_algorithm, check_data, check_rollout, check_vllm, model_dir,
                     model_head_dim, model_source, verl_validate, vllm_available)
from .compose import ALGORITHMS, PRESETS, compose, load_recipe, parse_overrides, resolved, verl_defaults
from .cpu import CPU_DEVICE, CPU_POLL_S, CPU_REQUIRED, GPU_POLL_S, cpu_defaults, request_cpu_platform
from .derive import (ENGINE_LIB, PERL_TRAINER_MODE, SAMPLER_NAME, SYNC_TRAINER_MODES, derive, peft_spec, run_dir)
from .errors import ConfigError
from .gpu import check_device, flash_attn_available, gpu_memory_gb, visible_gpus
from .gpu_checks import estimate_memory, gpu_run_checks
from .toy import materialize_toy

__all__ = [
    "ALGORITHMS", "CPU_DEVICE", "CPU_POLL_S", "CPU_REQUIRED", "ENGINE_LIB", "GPU_POLL_S", "PERL_TRAINER_MODE",
    "PRESETS", "SAMPLER_NAME", "SYNC_TRAINER_MODES", "ConfigError", "HeldoutBlock", "PeftBlock", "PerlBlock",
    "adapted_summary", "check", "check_algorithm", "check_batches", "check_data", "check_device", "check_rollout",
    "check_vllm", "compose", "cpu_defaults", "dataset_rows", "derive", "estimate_memory", "flash_attn_available",
    "format_arithmetic", "gpu_memory_gb", "gpu_run_checks", "load_recipe", "materialize_toy", "model_dir", "model_head_dim",
    "model_source", "parse_overrides", "peft_spec", "read_block", "request_cpu_platform", "resolved", "run_arithmetic",
    "run_dir", "updates_per_step", "verl_defaults", "verl_validate", "visible_gpus", "vllm_available",
]
