"""The registry: full fine-tuning and the 12 PEFT methods of the paper (Table 1), one class each.

Adding a method = one class here with `@register` (plus its recipe). Each class states what it
trains and builds it with peft's own tuner where peft has one; what peft lacks is written here and
marked as such (MiLoRA's minor-component init, AdaLoRA's regulariser outside `forward`, LoRA-FA's
frozen A under sharding, the PiSSA/MiLoRA resume path).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from .base import (
    METADATA_FILE,
    AdaptedPolicy,
    Method,
    MethodSpecError,
    canonical_name,
    active_in,
    check_linear,
    count_parameters,
    fp32,
    norm_leaf_names,
    resolve_targets,
)
from .spec import MethodSpec

METHODS: dict[str, Method] = {}

# The paper's categories, in its Table 3 order.
CATEGORIES = ("Baseline", "Structural", "Efficient", "Initialization", "Other")


def register(cls: type[Method]) -> type[Method]:
    if cls.name in METHODS:
        raise RuntimeError(f"method {cls.name!r} registered twice")
    if cls.category not in CATEGORIES:
        raise RuntimeError(f"method {cls.name!r}: unknown category {cls.category!r}")
    METHODS[cls.name] = cls()
    return cls


def method_names(where: Callable[[Method], bool]) -> tuple[str, ...]:
    """The registered methods with a capability, in registry order (for messages and tests)."""
    return tuple(name for name, m in METHODS.items() if where(m))


def get_method(name: str) -> Method:
    key = str(name).strip().lower().replace("-", "_")
    if key not in METHODS:
        raise MethodSpecError(f"peft.name: unknown method {name!r}; valid methods: {', '.join(METHODS)}")
    return METHODS[key]


def _owner_of(option: str) -> list[str]:
    return [m.name for m in METHODS.values() if option in m.options]


def resolve_options(method: Method, given: Mapping[str, Any]) -> dict[str, Any]:
    """Method defaults overlaid with the user's options; foreign or unknown options are errors."""
    resolved = dict(method.options)
    for key, value in given.items():
        if key not in method.options:
            owners = _owner_of(key)
            if owners:
                raise MethodSpecError(
                    f"peft option {key!r} belongs to {', '.join(owners)}, not to {method.name}; "
                    f"{method.name} accepts: {sorted(method.options) or 'no options'}"
                )
            raise MethodSpecError(
                f"peft option {key!r} is unknown for {method.name}; it accepts: {sorted(method.options) or 'no options'}"
            )
        resolved[key] = value
    return resolved


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise MethodSpecError(msg)


def _lora_layers(model: nn.Module):
    from peft.tuners.lora import LoraLayer

    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def _check_unflattened(policy: AdaptedPolicy, why: str) -> None:
    """Methods that treat A and B differently must be able to tell them apart by name.

    FSDP2 and FSDP1 with use_orig_params=True keep per-parameter names. FSDP1 without it flattens
    each wrapped unit into one `_flat_param`; that is fine when the LoRA linears are their own
    units (verl's LoRA wrap policy; FSDP1 itself refuses mixed requires_grad in one unit), and
    ambiguous otherwise, which we refuse rather than guess.
    """
    for name, p in policy.model.named_parameters():
        cname = canonical_name(name)
        if "_flat_param" in cname and p.requires_grad and ".lora_A." not in cname and ".lora_B." not in cname:
            raise RuntimeError(
                f"{policy.name} {why}, but trainable parameter {name!r} is an FSDP1 flat parameter that does "
                "not belong to one LoRA matrix; wrap each LoRA linear as its own FSDP unit, use FSDP2 "
                "(fully_shard), or FSDP1 with use_orig_params=True"
            )


# ----------------------------------------------------------------------------------------------
# Baseline
# ----------------------------------------------------------------------------------------------


@register
class Full(Method):
    name = "full"
    category = "Baseline"
    summary = "every parameter"
    target_kind = None
    trains_every_parameter = True
    lr_scale = 0.1  # the paper trains full fine-tuning at 1e-6 against 1e-5 for the adapters

    def build(self, model, spec, options, targets, state):
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    def save(self, policy, out_dir):
        policy.model.save_pretrained(out_dir, safe_serialization=True)

    def load(self, base_model, in_dir, meta, is_trainable, state):
        from safetensors.torch import load_file

        index = os.path.join(in_dir, "model.safetensors.index.json")
        if os.path.exists(index):  # sharded HF checkpoint
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        else:
            files = ["model.safetensors"]
        sd: dict[str, torch.Tensor] = {}
        for name in files:
            sd.update(load_file(os.path.join(in_dir, name)))
        missing, unexpected = base_model.load_state_dict(sd, strict=False)
        tied = _tied_parameter_names(base_model)
        bad = [k for k in missing if k not in tied]
        if bad or unexpected:
            raise RuntimeError(f"full checkpoint {in_dir} does not fit the base: missing {bad}, unexpected {unexpected}")
        for p in base_model.parameters():
            p.requires_grad_(is_trainable)
        return base_model


