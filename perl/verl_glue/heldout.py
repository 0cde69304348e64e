"""Held-out evaluation of a verl run before and after training (`perl.heldout`), through `perl eval`.

Both evaluations are `perl eval` runs (perl.eval.evaluate) with vLLM as the backend, on the same
k per-sample-seeded samples per problem, so "before" and "after" score the same random streams
(a paired comparison), every sample is kept (`heldout.samples.jsonl`) and a killed evaluation
resumes. "before" is the base model (`actor_rollout_ref.model.path`); "after" is the last
checkpoint's adapter (`global_step_N/actor/perl_adapter`, any method) merged into the base by
`perl export`'s path and written to `<run dir>/final_model` (a HF checkpoint vLLM serves).

The "before" score depends only on the base model, the data and the evaluation settings; it is
computed once and cached under $PERL_CACHE/heldout keyed by all three (the model by its files'
sizes and modification times), so a second run of the toy does not evaluate its cold start again.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import shutil
from typing import Any

from omegaconf import DictConfig, OmegaConf

HELDOUT = "heldout"  # the benchmark's name in results.json
BEFORE_DIR = "eval_before"
FINAL_MODEL = "final_model"
RESULTS = "results.json"
STEP_STAMP = "perl_step.json"  # in final_model/: the checkpoint step it was merged from


def eval_settings(cfg: DictConfig):
    """perl eval's EvalConfig for the run: k, seed, and the rollout's sampling unless overridden."""
    from perl.generation import SamplingConfig
    from perl.eval import EvalConfig

    block = cfg.perl.heldout
    rollout = cfg.actor_rollout_ref.rollout
    sampling = SamplingConfig(max_new_tokens=int(cfg.data.max_response_length),
                              temperature=float(block.temperature if block.temperature is not None else rollout.temperature),
                              top_p=float(block.top_p if block.top_p is not None else rollout.top_p))
    return EvalConfig(k={HELDOUT: int(block.k)}, seed=int(block.seed), batch_size=4096, sampling=sampling)


def reward_kwargs(cfg: DictConfig) -> dict[str, Any]:
    """The run's `perl.reward` (format rules such as `require_think: false` for an instruct model
    without a think block): the held-out set is scored by the rules training is rewarded by."""
    block = cfg.perl.get("reward")
    return OmegaConf.to_container(block, resolve=True) if block else {}


def heldout_reward(cfg: DictConfig):
    """The process-wide reward for those rules (checked by compose): before and after share its verifiers."""
    from perl.reward import reward_from_kwargs

    return reward_from_kwargs(reward_kwargs(cfg))


def _vllm_backend(cfg: DictConfig, model_dir: str):
    from perl.eval.backends import VLLMBackend

    on_cpu = cfg.trainer.device == "cpu"
    return VLLMBackend(model_dir, dtype="float32" if on_cpu else "bfloat16",
                       max_model_len=int(cfg.data.max_prompt_length) + int(cfg.data.max_response_length),
                       on_cpu=on_cpu)


def evaluate_dir(cfg: DictConfig, model_dir: str, out_dir: str, run_info: dict[str, Any]) -> dict[str, Any]:
    """One `perl eval` run of `model_dir` on the held-out set into `out_dir` (resumes a partial one)."""
    from perl.generation.tokenizer import load_tokenizer
    from perl.eval import evaluate

    backend = _vllm_backend(cfg, model_dir)
    try:
        return evaluate(backend, load_tokenizer(model_dir), {HELDOUT: str(cfg.perl.heldout.data)}, out_dir,
                        eval_settings(cfg), reward=heldout_reward(cfg), run_info=run_info)
    finally:
        backend.close()
        del backend
        gc.collect()


def _model_identity(model_dir: str) -> list:
    out = []
    for name in sorted(os.listdir(model_dir)):
        path = os.path.join(model_dir, name)
        if os.path.isfile(path):
            st = os.stat(path)
            out.append([name, st.st_size, st.st_mtime_ns])
    return [os.path.realpath(model_dir), out]


def before_cache_dir(cfg: DictConfig, model_dir: str) -> str:
    from dataclasses import asdict

    from perl.io import cache_root, file_sha256

    settings = eval_settings(cfg)
    key = json.dumps({"model": _model_identity(model_dir), "data": file_sha256(str(cfg.perl.heldout.data)),
                      "eval": {**asdict(settings), "sampling": asdict(settings.sampling)}, "reward": reward_kwargs(cfg),
                      "device": str(cfg.trainer.device)}, sort_keys=True)
    return os.path.join(cache_root(), HELDOUT, hashlib.sha256(key.encode()).hexdigest()[:16])


def evaluate_before(cfg: DictConfig, run_dir: str) -> dict[str, Any]:
    """The base model on the held-out set: `<run dir>/eval_before/results.json` (from the cache when
    the same model, data and settings were evaluated before)."""
    from perl.io import atomic_dir

    out = os.path.join(run_dir, BEFORE_DIR)
    if os.path.exists(os.path.join(out, RESULTS)):
        return json.load(open(os.path.join(out, RESULTS)))
    model_dir = str(cfg.actor_rollout_ref.model.path)
    cached = before_cache_dir(cfg, model_dir)
    hit = os.path.exists(os.path.join(cached, RESULTS))
    if not hit:
        with atomic_dir(cached) as tmp:
            evaluate_dir(cfg, model_dir, tmp, {"label": "cold start" if cfg.perl.get("toy") is not None else "base",
                                               "model": os.path.abspath(model_dir), "method": None,
                                               "trainable_percent": None})
    with atomic_dir(out) as tmp:
        for name in os.listdir(cached):
            shutil.copy2(os.path.join(cached, name), os.path.join(tmp, name))
    print(f"[perl] held-out before training: {os.path.join(out, RESULTS)}" + (f" (cached: {cached})" if hit else ""),
          flush=True)
    return json.load(open(os.path.join(out, RESULTS)))


def needs_export(run_dir: str, step: int, *, fresh: bool) -> bool:
    """Whether `evaluate_after` merges checkpoint `step` (and so reads its adapter) or reuses the
    `final_model/` merged from it before."""
    stamp = os.path.join(run_dir, FINAL_MODEL, STEP_STAMP)
    return fresh or not os.path.exists(stamp) or json.load(open(stamp)).get("step") != step


def eval_command(cfg: DictConfig, adapter: str, out_dir: str) -> str:
    """The `perl eval` command that scores `adapter` as the "after" evaluation does (same data, k,
    seed, sampling and reward rules, so still paired with eval_before/): what to run on the node that
    has the checkpoint when the driver's node does not (perl.verl_glue.checkpoints.NotOnThisNode)."""
    import shlex

    settings = eval_settings(cfg)
    argv = ["perl", "eval", "--model", str(cfg.actor_rollout_ref.model.path), "--adapter", adapter,
            "--data", f"{HELDOUT}={cfg.perl.heldout.data}", "--k", str(settings.k[HELDOUT]),
            "--seed", str(settings.seed), "--temperature", str(settings.sampling.temperature),
            "--top-p", str(settings.sampling.top_p), "--max-new-tokens", str(settings.sampling.max_new_tokens)]
    for key, value in reward_kwargs(cfg).items():
        argv += ["--reward", f"{key}={value if isinstance(value, str) else json.dumps(value)}"]
    return shlex.join(argv + ["--out", out_dir])


