"""The one sync path: an adapted policy -> `(hf_name, tensor)` pairs of the dense merged model.

vLLM serves only plain LoRA and verl 0.9.1 merges only `LoraLayer`, so every method is merged here,
each tuner layer by its method's own rule (`Method.merge_layer`, next to the method's class in
`perl.methods.catalog`), functionally and in fp32, from the trainer's own (pristine) base weights:
nothing is written back, so any number of syncs leaves the trainer bit-identical (merge/unmerge in
bf16 drifts, ~1.5e-2 after 1000 cycles). Pairs are produced module by module (per FSDP unit when sharded), so the extra
memory is one module, not a model copy. The pairs carry exactly the base checkpoint's names, which
is what vLLM's `model.load_weights` and HF `load_state_dict` consume.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn

from perl.methods.base import AdaptedPolicy, Method, canonical_name

Pairs = Iterator[tuple[str, torch.Tensor]]


def _merge_rule(module: nn.Module, method: Method | None) -> Callable[[nn.Module], dict[str, torch.Tensor]] | None:
    """The method's own merge for a peft tuner layer (None for any other module)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if not isinstance(module, BaseTunerLayer):
        return None
    if method is None:
        raise TypeError(f"{type(module).__name__} is a peft tuner layer: pass the AdaptedPolicy, whose method "
                        "knows how its layers merge, not the bare model")
    return method.merge_layer



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
    method = policy.method if isinstance(policy, AdaptedPolicy) else None
    root = hf_model(model)
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
            rule = _merge_rule(module, method)
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
