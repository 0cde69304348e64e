"""Composition: verl defaults <- PeRL base <- algorithm preset <- method lr <- recipe <- overrides <- derived.

`compose(user, overrides)` builds the full run config; the layering is documented in
`perl_dapo.yaml`. Composition only merges and refuses unknown keys; what the merged config means
for verl is `derive.py`, what could fail later is `checks.py`.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from perl.methods.catalog import METHODS

from .cpu import CPU_DEVICE, cpu_settings
from .derive import derive, loss_mode_overrides
from .errors import ConfigError
from .gpu import gpu_settings
from .layers import UserLayers, merge, nested, open_free_form, parse_overrides, pick
from .toy import TOY_KEYS

CONFIG_DIR = os.path.dirname(os.path.abspath(__file__))
BASE_YAML = os.path.join(CONFIG_DIR, "perl_dapo.yaml")

# What each algorithm of the paper's ablation changes on top of the DAPO base.
PRESETS: dict[str, dict[str, Any]] = {
    "dapo": {},
    # GRPO (paper eq. 1): symmetric clip, per-sequence token mean, no dynamic sampling
    "grpo": {
        "actor_rollout_ref.actor.clip_ratio_high": 0.2,
        "actor_rollout_ref.actor.loss_agg_mode": "seq-mean-token-mean",
        "algorithm.filter_groups.enable": False,
    },
    # Dr. GRPO: no length normalisation (constant horizon), no std normalisation of advantages
    "drgrpo": {
        "actor_rollout_ref.actor.clip_ratio_high": 0.2,
        "actor_rollout_ref.actor.loss_agg_mode": "seq-mean-token-sum-norm",
        "actor_rollout_ref.actor.loss_scale_factor": "${data.max_response_length}",
        "algorithm.norm_adv_by_std_in_grpo": False,
        "algorithm.filter_groups.enable": False,
    },
}
ALGORITHMS = tuple(PRESETS)
LR_KEY = "actor_rollout_ref.actor.optim.lr"

# Keys PeRL writes itself (from peft:/perl:); a recipe setting them would be silently overwritten.
DERIVED = (
    "actor_rollout_ref.model.lora_rank",
    "actor_rollout_ref.model.lora.perl",
    "actor_rollout_ref.model.lora.merge",
    "ray_kwargs.ray_init.num_gpus",
    "perl.derived",
)

_VERL_DEFAULTS: DictConfig | None = None


def verl_defaults() -> DictConfig:
    """verl 0.9.1's `ppo_trainer` config, composed with hydra exactly as `verl.trainer.main_ppo` does."""
    global _VERL_DEFAULTS
    if _VERL_DEFAULTS is None:
        import verl
        from hydra import compose as hydra_compose
        from hydra import initialize_config_dir
        from hydra.core.global_hydra import GlobalHydra

        config_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=config_dir, version_base=None):
            _VERL_DEFAULTS = hydra_compose(config_name="ppo_trainer")
    return copy.deepcopy(_VERL_DEFAULTS)


def method_lr_layer(method: str, cfg_lr: float, strict: DictConfig, add: DictConfig) -> DictConfig | None:
    """The lr of a method that trains at a multiple of the adapters' lr (`Method.lr_scale`: full
    fine-tuning at 0.1x, the paper's 1e-6 against 1e-5). One rule everywhere: the lr of the base and
    the recipe is the adapters' lr and the method scales it; an lr given on the command line is the
    run's lr as it stands. (So `bash scripts/run.sh peft.name=full` and `perl bench toy` agree.)"""
    m = METHODS.get(method)
    if m is None or m.lr_scale == 1.0 or pick(LR_KEY, add, strict, default=None) is not None:
        return None
    return nested({LR_KEY: m.lr_for(cfg_lr)})


