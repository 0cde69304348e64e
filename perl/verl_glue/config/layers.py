"""Config layers: parsing `key=value` overrides, merging a layer into verl's closed schema with an
error naming the unknown key, and asking which layer a user wrote set a key."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from .errors import ConfigError

_ABSENT = object()


def parse_overrides(overrides: Sequence[str]) -> tuple[DictConfig, DictConfig]:
    """`key=value` (must exist) and `+key=value` (may add) command-line overrides, hydra style."""
    strict, add = [], []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value (or +key=value to add a key)")
        if item.startswith("~"):
            raise ConfigError(f"override {item!r}: deleting keys is not supported; set the value instead")
        (add if item.startswith("+") else strict).append(item.lstrip("+"))
    try:
        return OmegaConf.from_dotlist(strict), OmegaConf.from_dotlist(add)
    except OmegaConfBaseException as e:
        raise ConfigError(f"overrides: {e}") from None


def merge(cfg: DictConfig, layer: DictConfig | Mapping, what: str, *, allow_new: bool = False) -> DictConfig:
    """Merge `layer` into `cfg`; an unknown key is an error naming it (verl's config is a closed schema).
    An empty layer returns `cfg` itself (a merge would deep-copy verl's whole config for nothing)."""
    if not layer:
        return cfg
    try:
        if allow_new:
            with open_dict(cfg):
                return OmegaConf.merge(cfg, layer)
        return OmegaConf.merge(cfg, layer)
    except ConfigKeyError as e:
        key = getattr(e, "full_key", None) or str(e)
        raise ConfigError(
            f"{what}: unknown key {key!r} (not in verl's ppo_trainer config nor in PeRL's peft:/perl: blocks); "
            "check the spelling, or use +key=value on the command line to add a key deliberately"
        ) from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"{what}: {e}") from None


def nested(flat: Mapping[str, Any]) -> DictConfig:
    """{"a.b": 1} -> {a: {b: 1}}, values kept as they are (no string parsing)."""
    out = OmegaConf.create({})
    for key, value in flat.items():
        OmegaConf.update(out, key, value, force_add=True)
    return out


def open_free_form(cfg: DictConfig, *paths: str) -> None:
    """Let free-form subtrees (method options, reward kwargs) take keys verl's schema does not list."""
    for path in paths:
        node = OmegaConf.select(cfg, path)
        if isinstance(node, DictConfig):
            OmegaConf.set_struct(node, False)


_ABSENT = object()


def pick(key: str, *layers: DictConfig, default: Any = None) -> Any:
    """`key` from the first layer that sets it; an explicit null counts (`perl.toy=null` on the
    command line drops the recipe's toy block)."""
    for layer in layers:
        value = OmegaConf.select(layer, key, default=_ABSENT)
        if value is not _ABSENT:
            return value
    return default


class UserLayers:
    """The layers a user wrote (recipe, overrides), to ask who set a key."""

    def __init__(self, recipe: DictConfig, strict: DictConfig, add: DictConfig) -> None:
        self.layers = ((recipe, "recipe"), (strict, "override"), (add, "override"))

    def value(self, key: str) -> tuple[Any, str | None]:
        """(value, where) of the first user layer that sets `key` to a non-null value."""
        for layer, name in self.layers:
            value = OmegaConf.select(layer, key, default=None)
            if value is not None:
                return value, name
        return None, None

    def refuse(self, keys: Sequence[str], why: str) -> None:
        for key in keys:
            value, where = self.value(key)
            if value is not None:
                raise ConfigError(f"{key} {why} (found in the {where})")
