"""Policy-loss variants beyond verl's own: token-efficient RL (S-GRPO, T-SPMO; arXiv 2504.20834).

`perl.algos.token_efficient` holds the pure-torch pieces (token subset selection and its
inclusion probabilities, prefix-matching advantages), the verl registrations (`sgrpo` / `tspmo`
policy losses, the `tspmo` advantage estimator: `register_with_verl`) and `verl_overrides(loss_mode)`
for the entry point. S-GRPO's shortened forward lives in PeRL's engine
(perl.verl_glue.token_subset). See docs/token_efficient.md.
"""

from .token_efficient import (
    LOSS_MODES,
    SGRPO_WEIGHTINGS,
    SGRPOConfig,
    register_with_verl,
    sgrpo_ht_weights,
    sgrpo_inclusion_prob,
    sgrpo_select,
    tspmo_advantages,
    tspmo_group_pairs,
    verl_overrides,
)

__all__ = [
    "LOSS_MODES",
    "SGRPO_WEIGHTINGS",
    "SGRPOConfig",
    "register_with_verl",
    "sgrpo_ht_weights",
    "sgrpo_inclusion_prob",
    "sgrpo_select",
    "tspmo_advantages",
    "tspmo_group_pairs",
    "verl_overrides",
]
