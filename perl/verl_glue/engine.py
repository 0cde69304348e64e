"""PeRL's FSDP2 engine for verl 0.9.1: any of the 13 PeRL methods instead of verl's hard-coded LoRA.

`PerlFSDPEngine` subclasses verl's `FSDPEngineWithLMHead` and overrides only what PEFT changes:

- `_build_lora_module`: the actor is adapted by PeRL's registry (`perl.methods.adapt`) from the
  `model.lora.perl` block the entry point writes (verl calls this hook when `model.lora_rank > 0`;
  the entry point sets `lora_rank` so that verl also keeps the reference policy inside the actor);
- `_build_optimizer`: the method's parameter groups (LoRA+ ratio, LoRA-FA's B-only group);
- `forward_backward_batch` / `optimizer_step`: AdaLoRA's orthogonal regulariser is added once per
  optimizer step (scaled by verl's grad scaler under fp16, like the policy loss), its rank allocation
  runs right after `optimizer.step()` (both on gathered full tensors, identically on every rank, then
  written back to the shards);
- `get_per_tensor_param`: rollout weights come from PeRL's merged sync (`perl.sync.merged_weights`,
  every method, per FSDP unit) or, for the LoRA family, adapter-only in vLLM's LoRA format;
  `get_per_tensor_param_shard` (verl's `delta_sharded` checkpoint engine) is refused;
- `disable_adapter`: the reference policy is the actor with its adapter off (PiSSA/MiLoRA: their
  initial adapter swapped in, since their frozen base is the residual W - B0 A0);
- `save_checkpoint` / `load_checkpoint`: verl's sharded checkpoint (model, optimizer, lr schedule,
  RNG) plus PeRL's step counter and AdaLoRA allocator state, and a peft-format adapter
  (`<ckpt>/perl_adapter`, every method) written by the method's own `save`.

Without a `model.lora.perl` block (e.g. a critic, or a plain verl run in the same process) every
override defers to verl, so registering this engine changes nothing else.

Registration: `register()` puts the engine into verl's `EngineRegistry` under vendor keys, which
`EngineRegistry.get_engine_cls` consults before verl's device-only defaults. Importing this module
runs it; verl's workers import it through `actor_rollout_ref.model.external_lib`.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, ContextManager, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from . import cpu_platform  # noqa: F401  (registered before verl's engine modules resolve the platform)
from verl.workers.engine.base import EngineRegistry
from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

from perl.methods import AdaptedPolicy, MethodSpec, adapt, get_method
from perl.methods.base import Method, canonical_name
from perl.verl_glue.on_policy import FROM_UPDATE, METRIC_ENTROPY, on_policy_loss
from perl.verl_glue.run_dir import ADAPTER_DIR, STATE_FILE
from verl.utils import tensordict_utils as tu

logger = logging.getLogger(__name__)

PERL_KEY = "perl"  # actor_rollout_ref.model.lora.perl: the resolved peft block (see perl.verl_glue.config)

# (device, vendor) keys verl's EngineRegistry looks up before its device-only defaults.
ENGINE_KEYS = (("cuda", "nvidia"), ("cuda", "amd"), ("npu", "huawei"), ("cpu", "cpu"))


def engine_block(model_config: Any) -> dict[str, Any] | None:
    """The PeRL block verl's model config carries to the worker, as plain Python data (or None).

    It travels in verl's `HFModelConfig.lora` dict (a free-form field verl keeps for Megatron's LoRA)."""
    lora = model_config.lora
    if not lora:
        return None
    block = lora.get(PERL_KEY) if hasattr(lora, "get") else None
    if block is None:
        return None
    from omegaconf import DictConfig, OmegaConf

    if isinstance(block, DictConfig):
        block = OmegaConf.to_container(block, resolve=True)
    return dict(block)


# ------------------------------------------------------------------------------------------------
# Full (unsharded) views of FSDP2 parameters
# ------------------------------------------------------------------------------------------------


def _is_dtensor(t: Any) -> bool:
    return isinstance(t, DTensor)


def _local_chunk(full: torch.Tensor, like) -> torch.Tensor:
    """The part of `full` that the DTensor `like` holds on this rank (no communication)."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(full.shape, like.device_mesh, like.placements)
    index = tuple(slice(o, o + s) for o, s in zip(offset, shape))
    return full[index]


