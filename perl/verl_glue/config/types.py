"""Values of the right type and range for verl's schema, before Ray (and in the dry run).

verl's config is a hydra YAML tree, not a typed schema: `actor_rollout_ref.actor.optim.lr=abc`
merges fine and fails minutes later in a worker. verl's config dataclasses do not check types
either (they are built inside the workers), so the check is written here against verl's own
defaults: where verl's default is a number the value must be a number, where it is a bool a bool;
and the sizes below must be positive. PeRL's own blocks are typed in blocks.py.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from .errors import ConfigError

# Sizes and counts that must be >= the minimum (None, where verl allows it, is left to verl).
MINIMUM: dict[str, float] = {
    "data.train_batch_size": 1, "data.max_prompt_length": 1, "data.max_response_length": 1,
    "actor_rollout_ref.rollout.n": 1, "actor_rollout_ref.actor.ppo_mini_batch_size": 1,
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu": 1, "actor_rollout_ref.actor.ppo_epochs": 1,
    "actor_rollout_ref.actor.ppo_max_token_len_per_gpu": 1,
    "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu": 1,
    "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu": 1,
    "actor_rollout_ref.rollout.tensor_model_parallel_size": 1,
    "trainer.n_gpus_per_node": 1, "trainer.nnodes": 1, "trainer.total_training_steps": 1,
    "actor_rollout_ref.actor.optim.lr": 0, "actor_rollout_ref.rollout.temperature": 0,
}


def _kind(value: Any) -> str | None:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    return None


def _leaves(node: Any, prefix: str = ""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, f"{prefix}.{key}" if prefix else str(key))
    else:
        yield prefix, node


_TYPED_DEFAULTS: list[tuple[str, str, Any]] | None = None


def _typed_defaults() -> list[tuple[str, str, Any]]:
    """(key, kind, default) of every number or bool in verl's defaults, computed once a process: the
    defaults are fixed, and walking them (a copy of verl's whole tree) was most of this check's time."""
    global _TYPED_DEFAULTS
    if _TYPED_DEFAULTS is None:
        from .compose import verl_defaults

        defaults = OmegaConf.to_container(verl_defaults(), resolve=False)
        _TYPED_DEFAULTS = [(key, kind, default) for key, default in _leaves(defaults)
                           if (kind := _kind(default)) is not None]
    return _TYPED_DEFAULTS


def _select(values: dict, key: str) -> Any:
    """`OmegaConf.select(tree, key, default=None)` on the plain container (a dotted key, no lists)."""
    node: Any = values
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return None if node == "???" else node  # a missing value (OmegaConf's MISSING), as select gives


def check_types(cfg: DictConfig) -> None:
    """Refuse a value whose type is not the one verl's default has, or a size below its minimum,
    naming the key (ConfigError)."""
    try:
        values = OmegaConf.to_container(cfg, resolve=True)
    except Exception as e:  # an interpolation that does not resolve
        raise ConfigError(f"config: {e}") from None
    for key, kind, default in _typed_defaults():
        value = _select(values, key)
        if value is None or _kind(value) == kind:
            continue
        raise ConfigError(f"{key}={value!r}: verl expects a {kind} here (its default is {default!r})")
    for key, minimum in MINIMUM.items():
        value = _select(values, key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < minimum:
            raise ConfigError(f"{key}={value}: must be >= {minimum:g}")