def _tied_parameter_names(model: nn.Module) -> set[str]:
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return {n for names in by_id.values() if len(names) > 1 for n in names}


class PeftTuner(Method):
    """Methods that are one peft tuner config applied with `get_peft_model`."""

    def peft_config(self, spec: MethodSpec, options: dict[str, Any], targets: tuple[str, ...], state: dict[str, Any]):
        raise NotImplementedError

    def build(self, model, spec, options, targets, state):
        from peft import get_peft_model

        if any(p.is_meta for p in model.parameters()):
            state["shapes_only"] = True  # parameter counting: skip data-dependent inits
        return get_peft_model(model, self.peft_config(spec, options, targets, state))


class LoraFamily(PeftTuner):
    """Methods built as peft `LoraConfig` variants (B @ A added to a linear layer)."""

    lora_keyed = True
    vllm_lora = True  # plain LoRA forward; DoRA turns this off

    def merge_layer(self, layer):
        """W + s * B A; DoRA: m * (W + s * B A) / ||W + s * B A||_row (peft's merge formula).
        PiSSA/MiLoRA need nothing more: their base layer already holds the residual."""
        check_linear(layer)
        w = fp32(layer.get_base_layer().weight)
        for adapter in active_in(layer, layer.lora_A):
            delta = fp32(layer.lora_B[adapter].weight) @ fp32(layer.lora_A[adapter].weight) * layer.scaling[adapter]
            if layer.use_dora.get(adapter, False):
                magnitude = fp32(layer.lora_magnitude_vector[adapter].weight)
                combined = w + delta
                w = (magnitude / torch.linalg.norm(combined, dim=1)).unsqueeze(1) * combined
            else:
                w = w + delta
        return {"weight": w}

    def lora_kwargs(self, spec: MethodSpec, options: dict[str, Any]) -> dict[str, Any]:
        return {}

    def peft_config(self, spec, options, targets, state):
        from peft import LoraConfig

        kwargs = self.lora_kwargs(spec, options)
        if state.get("shapes_only") or state.get("plain_init"):
            # plain_init: weights are about to be overwritten (resume); shapes_only: no SVD of empty weights.
            kwargs.pop("init_lora_weights", None)
        return LoraConfig(
            r=spec.rank,
            lora_alpha=spec.alpha,
            lora_dropout=spec.dropout,
            target_modules=list(targets),
            bias="none",
            task_type="CAUSAL_LM",
            **kwargs,
        )


@register
class Lora(LoraFamily):
    name = "lora"
    category = "Baseline"
    summary = "B, A (A gaussian, B zero), scale alpha/r"


# ----------------------------------------------------------------------------------------------
# Structural
# ----------------------------------------------------------------------------------------------


@register
class Dora(LoraFamily):
    name = "dora"
    category = "Structural"
    summary = "B, A and magnitude m (weight-decomposed LoRA)"
    vllm_lora = False  # vLLM has no DoRA kernel (it rejects the adapter)

    def lora_kwargs(self, spec, options):
        return {"use_dora": True}


