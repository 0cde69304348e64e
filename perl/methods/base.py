"""The contract every PEFT method fulfils, and the adapted policy the trainer holds.

A `Method` knows how to build itself onto a HF causal LM and what the trainer must do for it
(optimizer groups, a per-step hook, an extra loss term, save/load). `AdaptedPolicy` binds one
method to one model and is the only object trainers (verl engine, local engine) talk to.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from .spec import MethodSpec, MethodSpecError

METADATA_FILE = "perl_method.json"
FORMAT_VERSION = 1

# Wrapper prefixes that FSDP1, activation checkpointing and torch.compile insert into parameter
# names. Method logic keys on canonical names so that it stays right under those wrappers.
_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def canonical_name(name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()  # a DTensor reports its global size
    return total


def fp32(t: torch.Tensor) -> torch.Tensor:
    """A detached fp32 copy or view (merge rules compute in fp32)."""
    return t.detach().to(torch.float32)


def active_in(layer: nn.Module, store) -> list[str]:
    """The layer's active adapters that `store` (one of its per-adapter dicts) holds, in order: what a
    merge rule folds in."""
    return [adapter for adapter in layer.active_adapters if adapter in store]


def check_linear(layer: nn.Module) -> None:
    """Merge rules write `W + dW` in nn.Linear's (out, in) layout; refuse transposed Conv1D layers."""
    if getattr(layer, "fan_in_fan_out", False):
        raise NotImplementedError(f"{type(layer).__name__}: fan_in_fan_out (Conv1D) layers are not supported by the sync")


def _is_norm(module: nn.Module) -> bool:
    cls = type(module).__name__
    return isinstance(module, nn.LayerNorm) or cls.endswith("RMSNorm") or cls.endswith("LayerNorm")


def find_modules(model: nn.Module, leaf_names: tuple[str, ...]) -> dict[str, list[str]]:
    """Map each requested leaf name to the full module names it matches (peft's suffix rule)."""
    found: dict[str, list[str]] = {t: [] for t in leaf_names}
    for full_name, _ in model.named_modules():
        for target in leaf_names:
            if full_name == target or full_name.endswith("." + target):
                found[target].append(full_name)
    return found


def resolve_targets(model: nn.Module, targets: tuple[str, ...], kind: str, method: str) -> tuple[str, ...]:
    """Check that every target names at least one module of the right kind; raise otherwise."""
    found = find_modules(model, targets)
    modules = dict(model.named_modules())
    want = (lambda m: isinstance(m, nn.Linear)) if kind == "linear" else _is_norm
    arch = type(model).__name__
    for target, names in found.items():
        if not names:
            raise MethodSpecError(
                f"peft.target_modules: {target!r} matches no module of {arch} (method {method}); "
                f"{kind} modules available: {sorted(available_leaf_names(model, kind))}"
            )
        wrong = [n for n in names if not want(modules[n])]
        if wrong:
            raise MethodSpecError(
                f"peft.target_modules: {target!r} matches {type(modules[wrong[0]]).__name__} module "
                f"{wrong[0]!r}, but {method} adapts {kind} modules; "
                f"available: {sorted(available_leaf_names(model, kind))}"
            )
    return tuple(targets)


def available_leaf_names(model: nn.Module, kind: str) -> set[str]:
    want = (lambda m: isinstance(m, nn.Linear)) if kind == "linear" else _is_norm
    return {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if name and want(m)}


def norm_leaf_names(model: nn.Module) -> tuple[str, ...]:
    """Every norm layer of the blocks plus the final norm, by leaf name, in model order."""
    names: list[str] = []
    for full_name, module in model.named_modules():
        if full_name and _is_norm(module):
            leaf = full_name.rsplit(".", 1)[-1]
            if leaf not in names:
                names.append(leaf)
    return tuple(names)


