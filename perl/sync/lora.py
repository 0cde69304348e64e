"""Adapter-only sync for the LoRA family, in the format vLLM's LoRA path takes.

vLLM applies plain LoRA adapters (`W x + s * B A x`) and nothing else, so only methods whose
forward is exactly that qualify (`Method.vllm_lora`: lora, rslora, lora_plus, lora_fa, and
pissa/milora on top of their residual base, `Method.residual_base`: send `base_weights(policy)`
once, then adapters). Merged sync (`merged_weights`) stays the default: vLLM's LoRA kernels slow
generation.
"""

from __future__ import annotations

from typing import Any

import torch

from perl.methods import method_names
from perl.methods.base import AdaptedPolicy


def lora_sync_config(policy: AdaptedPolicy) -> dict:
    """The adapter's peft config as the receiving side needs it: the tensors sent are final, so
    nothing is initialised there (`init_lora_weights=True`)."""
    config = policy.model.peft_config["default"].to_dict()
    config["init_lora_weights"] = True
    return config


def lora_adapter(policy: AdaptedPolicy, dtype: torch.dtype | None = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(peft LoRA config as a dict, tensors named as in a peft adapter file) for vLLM.

    verl passes exactly this pair to vLLM as `TensorLoRARequest(peft_config=..., lora_tensors=...)`.
    """
    from peft import get_peft_model_state_dict

    if not policy.method.vllm_lora:
        raise ValueError(
            f"adapter-only sync serves plain LoRA only; {policy.name} is not (vLLM has no format for it, "
            f"or rejects it as for DoRA): use merged sync. Adapter sync works for: "
            f"{', '.join(method_names(lambda m: m.vllm_lora))}"
        )
    config = lora_sync_config(policy)
    for key in ("peft_type", "task_type"):
        config[key] = str(getattr(config[key], "value", config[key]))
    tensors = {}
    for name, t in get_peft_model_state_dict(policy.model).items():
        full = t.full_tensor() if hasattr(t, "full_tensor") else t
        tensors[name] = full.detach().to(dtype=dtype or full.dtype, copy=True)
    return config, tensors