@register
class Adalora(PeftTuner):
    name = "adalora"
    category = "Structural"
    summary = "P, Lambda, Q in SVD form; rank budget reallocated every step"
    lora_keyed = True  # lora_A / lora_E / lora_B
    needs_run_length = True  # the rank-budget schedule (tinit, tfinal, total_step)
    hook_reads_whole = ".lora_"  # the allocator scores and masks whole P, Lambda, Q
    options = {
        "init_r": None,  # default: round(1.5 * rank); the budget starts here ...
        "target_r": None,  # default: rank; ... and ends here (average per module)
        "tinit": None,  # default: 10% of total_steps, no pruning during warm-up
        "tfinal": None,  # default: 20% of total_steps, budget frozen at the end
        "delta_t": 1,
        "beta1": 0.85,
        "beta2": 0.85,
        "orth_reg_weight": 0.5,
    }

    def prepare_options(self, spec, options, total_steps):
        """Derive the rank-budget schedule from the run length."""
        rank = spec.rank
        _require(
            total_steps is not None and int(total_steps) >= 3,
            f"adalora needs the run length to schedule its rank budget: pass total_steps >= 3 "
            f"(the trainer's number of optimizer steps), got {total_steps!r}",
        )
        t = int(total_steps)
        o = dict(options)
        o["init_r"] = int(o["init_r"] if o["init_r"] is not None else round(1.5 * rank))
        o["target_r"] = int(o["target_r"] if o["target_r"] is not None else rank)
        o["tinit"] = int(o["tinit"] if o["tinit"] is not None else round(0.1 * t))
        o["tfinal"] = int(o["tfinal"] if o["tfinal"] is not None else round(0.2 * t))
        _require(1 <= o["target_r"] <= o["init_r"], f"adalora: need 1 <= target_r <= init_r, got {o['target_r']}, {o['init_r']}")
        _require(o["tinit"] >= 0 and o["tfinal"] >= 0, "adalora: tinit and tfinal must be >= 0")
        _require(
            o["tinit"] < t - o["tfinal"],
            f"adalora: tinit ({o['tinit']}) must be < total_steps - tfinal ({t} - {o['tfinal']})",
        )
        _require(int(o["delta_t"]) >= 1, f"adalora: delta_t must be >= 1, got {o['delta_t']}")
        return o

    def peft_config(self, spec, options, targets, state):
        from peft import AdaLoraConfig

        return AdaLoraConfig(
            init_r=options["init_r"],
            target_r=options["target_r"],
            tinit=options["tinit"],
            tfinal=options["tfinal"],
            deltaT=int(options["delta_t"]),
            beta1=options["beta1"],
            beta2=options["beta2"],
            orth_reg_weight=options["orth_reg_weight"],
            total_step=state["total_steps"],
            lora_alpha=spec.alpha,
            lora_dropout=spec.dropout,
            target_modules=list(targets),
            task_type="CAUSAL_LM",
        )

    def after_optimizer_step(self, policy, step):
        # peft: "call update_and_allocate after optimizer.step() and before zero_grad()".
        policy.model.base_model.update_and_allocate(step)

    def extra_loss(self, policy):
        # peft adds this term only inside AdaLoraModel.forward when HF labels are passed, which an
        # RL loss never does; same formula as peft, computed here so the trainer can add it.
        weight = float(policy.options["orth_reg_weight"])
        terms = []
        for name, p in policy.model.named_parameters():
            if not p.requires_grad or p.numel() == 0:
                continue
            if ".lora_A." in name:
                cov = p @ p.T
            elif ".lora_B." in name:
                cov = p.T @ p
            else:
                continue
            eye = torch.eye(*cov.shape, dtype=cov.dtype, device=cov.device)
            terms.append(torch.linalg.matrix_norm(cov - eye, ord="fro"))
        if not terms:
            return None
        return weight * torch.stack(terms).mean()

    def load(self, base_model, in_dir, meta, is_trainable, state):
        with warnings.catch_warnings():
            # AdaLoRA's rank_pattern is keyed by lora_E parameters, which peft's generic pattern check
            # mistakes for unmatched modules; AdaLoraModel resizes by it correctly.
            warnings.filterwarnings("ignore", message="The following rank_pattern keys did not match")
            return super().load(base_model, in_dir, meta, is_trainable, state)

    def trainer_state(self, policy):
        # peft keeps the allocator's importance averages outside the parameters; without them a
        # resumed run would reallocate from scratch
        base = policy.model.base_model
        alloc = base.rankallocator
        return {"rank_pattern": base.peft_config["default"].rank_pattern,
                "ipt": alloc.ipt, "exp_avg_ipt": alloc.exp_avg_ipt, "exp_avg_unc": alloc.exp_avg_unc}

    def load_trainer_state(self, policy, state):
        base = policy.model.base_model
        alloc = base.rankallocator
        base.peft_config["default"].rank_pattern = state["rank_pattern"]
        alloc.ipt, alloc.exp_avg_ipt, alloc.exp_avg_unc = state["ipt"], state["exp_avg_ipt"], state["exp_avg_unc"]

    def merge_layer(self, layer):
        """W + s * P (Lambda * Q) / ranknum (peft's AdaLoRA delta)."""
        check_linear(layer)
        w = fp32(layer.get_base_layer().weight)
        for adapter in active_in(layer, layer.lora_A):
            a, e, b = fp32(layer.lora_A[adapter]), fp32(layer.lora_E[adapter]), fp32(layer.lora_B[adapter])
            w = w + b @ (a * e) * layer.scaling[adapter] / (float(layer.ranknum[adapter]) + 1e-5)
        return {"weight": w}

    def budget(self, policy: AdaptedPolicy) -> int:
        """Ranks currently alive: the number of non-zero singular values across all modules."""
        total = 0
        for name, p in policy.model.named_parameters():
            if ".lora_E." in name:
                total += int((p.detach() != 0).sum())
        return total


