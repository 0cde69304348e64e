"""What a run's machine decides: its accelerator (verl's platform), its GPUs' memory, and on a GPU
node whether flash-attn is there.

verl 0.9.1 builds the actor with `attn_implementation=flash_attention_2` unless the config says
otherwise, and remove-padding runs flash-attn's varlen kernels; without flash-attn both end in an
ImportError inside a Ray worker. flash-attn is an optional install (README: it is a source package
whose build needs torch and nvcc), so on a GPU node without it `gpu_settings` picks sdpa and no
remove-padding, unless the recipe or the command line asked for either (then the check refuses,
naming the key). The notice `attention_note` says which was chosen.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

from omegaconf import DictConfig, OmegaConf

from .cpu import CPU_DEVICE
from .errors import ConfigError
from .layers import UserLayers, merge, nested

ATTN_KEY = "actor_rollout_ref.model.override_config.attn_implementation"
RMPAD_KEY = "actor_rollout_ref.model.use_remove_padding"
FLASH_ATTN = "flash_attention_2"  # verl 0.9.1's default (workers/config/model.py)
# Assumed per-GPU memory where neither torch.cuda nor perl.gpu_memory_gb gives it (a dry run on a
# machine without the GPU): an 80 GB A100/H100, the node the paper's recipes are written for.
ASSUMED_GPU_GB = 80.0
GB = 1e9


def flash_attn_available() -> bool:
    """flash-attn imports here (a build for another torch fails on import, not on lookup)."""
    try:
        importlib.import_module("flash_attn")
    except Exception:  # ImportError, or an undefined symbol of a build for another torch/CUDA
        return False
    return True


def gpu_settings(cfg: DictConfig, users: UserLayers) -> DictConfig:
    """A GPU run where flash-attn does not import: sdpa and no remove-padding, where the recipe and
    the overrides leave them unset (a key they set is kept; `check_flash_attn` then refuses it)."""
    if flash_attn_available():
        return cfg
    layer: dict[str, Any] = {}
    if users.value(ATTN_KEY)[0] is None:
        layer[ATTN_KEY] = "sdpa"
    if users.value(RMPAD_KEY)[0] is None:
        layer[RMPAD_KEY] = False
    return merge(cfg, nested(layer), "GPU settings without flash-attn", allow_new=True) if layer else cfg


def needs_flash_attn(cfg: DictConfig) -> list[str]:
    """The keys of `cfg` that need flash-attn (`key=value`), empty if none."""
    attn = OmegaConf.select(cfg, ATTN_KEY, default=None) or FLASH_ATTN
    needs = [f"{ATTN_KEY}={attn}"] if attn == FLASH_ATTN else []
    if OmegaConf.select(cfg, RMPAD_KEY, default=False):
        needs.append(f"{RMPAD_KEY}=true")
    return needs


def attention_note(cfg: DictConfig) -> str | None:
    """One line for the first screen when a GPU run goes without flash-attn."""
    if cfg.trainer.device == CPU_DEVICE or flash_attn_available() or needs_flash_attn(cfg):
        return None
    return (f"flash-attn does not import here: attention runs through sdpa without remove-padding "
            f"({ATTN_KEY}=sdpa, {RMPAD_KEY}=false; slower and more memory at long lengths). Install flash-attn "
            "(README, On a GPU node) for flash_attention_2 and remove-padding")


def check_flash_attn(cfg: DictConfig) -> None:
    """On this node (not a dry run): a GPU run whose config needs flash-attn has it."""
    needs = needs_flash_attn(cfg)
    if cfg.trainer.device == CPU_DEVICE or not needs or flash_attn_available():
        return
    raise ConfigError(f"{' and '.join(needs)} need flash-attn, which does not import here (verl would fail in "
                      f"the Ray worker building the actor). Install it (README, On a GPU node), or set "
                      f"{ATTN_KEY}=sdpa {RMPAD_KEY}=false (or leave both unset: PeRL then picks them)")


def visible_gpus() -> list[tuple[int, str, float]]:
    """(index, name, memory in GB) of every GPU torch sees; empty without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        out.append((i, str(props.name), props.total_memory / GB))
    return out


def gpu_memory_gb(cfg: DictConfig) -> tuple[float, str]:
    """(GB per GPU, where it comes from): perl.gpu_memory_gb, else the smallest visible GPU, else
    `ASSUMED_GPU_GB`."""
    given = OmegaConf.select(cfg, "perl.gpu_memory_gb", default=None)
    if given is not None:
        if float(given) <= 0:
            raise ConfigError(f"perl.gpu_memory_gb must be > 0 (GB per GPU) or null, got {given}")
        return float(given), "perl.gpu_memory_gb"
    gpus = visible_gpus()
    if gpus:
        i, name, gb = min(gpus, key=lambda g: g[2])
        return gb, f"GPU {i}, {name}"
    return ASSUMED_GPU_GB, "assumed: no GPU visible here; set perl.gpu_memory_gb for another size"


def check_device(cfg: DictConfig) -> None:
    """trainer.device must be what this machine is: a GPU recipe on a machine without an accelerator
    (or the CPU path on a GPU node) fails here, before Ray starts."""
    import torch
    from verl.plugin.platform import get_platform

    detected = get_platform().device_name
    wanted = str(cfg.trainer.device)
    asked = os.environ.get("VERL_PLATFORM", "").strip().lower()
    if wanted != CPU_DEVICE and detected == CPU_DEVICE:
        how = (" (VERL_PLATFORM=cpu is set: unset it)" if asked == CPU_DEVICE else
               f" (torch {torch.__version__} is a CPU build: a GPU node needs a CUDA torch, README)")
        raise ConfigError(f"trainer.device={wanted}, but this machine has no accelerator (verl found no CUDA, ROCm or "
                          f"NPU device){how}: this is a GPU recipe. On a CPU, verl's trainer runs small models with "
                          "vLLM's CPU build: set trainer.device=cpu (examples/toy.yaml does), or run the recipe on a "
                          "GPU node")
    if wanted == CPU_DEVICE and detected != CPU_DEVICE:
        raise ConfigError(f"trainer.device=cpu, but verl's platform here is {detected}"
                          + (f" (VERL_PLATFORM={asked})" if asked else "") + ": PeRL's CPU path is for machines "
                          f"without an accelerator. Set trainer.device={detected} (and drop the CPU settings), or "
                          "force the CPU platform with VERL_PLATFORM=cpu")
    if detected == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"trainer.device={wanted}: verl's platform is CUDA (torch {torch.__version__}, CUDA "
                          f"{torch.version.cuda}) but torch sees no CUDA device (torch.cuda.is_available() is False; "
                          f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}). Check the "
                          "driver and the container's GPU access, then `perl check --config RECIPE`")
