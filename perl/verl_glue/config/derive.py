"""Translation: the keys verl needs, written from PeRL's `peft:` / `perl:` blocks (in place).

verl's FSDP engine knows LoRA only through `model.lora_rank` / `model.lora.*`; PeRL's engine
(`ENGINE_LIB`, imported in every worker through `model.external_lib`) reads its own block,
`model.lora.perl` (`engine_block`). The reward, the dynamic-sampling sampler and PeRL's sync
trainer are wired in here too. Nothing here reads files or starts anything.
"""

from __future__ import annotations

import os
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from perl.methods import MethodSpec, MethodSpecError
from perl.methods.catalog import get_method, method_names, resolve_options
from perl.methods.spec import SPEC_FIELDS

from . import toy
from .batches import run_arithmetic, updates_per_step
from .blocks import ADAPTER_SYNC, CONSOLE_MODES, OLD_LOG_PROBS_MODES, SYNC_DTYPES, HeldoutBlock, PeftBlock, PerlBlock, read_block
from .layers import parse_overrides
from .cpu import poll_interval
from .errors import ConfigError

ENGINE_LIB = "perl.verl_glue.engine"
REWARD_PATH = "pkg://perl.reward.verl_reward"
SAMPLER_PATH = "pkg://perl.verl_glue.sampler"
SAMPLER_NAME = "PerlReplayBuffer"
# verl's agent-loop manager with PeRL's worker (perl/verl_glue/agent_loop.py); a string, so that
# composing a config does not import Ray
AGENT_LOOP_MANAGER = "perl.verl_glue.agent_loop.PerlAgentLoopManager"
# PeRL's sync trainer (perl.verl_glue.trainer): verl's, plus the run log and the T-SPMO advantage step.
PERL_TRAINER_MODE = "perl_sync"
SYNC_TRAINER_MODES = ("sync", PERL_TRAINER_MODE)


def is_remote(path: Any) -> bool:
    return "://" in str(path)


def run_dir(cfg: DictConfig) -> str:
    """The run directory: verl's checkpoints (global_step_*) and PeRL's run files, made absolute."""
    return os.path.abspath(os.path.expanduser(str(cfg.trainer.default_local_dir)))


def peft_spec(cfg: DictConfig) -> MethodSpec:
    """The method spec of the `peft:` block, validated (name, shared knobs, the method's own options)."""
    block = read_block(PeftBlock, cfg.peft, "peft", hint="method-specific knobs go under peft.options")
    spec_fields = {k: getattr(block, k) for k in SPEC_FIELDS if getattr(block, k) is not None}
    try:
        spec = MethodSpec.from_dict(spec_fields)
        resolve_options(get_method(spec.name), spec.options)
    except MethodSpecError as e:
        raise ConfigError(str(e)) from None
    return spec


def read_perl_blocks(cfg: DictConfig) -> PerlBlock:
    """`perl:` and `perl.heldout`, typed and checked."""
    perl = read_block(PerlBlock, cfg.perl, "perl")
    if perl.console not in CONSOLE_MODES:
        raise ConfigError(f"perl.console: {perl.console!r} is not one of {', '.join(CONSOLE_MODES)}")
    if perl.old_log_probs not in OLD_LOG_PROBS_MODES:
        raise ConfigError(f"perl.old_log_probs: {perl.old_log_probs!r} is not one of {', '.join(OLD_LOG_PROBS_MODES)}")
    if perl.heldout is not None:
        heldout = read_block(HeldoutBlock, perl.heldout, "perl.heldout")
        if heldout.k < 1:
            raise ConfigError(f"perl.heldout.k must be >= 1, got {heldout.k}")
    return perl


def rebase_data_files(cfg: DictConfig) -> None:
    """perl.data_dir set: relative data.train_files / val_files are file names under it. The directory
    is made absolute here (Ray workers need not share the launcher's working directory)."""
    data_dir = cfg.perl.get("data_dir")
    if not data_dir:
        return
    root = os.path.abspath(os.path.expanduser(str(data_dir)))

    def under(f: Any) -> Any:
        f = str(f)
        return f if is_remote(f) or os.path.isabs(os.path.expanduser(f)) else os.path.join(root, f)

    with open_dict(cfg):
        cfg.perl.data_dir = root
        for key in ("train_files", "val_files"):
            files = cfg.data[key]
            if isinstance(files, (list, ListConfig)):
                cfg.data[key] = [under(f) for f in files]
            elif files is not None:
                cfg.data[key] = under(files)