@register
class Miss(PeftTuner):
    name = "miss"
    category = "Structural"
    summary = "shard D of shape (r, d_out), expanded over the input dimension"
    options = {"variant": "default", "mini_r": 1}

    VARIANTS = {"default": True, "bat": "bat", "mini": "mini"}

    def prepare_options(self, spec, options, total_steps):
        _require(options["variant"] in self.VARIANTS,
                 f"miss: option variant must be one of {sorted(self.VARIANTS)}, got {options['variant']!r}")
        return options

    def peft_config(self, spec, options, targets, state):
        from peft import MissConfig

        return MissConfig(
            r=spec.rank,
            miss_dropout=spec.dropout,
            target_modules=list(targets),
            init_weights=self.VARIANTS[options["variant"]],
            mini_r=int(options["mini_r"]),
            task_type="CAUSAL_LM",
        )

    def merge_layer(self, layer):
        # MiSS's block expansion is intricate (remainders, bat/mini variants): reuse peft's own functions
        # on an fp32 copy (they may write into the weight they are given, never into the layer's).
        w = fp32(layer.get_base_layer().weight).clone()
        for adapter in active_in(layer, layer.miss_block):
            if layer.miss_fn == "bat":
                w = w + layer.get_delta_weight(adapter, w.clone()).to(torch.float32)
            else:
                w = layer.get_delta_weight_miss(adapter, w).to(torch.float32)
        return {"weight": w}


# ----------------------------------------------------------------------------------------------
# Efficient
# ----------------------------------------------------------------------------------------------


@register
class LoraFA(LoraFamily):
    name = "lora_fa"
    category = "Efficient"
    summary = "B only; A frozen at its random init"

    def build(self, model, spec, options, targets, state):
        model = super().build(model, spec, options, targets, state)
        self._freeze_a(model)
        return model

    @staticmethod
    def _freeze_a(model: nn.Module) -> None:
        for name, p in model.named_parameters():
            if ".lora_A." in canonical_name(name):
                p.requires_grad_(False)

    def param_groups(self, policy, lr, weight_decay):
        # Select B by name, not only by requires_grad: peft's set_adapter / wrappers may flip
        # requires_grad back on, and A must never reach the optimizer.
        _check_unflattened(policy, "must keep A frozen while B trains")
        self._freeze_a(policy.model)
        params = [p for n, p in policy.trainable_parameters() if ".lora_B." in canonical_name(n)]
        return [{"name": "lora_B", "params": params, "lr": lr, "weight_decay": weight_decay}]

    def after_optimizer_step(self, policy, step):
        self._freeze_a(policy.model)


@register
class Vera(PeftTuner):
    name = "vera"
    category = "Efficient"
    summary = "scaling vectors d, b; shared frozen random A, B"
    options = {"d_initial": 0.1, "projection_prng_key": 0, "save_projection": True}

    def peft_config(self, spec, options, targets, state):
        from peft import VeraConfig

        return VeraConfig(
            r=spec.rank,
            target_modules=list(targets),
            vera_dropout=spec.dropout,
            d_initial=float(options["d_initial"]),
            projection_prng_key=int(options["projection_prng_key"]),
            save_projection=bool(options["save_projection"]),
            task_type="CAUSAL_LM",
        )

    def merge_layer(self, layer):
        """W + (lambda_b * B) (lambda_d * A), with the shared projections cut to the layer's shape."""
        check_linear(layer)
        w = fp32(layer.get_base_layer().weight)
        for adapter in active_in(layer, layer.vera_lambda_d):
            a = fp32(layer.vera_A[adapter])[:, : layer.in_features]
            b = fp32(layer.vera_B[adapter])[: layer.out_features, :]
            lambda_d = fp32(layer.vera_lambda_d[adapter]).unsqueeze(-1)
            lambda_b = fp32(layer.vera_lambda_b[adapter]).unsqueeze(-1)
            w = w + (lambda_b * b) @ (lambda_d * a)
        return {"weight": w}


