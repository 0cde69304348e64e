"""The run directory (`trainer.default_local_dir`): verl's checkpoints and PeRL's record of the run.

verl writes `global_step_N/actor/` (its sharded model, optimizer and RNG state; PeRL's engine adds
`perl_adapter/`, a peft-format adapter of any method, and `perl_state.pt`) and
`latest_checkpointed_iteration.txt`, which it writes after the checkpoint itself, so a run killed
while saving resumes from the previous one. verl's tracking (console, tensorboard, wandb, ...) is
what a GPU run logs; on top of it every PeRL run keeps, in the same directory:

- `metrics.jsonl`: one line per trainer step with every scalar metric verl computed for it
  (`{"step": N, ...}`), appended as the step ends. A resumed run drops the lines of steps after
  the checkpoint it resumes from (they are trained again), so the file always describes one run;
- a progress line per step on stdout (reward, groups kept / dropped by dynamic sampling, entropy,
  clip fraction, step time), readable where verl's console line of 100+ metrics is not;
- `reward_curve.png` (written by `plot_reward_curve`, at the end of a run);
- `perl_run.json`: what the run trains (`RUN_IDENTITY` keys of its config) and its resolved config;
  resuming the directory with other such settings is refused (`claim`), naming what changed.

The log is written by `PerlSyncTrainer` (perl.verl_glue.trainer) in the task runner's process;
the rest by the entry point (perl.verl_glue.entry).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from numbers import Number
from typing import Any

METRICS_FILE = "metrics.jsonl"
REWARD_CURVE = "reward_curve.png"
RUN_FILE = "perl_run.json"
RESOLVED_CONFIG = "resolved_config.yaml"  # the full config the run started with (verl's keys + PeRL's blocks)
SUMMARY = "summary.json"  # a finished run's numbers (written last, atomically)
COLLAPSED = "collapsed.json"  # written by the trainer when dynamic sampling found nothing left to learn
ADAPTER_DIR = "perl_adapter"  # peft-format adapter inside each verl actor checkpoint
STATE_FILE = "perl_state.pt"  # PeRL step counter + AdaLoRA allocator state, beside it
LATEST = "latest_checkpointed_iteration.txt"  # verl's marker of the last complete checkpoint

# The verl metrics the progress line and the reward curve read.
SCORE = "critic/score/mean"
ENTROPY = "actor/entropy"
CLIPFRAC = "actor/pg_clipfrac"
STEP_TIME = "timing_s/step"
GEN_TIME = "timing_s/gen"
DROPPED = "training/filter_groups/evicted_samples"  # groups dynamic sampling dropped (all-equal metric)
REFILLED = "training/filter_groups/refilled_prompts"  # prompts generated to replace them (PeRL's sampler)
OVER_DISPATCHED = "training/filter_groups/over_dispatched_prompts"  # sent with the batch at the step's start
DISPATCHED = "training/filter_groups/dispatched_prompts"  # all prompts the step generated (batch + both above)
SURPLUS = "training/filter_groups/discarded_surplus_samples"  # groups with signal beyond the batch (verl)
ALL_GROUPS = "perl/acc_all_groups"  # accuracy over every group generated, dropped ones included (PeRL's trainer)


def scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The finite-or-not numeric metrics of a step as plain floats (numpy scalars included)."""
    out = {}
    for key, value in metrics.items():
        if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
            value = value.item()
        if isinstance(value, Number) and not isinstance(value, bool):
            out[key] = float(value)
    return out


def read_metrics(run_dir: str) -> list[dict[str, float]]:
    path = os.path.join(run_dir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill
                continue
    return rows


def keep_metrics_up_to(run_dir: str, step: int) -> str:
    """Drop the metrics.jsonl lines of steps after `step` (a resumed run trains them again), atomically."""
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, METRICS_FILE)
    kept = [r for r in read_metrics(run_dir) if r.get("step", 0) <= step]
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
    os.replace(tmp, path)
    return path