def compose(user: DictConfig | Mapping | str | None = None, overrides: Sequence[str] = ()) -> DictConfig:
    """The full run config: verl defaults <- PeRL base <- algorithm preset <- recipe <- overrides <-
    the method's lr <- derived.

    `user` is a recipe: a mapping, a DictConfig or a YAML path. Raises `ConfigError` on unknown keys,
    an unknown algorithm or method, or an invalid peft/perl block.
    """
    if isinstance(user, str):
        user = load_recipe(user)
    user = OmegaConf.create(dict(user) if isinstance(user, Mapping) and not isinstance(user, DictConfig) else user or {})
    strict, add = parse_overrides(overrides)

    base = OmegaConf.load(BASE_YAML)
    algorithm = str(pick("perl.algorithm", add, strict, user, base))
    if algorithm not in ALGORITHMS:
        raise ConfigError(f"perl.algorithm: {algorithm!r} is not one of {', '.join(ALGORITHMS)}")
    method = str(pick("peft.name", add, strict, user, base)).strip().lower().replace("-", "_")
    loss_strict, loss_add = loss_mode_overrides(pick("perl.loss_mode", add, strict, user, base, default="token"),
                                                pick("perl.sgrpo", add, strict, user, base))

    cfg = verl_defaults()
    with open_dict(cfg):
        cfg.peft = base.pop("peft")
        cfg.perl = base.pop("perl")
        cfg.reward.reward_kwargs = {}
    # free-form in verl too: reward kwargs go to the reward function, runtime_env to ray.init
    open_free_form(cfg, "peft", "perl", "reward.reward_kwargs", "ray_kwargs.ray_init.runtime_env")
    layers = [(base, "perl/verl_glue/config/perl_dapo.yaml"),
              (nested(PRESETS[algorithm]), f"perl.algorithm={algorithm} preset"),
              (loss_strict, "perl.loss_mode"), (user, "recipe"), (strict, "override")]
    try:  # one merge into verl's (large, closed) schema; per layer only to name the culprit of an error
        cfg = OmegaConf.merge(cfg, OmegaConf.merge(*[layer for layer, _ in layers]))
    except OmegaConfBaseException:
        for layer, what in layers:
            cfg = merge(cfg, layer, what)
        raise
    lr = method_lr_layer(method, OmegaConf.select(cfg, LR_KEY), strict, add)
    if lr is not None:
        cfg = merge(cfg, lr, f"peft.name={method}")
    cfg = merge(cfg, loss_add, "perl.loss_mode", allow_new=True)
    cfg = merge(cfg, add, "+override", allow_new=True)
    users = UserLayers(user, strict, add)
    users.refuse(DERIVED, "is derived by PeRL (from the peft:/perl: blocks, or on CPU from trainer.n_gpus_per_node); "
                          "do not set it")
    if pick("perl.toy", add, strict, user) is not None:
        users.refuse(TOY_KEYS, "is set by perl.toy (the toy's cold start and data sets); remove it, or drop "
                                   "perl.toy to train another model or data")
    if cfg.trainer.device == CPU_DEVICE:
        cfg = cpu_settings(cfg, users)
    else:  # without flash-attn on this node: sdpa, no remove-padding (config/gpu.py)
        cfg = gpu_settings(cfg, users)
    derive(cfg)
    return cfg


def load_recipe(path: str, _chain: tuple[str, ...] = ()) -> DictConfig:
    """A recipe YAML. Its optional `defaults:` list names other YAML files (paths relative to the
    recipe) that are merged first, in order, then the recipe itself; included files may include
    others. This is how recipes/ shares a scale (model, batch sizes, steps) between recipes."""
    if not os.path.exists(path):
        raise ConfigError(f"--config: {path} does not exist" + (f" (in the defaults of {_chain[-1]})" if _chain else ""))
    real = os.path.realpath(path)
    if real in _chain:
        raise ConfigError(f"recipe defaults: {path} includes itself ({' -> '.join([*_chain, real])})")
    try:
        node = OmegaConf.load(path)
    except Exception as e:  # yaml / omegaconf parse errors
        raise ConfigError(f"--config {path}: {e}") from None
    if not isinstance(node, DictConfig):
        raise ConfigError(f"--config {path}: a recipe is a mapping of config keys")
    includes = node.pop("defaults", None)
    if includes is None:
        return node
    includes = [includes] if isinstance(includes, str) else includes
    if not isinstance(includes, ListConfig) or not all(isinstance(i, str) for i in includes):
        raise ConfigError(f"{path}: defaults must be a list of YAML paths relative to the recipe")
    here = os.path.dirname(path)
    layers = [load_recipe(os.path.join(here, i), (*_chain, real)) for i in includes]
    return OmegaConf.merge(*layers, node)


def resolved(cfg: DictConfig) -> DictConfig:
    out = copy.deepcopy(cfg)
    OmegaConf.resolve(out)
    return out
