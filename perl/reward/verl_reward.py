"""Entry file for verl's custom reward hook, which loads a file by path (no package context):

    reward.custom_reward_function.path=$(python -c "import perl.reward.verl_reward as m; print(m.__file__)")
    reward.custom_reward_function.name=compute_score
    +reward.custom_reward_function.reward_kwargs.require_think=true   # any RewardConfig/FormatConfig field
"""

from perl.reward import compute_score  # noqa: F401
