"""Getting the trained policy's weights into the rollout engine (and into merged checkpoints).

- `merge.py`    the one sync path: any method, plain or FSDP2-sharded -> dense HF-named pairs;
- `lora.py`     adapter-only sync in vLLM's LoRA format, for the LoRA family;
- `export.py`   a merged HF checkpoint directory that vLLM / `from_pretrained` load as is.
"""

from .merge import base_weights, hf_model, merged_state_dict, merged_weights

__all__ = ["base_weights", "hf_model", "merged_state_dict", "merged_weights"]
