"""S-GRPO and T-SPMO: critic-free losses over a small subset of output tokens (arXiv 2504.20834).

Lee & Tong, "Token-Efficient RL for LLM Reasoning" (v1 title: "Reinforcement Learning for LLM
Reasoning Under Memory Constraints"). What is taken from the paper and what is chosen here
(docs/token_efficient.md has the sources):

S-GRPO (established): GRPO's group-normalised advantage, but the loss of completion i only runs
over a token set T_i,

    J = 1/G sum_i 1/|T_i| sum_{t in T_i} pi(y_t|..) / pi(y_t|..)_no-grad * A_i   (- beta KL)

    t in T_i  <=>  1                 if t < alpha         (early tokens always kept)
                   Bernoulli(P)      if t >= alpha and |T_i| < k
                   0                 otherwise             (k = most tokens per completion)

  Chosen here: the defaults (alpha=4, k=8, P=0.5 for the toy's ~16-token answers; the recipes use
  larger values); the ratio is the PPO-clipped ratio against the rollout policy's log-probs (the
  paper's pi/pi_no-grad is that ratio on the first update; clipping only matters for later
  mini-batches); beta = 0. `weighting="paper"` is the paper's 1/|T_i| mean; `"unbiased"` weights
  each kept token by |T_i| / (pi_t |y_i|) with pi_t its exact inclusion probability
  (`sgrpo_inclusion_prob`, `sgrpo_ht_weights`), which makes the sampled loss an unbiased estimate
  of the full-token seq-mean-token-mean loss (Horvitz-Thompson). The paper's estimator is biased towards early
  tokens on purpose.

T-SPMO (established in outline, from the issue text and the paper's abstract): token-level credit
by prefix matching over the G completions of a prompt. For every (prefix p, next token v) pair
that occurs, A(p, v) = mean reward of the completions that continue p with v - mean reward of the
completions that share p. The loss runs over the unique pairs (each pair once, however many
completions contain it), with the same ratio form as S-GRPO.

  Chosen here: a completion that stops exactly at p (length = |p|, no next token) still counts in
  the baseline of p; each unique pair is attributed to the first completion (lowest row) that
  contains it; pairs whose prefix is not shared, or whose every continuation scores the same, have
  A = 0 and add no gradient; advantages are raw reward differences (not divided by a std); the
  loss is normalised by verl's global count of responses (loss_agg_mode=seq-mean-token-sum). The
  paper's replay / resampling of later positions could not be established from the sources we
  could read and is not implemented (docs/token_efficient.md, open problems).

verl (0.9.1): `sgrpo` and `tspmo` are registered policy losses (`register_policy_loss`), `tspmo` an
advantage estimator (`register_adv_est`), by `register_with_verl()`, which PeRL's engine module,
trainer module and config check call (each process that needs them imports one of those). verl
hands a custom estimator only token_level_rewards, response_mask, index and config - not the
response token ids T-SPMO needs - so T-SPMO runs on PeRL's sync trainer
(perl.verl_glue.trainer.PerlSyncTrainer), whose advantage step reads the ids from verl's
TransferQueue and calls `tspmo_outcome_advantage`. S-GRPO's token subset is drawn by PeRL's
engine before the forward (perl.verl_glue.token_subset: the sequences are cut after their last
selected token and the LM head runs only where the loss is), from the `SGRPOConfig` the config
hands the engine (`actor_rollout_ref.model.lora.perl.sgrpo`); the `sgrpo` policy loss is then the
vanilla clipped loss over that subset. `verl_overrides(loss_mode)` gives the verl keys of each mode.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

LOSS_MODES = ("token", "sgrpo", "tspmo")
SGRPO_WEIGHTINGS = ("paper", "unbiased")


# ----------------------------------------------------------------------------------------------
# S-GRPO: the token subset
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SGRPOConfig:
    """The paper's selection rule: first `alpha` tokens always, later ones Bernoulli(`p`) until `k`."""

    alpha: int = 4
    k: int = 8
    p: float = 0.5
    weighting: str = "paper"  # paper | unbiased

    def __post_init__(self) -> None:
        if self.alpha < 0:
            raise ValueError(f"sgrpo_alpha must be >= 0, got {self.alpha}")
        if self.k < 1 or self.k < self.alpha:
            raise ValueError(f"sgrpo_k must be >= max(1, sgrpo_alpha={self.alpha}), got {self.k}")
        if not 0.0 < self.p <= 1.0:
            raise ValueError(f"sgrpo_p must be in (0, 1], got {self.p}")
        if self.weighting not in SGRPO_WEIGHTINGS:
            raise ValueError(f"sgrpo_weighting: {self.weighting!r} is not one of {SGRPO_WEIGHTINGS}")


