"""Old log-probs from the actor update's own forward, where a trainer step is one optimizer step.

PPO's ratio compares the policy being trained with the one the batch's log-probs were taken under,
π_old. With ppo_epochs=1 and ppo_mini_batch_size = train_batch_size (PeRL's DAPO default, the
paper's setting: one optimizer step per trainer step) the update's forward runs with exactly π_old's
weights, since the optimizer steps only after every micro-batch's backward: the ratio is 1, clipping
never binds, and what the loss needs is the ratio's gradient, ∇ log π. verl's legacy FSDP actor did
the same (`verl/workers/actor/dp_actor.py`: `if on_policy: old_log_prob = log_prob.detach()`), but
verl 0.9.1's V1 trainer always runs a separate forward over the whole batch first
(`PPOTrainer._compute_old_log_prob`), and reads the step's entropy and its rollout-vs-actor metrics
from it.

With `perl.old_log_probs=auto` (the default) PeRL skips that pass where it is redundant
(`old_log_probs_source` says where and why not): the loss takes old_log_probs = log_probs.detach()
from the update's own forward (`on_policy_loss`, wrapped around verl's loss by PeRL's engine), and
the metrics the pass gave come from the same forward, with the same weights: `actor/entropy` (no
gradient flows through it unless entropy_coeff puts it in the loss), verl's `training/
rollout_probs_diff_*` / `rollout_actor_probs_pearson_corr` and the `rollout_corr/*` diagnostics its
advantage step reports (`_compute_advantage` then reads no rollout_correction block:
`trainer.without_rollout_correction`), summed per micro-batch and combined after the update
(`update_metrics`). `perl.old_log_probs=recompute` keeps verl's separate pass.

Where the pass stays (the ratio or the advantage needs a π_old that is not the update's own policy,
or a record needs the pass's values): more than one optimizer step per trainer step, verl's rollout
correction (IS/RS weights against π_old; its bypass mode already skips the pass itself), the KL
penalty in the reward, the optimal-token-baseline estimators, S-GRPO (its update forward covers its
token subset only, the step's entropy covers every token) and distillation. `perl.dump_rollout_tokens`
records no `old_log_probs` where there was no pass (the rollout's are there, and the weights they
were taken with are the step's checkpoint before).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

# The flag PeRL's trainer puts in the update batch's extra info, read by PeRL's engine: take the
# old log-probs from this forward. Its absence means verl's own path (the separate pass ran).
FROM_UPDATE = "perl_old_log_probs_from_update"
# set by PeRL's engine on such an update's padded-path micro-batches: the entropy is for the metric only
METRIC_ENTROPY = "perl_metric_entropy"

# verl's estimators whose advantage reads old_log_probs (verl/trainer/ppo/core_algos.py)
_ESTIMATORS_READING_OLD = ("optimal_token_baseline", "tir_optimal_token_baseline")

# The pass's metrics of the rollout's log-probs against the actor's are means over the batch's tokens
# or sequences, maxima and minima: each micro-batch reports its sums (SUM metrics: verl adds them over
# micro-batches and averages them over data-parallel ranks, so every sum is scaled alike and their
# ratios are the global means) and its extremes (MAX / MIN), and `update_metrics` divides.
_KEY = "actor/perl_vs_rollout/{}"
_TOKEN_SUMS = ("tokens", "diff", "diff_sq", "actor", "rollout", "actor_sq", "rollout_sq", "actor_rollout",
               "kl", "k3_kl", "rho_sq")
_SEQ_SUMS = ("seqs", "training_ppl", "training_log_ppl", "rollout_ppl", "rollout_log_ppl", "log_ppl_diff",
             "log_ppl_abs_diff", "ppl_ratio", "rho_sq_seq")
_EXTREMES = {"diff_max": "max", "log_ppl_diff_max": "max", "log_ppl_diff_min": "min", "ranks": "max"}
_ENTROPY_KEY = "actor/entropy_loss"  # verl's ppo_loss: agg_loss of the entropy over the global batch
SAFETY_BOUND = 20.0  # verl's rollout_corr_helper.SAFETY_BOUND: the clamp of log ratios before exp


def old_log_probs_source(cfg) -> tuple[str, str]:
    """("update", why) where the update's forward gives the old log-probs; ("pass", why) where verl's
    separate pass runs (or verl's bypass mode takes the rollout's log-probs instead)."""
    from perl.verl_glue.config.batches import updates_per_step

    perl = cfg.get("perl") or {}
    if perl.get("old_log_probs", "auto") == "recompute":  # any other value than auto: refused by read_perl_blocks
        return "pass", "perl.old_log_probs=recompute"
    updates = updates_per_step(cfg)
    if updates != 1:
        return "pass", f"{updates} optimizer steps per trainer step (ppo_epochs x mini-batches); after the first, π_old is not the policy"
    algorithm = cfg.algorithm
    correction = algorithm.get("rollout_correction") or {}
    if correction.get("bypass_mode", False):
        return "pass", "algorithm.rollout_correction.bypass_mode; verl takes the rollout's log-probs as π_old"
    if correction.get("rollout_is") is not None or correction.get("rollout_rs") is not None:
        return "pass", "algorithm.rollout_correction weighs against π_old before the update"
    if algorithm.get("use_kl_in_reward", False):
        return "pass", "algorithm.use_kl_in_reward; the advantage step reads π_old"
    if str(algorithm.get("adv_estimator")) in _ESTIMATORS_READING_OLD:
        return "pass", f"algorithm.adv_estimator={algorithm.adv_estimator} reads π_old"
    if perl.get("loss_mode") == "sgrpo":
        return "pass", "perl.loss_mode=sgrpo; the update's forward covers the token subset only"
    distillation = cfg.get("distillation") or {}
    if distillation.get("enabled", False):
        return "pass", "distillation"
    return "update", "one optimizer step per trainer step; π_old is the update's own policy"


def describe(cfg) -> str:
    """The old log-probs' source in a line (the first screen, the dry run, the trainer's log)."""
    source, why = old_log_probs_source(cfg)
    where = "the update's own forward" if source == "update" else "verl's separate pass"
    return f"{where} ({why})"


def on_policy_loss(loss_function: Callable, *, entropy_in_loss: bool) -> Callable:
    """verl's loss with old_log_probs = the forward's own log-probs, detached, and the sums the
    pass's metrics are made of (entropy: verl's own `entropy_loss` metric, detached unless
    `entropy_in_loss`)."""
    from verl.workers.utils.padding import no_padding_2_padding, response_to_nested

    def loss(model_output: dict, data, dp_group=None) -> tuple[torch.Tensor, dict[str, Any]]:
        log_prob = no_padding_2_padding(model_output["log_probs"], data).detach()
        data["old_log_probs"] = response_to_nested(log_prob, data["response_mask"])
        if not entropy_in_loss and model_output.get("entropy") is not None:
            model_output = {**model_output, "entropy": model_output["entropy"].detach()}
        value, metrics = loss_function(model_output=model_output, data=data, dp_group=dp_group)
        if "rollout_log_probs" in data.keys():
            padded = data.select("response_mask", "rollout_log_probs").to_padded_tensor()
            metrics = {**metrics, **_rollout_sums(log_prob, padded["rollout_log_probs"], padded["response_mask"],
                                                  ranks=int(data["dp_size"]))}
        return value, metrics

    return loss


def _rollout_sums(old: torch.Tensor, rollout: torch.Tensor, response_mask: torch.Tensor, *, ranks: int) -> dict:
    """One micro-batch's sums and extremes (padded [sequences, response tokens]) of what verl's
    `calculate_debug_metrics` and `compute_offpolicy_metrics` compute over the whole batch, in float64."""
    from verl.utils.metric.utils import Metric

    mask = response_mask.double()
    old, rollout = old.double() * mask, rollout.double() * mask
    valid = mask.bool()
    p_actor, p_rollout = torch.exp(old[valid]), torch.exp(rollout[valid])  # calculate_debug_metrics: probabilities
    diff = (p_actor - p_rollout).abs()
    log_ratio = old - rollout  # compute_offpolicy_metrics: log(π_training / π_rollout) per token
    rho = torch.exp(log_ratio.clamp(-SAFETY_BOUND, SAFETY_BOUND))
    tokens = {
        "tokens": mask.sum(), "diff": diff.sum(), "diff_sq": (diff * diff).sum(), "actor": p_actor.sum(),
        "rollout": p_rollout.sum(), "actor_sq": (p_actor * p_actor).sum(), "rollout_sq": (p_rollout * p_rollout).sum(),
        "actor_rollout": (p_actor * p_rollout).sum(), "kl": (-log_ratio * mask).sum(),
        "k3_kl": ((torch.exp(log_ratio) - log_ratio - 1) * mask).sum(), "rho_sq": (rho * rho * mask).sum(),
    }
    per_seq = mask.sum(-1) + 1e-8  # verl_F.masked_mean's denominator
    mean_training, mean_rollout = old.sum(-1) / per_seq, rollout.sum(-1) / per_seq
    log_ppl_diff = mean_rollout - mean_training
    seqs = {
        "seqs": torch.tensor(float(len(mask))), "training_ppl": torch.exp(-mean_training).sum(),
        "training_log_ppl": (-mean_training).sum(), "rollout_ppl": torch.exp(-mean_rollout).sum(),
        "rollout_log_ppl": (-mean_rollout).sum(), "log_ppl_diff": log_ppl_diff.sum(),
        "log_ppl_abs_diff": log_ppl_diff.abs().sum(), "ppl_ratio": torch.exp(log_ppl_diff).sum(),
        "rho_sq_seq": torch.exp(2.0 * log_ratio.sum(-1).clamp(-SAFETY_BOUND, SAFETY_BOUND)).sum(),
    }
    out = {_KEY.format(name): Metric("sum", float(total)) for name, total in {**tokens, **seqs}.items()}
    extremes = {"diff_max": float(diff.max()) if diff.numel() else -math.inf,
                "log_ppl_diff_max": float(log_ppl_diff.max()), "log_ppl_diff_min": float(log_ppl_diff.min()),
                "ranks": ranks}
    out.update({_KEY.format(name): Metric(_EXTREMES[name], value) for name, value in extremes.items()})
    return out


def update_metrics(metrics: dict, *, entropy_in_loss: bool, offpolicy: bool) -> None:
    """The metrics verl's old-log-prob pass leads to, from the update's sums (in place): `actor/entropy`;
    `training/rollout_probs_diff_*` and `training/rollout_actor_probs_pearson_corr` as verl's
    `calculate_debug_metrics` computes them; with `offpolicy` (verl's rollout_correction block present:
    its advantage step then reports them) the `rollout_corr/*` diagnostics of `compute_offpolicy_metrics`."""
    if _ENTROPY_KEY in metrics:
        metrics["actor/entropy"] = metrics[_ENTROPY_KEY] if entropy_in_loss else metrics.pop(_ENTROPY_KEY)
    got = {name: metrics.pop(_KEY.format(name), None) for name in (*_TOKEN_SUMS, *_SEQ_SUMS, *_EXTREMES)}
    if got["tokens"] is None:
        return
    n, seqs, ranks = float(got["tokens"]), float(got["seqs"]), float(got["ranks"])
    if n <= 0:  # verl's calculate_debug_metrics without a valid token (compute_offpolicy_metrics asserts)
        metrics.update({"training/rollout_probs_diff_valid": 0, "training/rollout_probs_diff_max": math.nan,
                        "training/rollout_probs_diff_mean": math.nan, "training/rollout_probs_diff_std": math.nan,
                        "training/rollout_actor_probs_pearson_corr": math.nan})
        return
    per_token = lambda key: float(got[key]) / n  # noqa: E731
    per_seq = lambda key: float(got[key]) / seqs  # noqa: E731
    diff_mean = per_token("diff")
    tokens = n * ranks  # the global count (the sums are global / ranks), for torch.std's unbiased n - 1
    std = math.sqrt(max(per_token("diff_sq") - diff_mean ** 2, 0.0) * tokens / (tokens - 1)) if tokens > 1 else math.nan
    cov = per_token("actor_rollout") - per_token("actor") * per_token("rollout")
    var_a = per_token("actor_sq") - per_token("actor") ** 2
    var_r = per_token("rollout_sq") - per_token("rollout") ** 2
    corr = cov / math.sqrt(var_a * var_r) if var_a > 0 and var_r > 0 else math.nan
    metrics.update({"training/rollout_probs_diff_valid": 1, "training/rollout_probs_diff_max": float(got["diff_max"]),
                    "training/rollout_probs_diff_mean": diff_mean, "training/rollout_probs_diff_std": std,
                    "training/rollout_actor_probs_pearson_corr": corr})
    if offpolicy:
        metrics.update({f"rollout_corr/{k}": v for k, v in {
            "training_ppl": per_seq("training_ppl"), "training_log_ppl": per_seq("training_log_ppl"),
            "kl": per_token("kl"), "k3_kl": per_token("k3_kl"),
            "rollout_ppl": per_seq("rollout_ppl"), "rollout_log_ppl": per_seq("rollout_log_ppl"),
            "log_ppl_diff": per_seq("log_ppl_diff"), "log_ppl_abs_diff": per_seq("log_ppl_abs_diff"),
            "log_ppl_diff_max": float(got["log_ppl_diff_max"]), "log_ppl_diff_min": float(got["log_ppl_diff_min"]),
            "ppl_ratio": per_seq("ppl_ratio"), "chi2_token": per_token("rho_sq") - 1.0,
            "chi2_seq": per_seq("rho_sq_seq") - 1.0}.items()})