def sync_settings(cfg: DictConfig, spec: MethodSpec) -> tuple[str, str]:
    """(adapter_sync, sync_dtype) of the peft block, checked against the method."""
    sync = str(cfg.peft.get("adapter_sync", "merged"))
    if sync not in ADAPTER_SYNC:
        raise ConfigError(f"peft.adapter_sync: {sync!r} is not one of {', '.join(ADAPTER_SYNC)}")
    method = get_method(spec.name)
    if sync == "adapter" and not method.vllm_lora:
        raise ConfigError(f"peft.adapter_sync=adapter serves plain LoRA through vLLM's LoRA path; {spec.name} has no "
                          f"such form. Use adapter_sync=merged, or a method among "
                          f"{', '.join(method_names(lambda m: m.vllm_lora))}")
    sync_dtype = cfg.peft.get("sync_dtype")
    sync_dtype = str(cfg.actor_rollout_ref.rollout.dtype if sync_dtype is None else sync_dtype)
    if sync_dtype not in SYNC_DTYPES:
        raise ConfigError(f"peft.sync_dtype: {sync_dtype!r} is not one of {', '.join(SYNC_DTYPES)}")
    return sync, sync_dtype


def derive(cfg: DictConfig) -> None:
    """Write the keys verl needs from the PeRL blocks (in place)."""
    spec = peft_spec(cfg)
    read_perl_blocks(cfg)
    sync, sync_dtype = sync_settings(cfg, spec)
    method = get_method(spec.name)
    for role in ("actor", "ref"):
        strategy = cfg.actor_rollout_ref[role].strategy
        if strategy != "fsdp2":
            raise ConfigError(f"actor_rollout_ref.{role}.strategy: PeRL's engine runs on fsdp2 (per-parameter "
                              f"sharding keeps every method's adapter names), got {strategy!r}")
    save_lora_only = OmegaConf.select(cfg, "actor_rollout_ref.actor.checkpoint.save_lora_only", default=False)
    if save_lora_only and not method.lora_keyed:
        raise ConfigError(f"actor_rollout_ref.actor.checkpoint.save_lora_only keeps only 'lora_' keys; {spec.name}'s "
                          f"adapter has others, so resume would lose it. Leave it false, or use one of "
                          f"{', '.join(method_names(lambda m: m.lora_keyed))}")
    if cfg.algorithm.adv_estimator == "tspmo":
        # only PeRL's trainer hands T-SPMO the response token ids (perl.verl_glue.trainer)
        mode = cfg.trainer.v1.trainer_mode
        if mode not in SYNC_TRAINER_MODES:
            raise ConfigError(f"trainer.v1.trainer_mode={mode}: T-SPMO (adv_estimator=tspmo) runs on PeRL's sync "
                              f"trainer only; use one of {', '.join(SYNC_TRAINER_MODES)}")
    if cfg.trainer.v1.trainer_mode == "sync":
        # PeRL's sync trainer is verl's plus the run log and the T-SPMO step (perl.verl_glue.trainer)
        cfg.trainer.v1.trainer_mode = PERL_TRAINER_MODE

    rebase_data_files(cfg)
    if toy.enabled(cfg):
        toy.toy_paths(cfg, run_dir(cfg))
    heldout = cfg.perl.get("heldout")
    if heldout is not None and heldout.get("data") is not None and int(cfg.trainer.save_freq) <= 0:
        raise ConfigError("perl.heldout.data is set but trainer.save_freq <= 0: the 'after' evaluation reads the "
                          "last checkpoint; set trainer.save_freq > 0 (verl then also saves at the last step)")
    with open_dict(cfg):
        cfg.perl.derived = run_arithmetic(cfg)
    updates = updates_per_step(cfg)
    total = cfg.trainer.total_training_steps
    model = cfg.actor_rollout_ref.model
    with open_dict(model):
        # verl keeps the reference policy in the actor (adapter disabled) and calls the engine's
        # adapter hook exactly when lora_rank > 0; full fine-tuning has no adapter.
        model.lora_rank = 0 if method.trains_every_parameter else spec.rank
        model.lora.merge = sync == "merged"
        model.lora.perl = {
            "spec": spec.to_dict(),
            "adapter_sync": sync,
            "sync_dtype": sync_dtype,
            "updates_per_step": updates,
            "total_steps": int(total) * updates if total else None,
            "sgrpo": sgrpo_config(str(cfg.perl.loss_mode), cfg.perl.get("sgrpo")),
            # the run's seed, for what the engine draws itself (S-GRPO's token subsets)
            "seed": int(cfg.data.get("seed") or 0),
        }
        libs = model.external_lib
        libs = [] if libs is None else ([libs] if isinstance(libs, str) else list(libs))
        if ENGINE_LIB not in libs:
            libs.append(ENGINE_LIB)
        model.external_lib = libs[0] if len(libs) == 1 else libs
    wire_reward(cfg)
    wire_sampler(cfg)
    wire_agent_loop(cfg)
    env_vars_as_strings(cfg)


