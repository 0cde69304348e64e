"""The PEFT method registry: `adapt(model, spec)` builds any of the 13 methods onto a HF causal LM.

Where things are:
- `spec.py`     the request (`MethodSpec`) and its validation, the paper's defaults;
- `base.py`     the `Method` contract and `AdaptedPolicy`, what trainers hold;
- `catalog.py`  the registry itself: one class per method, each with its capabilities (see `Method`)
                and its own merge rule; `register` makes a class known everywhere.
"""

from .base import AdaptedPolicy, Method, canonical_name, count_parameters, format_percent
from .catalog import (CATEGORIES, METHODS, LoraFamily, PeftTuner, adapt, get_method, load_adapted, method_names,
                      method_table, register)
from .spec import ALL_LINEAR, DEFAULT_ALPHA, DEFAULT_DROPOUT, DEFAULT_RANK, MethodSpec, MethodSpecError

__all__ = [
    "ALL_LINEAR",
    "CATEGORIES",
    "DEFAULT_ALPHA",
    "DEFAULT_DROPOUT",
    "DEFAULT_RANK",
    "METHODS",
    "AdaptedPolicy",
    "LoraFamily",
    "Method",
    "MethodSpec",
    "MethodSpecError",
    "PeftTuner",
    "adapt",
    "canonical_name",
    "count_parameters",
    "format_percent",
    "get_method",
    "load_adapted",
    "method_names",
    "method_table",
    "register",
]
