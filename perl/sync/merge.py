"""The one sync path: an adapted policy -> `(hf_name, tensor)` pairs of the dense merged model.

vLLM serves only plain LoRA and verl 0.9.1 merges only `LoraLayer`, so every method is merged here,
functionally and in fp32, from the trainer's own (pristine) base weights: nothing is written back,
so any number of syncs leaves the trainer bit-identical (merge/unmerge in bf16 drifts, ~1.5e-2
after 1000 cycles). Pairs are produced module by module (per FSDP unit when sharded), so the extra
memory is one module, not a model copy. The pairs carry exactly the base checkpoint's names, which
is what vLLM's `model.load_weights` and HF `load_state_dict` consume.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn

from perl.methods.base import AdaptedPolicy, canonical_name

Pairs = Iterator[tuple[str, torch.Tensor]]


def _fp32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float32)


def _check_linear(layer: nn.Module) -> None:
    if getattr(layer, "fan_in_fan_out", False):
        raise NotImplementedError(f"{type(layer).__name__}: fan_in_fan_out (Conv1D) layers are not supported by the sync")


# --- one merge rule per peft layer type; each returns {param_name_in_base_layer: fp32 tensor} ---------


def _merge_lora(layer) -> dict[str, torch.Tensor]:
    """LoRA, rsLoRA, LoRA+, LoRA-FA, PiSSA/MiLoRA (residual base) and DoRA."""
    _check_linear(layer)
    out = {}
    w = _fp32(layer.get_base_layer().weight)
    for adapter in layer.active_adapters:
        if adapter not in layer.lora_A:
            continue
        delta = _fp32(layer.lora_B[adapter].weight) @ _fp32(layer.lora_A[adapter].weight) * layer.scaling[adapter]
        if layer.use_dora.get(adapter, False):
            # DoRA: m * (W + dW) / ||W + dW||_row, peft's merge formula
            magnitude = _fp32(layer.lora_magnitude_vector[adapter].weight)
            combined = w + delta
            w = (magnitude / torch.linalg.norm(combined, dim=1)).unsqueeze(1) * combined
        else:
            w = w + delta
    out["weight"] = w
    return out


def _merge_adalora(layer) -> dict[str, torch.Tensor]:
    _check_linear(layer)
    w = _fp32(layer.get_base_layer().weight)
    for adapter in layer.active_adapters:
        if adapter not in layer.lora_A:
            continue
        a, e, b = _fp32(layer.lora_A[adapter]), _fp32(layer.lora_E[adapter]), _fp32(layer.lora_B[adapter])
        w = w + b @ (a * e) * layer.scaling[adapter] / (float(layer.ranknum[adapter]) + 1e-5)
    return {"weight": w}


def _merge_vera(layer) -> dict[str, torch.Tensor]:
    _check_linear(layer)
    w = _fp32(layer.get_base_layer().weight)
    for adapter in layer.active_adapters:
        if adapter not in layer.vera_lambda_d:
            continue
        a = _fp32(layer.vera_A[adapter])[:, : layer.in_features]
        b = _fp32(layer.vera_B[adapter])[: layer.out_features, :]
        lambda_d = _fp32(layer.vera_lambda_d[adapter]).unsqueeze(-1)
        lambda_b = _fp32(layer.vera_lambda_b[adapter]).unsqueeze(-1)
        w = w + (lambda_b * b) @ (lambda_d * a)
    return {"weight": w}


def _merge_miss(layer) -> dict[str, torch.Tensor]:
    # MiSS's block expansion is intricate (remainders, bat/mini variants): reuse peft's own functions on
    # an fp32 copy (they may write into the weight they are given, never into the layer's).
    w = _fp32(layer.get_base_layer().weight).clone()
    for adapter in layer.active_adapters:
        if adapter not in layer.miss_block:
            continue
        if layer.miss_fn == "bat":
            w = w + layer.get_delta_weight(adapter, w.clone()).to(torch.float32)
        else:
            w = layer.get_delta_weight_miss(adapter, w).to(torch.float32)
    return {"weight": w}


def _merge_ia3(layer) -> dict[str, torch.Tensor]:
    _check_linear(layer)
    base = layer.get_base_layer()
    w = _fp32(base.weight)
    bias = _fp32(base.bias) if base.bias is not None else None
    for adapter in layer.active_adapters:
        if adapter not in layer.ia3_l:
            continue
        scale = _fp32(layer.ia3_l[adapter])  # (out, 1) on outputs, (1, in) on the FFN input
        w = w * scale
        if bias is not None and not layer.is_feedforward:
            bias = bias * scale.reshape(bias.shape)
    return {"weight": w} if bias is None else {"weight": w, "bias": bias}


def _merge_ln_tuning(layer) -> dict[str, torch.Tensor]:
    adapters = [a for a in layer.active_adapters if a in layer.ln_tuning_layers]
    source = layer.ln_tuning_layers[adapters[-1]] if adapters else layer.get_base_layer()
    return {name: _fp32(p) for name, p in source.named_parameters()}


def _merge_rules() -> list[tuple[type, Callable[[nn.Module], dict[str, torch.Tensor]]]]:
    from peft.tuners.adalora.layer import AdaLoraLayer
    from peft.tuners.ia3 import IA3Layer
    from peft.tuners.ln_tuning.layer import LNTuningLayer
    from peft.tuners.lora import LoraLayer
    from peft.tuners.miss.layer import MissLayer
    from peft.tuners.vera.layer import VeraLayer

    # AdaLoraLayer subclasses LoraLayer: it must come first.
    return [(AdaLoraLayer, _merge_adalora), (LoraLayer, _merge_lora), (VeraLayer, _merge_vera),
            (MissLayer, _merge_miss), (IA3Layer, _merge_ia3), (LNTuningLayer, _merge_ln_tuning)]


def _rule_for(module: nn.Module, rules) -> Callable | None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    if not isinstance(module, BaseTunerLayer):
        return None
    for cls, rule in rules:
        if isinstance(module, cls):
            return rule
    raise NotImplementedError(f"no merge rule for peft layer {type(module).__name__}")


# --- the walk ----------------------------------------------------------------------------------------


def hf_model(model: nn.Module) -> nn.Module:
    """The HF model inside a PeftModel (with tuner layers injected), or the model itself."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def _fsdp_module_cls():
    try:
        from torch.distributed.fsdp import FSDPModule

        return FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return None