def env_vars_as_strings(cfg: DictConfig) -> None:
    """Ray's runtime env takes only string values (`...env_vars.X=1` on the command line parses as an
    int, and Ray would stop with a TypeError after the config check): numbers and booleans become
    their text; `X=null` leaves the variable out (Ray refuses None); anything else is refused naming
    the key."""
    env = OmegaConf.select(cfg, "ray_kwargs.ray_init.runtime_env.env_vars")
    if env is None:
        return
    with open_dict(env):
        for key in list(env.keys()):
            value = env[key]
            if value is None:
                del env[key]
            elif isinstance(value, bool):
                env[key] = str(value).lower()
            elif isinstance(value, (int, float)):
                env[key] = str(value)
            elif not isinstance(value, str):
                raise ConfigError(f"ray_kwargs.ray_init.runtime_env.env_vars.{key}: an environment variable "
                                  f"is a string, got {value!r}")


def wire_agent_loop(cfg: DictConfig) -> None:
    """PeRL's agent-loop manager (one agent loop per worker; in-process scoring with
    reward.num_workers=0), unless the recipe names its own."""
    agent = cfg.actor_rollout_ref.rollout.agent
    with open_dict(agent):
        if not agent.get("agent_loop_manager_class"):
            agent.agent_loop_manager_class = AGENT_LOOP_MANAGER


def wire_reward(cfg: DictConfig) -> None:
    """PeRL's math reward as verl's custom reward function, with DAPO's overlong buffer and the
    format rules of `perl.reward`."""
    reward = cfg.reward
    with open_dict(reward):
        if not reward.custom_reward_function.path:
            reward.custom_reward_function.path = REWARD_PATH
            reward.custom_reward_function.name = "compute_score"
        reward.reward_kwargs.overlong_buffer_cfg = cfg.perl.overlong_buffer
        reward.reward_kwargs.max_resp_len = "${data.max_response_length}"
        if cfg.perl.get("reward"):  # the math reward's format rules, for the custom reward function
            from perl.reward import reward_config

            kwargs = OmegaConf.to_container(cfg.perl.reward, resolve=True)
            try:
                reward_config(kwargs, field="perl.reward")
            except (TypeError, ValueError) as e:
                raise ConfigError(str(e)) from None
            reward.custom_reward_function.reward_kwargs = kwargs


def wire_sampler(cfg: DictConfig) -> None:
    """verl's V1 ReplayBuffer does DAPO's filtering and refill; PeRL's subclass adds the cap
    (max_num_gen_batches) that the built-in buffer ignores, and a poll interval that suits the machine."""
    fg = cfg.algorithm.filter_groups
    sampler = cfg.trainer.v1.sampler
    if cfg.trainer.v1.trainer_mode not in SYNC_TRAINER_MODES or sampler.custom_sampler.path:
        return
    with open_dict(sampler):
        sampler.custom_sampler.path = SAMPLER_PATH
        sampler.custom_sampler.name = SAMPLER_NAME
        sampler.sampler_kwargs = {
            "filter_groups_metric": "${algorithm.filter_groups.metric}" if fg.enable else None,
            "max_num_gen_batches": "${algorithm.filter_groups.max_num_gen_batches}",
            "max_inflight_gen_batches": "${algorithm.filter_groups.max_inflight_gen_batches}",
            "train_batch_size": "${data.train_batch_size}",
            "sync_refill_failed_groups": "${trainer.v1.sampler.sync_refill_failed_groups}",
            "poll_interval": poll_interval(cfg),
            "over_dispatch": "${perl.over_dispatch}",
            "run_dir": run_dir(cfg),  # a resume reads the drop rate of the steps before it
        }


def loss_mode_overrides(loss_mode: str, sgrpo: Any = None) -> tuple[DictConfig, DictConfig]:
    """perl.loss_mode=sgrpo|tspmo: the overrides of `perl.algos.verl_overrides` (token: none)."""
    from perl.algos import LOSS_MODES, verl_overrides

    if loss_mode not in LOSS_MODES:
        raise ConfigError(f"perl.loss_mode: {loss_mode!r} is not one of {', '.join(LOSS_MODES)}")
    if sgrpo is not None and loss_mode != "sgrpo":
        raise ConfigError(f"perl.sgrpo is set but perl.loss_mode={loss_mode}; it applies to loss_mode=sgrpo only")
    sgrpo_config(loss_mode, sgrpo)  # checks the knobs
    return parse_overrides(verl_overrides(loss_mode))


def sgrpo_config(loss_mode: str, sgrpo: Any) -> dict[str, Any] | None:
    """The S-GRPO token-subset settings PeRL's engine draws T_i with (None unless loss_mode=sgrpo)."""
    from dataclasses import asdict

    from perl.algos import SGRPOConfig

    if loss_mode != "sgrpo":
        return None
    try:
        knobs = OmegaConf.to_container(sgrpo) if isinstance(sgrpo, DictConfig) else dict(sgrpo or {})
        return asdict(SGRPOConfig(**knobs))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"perl.sgrpo: {e}") from None