class Method:
    """One PEFT method. Subclasses live in `perl.methods.catalog` (the registry)."""

    name: ClassVar[str]
    category: ClassVar[str]  # the paper's grouping: Baseline, Structural, Efficient, Initialization, Other
    summary: ClassVar[str]
    options: ClassVar[dict[str, Any]] = {}  # method-specific options and their defaults
    target_kind: ClassVar[str | None] = "linear"  # "linear", "norm", or None (no targets)

    # ----- capabilities: what the trainer, the sync and the analysis ask a method (never its name) -----
    # Trains every weight of the model itself: no adapter (nothing to disable for a reference policy,
    # verl's lora_rank is 0), the whole model is the checkpoint, 100% trainable in the tables.
    trains_every_parameter: ClassVar[bool] = False
    # Its learning rate relative to the adapters' (the paper: full fine-tuning at 1e-6 against 1e-5);
    # see `lr_for`.
    lr_scale: ClassVar[float] = 1.0
    # Its forward is exactly W x + s * B A x, the one adapter form vLLM's LoRA path applies: it may be
    # synced to vLLM as a LoRA adapter (`peft.adapter_sync=adapter`) instead of merged weights.
    vllm_lora: ClassVar[bool] = False
    # Its frozen base is the residual W - s * B0 A0 (PiSSA/MiLoRA), not the checkpoint's W: an adapter
    # sync must send that base once, and the reference policy is the initial adapter, not no adapter.
    residual_base: ClassVar[bool] = False
    # Its whole trainable state sits under `lora_` keys (what verl's `save_lora_only` keeps).
    lora_keyed: ClassVar[bool] = False
    # It schedules itself over the run (AdaLoRA's rank budget): the run length is required, and a
    # resumed run must keep it.
    needs_run_length: ClassVar[bool] = False
    # Parameters whose name contains this are read as whole tensors by `after_optimizer_step`
    # (AdaLoRA's rank allocation): under FSDP the trainer gathers them around the hook. None: the
    # hook (if any) works on the shards as they are.
    hook_reads_whole: ClassVar[str | None] = None

    def lr_for(self, adapter_lr: float) -> float:
        """This method's learning rate where the adapters train at `adapter_lr`, to 6 significant
        digits (1e-5 x 0.1 is 1e-06, not 1.0000000000000002e-06)."""
        return float(f"{float(adapter_lr) * self.lr_scale:g}")

    # ----- construction -------------------------------------------------------------------
    def default_targets(self, model: nn.Module) -> tuple[str, ...]:
        from .spec import ALL_LINEAR

        return ALL_LINEAR

    def prepare_options(self, spec: MethodSpec, options: dict[str, Any], total_steps: int | None) -> dict[str, Any]:
        """Method-specific checks and derived option values (AdaLoRA's schedule); override."""
        return options

    def build(self, model: nn.Module, spec: MethodSpec, options: dict[str, Any], targets: tuple[str, ...],
              state: dict[str, Any]) -> nn.Module:
        raise NotImplementedError

    # ----- what the trainer needs -----------------------------------------------------------
    def param_groups(self, policy: AdaptedPolicy, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        params = [p for _, p in policy.trainable_parameters()]
        return [{"name": "trainable", "params": params, "lr": lr, "weight_decay": weight_decay}]

    def after_optimizer_step(self, policy: AdaptedPolicy, step: int) -> None:
        """Called after `optimizer.step()` and before `zero_grad()` (gradients still present)."""

    def extra_loss(self, policy: AdaptedPolicy) -> torch.Tensor | None:
        """A term the trainer adds to its policy loss (AdaLoRA's orthogonal regulariser)."""
        return None

    def trainer_state(self, policy: AdaptedPolicy) -> dict[str, Any] | None:
        """State outside the parameters that a trainer checkpoint must carry (AdaLoRA's allocator)."""
        return None

    def load_trainer_state(self, policy: AdaptedPolicy, state: dict[str, Any]) -> None:
        """Restore what `trainer_state` returned."""

    # ----- sync -------------------------------------------------------------------------------
    def merge_layer(self, layer: nn.Module) -> dict[str, torch.Tensor]:
        """This method's tuner layer merged into its base layer, functionally and in fp32:
        `{parameter name in the base layer: tensor}` (names left out keep the base's value).
        `perl.sync.merged_weights` calls it for every peft tuner layer of the model."""
        raise NotImplementedError(f"method {self.name} has no merge rule for {type(layer).__name__}")

    # ----- persistence ----------------------------------------------------------------------
    def save(self, policy: AdaptedPolicy, out_dir: str) -> None:
        """Write a peft-format adapter (loadable with `PeftModel.from_pretrained`)."""
        policy.model.save_pretrained(out_dir)

    def load(self, base_model: nn.Module, in_dir: str, meta: dict[str, Any], is_trainable: bool,
             state: dict[str, Any]) -> nn.Module:
        from peft import PeftModel

        return PeftModel.from_pretrained(base_model, in_dir, is_trainable=is_trainable)


@dataclass
class AdaptedPolicy:
    """A HF causal LM adapted by one method, with everything a trainer needs from that method."""

    model: nn.Module
    spec: MethodSpec
    method: Method
    options: dict[str, Any]
    target_modules: tuple[str, ...]
    base_param_count: int
    total_steps: int | None = None
    state: dict[str, Any] = field(default_factory=dict)  # method-private (initial adapters, step counter)
    optimizer_steps: int = 0

    @property
    def name(self) -> str:
        return self.method.name

    def trainable_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        seen: set[int] = set()
        for name, p in self.model.named_parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                yield name, p

    def num_trainable(self) -> int:
        return sum(p.numel() for _, p in self.trainable_parameters())

    def trainable_percent(self) -> float:
        return 100.0 * self.num_trainable() / self.base_param_count

    def param_groups(self, lr: float, weight_decay: float = 0.0) -> list[dict[str, Any]]:
        """Optimizer parameter groups (each has a `name`; torch optimizers ignore unknown keys)."""
        if not lr > 0:
            raise ValueError(f"optim.lr must be > 0, got {lr!r}")
        groups = [g for g in self.method.param_groups(self, lr, weight_decay) if g["params"]]
        if not groups:
            raise RuntimeError(f"method {self.name} left no trainable parameters")
        return groups

    def after_optimizer_step(self, step: int | None = None) -> None:
        """Per-optimizer-step hook. `step` is the 1-based count of optimizer steps taken so far."""
        self.optimizer_steps = self.optimizer_steps + 1 if step is None else int(step)
        self.method.after_optimizer_step(self, self.optimizer_steps)

    def extra_loss(self) -> torch.Tensor | None:
        return self.method.extra_loss(self)

    def summary(self) -> dict[str, Any]:
        return {
            "method": self.name,
            "category": self.method.category,
            "trainable": self.num_trainable(),
            "total": self.base_param_count,
            "percent": self.trainable_percent(),
            "target_modules": list(self.target_modules),
            "options": self.options,
        }

    def save(self, out_dir: str) -> str:
        """Save atomically (a sibling temp dir renamed over `out_dir`)."""
        from perl.io import atomic_dir

        with atomic_dir(out_dir) as tmp:
            self.method.save(self, tmp)
            meta = {
                "perl_format": FORMAT_VERSION,
                "method": self.name,
                "spec": self.spec.to_dict(),
                "options": self.options,
                "target_modules": list(self.target_modules),
                "base_param_count": self.base_param_count,
                "trainable": self.num_trainable(),
                "trainable_percent": self.trainable_percent(),
                "total_steps": self.total_steps,
                "optimizer_steps": self.optimizer_steps,
            }
            with open(os.path.join(tmp, METADATA_FILE), "w") as f:
                json.dump(meta, f, indent=2, default=_json_default)
        return os.path.abspath(out_dir)


def format_percent(p: float) -> str:
    """A trainable share as the paper's tables print it (100%, 1.23%, 0.0123%); below 0.0001%, where
    four decimals would print 0 (TinyLoRA's 13 parameters), two significant digits (7.3e-07%)."""
    if p >= 99.995:
        return f"{p:.0f}%"
    if p >= 0.1:
        return f"{p:.2f}%"
    return f"{p:.4f}%" if p >= 0.00005 or p == 0 else f"{p:.2g}%"


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (tuple, set)):
        return list(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
