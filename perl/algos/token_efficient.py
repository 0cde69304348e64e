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
  each kept token by 1/(pi_t |y_i|) with pi_t its exact inclusion probability
  (`sgrpo_inclusion_prob`), which makes the sampled loss an unbiased estimate of the full-token
  seq-mean-token-mean loss (Horvitz-Thompson). The paper's estimator is biased towards early
  tokens on purpose.

T-SPMO (established in outline, from the issue text and the paper's abstract): token-level credit
by prefix matching over the G completions of a prompt. For every (prefix p, next token v) pair
that occurs, A(p, v) = mean reward of the completions that continue p with v - mean reward of the
completions that share p. The loss runs over the unique pairs (each pair once, however many
completions contain it), with the same ratio form as S-GRPO.

  Chosen here: a completion that stops exactly at p (length = |p|, no next token) still counts in
  the baseline of p; each unique pair is attributed to the first completion (lowest row) that
  contains it; the loss is the mean over pairs with a non-zero advantage (`norm="pairs"`; pairs
  whose prefix is not shared, or whose every continuation scores the same, have A = 0 and add no
  gradient) - `"all_pairs"` divides by every unique pair, `"sequences"` by the number of
  completions; advantages are raw reward differences (not divided by a std). The paper's replay /
  resampling of later positions could not be established from the sources we could read and is
  not implemented (docs/token_efficient.md, open problems).

Memory and compute (`selected_token_log_probs`): the forward runs only over the rows that have a
selected token, truncated after the last selected position of the mini-batch, and the LM head,
log-softmax and entropy are computed only at the selected positions (hidden states gathered
first), so the logits tensor is [n_selected, vocab] instead of [rows, response_len, vocab].

verl (0.9.1): `sgrpo` and `tspmo` are registered policy losses (`register_policy_loss`), `tspmo` an
advantage estimator (`register_adv_est`). verl hands a custom estimator only token_level_rewards,
response_mask, index and config - not the response token ids T-SPMO needs - so T-SPMO runs on
PeRL's sync trainer (perl.verl_glue.trainer.PerlSyncTrainer), whose advantage step reads the ids
from verl's TransferQueue and calls `tspmo_outcome_advantage`. Importing this module registers the
losses and the estimator (at once if verl's core_algos is loaded, else when it is first imported,
so importing this module does not import verl); `verl_overrides(loss_mode)` gives the hydra
overrides that make verl import it in every Ray process (`VERL_USE_EXTERNAL_MODULES`;
perl.verl_glue imports it as well). The verl path computes log-probs over the full response
(verl's actor owns the forward), so there it gives the algorithm, not the memory saving; the CPU
engine (`perl.local.engine`, `RLConfig.loss_mode`) gives both.
"""

from __future__ import annotations

import functools
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

LOSS_MODES = ("token", "sgrpo", "tspmo")
SGRPO_WEIGHTINGS = ("paper", "unbiased")
TSPMO_NORMS = ("pairs", "all_pairs", "sequences")
ENV_PREFIX = "PERL_SGRPO_"  # S-GRPO knobs for verl's workers: PERL_SGRPO_ALPHA / _K / _P / _WEIGHTING


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

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> SGRPOConfig:
        env = os.environ if env is None else env
        d = cls()
        return cls(alpha=int(env.get(ENV_PREFIX + "ALPHA", d.alpha)), k=int(env.get(ENV_PREFIX + "K", d.k)),
                   p=float(env.get(ENV_PREFIX + "P", d.p)), weighting=env.get(ENV_PREFIX + "WEIGHTING", d.weighting))


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


def sgrpo_weights(selected: torch.Tensor, response_mask: torch.Tensor, cfg: SGRPOConfig,
                  n_seqs: int | None = None) -> torch.Tensor:
    """Per-token loss weights w [B, L] (loss = sum w * per-token loss).

    paper:    w = 1 / (n |T_i|) on T_i                  -> 1/n sum_i 1/|T_i| sum_{T_i}
    unbiased: w = 1 / (n pi_t |y_i|) on T_i             -> E[loss] = 1/n sum_i 1/|y_i| sum_t (full tokens)
    n = `n_seqs` (default: rows with at least one response token)."""
    sel = selected.bool() & response_mask.bool()
    lengths = response_mask.bool().sum(-1)
    n = int((lengths > 0).sum()) if n_seqs is None else n_seqs
    if n == 0:
        return torch.zeros(sel.shape, dtype=torch.float32, device=sel.device)
    if cfg.weighting == "paper":
        size = sel.sum(-1, keepdim=True).clamp(min=1)
        w = sel.float() / size / n
    else:
        pi = sgrpo_inclusion_prob(sel.shape[-1], cfg).to(device=sel.device, dtype=torch.float32)
        w = sel.float() / (pi.clamp(min=1e-12) * lengths.clamp(min=1).unsqueeze(-1).float()) / n
    return w


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


def tspmo_weights(pair_mask: torch.Tensor, advantages: torch.Tensor, norm: str = "pairs",
                  n_seqs: int | None = None) -> torch.Tensor:
    """Loss weights for T-SPMO: 1/#non-zero-advantage pairs (pairs), 1/#pairs (all_pairs), 1/#rows (sequences)."""
    if norm not in TSPMO_NORMS:
        raise ValueError(f"tspmo_norm: {norm!r} is not one of {TSPMO_NORMS}")
    live = pair_mask.bool() & (advantages != 0)
    denom = {"pairs": int(live.sum()), "all_pairs": int(pair_mask.bool().sum()),
             "sequences": pair_mask.shape[0] if n_seqs is None else n_seqs}[norm]
    return live.float() / max(denom, 1)


# ----------------------------------------------------------------------------------------------
# The loss and the subset forward
# ----------------------------------------------------------------------------------------------


def weighted_policy_loss(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                         weights: torch.Tensor, actor_config) -> tuple[torch.Tensor, dict[str, Any]]:
    """sum_j w_j * clipped-surrogate_j through verl's `compute_policy_loss_vanilla` (any shape, w >= 0).

    Scaling the advantage by w > 0 scales every branch of the (dual-)clipped PPO loss by w, so
    vanilla(A * w, token-sum) is exactly sum_j w_j * vanilla_j."""
    from verl.trainer.ppo.core_algos import compute_policy_loss_vanilla

    flat = lambda x: x.reshape(1, -1)  # noqa: E731
    mask = flat(weights > 0).float()
    return compute_policy_loss_vanilla(flat(old_log_prob), flat(log_prob), flat(advantages * weights), mask,
                                       "token-sum", actor_config)


def _backbone_and_head(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    prefix = getattr(base, "base_model_prefix", None)
    backbone = getattr(base, prefix, None) if prefix else None
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    return backbone, head


def selected_token_log_probs(model, seqs: torch.Tensor, attn: torch.Tensor, resp_start: int, rows: torch.Tensor,
                             positions: torch.Tensor, subset_forward: bool = True):
    """(log pi(token), entropy) at response positions (rows[j], positions[j]) only.

    seqs/attn: [B, T] (prompt left-padded to `resp_start`, response after it). The forward is
    truncated after the last requested position; with `subset_forward` the LM head runs only on the
    gathered hidden states (HF causal LMs whose logits are lm_head(last_hidden_state): Qwen2, Llama,
    Mistral...), else the full logits are computed and gathered (the reference path)."""
    if rows.numel() == 0:
        empty = seqs.new_zeros(0, dtype=torch.float32)
        return empty, empty
    width = resp_start + int(positions.max()) + 1
    ids, am = seqs[:, :width], attn[:, :width]
    at = resp_start - 1 + positions
    backbone, head = _backbone_and_head(model) if subset_forward else (None, None)
    if backbone is not None and head is not None:
        hidden = backbone(input_ids=ids, attention_mask=am).last_hidden_state
        logits = head(hidden[rows, at]).float()
    else:
        logits = model(input_ids=ids, attention_mask=am).logits[rows, at].float()
    logp = torch.log_softmax(logits, -1)
    token_logp = logp.gather(-1, ids[rows, at + 1].unsqueeze(-1)).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return token_logp, entropy


# ----------------------------------------------------------------------------------------------
# verl: policy losses, the T-SPMO advantage estimator, hydra overrides
# ----------------------------------------------------------------------------------------------


def sgrpo_policy_loss(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode: str = "seq-mean-token-mean",
                      config=None, rollout_is_weights=None):
    """verl policy loss `sgrpo`: the vanilla clipped loss over a freshly sampled T_i per response.

    Knobs from the environment (PERL_SGRPO_ALPHA/_K/_P/_WEIGHTING, forwarded to Ray workers by
    `verl_overrides`). Use loss_agg_mode=seq-mean-token-mean (the paper's 1/G sum 1/|T_i| sum)."""
    from verl.trainer.ppo.core_algos import compute_policy_loss_vanilla

    cfg = SGRPOConfig.from_env()
    selected = sgrpo_select(response_mask, cfg) & response_mask.bool()
    weights = rollout_is_weights
    if cfg.weighting == "unbiased":  # seq-mean-token-mean over T_i of |T_i| / (pi_t |y_i|) * loss
        pi = sgrpo_inclusion_prob(selected.shape[-1], cfg).to(device=selected.device, dtype=log_prob.dtype)
        size = selected.sum(-1, keepdim=True).clamp(min=1).to(log_prob.dtype)
        length = response_mask.sum(-1, keepdim=True).clamp(min=1).to(log_prob.dtype)
        ht = size / (pi.clamp(min=1e-12) * length)
        weights = ht if weights is None else weights * ht
    loss, metrics = compute_policy_loss_vanilla(old_log_prob, log_prob, advantages, selected.to(response_mask.dtype),
                                                loss_agg_mode, config, weights)
    metrics["actor/sgrpo_token_frac"] = float(selected.sum() / response_mask.bool().sum().clamp(min=1))
    return loss, metrics


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


def verl_overrides(loss_mode: str, sgrpo: SGRPOConfig | None = None) -> list[str]:
    """Hydra overrides for verl's PPO trainer selecting `loss_mode` ("token" | "sgrpo" | "tspmo").

    "token" returns [] (verl's defaults). The others pick the loss, its aggregation and estimator,
    forward the S-GRPO knobs to the Ray processes as environment variables, and make every Ray
    process import this module when it imports verl (VERL_USE_EXTERNAL_MODULES): the workers need
    the registrations. `actor_rollout_ref.model.external_lib` and, for tspmo, the trainer that can
    compute its advantages (trainer.v1.trainer_mode=perl_sync) are left to the entry point
    (perl.verl_glue.config); an entry point that sets VERL_USE_EXTERNAL_MODULES itself must join
    the module lists with a comma. verl normalises the tspmo loss by its global count of responses
    (seq-mean-token-sum), which is the CPU engine's tspmo_norm="sequences"."""
    if loss_mode not in LOSS_MODES:
        raise ValueError(f"loss_mode: {loss_mode!r} is not one of {LOSS_MODES}")
    if loss_mode == "token":
        return []
    env = "+ray_kwargs.ray_init.runtime_env.env_vars"
    out = [f"{env}.VERL_USE_EXTERNAL_MODULES={__name__}",
           f"actor_rollout_ref.actor.policy_loss.loss_mode={loss_mode}"]
    if loss_mode == "sgrpo":
        cfg = sgrpo or SGRPOConfig()
        out += ["algorithm.adv_estimator=grpo", "actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-mean",
                f"{env}.{ENV_PREFIX}ALPHA={cfg.alpha}", f"{env}.{ENV_PREFIX}K={cfg.k}",
                f"{env}.{ENV_PREFIX}P={cfg.p}", f"{env}.{ENV_PREFIX}WEIGHTING={cfg.weighting}"]
    else:
        out += ["algorithm.adv_estimator=tspmo", "actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-sum"]
    return out


_ON_IMPORT = {  # verl module -> what to do once it is imported
    "verl.trainer.ppo.core_algos": lambda: register_with_verl(),
}


class _HookOnImport:
    """Meta-path finder: register with verl right after the verl module in `_ON_IMPORT` is imported.

    Importing verl here would make this module (and RLConfig, which validates against it) slow to
    import, ray_trainer pulls in ray, and from inside `import verl` (verl imports this module
    through VERL_USE_EXTERNAL_MODULES) neither can be imported yet; so wait for them."""

    def find_spec(self, name, path=None, target=None):
        callback = _ON_IMPORT.get(name)
        if callback is None:
            return None
        import importlib.machinery

        sys.meta_path.remove(self)
        try:
            spec = importlib.machinery.PathFinder.find_spec(name, path)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return None
        exec_module = spec.loader.exec_module

        def exec_and_hook(module):
            exec_module(module)
            callback()

        spec.loader.exec_module = exec_and_hook
        return spec


def _install_on_import() -> None:
    for name, callback in _ON_IMPORT.items():
        if name in sys.modules:
            callback()
    if not any(isinstance(f, _HookOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _HookOnImport())


_install_on_import()
