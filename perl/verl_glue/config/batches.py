"""The batch arithmetic: what a trainer step and the run amount to in the paper's units, and the
divisibility verl needs (verl itself asserts deep inside its workers, minutes later)."""

from __future__ import annotations

import os
from typing import Any

from omegaconf import DictConfig, ListConfig

from .errors import ConfigError


def dataset_rows(cfg: DictConfig) -> tuple[int | None, str]:
    """Rows of the training data and where the number comes from: the parquet files' metadata when
    they are at hand, else the recipe's `perl.dataset_rows`."""
    files = cfg.data.train_files
    files = list(files) if isinstance(files, (list, ListConfig)) else [files]
    paths = [os.path.expanduser(str(f)) for f in files if f is not None]
    if paths and all(not "://" in p and os.path.isfile(p) for p in paths):
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


