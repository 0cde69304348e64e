"""A merged HF checkpoint directory (safetensors + config + tokenizer) from a trained policy.

vLLM and `AutoModelForCausalLM.from_pretrained` load the result as is. Written through the
streaming sync path (one module in memory at a time, shards flushed as they fill) into a temporary
sibling directory that is renamed into place at the end.
"""

from __future__ import annotations

import json
import os
import shutil

import torch
from tqdm import tqdm

from perl.io import atomic_dir
from perl.methods.base import AdaptedPolicy

from .merge import hf_model, merged_weights

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}
# Files a tokenizer / generation setup may consist of (HF and sentencepiece layouts).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"dtype: {name!r} is not one of {sorted(DTYPES)}")
    return DTYPES[name]


def parse_size(size: str | int) -> int:
    if isinstance(size, int):
        return size
    s = size.strip().upper()
    for unit, mult in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)


def export_merged(policy: AdaptedPolicy, out_dir: str, *, dtype: str | torch.dtype = "bf16",
                  tokenizer_dir: str | None = None, max_shard_size: str | int = "2GB", progress: bool = True) -> str:
    from safetensors.torch import save_file

    dt = parse_dtype(dtype)
    limit = parse_size(max_shard_size)
    with atomic_dir(out_dir) as tmp:
        shards: list[dict[str, torch.Tensor]] = [{}]
        written: list[str] = []
        weight_map: dict[str, str] = {}
        size = total = 0

        def flush() -> None:
            name = f"part-{len(written):05d}.safetensors"
            save_file(shards[-1], os.path.join(tmp, name), metadata={"format": "pt"})
            written.append(name)
            for key in shards[-1]:
                weight_map[key] = name
            shards[-1] = {}

        pairs = merged_weights(policy, dt)
        for name, tensor in tqdm(pairs, desc="export", unit="tensor", disable=not progress):
            nbytes = tensor.numel() * tensor.element_size()
            if shards[-1] and size + nbytes > limit:
                flush()
                size = 0
            shards[-1][name] = tensor
            size += nbytes
            total += nbytes
        if shards[-1]:
            flush()
        if len(written) == 1:
            os.replace(os.path.join(tmp, written[0]), os.path.join(tmp, "model.safetensors"))
        else:
            final = {w: f"model-{i + 1:05d}-of-{len(written):05d}.safetensors" for i, w in enumerate(written)}
            for w, f in final.items():
                os.replace(os.path.join(tmp, w), os.path.join(tmp, f))
            index = {"metadata": {"total_size": total}, "weight_map": {k: final[v] for k, v in weight_map.items()}}
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump(index, f, indent=2)
        config = hf_model(policy.model).config
        config = config.__class__.from_dict(config.to_dict())
        config.dtype = dt
        config.save_pretrained(tmp)
        if tokenizer_dir:
            for fname in TOKENIZER_FILES:
                src = os.path.join(tokenizer_dir, fname)
                if os.path.exists(src):
                    shutil.copy2(src, os.path.join(tmp, fname))
    return os.path.abspath(out_dir)


def export_adapter_merged(base_dir: str, adapter_dir: str, out_dir: str, **kwargs) -> tuple[str, str]:
    """A saved adapter merged into its base model (loaded in fp32) and written as an HF checkpoint:
    (out_dir, method name). `kwargs` go to `export_merged` (dtype, tokenizer_dir, max_shard_size)."""
    from transformers import AutoModelForCausalLM

    from perl.methods import load_adapted

    policy = load_adapted(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), adapter_dir)
    return export_merged(policy, out_dir, **kwargs), policy.name