class RunLog:
    """Appends one `metrics.jsonl` line and prints one progress line per trainer step."""

    def __init__(self, run_dir: str, total_steps: int, resumed_from: int, batch_groups: int,
                 dynamic_sampling: bool) -> None:
        self.run_dir = run_dir
        self.total_steps = int(total_steps)
        self.batch_groups = int(batch_groups)
        self.dynamic_sampling = dynamic_sampling
        self.path = keep_metrics_up_to(run_dir, resumed_from)
        if resumed_from > 0:
            print(resuming_line(resumed_from, self.total_steps, run_dir), flush=True)

    def log(self, step: int, metrics: Mapping[str, Any]) -> dict[str, float]:
        row = {"step": int(step), **scalars(metrics)}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        print(self.progress_line(row), flush=True)
        return row

    def progress_line(self, row: Mapping[str, float]) -> str:
        return progress_line(row, self.total_steps, self.batch_groups, self.dynamic_sampling)


def progress_line(row: Mapping[str, float], total_steps: int, batch_groups: int, dynamic_sampling: bool) -> str:
    """The one line a step shows: reward, groups kept / dropped, accuracy over all groups, entropy,
    clip fraction, step time (read by the trainer's process and by the entry point's console)."""
    def fmt(key: str, spec: str) -> str:
        value = row.get(key)
        return "n/a" if value is None or not math.isfinite(value) else format(value, spec)

    parts = [f"[perl] step {int(row['step'])}/{total_steps}", f"reward {fmt(SCORE, '.3f')}"]
    if dynamic_sampling:  # verl reports the evicted groups only on steps that evicted some
        groups = f"groups {batch_groups} kept, {int(row.get(DROPPED, 0))} dropped"
        if row.get(SURPLUS):
            groups += f", {int(row[SURPLUS])} surplus"
        parts.append(groups)
    if ALL_GROUPS in row:
        parts.append(f"acc (all groups) {fmt(ALL_GROUPS, '.3f')}")
    parts += [f"entropy {fmt(ENTROPY, '.3f')}", f"clip {fmt(CLIPFRAC, '.4f')}",
              f"{fmt(STEP_TIME, '.1f')} s (gen {fmt(GEN_TIME, '.1f')} s)"]
    return " | ".join(parts)


def resuming_line(step: int, total_steps: int, run_dir: str) -> str:
    return f"[perl] resuming at step {step}/{total_steps} from {run_dir}"


def plot_reward_curve(run_dir: str) -> str | None:
    """`reward_curve.png`: the training reward of every step: over all the groups it generated
    (dynamic sampling's dropped ones included) and over the groups it trained on."""
    rows = [r for r in read_metrics(run_dir) if SCORE in r]
    if not rows:
        return None
    from perl.analysis.plotting import finish, new_figure

    fig, (ax,) = new_figure(figsize=(6, 3.5))
    steps = [r["step"] for r in rows]
    if all(ALL_GROUPS in r for r in rows):
        ax.plot(steps, [r[ALL_GROUPS] for r in rows], label="accuracy, all generated groups")
    ax.plot(steps, [r[SCORE] for r in rows], label="reward, trained groups", alpha=0.6)
    ax.set_xlabel("RL step")
    ax.set_ylabel("reward")
    return finish(fig, [ax], os.path.join(run_dir, REWARD_CURVE))


# ------------------------------------------------------------------------------------------------
# verl's checkpoints
# ------------------------------------------------------------------------------------------------


def latest_step(run_dir: str) -> int:
    """The step of the last complete checkpoint in `run_dir` (0: none), as verl's resume reads it."""
    path = os.path.join(run_dir, LATEST)
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        text = f.read().strip()
    return int(text) if text.isdigit() else 0


def actor_dir(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, f"global_step_{step}", "actor")


def adapter_dir(run_dir: str, step: int) -> str:
    return os.path.join(actor_dir(run_dir, step), ADAPTER_DIR)


# ------------------------------------------------------------------------------------------------
# what a run trains: resuming a directory under other settings would mix two runs
# ------------------------------------------------------------------------------------------------