@register
class TinyLora(PeftTuner):
    """TinyLoRA ("Learning to Reason in 13 Parameters", Morris et al., arXiv 2602.04118), beyond the
    paper's Table 1: W + B (sum_i v_i P_i) A, with B A the frozen top-r SVD of W (sqrt(S) on each
    side, LoRA-XS), P fixed random (u, r, r) per module, and only v (u numbers per group) trained.

    Built with peft 0.21.2's `TinyLoraConfig`. Defaults are the paper's headline setting as peft and
    the abstract give it: SVD rank r=2, u=13, `weight_tying=1.0` (one v for the whole model: 13
    trainable parameters), v starting at zero (the adapted model is the base at init). peft names the
    rank `r`, and it is an option here: the shared `peft.rank` / `peft.alpha` are LoRA's knobs and
    do not apply (as for IA3 and LN tuning). Learning rate: none of the sources at hand (the abstract,
    peft's docs, secondary summaries) states the paper's, so TinyLoRA trains at the adapters' lr
    (`lr_scale` 1.0: the recipes' 1e-5, the toy's 1e-3); recipes/README.md says to sweep it.

    What peft does not do, and this class adds: peft registers the one dict of vectors
    (`base_model.tinylora_v`) as a submodule of every adapted layer as well, so FSDP would place the
    same tensor in every decoder layer's unit (FSDP2 fails on the second). `_own_vectors` keeps the
    layers' reference as a plain attribute (peft's forward looks it up there) and the dict registered
    once, at the tuner, outside every decoder layer: under FSDP the vectors are the root unit's, whose
    gradient collects every module's contribution before one reduction over the ranks, and the
    optimizer holds each vector once. peft's adapter format (`base_model.tinylora_v.<i>`) is unchanged.
    """

    name = "tinylora"
    category = "Efficient"
    summary = "vector v (u per group) through fixed random P into the frozen top-r SVD of W"
    options = {"r": 2, "u": 13, "weight_tying": 1.0, "projection_seed": 42, "save_projection": True}

    def prepare_options(self, spec, options, total_steps):
        for key in ("r", "u"):
            value = options[key]
            _require(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                     f"tinylora: option {key} must be an integer >= 1, got {value!r}")
        tying = options["weight_tying"]
        _require(isinstance(tying, (int, float)) and not isinstance(tying, bool) and 0.0 <= tying <= 1.0,
                 f"tinylora: option weight_tying must be a number in [0, 1] (0: one v per module, 1: one v "
                 f"for the model), got {tying!r}")
        _require(isinstance(options["projection_seed"], int) and not isinstance(options["projection_seed"], bool),
                 f"tinylora: option projection_seed must be an integer, got {options['projection_seed']!r}")
        _require(isinstance(options["save_projection"], bool),
                 f"tinylora: option save_projection must be true or false, got {options['save_projection']!r}")
        return {**options, "weight_tying": float(tying)}

    def peft_config(self, spec, options, targets, state):
        from peft import TinyLoraConfig

        return TinyLoraConfig(
            r=options["r"],
            u=options["u"],
            weight_tying=options["weight_tying"],
            projection_seed=options["projection_seed"],
            save_projection=options["save_projection"],
            init_weights=True,  # v = 0: the adapted model is the base at init
            tinylora_dropout=spec.dropout,
            target_modules=list(targets),
            task_type="CAUSAL_LM",
        )

    @staticmethod
    def _own_vectors(model: nn.Module) -> nn.Module:
        """Register the vectors once, at the tuner (see the class docstring); idempotent."""
        tuner = model.base_model
        vectors = tuner.tinylora_v
        for module in tuner.model.modules():
            if module._modules.get("tinylora_v") is vectors:
                del module._modules["tinylora_v"]
                object.__setattr__(module, "tinylora_v", vectors)  # a reference, not a child module
        return model

    def build(self, model, spec, options, targets, state):
        return self._own_vectors(super().build(model, spec, options, targets, state))

    def load(self, base_model, in_dir, meta, is_trainable, state):
        return self._own_vectors(super().load(base_model, in_dir, meta, is_trainable, state))

    def merge_layer(self, layer):
        """W + B R A with R = sum_i v_i P_i (peft's `get_delta_weight`), in fp32."""
        check_linear(layer)
        w = fp32(layer.get_base_layer().weight)
        for adapter in active_in(layer, layer.tinylora_A):
            v = fp32(layer.tinylora_v[adapter][layer._tinylora_v_key[adapter]])
            r = torch.einsum("i,ijk->jk", v, fp32(layer.tinylora_P[adapter]))
            w = w + fp32(layer.tinylora_B[adapter]) @ r @ fp32(layer.tinylora_A[adapter])
        return {"weight": w}


# ----------------------------------------------------------------------------------------------
# Initialization
# ----------------------------------------------------------------------------------------------