def sgrpo_select(response_mask: torch.Tensor, cfg: SGRPOConfig,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Bool mask [B, L] of the tokens in each T_i (responses right-padded in `response_mask`).

    Vectorised form of the sequential rule: every later token draws Bernoulli(p); a success is kept
    while fewer than k tokens are in T_i, i.e. while (#early tokens + successes so far) <= k."""
    mask = response_mask.bool()
    t = torch.arange(mask.shape[-1], device=mask.device)
    early = mask & (t < cfg.alpha)
    later = mask & (t >= cfg.alpha)
    dev = generator.device if generator is not None else mask.device
    draws = (torch.rand(mask.shape, generator=generator, device=dev) < cfg.p).to(mask.device)
    success = later & draws
    n_before = early.sum(-1, keepdim=True) + success.long().cumsum(-1)  # |T_i| once this success is in
    return early | (success & (n_before <= cfg.k))


@functools.lru_cache(maxsize=64)
def _inclusion(length: int, alpha: int, k: int, p: float) -> tuple[float, ...]:
    out = []
    m = k - alpha - 1  # a later token is drawn only while at most m earlier later-tokens were kept
    for t in range(length):
        if t < alpha:
            out.append(1.0)
            continue
        n = t - alpha
        if m < 0:
            out.append(0.0)
            continue
        cdf = sum(math.comb(n, j) * p**j * (1 - p) ** (n - j) for j in range(min(m, n) + 1))
        out.append(p * cdf)
    return tuple(out)


def sgrpo_inclusion_prob(length: int, cfg: SGRPOConfig) -> torch.Tensor:
    """pi_t = P(t in T_i) for t < length: 1 before alpha, p * P(Binomial(t - alpha, p) <= k - alpha - 1) after."""
    return torch.tensor(_inclusion(int(length), cfg.alpha, cfg.k, float(cfg.p)), dtype=torch.float64)


def sgrpo_ht_weights(selected: torch.Tensor, length: int, cfg: SGRPOConfig) -> torch.Tensor:
    """Per-token multipliers of one response's loss under S-GRPO's `weighting` (selected: bool [L]).

    paper:    1 on T_i (with seq-mean-token-mean: 1/|T_i| sum over T_i, the paper's estimator);
    unbiased: |T_i| / (pi_t |y_i|) on T_i, so that seq-mean-token-mean over T_i, i.e.
              1/|T_i| sum_{T_i} |T_i| / (pi_t |y_i|) l_t, has expectation 1/|y_i| sum_t l_t:
              the full-token loss (Horvitz-Thompson, pi_t = `sgrpo_inclusion_prob`)."""
    sel = selected.bool()
    if cfg.weighting == "paper":
        return sel.float()
    pi = sgrpo_inclusion_prob(sel.shape[-1], cfg).to(device=sel.device, dtype=torch.float32)
    w = sel.sum().clamp(min=1).float() / (pi.clamp(min=1e-12) * max(int(length), 1))
    return torch.where(sel, w, torch.zeros_like(w))


# ----------------------------------------------------------------------------------------------
# T-SPMO: prefix-matching advantages
# ----------------------------------------------------------------------------------------------


def tspmo_group_pairs(responses: Sequence[Sequence[int]], rewards: Sequence[float]) -> list[tuple[int, int, float]]:
    """Every unique (prefix, next token) pair of one group as (row, position, advantage).

    A(p, v) = mean reward of the responses continuing p with v - mean reward of the responses that
    share p (including any that end at p). The pair is attributed to the first row containing it.
    Walks the prefix tree level by level: O(total tokens)."""
    rewards = np.asarray(rewards, dtype=np.float64)
    if len(responses) != len(rewards):
        raise ValueError(f"{len(responses)} responses but {len(rewards)} rewards")
    node = [0] * len(responses)
    members: dict[int, list[int]] = {0: list(range(len(responses)))}
    out: list[tuple[int, int, float]] = []
    next_id, t = 1, 0
    while True:
        children: dict[tuple[int, int], list[int]] = {}
        for i, r in enumerate(responses):
            if t < len(r):
                children.setdefault((node[i], int(r[t])), []).append(i)
        if not children:
            return out
        new_members: dict[int, list[int]] = {}
        for (parent, _), rows in children.items():
            adv = float(rewards[rows].mean() - rewards[members[parent]].mean())
            out.append((rows[0], t, adv))
            for i in rows:
                node[i] = next_id
            new_members[next_id] = rows
            next_id += 1
        members = new_members
        t += 1


def tspmo_advantages(responses: Sequence[Sequence[int]], rewards: Sequence[float], index: Sequence[Any],
                     width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages [B, W], pair_mask [B, W]) for a batch; rows with equal `index` form one group.

    pair_mask marks each unique pair once (at its representative row), zero-advantage pairs included;
    advantages are 0 elsewhere."""
    n = len(responses)
    width = width if width is not None else max((len(r) for r in responses), default=0)
    adv = torch.zeros((n, width), dtype=torch.float32)
    pairs = torch.zeros((n, width), dtype=torch.bool)
    groups: dict[Any, list[int]] = {}
    for i, uid in enumerate(index):
        groups.setdefault(uid, []).append(i)
    for rows in groups.values():
        for local, t, a in tspmo_group_pairs([responses[i] for i in rows], [rewards[i] for i in rows]):
            adv[rows[local], t] = a
            pairs[rows[local], t] = True
    return adv, pairs


# ----------------------------------------------------------------------------------------------
# verl: policy losses, the T-SPMO advantage estimator, hydra overrides
# ----------------------------------------------------------------------------------------------


def sgrpo_policy_loss(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode: str = "seq-mean-token-mean",
                      config=None, rollout_is_weights=None):
    """verl policy loss `sgrpo`: the vanilla clipped loss over T_i. PeRL's engine has already drawn
    T_i, cut the sequences to it and made it the response mask (and, for weighting="unbiased",
    put the Horvitz-Thompson weights into `rollout_is_weights`): perl.verl_glue.token_subset.
    Use loss_agg_mode=seq-mean-token-mean (the paper's 1/G sum 1/|T_i| sum)."""
    from verl.trainer.ppo.core_algos import compute_policy_loss_vanilla

    return compute_policy_loss_vanilla(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                                       rollout_is_weights)


def tspmo_policy_loss(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode: str = "seq-mean-token-sum",
                      config=None, rollout_is_weights=None):
    """verl policy loss `tspmo`: the vanilla clipped loss over the pair positions (advantage != 0).

    Needs adv_estimator=tspmo (advantages are 0 off the pairs). verl normalises with its global
    counts (responses for seq-mean-token-sum), not by the number of pairs as the CPU engine does."""
    from verl.trainer.ppo.core_algos import compute_policy_loss_vanilla

    pairs = response_mask.bool() & (advantages != 0)
    loss, metrics = compute_policy_loss_vanilla(old_log_prob, log_prob, advantages, pairs.to(response_mask.dtype),
                                                loss_agg_mode, config, rollout_is_weights)
    metrics["actor/tspmo_pair_frac"] = float(pairs.sum() / response_mask.bool().sum().clamp(min=1))
    return loss, metrics


def tspmo_outcome_advantage(token_level_rewards: torch.Tensor, response_mask: torch.Tensor, index=None,
                            config=None, responses: torch.Tensor | None = None, **_: Any):
    """verl advantage estimator `tspmo` (advantages = returns = the pair advantages).

    Called by perl.verl_glue.trainer.PerlSyncTrainer with the response ids; registered as well so
    that verl's own trainers, which cannot pass them, fail with this message instead of a lookup error."""
    if responses is None or index is None:
        raise ValueError("adv_estimator=tspmo needs the response token ids and uids, which verl's trainers do not "
                         "pass to custom estimators: run it on PeRL's trainer (trainer.v1.trainer_mode=perl_sync, "
                         "perl.verl_glue.trainer; perl.loss_mode=tspmo selects it)")
    lengths = response_mask.bool().sum(-1).tolist()
    ids = [responses[i, :n].tolist() for i, n in enumerate(lengths)]
    scores = token_level_rewards.sum(-1).tolist()
    adv, _ = tspmo_advantages(ids, scores, list(index), width=response_mask.shape[-1])
    adv = adv.to(device=token_level_rewards.device, dtype=token_level_rewards.dtype) * response_mask
    return adv, adv


def register_with_verl() -> bool:
    """Register the `sgrpo`/`tspmo` policy losses and the `tspmo` estimator (idempotent)."""
    try:
        from verl.trainer.ppo import core_algos
    except Exception:
        return False
    core_algos.register_policy_loss("sgrpo")(sgrpo_policy_loss)
    core_algos.register_policy_loss("tspmo")(tspmo_policy_loss)
    if core_algos.ADV_ESTIMATOR_REGISTRY.get("tspmo") is not tspmo_outcome_advantage:
        core_algos.register_adv_est("tspmo")(tspmo_outcome_advantage)
    return True


def verl_overrides(loss_mode: str) -> list[str]:
    """verl's keys for `loss_mode` ("token" | "sgrpo" | "tspmo"): the policy loss, its aggregation
    and the advantage estimator ("token" returns [], verl's defaults). What verl has no key for is
    derived by the entry point (perl.verl_glue.config): the S-GRPO knobs for the engine, and for
    tspmo the trainer that can compute its advantages (trainer.v1.trainer_mode=perl_sync). verl
    normalises the tspmo loss by its global count of responses (seq-mean-token-sum)."""
    if loss_mode not in LOSS_MODES:
        raise ValueError(f"loss_mode: {loss_mode!r} is not one of {LOSS_MODES}")
    if loss_mode == "token":
        return []
    out = [f"actor_rollout_ref.actor.policy_loss.loss_mode={loss_mode}"]
    if loss_mode == "sgrpo":
        out += ["algorithm.adv_estimator=grpo", "actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-mean"]
    else:
        out += ["algorithm.adv_estimator=tspmo", "actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-sum"]
    return out