# Config keys (subtrees) that define what a run trains. Not among them: the run length
# (trainer.total_training_steps: a longer rerun resumes), logging, checkpoint frequency, paths
# of the outputs, the machine layout and the held-out evaluation.
RUN_IDENTITY = (
    "peft.name", "peft.rank", "peft.alpha", "peft.dropout", "peft.target_modules", "peft.options",
    "perl.algorithm", "perl.loss_mode", "perl.sgrpo",
    "actor_rollout_ref.model.path", "data.train_files", "data.train_batch_size", "data.max_prompt_length",
    "data.max_response_length", "actor_rollout_ref.actor.optim.lr", "actor_rollout_ref.actor.optim.weight_decay",
    "actor_rollout_ref.actor.ppo_mini_batch_size", "actor_rollout_ref.actor.ppo_epochs",
    "actor_rollout_ref.actor.clip_ratio_low", "actor_rollout_ref.actor.clip_ratio_high",
    "actor_rollout_ref.actor.loss_agg_mode", "actor_rollout_ref.actor.policy_loss.loss_mode",
    "actor_rollout_ref.actor.use_kl_loss", "actor_rollout_ref.actor.entropy_coeff",
    "actor_rollout_ref.rollout.n", "actor_rollout_ref.rollout.temperature", "actor_rollout_ref.rollout.top_p",
    "algorithm.adv_estimator", "algorithm.norm_adv_by_std_in_grpo", "algorithm.use_kl_in_reward",
    "algorithm.filter_groups.enable", "algorithm.filter_groups.metric",
)
# A method that schedules itself over the run (`Method.needs_run_length`, AdaLoRA's rank budget):
# the run's length is part of what it trains.
RUN_LENGTH_IDENTITY = ("actor_rollout_ref.model.lora.perl.total_steps",)


def run_identity(cfg) -> dict[str, Any]:
    from omegaconf import OmegaConf

    from perl.methods import METHODS

    from perl.verl_glue.config.toy import identity as toy_identity

    method = METHODS.get(str(OmegaConf.select(cfg, "peft.name")))
    keys = RUN_IDENTITY + (RUN_LENGTH_IDENTITY if method is not None and method.needs_run_length else ())
    out = {}
    for key in keys:
        value = OmegaConf.select(cfg, key, default=None)
        out[key] = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
    out.update(toy_identity(cfg))  # the toy's own list: what of its block changes the data
    return json.loads(json.dumps(inside_relative(out, str(OmegaConf.select(cfg, "trainer.default_local_dir"))),
                                 default=str))


IN_RUN_DIR = "<run dir>"


def inside_relative(value: Any, run_dir: str) -> Any:
    """Paths inside the run directory as `<run dir>/...` (the toy's data lives there): a copied or
    moved run keeps its identity; a path outside it stays as it is."""
    root = os.path.abspath(os.path.expanduser(run_dir)) + os.sep
    if isinstance(value, dict):
        return {k: inside_relative(v, run_dir) for k, v in value.items()}
    if isinstance(value, list):
        return [inside_relative(v, run_dir) for v in value]
    if isinstance(value, str) and os.path.isabs(value) and value.startswith(root):
        return os.path.join(IN_RUN_DIR, value[len(root):])
    return value


def identity_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    unset = "(unset)"
    return [f"{k}: {old.get(k, unset)} -> {new.get(k, unset)}" for k in sorted(set(old) | set(new))
            if (k in old, old.get(k)) != (k in new, new.get(k))]


def claim(run_dir: str, cfg) -> None:
    """A run directory holds one run. Once it has a checkpoint, rerunning it under settings that
    change what it trains is refused before anything starts; otherwise the record is (re)written."""
    from omegaconf import OmegaConf

    from perl.io import atomic_file

    identity = run_identity(cfg)
    path = os.path.join(run_dir, RUN_FILE)
    if os.path.exists(path) and latest_step(run_dir) > 0:
        with open(path) as f:
            changes = identity_changes(json.load(f)["identity"], identity)
        if changes:
            raise ValueError(f"trainer.default_local_dir={run_dir} holds a run with other settings "
                             f"({'; '.join(changes)}); use another directory, or delete that one to start over")
    os.makedirs(run_dir, exist_ok=True)
    with atomic_file(path) as tmp, open(tmp, "w") as f:
        json.dump({"identity": identity, "config": OmegaConf.to_container(cfg, resolve=True)}, f, indent=2,
                  default=str)