@register
class LoraPlus(LoraFamily):
    name = "lora_plus"
    category = "Initialization"
    summary = "B, A with lr_B = lr_ratio * lr_A"
    options = {"lr_ratio": 16.0}  # LoRA+ paper's recommended 2^4

    def prepare_options(self, spec, options, total_steps):
        ratio = options["lr_ratio"]
        _require(isinstance(ratio, (int, float)) and not isinstance(ratio, bool) and ratio > 0,
                 f"lora_plus: option lr_ratio must be a number > 0, got {ratio!r}")
        return options

    def param_groups(self, policy, lr, weight_decay):
        ratio = float(policy.options["lr_ratio"])
        _check_unflattened(policy, "needs separate learning rates for A and B")
        a, b = [], []
        for n, p in policy.trainable_parameters():
            (b if ".lora_B." in canonical_name(n) else a).append(p)
        return [
            {"name": "lora_A", "params": a, "lr": lr, "weight_decay": weight_decay},
            {"name": "lora_B", "params": b, "lr": lr * ratio, "weight_decay": weight_decay},
        ]


@register
class RsLora(LoraFamily):
    name = "rslora"
    category = "Initialization"
    summary = "B, A with scale alpha/sqrt(r)"

    def lora_kwargs(self, spec, options):
        return {"use_rslora": True}


def svd_init_device() -> torch.device | None:
    """Where PiSSA/MiLoRA decompose the weights: the current CUDA device when torch sees one, else None
    (in place). verl builds the model on rank 0's CPU (the other ranks hold meta tensors until the
    broadcast), where the exact SVDs of a 7B model take minutes (bench/svd_init.py) while the other
    ranks wait in a collective; on the accelerator each matrix goes there, is decomposed, and its
    factors and residual come back, one at a time."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return None


def svd_init_layer(layer, adapter: str, which: str, niter: int | None = None,
                   device: torch.device | None = None) -> None:
    """PiSSA's init (peft's `pissa_init`, same fp32 arithmetic in the same order) on one LoRA layer,
    with the `which` ("top": PiSSA, "bottom": MiLoRA) r singular triplets of W, computed on `device`
    (None: where W is): A = sqrt(S_r / s) Vh_r, B = U_r sqrt(S_r / s), base W <- W - s B A. The
    factors stay fp32 (as peft leaves them); the residual takes W's dtype, both go back to W's device.
    `niter`: peft's randomized SVD (`torch.svd_lowrank`, top only) instead of the exact one."""
    base = layer.get_base_layer()
    _require(not getattr(layer, "fan_in_fan_out", False), "SVD-initialised methods need nn.Linear weights (fan_in_fan_out=False)")
    home, dtype = base.weight.device, base.weight.dtype
    r, scaling = layer.r[adapter], layer.scaling[adapter]
    weight = base.weight.detach().to(device=device or home, dtype=torch.float32)
    if niter is None:
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        sel = slice(None, r) if which == "top" else slice(-r, None)
        u_r, s_r, vh_r = u[:, sel], s[sel] / scaling, vh[sel]
    else:
        _require(which == "top", "a randomized SVD (niter) finds the top singular triplets only")
        u_r, s_r, v_r = torch.svd_lowrank(weight, r, niter=int(niter))
        s_r, vh_r = s_r / scaling, v_r.t()
    lora_a = torch.diag(torch.sqrt(s_r)) @ vh_r
    lora_b = u_r @ torch.diag(torch.sqrt(s_r))
    residual = weight - scaling * lora_b @ lora_a
    layer.lora_A[adapter].weight.data = lora_a.to(home)
    layer.lora_B[adapter].weight.data = lora_b.to(home)
    base.weight.data = residual.to(dtype).to(home)