def merged_weights(policy: AdaptedPolicy | nn.Module, dtype: torch.dtype | None = torch.bfloat16, *,
                   include_tied: bool = False) -> Pairs:
    """Yield `(hf_name, tensor)` for every tensor of the base checkpoint, adapters merged in fp32.

    `dtype=None` keeps each tensor's own dtype (merged tensors stay fp32). Every yielded tensor is a
    fresh copy the consumer may keep or modify. Tied weights (e.g. `lm_head.weight` tied to the
    embedding) are yielded once under their first name, as `save_pretrained` writes them, unless
    `include_tied` (what `load_state_dict(strict=True)` wants).

    Under FSDP2 every rank must consume the generator to the end: each FSDP unit is unsharded (an
    all-gather) while its modules are merged and resharded right after.
    """
    return _walk(policy, dtype, include_tied, merge=True)


def base_weights(policy: AdaptedPolicy | nn.Module, dtype: torch.dtype | None = torch.bfloat16, *,
                 include_tied: bool = False) -> Pairs:
    """The trainer's base weights as they are (PiSSA/MiLoRA: the residual W - BA), HF names.

    What an adapter-only rollout needs once before it receives LoRA tensors.
    """
    return _walk(policy, dtype, include_tied, merge=False)


def _walk(policy: AdaptedPolicy | nn.Module, dtype: torch.dtype | None, include_tied: bool, merge: bool) -> Pairs:
    model = policy.model if isinstance(policy, AdaptedPolicy) else policy
    root = hf_model(model)
    rules = _merge_rules()
    fsdp_cls = _fsdp_module_cls()
    seen: set[int] = set()

    def emit(name: str, tensor: torch.Tensor, live: set[int]) -> tuple[str, torch.Tensor]:
        """Cast to `dtype`; copy only when the tensor still shares memory with the live model."""
        t = tensor.detach()
        shared = t.untyped_storage().data_ptr() in live
        return name, t.to(dtype=dtype or t.dtype, copy=shared)

    def storages(module: nn.Module, recurse: bool) -> set[int]:
        tensors = [*module.parameters(recurse=recurse), *module.buffers(recurse=recurse)]
        local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]  # still-sharded DTensors
        return {t.detach().untyped_storage().data_ptr() for t in local}

    def visit(module: nn.Module, prefix: str) -> Pairs:
        sharded = fsdp_cls is not None and isinstance(module, fsdp_cls)
        if sharded:
            module.unshard()
        try:
            rule = _rule_for(module, rules)
            if rule is not None:
                merged = rule(module) if merge else {}
                base = module.get_base_layer()
                own = dict(base.named_parameters(recurse=False))
                if not set(merged) <= set(own):
                    raise RuntimeError(f"merge of {prefix[:-1]} produced {sorted(set(merged) - set(own))}, not in the base layer")
                live = storages(module, recurse=True)  # a tuner layer lives in one FSDP unit
                for pname, p in own.items():  # base names and order; untouched ones (biases) as they are
                    yield emit(f"{prefix}{pname}", merged.get(pname, p), live)
                return
            live = storages(module, recurse=False)
            for pname, p in module.named_parameters(recurse=False):
                if id(p) in seen and not include_tied:
                    continue
                seen.add(id(p))
                yield emit(f"{prefix}{pname}", p, live)
            for bname, b in module.named_buffers(recurse=False):
                if bname not in module._non_persistent_buffers_set:
                    yield emit(f"{prefix}{bname}", b, live)
            for cname, child in module.named_children():
                yield from visit(child, f"{prefix}{cname}.")
        finally:
            if sharded:
                module.reshard()

    # FSDP2 may wrap the PeftModel rather than the HF model: unshard the outer units as well.
    outer = [m for m in model.modules() if fsdp_cls is not None and isinstance(m, fsdp_cls)
             and any(c is root for c in m.modules()) and m is not root]
    for unit in outer:
        unit.unshard()
    try:
        for name, tensor in visit(root, ""):
            yield canonical_name(name), tensor
    finally:
        for unit in outer:
            unit.reshard()


def merged_state_dict(policy: AdaptedPolicy | nn.Module, dtype: torch.dtype | None = torch.float32, *,
                      include_tied: bool = False) -> dict[str, torch.Tensor]:
    """The whole merged model as a dict (tests, small models); prefer streaming `merged_weights`."""
    return dict(merged_weights(policy, dtype, include_tied=include_tied))
