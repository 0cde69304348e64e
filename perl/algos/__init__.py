"""Policy-loss variants beyond verl's own: token-efficient RL (S-GRPO, T-SPMO; arXiv 2504.20834).

`perl.algos.token_efficient` holds the pure-torch pieces (token subset selection, prefix-matching
advantages, the losses, a forward that computes log-probs only where the loss needs them), the
verl registrations (`sgrpo` / `tspmo` policy losses, the `tspmo` advantage estimator and its hook)
and `verl_overrides(loss_mode)` for the verl entry point. The CPU engine selects them with
`RLConfig.loss_mode`. See docs/token_efficient.md.
"""

from .token_efficient import (
    LOSS_MODES,
    SGRPO_WEIGHTINGS,
    TSPMO_NORMS,
    SGRPOConfig,
    selected_token_log_probs,
    sgrpo_inclusion_prob,
    sgrpo_select,
    sgrpo_weights,
    tspmo_advantages,
    tspmo_group_pairs,
    verl_overrides,
    weighted_policy_loss,
)

__all__ = [
    "LOSS_MODES",
    "SGRPO_WEIGHTINGS",
    "TSPMO_NORMS",
    "SGRPOConfig",
    "selected_token_log_probs",
    "sgrpo_inclusion_prob",
    "sgrpo_select",
    "sgrpo_weights",
    "tspmo_advantages",
    "tspmo_group_pairs",
    "verl_overrides",
    "weighted_policy_loss",
]