class _SvdInitLora(LoraFamily):
    """PiSSA and MiLoRA: A, B from an SVD of W, base replaced by the residual W - s*B@A.

    The init is PeRL's (`svd_init_layer`, peft's arithmetic), layer by layer, on the accelerator when
    there is one (`svd_init_device`). Saved as a plain LoRA delta (rank 2r: [A | A0], [B | -B0],
    peft's own conversion), so the adapter loads on the *original* base with
    `PeftModel.from_pretrained`. Loading with `is_trainable=True` rebuilds the residual form exactly
    (same fp32 arithmetic as the init).
    """

    INITIAL = "initial_adapter"
    residual_base = True
    which = "top"

    def build(self, model, spec, options, targets, state):
        model = super().build(model, spec, options, targets, state)  # plain layers; A, B replaced below
        device = svd_init_device()
        for name, layer in _lora_layers(model):
            w = layer.get_base_layer().weight
            _require(layer.r["default"] <= min(w.shape),
                     f"{self.name}: rank {layer.r['default']} exceeds min(shape) {tuple(w.shape)} of {name}")
            if not state.get("shapes_only"):  # meta weights (a shapes-only model, verl's ranks > 0): no init
                svd_init_layer(layer, "default", self.which, options.get("niter"), device)
        state["initial_adapter"] = {
            k: v.detach().clone() for k, v in model.state_dict().items() if ".lora_A." in k or ".lora_B." in k
        }
        return model

    def save(self, policy, out_dir):
        init_dir = os.path.join(out_dir, self.INITIAL)
        policy.model.save_pretrained(init_dir, state_dict=policy.state["initial_adapter"])
        with warnings.catch_warnings():
            # the conversion briefly loads the initial adapter beside PiSSA's; peft warns about that mix
            warnings.filterwarnings("ignore", message="PiSSA changes the base weights")
            policy.model.save_pretrained(out_dir, path_initial_model_for_weight_conversion=init_dir)
        # peft's conversion loads the initial adapter and may toggle requires_grad; restore the policy.
        policy.model.set_adapter("default")

    def load(self, base_model, in_dir, meta, is_trainable, state):
        from peft import PeftModel

        if not is_trainable:
            return PeftModel.from_pretrained(base_model, in_dir)
        # Resume: split the converted delta back into (trained, initial) and rebuild W_res.
        from safetensors.torch import load_file

        spec = MethodSpec.from_dict(meta["spec"])
        state["plain_init"] = True
        model = PeftTuner.build(self, base_model, spec, meta["options"], tuple(meta["target_modules"]), state)
        del state["plain_init"]
        delta = load_file(os.path.join(in_dir, "adapter_model.safetensors"))
        r = spec.rank
        initial = {}
        for name, layer in _lora_layers(model):
            key = name.removeprefix("base_model.model.")
            a2 = delta[f"base_model.model.{key}.lora_A.weight"]
            b2 = delta[f"base_model.model.{key}.lora_B.weight"]
            a, a0, b, b0 = a2[:r], a2[r:], b2[:, :r], -b2[:, r:]
            layer.lora_A["default"].weight.data = a0.clone()
            layer.lora_B["default"].weight.data = b0.clone()
            _subtract_into_base(layer, "default")
            initial[f"{name}.lora_A.default.weight"] = a0.clone()
            initial[f"{name}.lora_B.default.weight"] = b0.clone()
            layer.lora_A["default"].weight.data = a.clone()
            layer.lora_B["default"].weight.data = b.clone()
        state["initial_adapter"] = initial
        return model


def _subtract_into_base(layer, adapter: str) -> None:
    """W <- W - scaling * B @ A in fp32 (the init's arithmetic, so resume is bit-exact)."""
    base = layer.get_base_layer()
    _require(not getattr(layer, "fan_in_fan_out", False), "SVD-initialised methods need nn.Linear weights (fan_in_fan_out=False)")
    dtype = base.weight.dtype
    a = layer.lora_A[adapter].weight
    b = layer.lora_B[adapter].weight
    weight = base.weight.data.to(torch.float32) - layer.scaling[adapter] * b.data @ a.data
    base.weight.data = weight.to(dtype)


@register
class Pissa(_SvdInitLora):
    name = "pissa"
    category = "Initialization"
    summary = "B, A from the top-r SVD of W; base becomes W - BA"
    options = {"niter": None}  # None: exact SVD; an int: peft's fast randomized SVD with that many iterations

    def lora_kwargs(self, spec, options):
        # no init draws (peft's own "pissa" init makes none): the run's random stream stays as it was
        return {"init_lora_weights": False}


@register
class Milora(_SvdInitLora):
    name = "milora"
    category = "Initialization"
    summary = "B, A from the minor (bottom-r) SVD components of W; base becomes W - BA"
    which = "bottom"


# ----------------------------------------------------------------------------------------------
# Other
# ----------------------------------------------------------------------------------------------


@register
class Ia3(PeftTuner):
    name = "ia3"
    category = "Other"
    summary = "rescaling vectors on k, v outputs and the FFN input of down_proj"
    options = {"feedforward_modules": ("down_proj",)}

    def default_targets(self, model):
        return ("k_proj", "v_proj", "down_proj")

    def peft_config(self, spec, options, targets, state):
        from peft import IA3Config

        ff = options["feedforward_modules"]
        ff = (ff,) if isinstance(ff, str) else tuple(ff)
        missing = [m for m in ff if m not in targets]
        _require(not missing, f"ia3: feedforward_modules {missing} must also be in target_modules {list(targets)}")
        return IA3Config(target_modules=list(targets), feedforward_modules=list(ff), task_type="CAUSAL_LM")

    def merge_layer(self, layer):
        """W scaled by l (rows for k/v outputs, columns for the FFN input); an output bias scales too."""
        check_linear(layer)
        base = layer.get_base_layer()
        w = fp32(base.weight)
        bias = fp32(base.bias) if base.bias is not None else None
        for adapter in active_in(layer, layer.ia3_l):
            scale = fp32(layer.ia3_l[adapter])  # (out, 1) on outputs, (1, in) on the FFN input
            w = w * scale
            if bias is not None and not layer.is_feedforward:
                bias = bias * scale.reshape(bias.shape)
        return {"weight": w} if bias is None else {"weight": w, "bias": bias}


