"""What a user asks for: a method name plus the shared PEFT knobs and method-specific options.

A spec is plain data (it round-trips through JSON and hydra `peft:` blocks); the registry turns it
into an adapted model. Validation happens here, before any model is touched, so that a bad recipe
fails in the first second with the field name and the allowed values.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

# The paper's PEFT settings (section 2.2): rank 32, alpha 64, dropout 0.05, all linear modules.
DEFAULT_RANK = 32
DEFAULT_ALPHA = 64.0
DEFAULT_DROPOUT = 0.05
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Short names used in the paper ({q,k,v,o,gate,up,down}_proj) are accepted as aliases.
TARGET_ALIASES = {
    "q": "q_proj",
    "k": "k_proj",
    "v": "v_proj",
    "o": "o_proj",
    "gate": "gate_proj",
    "up": "up_proj",
    "down": "down_proj",
}

SPEC_FIELDS = ("name", "rank", "alpha", "dropout", "target_modules", "options")


class MethodSpecError(ValueError):
    """A PEFT method spec that cannot be built (bad field, unknown method, foreign option)."""


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """One PEFT method request.

    `target_modules=None` means the method's own default (all 7 linear projections for the
    weight-update methods, k/v/down for IA3, every norm layer for LN tuning).
    `options` holds method-specific knobs (e.g. `lr_ratio` for LoRA+); the registry checks that each
    belongs to the chosen method and fills in the defaults.
    """

    name: str
    rank: int = DEFAULT_RANK
    alpha: float = DEFAULT_ALPHA
    dropout: float = DEFAULT_DROPOUT
    target_modules: tuple[str, ...] | None = None
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise MethodSpecError(f"peft.name must be a non-empty string, got {self.name!r}")
        object.__setattr__(self, "name", self.name.strip().lower().replace("-", "_"))
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise MethodSpecError(f"peft.rank must be an integer >= 1, got {self.rank!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not (
            math.isfinite(self.alpha) and self.alpha > 0
        ):
            raise MethodSpecError(f"peft.alpha must be a finite number > 0, got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not (0.0 <= self.dropout < 1.0):
            raise MethodSpecError(f"peft.dropout must be in [0, 1), got {self.dropout!r}")
        if self.target_modules is not None:
            targets = self.target_modules
            if isinstance(targets, str):
                targets = [t for t in targets.replace(",", " ").split() if t]
            targets = tuple(TARGET_ALIASES.get(str(t), str(t)) for t in targets)
            if not targets:
                raise MethodSpecError("peft.target_modules is empty; leave it unset for the method's default")
            object.__setattr__(self, "target_modules", targets)
        if not isinstance(self.options, Mapping):
            raise MethodSpecError(f"peft.options must be a mapping, got {type(self.options).__name__}")
        object.__setattr__(self, "options", dict(self.options))

    @property
    def scale(self) -> float:
        """LoRA's alpha / r (rsLoRA overrides this in its own method)."""
        return self.alpha / self.rank

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["target_modules"] = list(self.target_modules) if self.target_modules is not None else None
        d["options"] = dict(self.options)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MethodSpec:
        """Build from a flat or nested mapping (hydra `peft:` block, JSON).

        Keys other than the shared fields are treated as method options, so both
        `{name: lora_plus, lr_ratio: 16}` and `{name: lora_plus, options: {lr_ratio: 16}}` work.
        `method` is accepted as a synonym of `name`.
        """
        data = dict(data)
        if "method" in data and "name" not in data:
            data["name"] = data.pop("method")
        if "name" not in data:
            raise MethodSpecError("peft.name is required (the PEFT method to use)")
        options = dict(data.pop("options", None) or {})
        shared = {k: data.pop(k) for k in list(data) if k in SPEC_FIELDS}
        for key, value in data.items():
            if key in options:
                raise MethodSpecError(f"peft option {key!r} given twice (flat and under options)")
            options[key] = value
        if "target_modules" in shared and shared["target_modules"] is not None:
            tm = shared["target_modules"]
            shared["target_modules"] = tm if isinstance(tm, str) else tuple(tm)
        return cls(options=options, **shared)