def gather_full(model: nn.Module, select: Callable[[str, nn.Parameter], bool], *,
                keep: bool = True) -> dict[str, torch.Tensor]:
    """Full copies of the selected parameters, by canonical name (collective over sharded ones)."""
    out: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        cname = canonical_name(name)
        if not select(cname, p):
            continue
        t = p.detach().full_tensor() if _is_dtensor(p) else p.detach().clone()
        if keep:
            out[cname] = t.cpu()
    return out


@contextmanager
def full_parameters(model: nn.Module, select: Callable[[str, nn.Parameter], bool], *, differentiable: bool = False,
                    with_grad: bool = False, write_back: bool = False):
    """Temporarily register full tensors in place of the selected sharded (DTensor) parameters.

    For code written against unsharded models (AdaLoRA's regulariser and rank allocation) that only
    reads and writes those parameters; nothing may load a state dict or run FSDP forward inside.
    Collective: every rank enters with the same model and selection (gathered in `named_parameters`
    order) and computes the same thing. `differentiable`: the full tensors are autograd views of the
    shards (`DTensor.full_tensor`), so a loss built from them sends its gradient into the shards.
    Otherwise they are detached copies; `with_grad` gathers their gradients too and `write_back`
    copies their (possibly modified) values back into the shards on exit.
    """
    owners = {}
    for mod_name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            owners.setdefault(id(p), (module, pname, f"{mod_name}.{pname}" if mod_name else pname))
    swapped: list[tuple[nn.Module, str, nn.Parameter, torch.Tensor]] = []
    try:
        for _, p in model.named_parameters():
            module, pname, full_name = owners[id(p)]
            if not _is_dtensor(p) or not select(canonical_name(full_name), p):
                continue
            if differentiable:
                full = p.full_tensor()
            else:
                full = nn.Parameter(p.detach().full_tensor(), requires_grad=p.requires_grad)
                if with_grad and p.grad is not None:
                    full.grad = p.grad.full_tensor()
            module._parameters[pname] = full
            swapped.append((module, pname, p, full))
        yield swapped
    finally:
        for module, pname, original, full in reversed(swapped):
            module._parameters[pname] = original
            if write_back and not differentiable:
                with torch.no_grad():
                    original.to_local().copy_(_local_chunk(full.detach(), original))


def adapter_parameter_filter(model: nn.Module, method: Method) -> Callable[[str, nn.Parameter], bool]:
    """Select the parameters a method trains or owns (not the frozen base): what an adapter file holds."""
    if method.trains_every_parameter:
        return lambda name, p: True
    from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer

    ids = set()
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            for name, p in module.named_parameters():
                if not name.startswith("base_layer."):
                    ids.add(id(p))
        elif isinstance(module, BaseTuner):  # held by the tuner itself (TinyLoRA's shared vectors)
            inside = {id(p) for p in module.model.parameters()}
            ids.update(id(p) for p in module.parameters() if id(p) not in inside)
    return lambda name, p: id(p) in ids


# ------------------------------------------------------------------------------------------------
# The engine
# ------------------------------------------------------------------------------------------------