@register
class LnTuning(PeftTuner):
    name = "ln_tuning"
    category = "Other"
    summary = "norm gains (and biases) of every block and the final norm"
    target_kind = "norm"

    def default_targets(self, model):
        return norm_leaf_names(model)

    def peft_config(self, spec, options, targets, state):
        from peft import LNTuningConfig

        return LNTuningConfig(target_modules=list(targets), task_type="CAUSAL_LM")

    def build(self, model, spec, options, targets, state):
        with warnings.catch_warnings():
            # peft warns on any non-LayerNorm class; RMSNorm is deep-copied and tuned the same way.
            warnings.filterwarnings("ignore", message="Unsupported layer type")
            return super().build(model, spec, options, targets, state)

    def merge_layer(self, layer):
        """The tuned copy of the norm replaces the base norm's parameters."""
        adapters = active_in(layer, layer.ln_tuning_layers)
        source = layer.ln_tuning_layers[adapters[-1]] if adapters else layer.get_base_layer()
        return {name: fp32(p) for name, p in source.named_parameters()}


# ----------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------


def _prepare(method: Method, model: nn.Module, spec: MethodSpec, total_steps: int | None):
    from peft import PeftModel

    if isinstance(model, PeftModel):
        raise MethodSpecError("model is already a PeftModel; pass the plain base model")
    options = method.prepare_options(spec, resolve_options(method, spec.options), total_steps)
    if method.target_kind is None:
        _require(spec.target_modules is None, f"{method.name} trains every parameter; peft.target_modules does not apply")
        targets: tuple[str, ...] = ()
    else:
        targets = spec.target_modules or method.default_targets(model)
        resolve_targets(model, targets, method.target_kind, method.name)
    return options, targets


def adapt(model: nn.Module, spec: MethodSpec | Mapping[str, Any], *, total_steps: int | None = None) -> AdaptedPolicy:
    """Adapt a loaded HF causal LM with one PEFT method (in place) and return the policy.

    `total_steps` is the run length in optimizer steps; AdaLoRA needs it for its rank schedule.
    """
    if not isinstance(spec, MethodSpec):
        spec = MethodSpec.from_dict(spec)
    method = get_method(spec.name)
    options, targets = _prepare(method, model, spec, total_steps)
    base_count = count_parameters(model)
    state: dict[str, Any] = {"total_steps": total_steps}
    adapted = method.build(model, spec, options, targets, state)
    return AdaptedPolicy(adapted, spec, method, options, targets, base_count, total_steps, state)


def load_adapted(base_model: nn.Module, path: str, *, is_trainable: bool = False) -> AdaptedPolicy:
    """Load a policy saved by `AdaptedPolicy.save` onto a fresh copy of the original base model."""
    meta_path = os.path.join(path, METADATA_FILE)
    if not os.path.exists(meta_path):
        raise FileNotFoundError(
            f"{path} has no {METADATA_FILE}: not a PeRL checkpoint (a plain peft adapter loads with PeftModel.from_pretrained)"
        )
    with open(meta_path) as f:
        meta = json.load(f)
    spec = MethodSpec.from_dict(meta["spec"])
    method = get_method(meta["method"])
    base_count = count_parameters(base_model)
    if base_count != meta["base_param_count"]:
        raise ValueError(
            f"{path} was trained on a base with {meta['base_param_count']} parameters; this base has {base_count}"
        )
    state: dict[str, Any] = {"total_steps": meta.get("total_steps")}
    model = method.load(base_model, path, meta, is_trainable, state)
    policy = AdaptedPolicy(
        model, spec, method, meta["options"], tuple(meta["target_modules"]), base_count, meta.get("total_steps"), state
    )
    policy.optimizer_steps = int(meta.get("optimizer_steps", 0))
    return policy


def method_table() -> list[dict[str, str]]:
    """Name, category and what each registered method trains (for docs and `perl methods`)."""
    return [{"name": m.name, "category": m.category, "trains": m.summary} for m in METHODS.values()]