def evaluate_after(cfg: DictConfig, run_dir: str, step: int, run_info: dict[str, Any], *, fresh: bool) -> dict[str, Any]:
    """The last checkpoint's policy on the held-out set: merged into `<run dir>/final_model`, then
    `perl eval` into the run directory itself (`results.json`, `heldout.samples.jsonl`).
    `fresh`: the run trained since an earlier evaluation, whose files are stale and removed."""
    from perl.sync.export import export_adapter_merged
    from perl.verl_glue.run_dir import adapter_dir

    final = os.path.join(run_dir, FINAL_MODEL)
    if needs_export(run_dir, step, fresh=fresh):
        for stale in (f"{HELDOUT}.samples.jsonl", RESULTS):
            if os.path.exists(os.path.join(run_dir, stale)):
                os.remove(os.path.join(run_dir, stale))
        base = str(cfg.actor_rollout_ref.model.path)
        export_adapter_merged(base, adapter_dir(run_dir, step), final,
                              dtype="fp32" if cfg.trainer.device == "cpu" else "bf16", tokenizer_dir=base,
                              progress=False)
        with open(os.path.join(final, STEP_STAMP), "w") as f:
            json.dump({"step": step, "adapter": adapter_dir(run_dir, step)}, f)
    return evaluate_dir(cfg, final, run_dir, run_info)