class PerlFSDPEngine(FSDPEngineWithLMHead):
    """verl's FSDP engine with the actor adapted by PeRL's method registry (see module docstring)."""

    def __init__(self, model_config, engine_config, optimizer_config, checkpoint_config):
        super().__init__(model_config, engine_config, optimizer_config, checkpoint_config)
        self.perl = engine_block(model_config)
        self.policy: AdaptedPolicy | None = None
        self.sgrpo = None
        self._initial_adapter: dict[str, torch.Tensor] = {}
        if self.perl is None:
            return
        self.spec = MethodSpec.from_dict(self.perl["spec"])
        sgrpo = self.perl.get("sgrpo")  # S-GRPO's token subset: the shortened forward (token_subset.py)
        if sgrpo is not None:
            from perl.algos.token_efficient import SGRPOConfig

            self.sgrpo = SGRPOConfig(**sgrpo)
        self.adapter_sync = str(self.perl.get("adapter_sync", "merged"))
        self.sync_dtype = getattr(torch, str(self.perl.get("sync_dtype", "bfloat16")))
        if engine_config.strategy != "fsdp2":
            raise ValueError(
                f"actor_rollout_ref.actor.strategy: PeRL's engine needs fsdp2 (per-parameter sharding keeps "
                f"adapter names and shapes), got {engine_config.strategy!r}"
            )
        if self._qat_enabled:
            raise ValueError("actor.fsdp_config.qat.enable: QAT is not supported together with a PeRL peft method")
        if getattr(model_config, "lora_adapter_path", None):
            raise ValueError("actor_rollout_ref.model.lora_adapter_path is verl's LoRA-only resume; with a PeRL "
                             "peft block resume through trainer.resume_mode instead")
        # verl builds the adapter only when model.lora_rank > 0 (self._is_lora); PeRL builds every method,
        # full fine-tuning included, but never in a forward-only engine (a reference model stays the base).
        self._is_lora = not engine_config.forward_only

    # ----- build ------------------------------------------------------------------------------
    def adapt_total_steps(self) -> int | None:
        """Optimizer steps of the whole run (the schedule of a method with `needs_run_length`)."""
        if self.perl.get("total_steps"):
            return int(self.perl["total_steps"])
        steps = getattr(self.optimizer_config, "total_training_steps", None) or 0
        if steps > 0:
            return int(steps) * int(self.perl.get("updates_per_step", 1) or 1)
        return None

    def _build_lora_module(self, module):
        if self.perl is None:
            return super()._build_lora_module(module)
        if not get_method(self.spec.name).trains_every_parameter:  # before the policy exists
            module.enable_input_require_grads()  # gradient checkpointing with a frozen embedding
        # the adapter's init follows the run's seed (data.seed), without moving the rest of the RNG
        # streams (the CUDA one too: PiSSA/MiLoRA's randomized SVD runs on the accelerator)
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(int(self.perl["seed"]))
            self.policy = adapt(module, self.spec, total_steps=self.adapt_total_steps())
        model = self.policy.model
        self._sync_requires_grad(model)
        self._materialize_meta_buffers(model)
        # FSDP2 gathers one dtype per unit: cast fp32 adapters to the base dtype when they differ (verl's rule).
        base_dtype = next((p.dtype for p in model.parameters() if not p.requires_grad), None)
        if base_dtype is not None:
            for p in model.parameters():
                if p.requires_grad and p.dtype != base_dtype:
                    p.data = p.data.to(base_dtype)
        if self.rank == 0:
            s = self.policy.summary()
            print(f"[perl] {s['method']}: {s['trainable']:,} trainable of {s['total']:,} ({s['percent']:.4f}%), "
                  f"targets {s['target_modules'] or 'all parameters'}; torch on {torch.get_num_threads()} thread(s)")
        return model

    @staticmethod
    def _sync_requires_grad(model: nn.Module) -> None:
        """Make every rank train exactly rank 0's parameters.

        verl builds the base on the meta device on ranks > 0 (and broadcasts rank 0's weights later);
        peft does not always set the same flags on meta weights (AdaLoRA's `ranknum` comes out
        trainable there), and FSDP2 then reduce-scatters gradients of different sizes per rank.
        """
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return
        layout = [(name, tuple(p.shape), p.requires_grad) for name, p in model.named_parameters()]
        reference = [layout]
        dist.broadcast_object_list(reference, src=0)
        if [(n, s) for n, s, _ in reference[0]] != [(n, s) for n, s, _ in layout]:
            raise RuntimeError("PeRL adapter built differently on this rank than on rank 0 (parameter names/shapes)")
        for (_, _, flag), (_, p) in zip(reference[0], model.named_parameters()):
            if p.requires_grad != flag:
                p.requires_grad_(flag)

    @staticmethod
    def _materialize_meta_buffers(model: nn.Module) -> None:
        """Give ranks > 0 rank 0's values of adapter buffers that came out on the meta device.

        VeRA's shared projections are buffers aliased under every adapted layer; verl's FSDP2 state
        broadcast (`set_model_state_dict(broadcast_from_rank0=True)`) skips aliases and then copies
        them from the meta state of ranks > 0. Materialising them first makes that copy a no-op.
        """
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return
        groups: dict[int, list[tuple[str, nn.Module, str]]] = {}  # one entry per tensor, with all its aliases
        for mod_name, module in model.named_modules(remove_duplicate=False):
            for key, buf in module._buffers.items():
                if buf is not None:
                    groups.setdefault(id(buf), []).append((f"{mod_name}.{key}" if mod_name else key, module, key))
        tensors = {min(g)[0]: g for g in groups.values()}  # a rank-independent name per tensor
        local_meta = [name for name, g in tensors.items() if g[0][1]._buffers[g[0][2]].is_meta]
        gathered: list[list[str]] = [None] * dist.get_world_size()  # type: ignore[list-item]
        dist.all_gather_object(gathered, local_meta)
        needed = set().union(*map(set, gathered))
        if not needed:
            return
        if dist.get_rank() == 0 and local_meta:
            raise RuntimeError(f"rank 0 holds meta buffers {local_meta[:3]}; nothing to broadcast them from")
        for name in sorted(needed):
            group = tensors[name]
            buf = group[0][1]._buffers[group[0][2]]
            if buf.is_meta:
                buf = torch.empty(buf.shape, dtype=buf.dtype, device="cpu")
            dist.broadcast(buf, src=0)
            for _, module, key in group:
                module._buffers[key] = buf

    def _build_fsdp_module(self, module):
        module = super()._build_fsdp_module(module)
        if self.policy is not None:
            self.policy.model = module  # FSDP2 shards in place; keep the policy bound to the wrapped module
            if self.policy.method.residual_base:
                # Right after the broadcast from rank 0 the adapter *is* the initial one.
                self._initial_adapter = {
                    name: p.detach().clone()
                    for name, p in module.named_parameters()
                    if ".lora_A." in name or ".lora_B." in name
                }
        return module

    def _build_optimizer(self, module):
        if self.policy is None:
            return super()._build_optimizer(module)
        from verl.workers.config.optimizer import build_optimizer

        groups = self.policy.param_groups(self.optimizer_config.lr, self.optimizer_config.weight_decay)
        return build_optimizer(groups, self.optimizer_config)

    # ----- training step hooks ----------------------------------------------------------------
    def _has_extra_loss(self) -> bool:
        return self.policy is not None and type(self.policy.method).extra_loss is not Method.extra_loss

    def forward_backward_batch(self, data, loss_function, forward_only=False):
        stats: dict[str, float] = {}
        if not forward_only and self.sgrpo is not None:
            data, stats = self.cut_to_sgrpo_subset(data)
        with self._old_log_probs_from_this_forward(data, loss_function, forward_only) as loss_function:
            output = super().forward_backward_batch(data, loss_function, forward_only=forward_only)
        if not forward_only and self._has_extra_loss():
            extra = self.extra_loss_backward()
            if extra is not None:
                stats["actor/perl_extra_loss"] = extra
        if stats and isinstance(output, dict) and isinstance(output.get("metrics"), dict):
            output["metrics"].update({k: [v] for k, v in stats.items()})  # verl's metrics are per-micro-batch lists
        return output

    @contextmanager
    def _old_log_probs_from_this_forward(self, data, loss_function, forward_only: bool):
        """Where PeRL's trainer asks for it (perl.verl_glue.on_policy), verl's loss with the old
        log-probs taken from this forward, and the entropy computed for the step's metric, without a
        gradient unless the loss has it: in row chunks under no_grad, so no logits-sized copy beside the
        update's (the packed path: through verl's `compute_entropy_from_logits`; the padded path:
        `_outputs_with_metric_entropy`). Otherwise verl's loss, unchanged."""
        if forward_only or not tu.get_non_tensor_data(data=data, key=FROM_UPDATE, default=False):
            yield loss_function
            return
        entropy_in_loss = bool(tu.get_non_tensor_data(data=data, key="calculate_entropy", default=False))
        tu.assign_non_tensor(data, calculate_entropy=True)
        compute = self.compute_entropy_from_logits
        packed = tu.get_non_tensor_data(data=data, key="use_remove_padding", default=True)
        if not entropy_in_loss and not packed:
            if not tu.get_non_tensor_data(data=data, key="use_fused_kernels", default=False):
                tu.assign_non_tensor(data, **{METRIC_ENTROPY: True})  # `_outputs_with_metric_entropy`
        elif not entropy_in_loss:  # the packed path's entropy: no gradient, in row chunks (no logits-sized copies)
            from verl.utils.torch_functional import entropy_from_logits_with_chunking

            chunk = int(self.engine_config.entropy_from_logits_chunk_size)

            def entropy_without_gradient(logits, *args, **kwargs):
                with torch.no_grad():
                    return entropy_from_logits_with_chunking(logits, chunk_size=chunk)

            self.compute_entropy_from_logits = entropy_without_gradient
        try:
            yield on_policy_loss(loss_function, entropy_in_loss=entropy_in_loss)
        finally:
            self.compute_entropy_from_logits = compute

    # ----- S-GRPO: the forward only where the loss is (perl.verl_glue.token_subset) ---------------
    def cut_to_sgrpo_subset(self, data):
        """Draw T_i for this optimizer step (seeded by step and rank) and cut the mini-batch to it."""
        from perl.verl_glue.token_subset import cut_to_subset, subset_generator

        # the run's seed (data.seed), written by the config's derive step
        return cut_to_subset(data, self.sgrpo, subset_generator(self.perl["seed"], self.policy.optimizer_steps,
                                                                self.rank))

    def prepare_model_inputs(self, micro_batch):
        model_inputs, output_args = super().prepare_model_inputs(micro_batch)
        from perl.verl_glue.token_subset import SELECTED, loss_positions

        if SELECTED in micro_batch.keys():
            rmpad = tu.get_non_tensor_data(data=micro_batch, key="use_remove_padding", default=True)
            keep = loss_positions(micro_batch, use_remove_padding=rmpad).to(model_inputs["input_ids"].device)
            model_inputs["logits_to_keep"] = keep  # HF causal LMs: lm_head(hidden[:, keep])
            output_args["perl_keep"] = keep
        return model_inputs, output_args

    def prepare_model_outputs(self, output, output_args, micro_batch, logits_processor_func):
        keep = output_args.get("perl_keep")
        if keep is None:
            if tu.get_non_tensor_data(data=micro_batch, key=METRIC_ENTROPY, default=False):
                return self._outputs_with_metric_entropy(output, output_args, micro_batch, logits_processor_func)
            return super().prepare_model_outputs(output, output_args, micro_batch, logits_processor_func)
        from perl.verl_glue.token_subset import subset_log_probs

        return subset_log_probs(output.logits, keep, output_args, micro_batch,
                                use_remove_padding=tu.get_non_tensor_data(data=micro_batch, key="use_remove_padding",
                                                                          default=True),
                                calculate_entropy=tu.get_non_tensor_data(data=micro_batch, key="calculate_entropy",
                                                                         default=False))

    def _outputs_with_metric_entropy(self, output, output_args, micro_batch, logits_processor_func):
        """The padded path's outputs where the entropy is for the step's metric only (perl.verl_glue.on_policy):
        verl's, without the entropy, which verl would compute with `verl_F.entropy_from_logits` on the
        logits that carry the gradient (its softmax, a logits-sized copy, alive to the end of the
        forward). Here: in row chunks under no_grad, at the rollout's temperature, laid out as verl lays
        out the padded path's entropy (per sequence, nested over its tokens)."""
        from verl.utils.torch_functional import entropy_from_logits_with_chunking

        tu.assign_non_tensor(micro_batch, calculate_entropy=False)
        try:
            out = super().prepare_model_outputs(output, output_args, micro_batch, logits_processor_func)
        finally:
            tu.assign_non_tensor(micro_batch, calculate_entropy=True)
        logits = output.logits  # (sequences, padded length, vocab)
        temperature = output_args["temperature"]  # (sequences,)
        lengths = micro_batch["input_ids"].offsets().diff()
        chunk = int(self.engine_config.entropy_from_logits_chunk_size)
        with torch.no_grad():
            rows = [entropy_from_logits_with_chunking(logits[i, : int(n)] / temperature[i].clamp(min=1e-8).to(logits.dtype),
                                                      chunk_size=chunk) for i, n in enumerate(lengths)]
        out["entropy"] = torch.nested.nested_tensor_from_jagged(torch.cat(rows), micro_batch["input_ids"].offsets())
        return out

    def extra_loss_backward(self) -> float | None:
        """Add the method's extra loss (AdaLoRA's orthogonal regulariser) once per optimizer step.

        With fp16 parameters verl scales every micro-batch loss by its grad scaler and unscales all
        gradients before clipping (`optimizer_step`); the extra loss is scaled the same way, else its
        gradient would reach the step divided by the loss scale."""
        select = lambda name, p: p.requires_grad  # noqa: E731
        with full_parameters(self.module, select, differentiable=True):
            extra = self.policy.extra_loss()
        if extra is None:
            return None
        scaler = getattr(self, "scaler", None)  # verl's ShardedGradScaler when param_dtype is fp16, else None
        (scaler.scale(extra) if scaler is not None else extra).backward()
        return float(extra.detach())

    def optimizer_step(self):
        grad_norm = super().optimizer_step()
        if self.policy is not None and math.isfinite(grad_norm):
            self.after_optimizer_step()
        return grad_norm

    def after_optimizer_step(self) -> None:
        """The method's per-step hook. AdaLoRA's rank allocation ranks importance scores across all
        modules (cat + kthvalue over whole tensors), which DTensor shards cannot do: it runs on gathered
        full tensors, identically on every rank, and the pruned values go back to the shards. Other hooks
        (LoRA-FA's freeze of A) act on the sharded parameters directly."""
        whole = self.policy.method.hook_reads_whole
        if whole is None:
            self.policy.after_optimizer_step()
            return
        select = lambda name, p: whole in name  # noqa: E731
        with full_parameters(self.module, select, with_grad=True, write_back=True):
            self.policy.after_optimizer_step()

    # ----- reference policy ----------------------------------------------------------------------
    def disable_adapter(self) -> ContextManager:
        if self.policy is None:
            return super().disable_adapter()
        if self.policy.method.trains_every_parameter:
            raise RuntimeError(f"peft.name={self.policy.name} has no adapter to disable; the reference policy is a separate "
                               "model (verl builds it when use_kl_loss or use_kl_in_reward is on)")
        if self.policy.method.residual_base:
            return self._initial_adapter_swapped()
        return self.module.disable_adapter()

    @contextmanager
    def _initial_adapter_swapped(self):
        """PiSSA/MiLoRA: W_res + B0 A0 is the original W, so the reference runs with the initial adapter."""
        params = dict(self.module.named_parameters())
        saved = []
        with torch.no_grad():
            for name, initial in self._initial_adapter.items():
                p = params[name]
                saved.append((p, p.detach().clone()))
                p.detach().copy_(initial)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, value in saved:
                    p.detach().copy_(value)

    # ----- weight sync to the rollout ------------------------------------------------------------
    def get_per_tensor_param(self, layered_summon=False, base_sync_done=False, **kwargs):
        if self.policy is None:
            return super().get_per_tensor_param(layered_summon=layered_summon, base_sync_done=base_sync_done, **kwargs)
        from verl.utils.fsdp_utils import load_fsdp_model_to_gpu

        if not self._uses_fsdp2_cpu_offload_policy:
            load_fsdp_model_to_gpu(self.module)
        if self.adapter_sync == "adapter":
            return self._adapter_sync(base_sync_done)
        return self._offload_after(self._merged()), None

    def get_per_tensor_param_shard(self, **kwargs):
        """Refused with a PeRL method: verl's shard export (the `delta_sharded` checkpoint engine, also
        behind `prime_delta_snapshots` and `get_per_tensor_param_delta_shard`) yields each rank's local
        shards of the *unmerged* parameters under their peft names, which the rollout cannot load, and
        the merge needs whole tensors of a module."""
        if self.policy is None:
            return super().get_per_tensor_param_shard(**kwargs)
        raise NotImplementedError(
            f"actor_rollout_ref.rollout.checkpoint_engine.backend=delta_sharded is not supported with "
            f"peft.name={self.policy.name}: its shard export sends the unmerged peft parameters, not the merged "
            "weights the rollout serves. Use the naive backend (the default; the one the config check allows, "
            "perl/verl_glue/config/gpu_checks.py)")

    def _merged(self) -> Iterator[tuple[str, torch.Tensor]]:
        from perl.sync import merged_weights

        yield from merged_weights(self.policy, self.sync_dtype)

    def _adapter_sync(self, base_sync_done: bool):
        from peft.utils import PeftType, TaskType

        from perl.sync import base_weights
        from perl.sync.lora import lora_adapter, lora_sync_config

        config = lora_sync_config(self.policy)
        config["peft_type"] = PeftType(config["peft_type"])  # verl's contract: enum members, not strings
        config["task_type"] = TaskType(config["task_type"])
        if base_sync_done:
            _, tensors = lora_adapter(self.policy, dtype=self.sync_dtype)
            self._offload_param_if_needed()
            return iter(tensors.items()), config
        # Once, before the first adapter: the trainer's base (PiSSA/MiLoRA: the residual W - B0 A0).
        return self._offload_after(base_weights(self.policy, self.sync_dtype)), config

    def _offload_param_if_needed(self) -> None:
        if self._is_offload_param:
            from verl.utils.fsdp_utils import offload_fsdp_model_to_cpu

            offload_fsdp_model_to_cpu(self.module)

    def _offload_after(self, pairs):
        try:
            yield from pairs
        finally:
            self._offload_param_if_needed()

    # ----- checkpoints ------------------------------------------------------------------------
    def save_checkpoint(self, local_path: str, hdfs_path: Optional[str] = None, global_step: int = 0,
                        max_ckpt_to_keep: Optional[int] = None, **kwargs) -> None:
        super().save_checkpoint(local_path, hdfs_path=hdfs_path, global_step=global_step,
                                max_ckpt_to_keep=max_ckpt_to_keep, **kwargs)
        if self.policy is None:
            return
        from verl.utils.fsdp_utils import load_fsdp_model_to_gpu

        if self._is_offload_param:
            load_fsdp_model_to_gpu(self.module)
        self.export_adapter(os.path.join(local_path, ADAPTER_DIR))
        if self.rank == 0:
            torch.save(self._perl_state(), os.path.join(local_path, STATE_FILE))
        dist.barrier()
        self._offload_param_if_needed()

    def export_adapter(self, out_dir: str) -> str:
        """Write the adapter in peft format with the method's own `save` (collective; rank 0 writes).

        The live model is FSDP2-sharded and peft's save paths may load adapters into it (PiSSA's
        conversion does), which FSDP2's load hooks do not allow. So rank 0 saves from a replica:
        the same method built on a shapes-only base, holding the gathered full adapter tensors
        (the whole model for `full`), the live peft config (AdaLoRA's rank pattern) and the
        method's state (PiSSA/MiLoRA's initial adapter); frozen base weights are zero-stride
        placeholders that cost no memory and that no save path reads.
        """
        select = adapter_parameter_filter(self.module, self.policy.method)
        rank0 = self.rank == 0
        full = gather_full(self.module, select, keep=rank0)
        if rank0:
            # Building the replica draws random inits; keep the run's RNG stream as verl checkpointed it.
            devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
            with torch.random.fork_rng(devices=devices):
                self.replica(full).save(out_dir)
        dist.barrier()
        return out_dir

    def replica(self, tensors: dict[str, torch.Tensor]) -> AdaptedPolicy:
        """An unsharded CPU copy of the policy for saving (see `export_adapter`)."""
        import copy

        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            base = AutoModelForCausalLM.from_config(copy.deepcopy(self.model_config.hf_config),
                                                    attn_implementation="eager",  # never run; no kernel needed
                                                    trust_remote_code=self.model_config.trust_remote_code)
        replica = adapt(base, self.spec, total_steps=self.policy.total_steps)
        model = replica.model
        live_buffers = {canonical_name(n): b for n, b in self.module.named_buffers()}
        owners: dict[int, list[tuple[nn.Module, str]]] = {}
        for module in model.modules():
            for key, t in list(module._parameters.items()) + list(module._buffers.items()):
                if t is not None:
                    owners.setdefault(id(t), []).append((module, key))
        for kind, named in (("param", model.named_parameters()), ("buffer", model.named_buffers())):
            for name, t in list(named):
                if kind == "param":
                    value = tensors.get(name)
                else:
                    live = live_buffers.get(name)
                    value = live.detach().cpu() if live is not None else None
                if value is None:
                    value = torch.zeros((), dtype=t.dtype).expand(t.shape)  # never read: frozen base
                elif tuple(value.shape) != tuple(t.shape):
                    raise RuntimeError(f"replica {name}: shape {tuple(t.shape)} vs gathered {tuple(value.shape)}")
                new = nn.Parameter(value, requires_grad=t.requires_grad) if kind == "param" else value
                for module, key in owners[id(t)]:
                    (module._parameters if kind == "param" else module._buffers)[key] = new
        if hasattr(model, "peft_config"):
            model.peft_config = copy.deepcopy(self.policy.model.peft_config)
        replica.state = dict(self.policy.state)
        replica.options = self.policy.options
        replica.target_modules = self.policy.target_modules
        replica.base_param_count = self.policy.base_param_count
        replica.optimizer_steps = self.policy.optimizer_steps
        return replica

    def _perl_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"method": self.policy.name, "spec": self.spec.to_dict(),
                                 "optimizer_steps": self.policy.optimizer_steps}
        extra = self.policy.method.trainer_state(self.policy)
        if extra is not None:
            state[self.policy.name] = extra  # e.g. AdaLoRA's allocator, under the method's name
        return state

    def _read_perl_state(self, local_path: str) -> dict[str, Any]:
        """`perl_state.pt`, which rank 0 wrote: rank 0 reads it and broadcasts it, so ranks on other
        nodes need no shared filesystem (verl's own shards are per rank). A missing file fails on
        every rank with the same error."""
        path = os.path.join(local_path, STATE_FILE)
        box: list[Any] = [None]
        if self.rank == 0:
            box[0] = (torch.load(path, weights_only=False) if os.path.exists(path) else
                      f"{local_path} has no {STATE_FILE}: not a checkpoint of PeRL's verl engine")
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast_object_list(box, src=0)
        if isinstance(box[0], str):
            raise FileNotFoundError(box[0])
        return box[0]

    def load_checkpoint(self, local_path: str, hdfs_path: Optional[str] = None, del_local_after_load: int = True,
                        **kwargs) -> None:
        super().load_checkpoint(local_path, hdfs_path=hdfs_path, del_local_after_load=del_local_after_load, **kwargs)
        if self.policy is None or local_path is None:
            return
        state = self._read_perl_state(local_path)
        if state["method"] != self.policy.name:
            raise ValueError(f"checkpoint {local_path} was trained with peft.name={state['method']}, "
                             f"this run has peft.name={self.policy.name}")
        self.policy.optimizer_steps = int(state["optimizer_steps"])
        if self.policy.name in state:
            self.policy.method.load_trainer_state(self.policy, state[self.policy.name])


def register() -> type[PerlFSDPEngine]:
    """Make verl build `PerlFSDPEngine` for fsdp/fsdp2 language models (idempotent)."""
    registry = EngineRegistry._engines.setdefault("language_model", {})
    for backend in ("fsdp", "fsdp2"):
        table = registry.setdefault(backend, {})
        for device, vendor in ENGINE_KEYS:
            if table.get((device, vendor)) is PerlFSDPEngine:
                continue
            if (device, vendor) in table:
                raise RuntimeError(f"verl EngineRegistry already has {table[(device, vendor)].__name__} for "
                                   f"{backend}/{device}/{vendor}; PeRL's engine cannot take that slot")
            EngineRegistry.register(model_type="language_model", backend=backend, device=device, vendor=vendor)(
                PerlFSDPEngine)
    return PerlFSDPEngine


register()

from perl.verl_glue import log_probs  # noqa: E402

log_probs.install()  # token log-probs in row chunks, not row by row (patches/README.md #11)

from perl.algos import register_with_verl  # noqa: E402

register_with_verl()  # the S-GRPO / T-SPMO policy losses, in every worker that builds this engine
