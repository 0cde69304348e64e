"""PeRL's own config blocks, typed: `peft:`, `perl:` and `perl.heldout`.

verl's part of the config is verl's closed hydra schema; these blocks are PeRL's. Each is a
dataclass with a help line per field (as TRL's `GRPOConfig` documents its knobs), so the allowed
keys, their types and what they do live in one place: an unknown key or a value of the wrong type
is refused naming the field. The defaults a run starts from are `perl_dapo.yaml`'s (commented
there); tests/test_verl_config.py checks that the YAML and these dataclasses list the same keys.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

from perl.methods.spec import DEFAULT_ALPHA, DEFAULT_DROPOUT, DEFAULT_RANK

from .errors import ConfigError

ADAPTER_SYNC = ("merged", "adapter")
SYNC_DTYPES = ("bfloat16", "float16", "float32")


def _f(default: Any, help: str) -> Any:
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class PeftBlock:
    """`peft:`: the PEFT method that adapts the actor (perl.methods)."""

    name: str = _f(None, "the method: any name of `perl methods` (perl_dapo.yaml's default: LoRA)")
    rank: int = _f(DEFAULT_RANK, "adapter rank r (paper: 32)")
    alpha: float = _f(DEFAULT_ALPHA, "LoRA scaling alpha (paper: 64)")
    dropout: float = _f(DEFAULT_DROPOUT, "dropout on the adapter's input (paper: 0.05)")
    target_modules: list | str | None = _f(None, "modules to adapt; null: the method's default")
    options: dict = _f({}, "method-specific knobs, e.g. {lr_ratio: 16} for lora_plus (perl methods)")
    adapter_sync: str = _f("merged", f"rollout weight sync: {' | '.join(ADAPTER_SYNC)} (adapter: LoRA family only)")
    sync_dtype: str | None = _f(None, f"dtype sent to the rollout ({', '.join(SYNC_DTYPES)}); null: rollout.dtype")


@dataclass
class HeldoutBlock:
    """`perl.heldout`: held-out Avg@k before and after the run (perl.verl_glue.heldout)."""

    data: str | None = _f(None, "a parquet in verl's schema; null: no held-out evaluation")
    k: int = _f(4, "samples per problem (Avg@k / Pass@k)")
    seed: int = _f(42, "base seed; every sample gets its own")
    temperature: float | None = _f(None, "null: the rollout's temperature")
    top_p: float | None = _f(None, "null: the rollout's top_p")


@dataclass
class PerlBlock:
    """`perl:`: what PeRL adds around verl's trainer."""

    algorithm: str = _f("dapo", "dapo | grpo | drgrpo: the paper's algorithm presets (compose.PRESETS)")
    loss_mode: str = _f("token", "token (verl's policy loss) | sgrpo | tspmo (arXiv 2504.20834)")
    sgrpo: dict | None = _f(None, "S-GRPO token selection {alpha, k, p, weighting} (loss_mode=sgrpo)")
    overlong_buffer: dict = _f({"enable": False, "len": 4096, "penalty_factor": 1.0, "log": False},
                               "DAPO's soft overlong punishment (verl's DAPO reward manager)")
    data_dir: str | None = _f(None, "directory that relative data.train_files / val_files are under")
    heldout: dict | None = _f({}, "held-out evaluation (HeldoutBlock); null: none")
    toy: dict | None = _f(None, "the embedded default's task (perl.toy.task.ToyTask); null: off")
    dataset_rows: int | None = _f(None, "training-set rows for the run arithmetic when the parquet is not at hand")
    derived: dict | None = _f(None, "written by PeRL: the run arithmetic (do not set)")
    over_dispatch: bool = _f(True, "dynamic sampling sends extra prompts with each batch, sized by the last steps' "
                                   "drop rate, so that refill rounds are rare (perl.verl_glue.sampler); false: "
                                   "verl's exact batch, refilled in rounds")
    old_log_probs: str = _f("auto", "auto: from the update's own forward when a trainer step is one optimizer step "
                                    "(perl.verl_glue.on_policy) | recompute: verl's separate pass")
    dump_rollout_tokens: bool = _f(False, "write each step's batch as token ids + log-probs (<run>/rollouts/)")
    seeded_rollouts: bool = _f(False, "each completion sampled with its own seed from rollout.seed, the step, the "
                                      "prompt's index and its place in the group: rollouts reproducible")
    reward: dict = _f({}, "the math reward's format rules (perl.reward.reward_config); {}: the paper's")
    gpu_memory_gb: float | None = _f(None, "GB per GPU for the memory estimate of the config check; null: the "
                                           "smallest GPU torch sees, else 80 (a dry run elsewhere)")
    label: str | None = _f(None, "the run's row name in tables and plots; null: the method (and its loss)")
    console: str = _f("quiet", "quiet: a first screen and one line per step, library logs in <run>/logs/; "
                                "verbose: every library's output on the terminal too")


CONSOLE_MODES = ("quiet", "verbose")
OLD_LOG_PROBS_MODES = ("auto", "recompute")  # perl.verl_glue.on_policy


def _matches(value: Any, annotation: Any) -> bool:
    """`value` (a plain container value) fits the field's annotation (int, float, str, bool, list,
    dict, unions with None). An int fits a float; a bool fits only bool."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is Any:
        return True
    if annotation is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if annotation is float:
        return isinstance(value, (int, float))
    return isinstance(value, annotation)


def _type_name(annotation: Any) -> str:
    args = typing.get_args(annotation)
    if args:
        return " or ".join("null" if a is type(None) else a.__name__ for a in args)
    return annotation.__name__


def read_block(cls: type, node: DictConfig | dict | None, where: str, hint: str = "") -> Any:
    """The block as `cls`, checked: every key known and of its field's type (else ConfigError)."""
    block = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node or {})
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(block) - set(names))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {', '.join(names)}" + (f" ({hint})" if hint else ""))
    for key, value in block.items():
        if not _matches(value, hints[key]):
            raise ConfigError(f"{where}.{key}: {value!r} is not a {_type_name(hints[key])} "
                              f"({help_of(cls, key)})")
    return cls(**block)


def help_of(cls: type, name: str) -> str:
    return next(f.metadata.get("help", "") for f in dataclasses.fields(cls) if f.name == name)
