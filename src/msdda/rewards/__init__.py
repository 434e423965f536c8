"""Rewards: the Reward protocol, validation, a name registry and the built-in digits rewards.

Use ``get_reward("ink")`` (or "symmetry", "alignment", or a "package.module:function" spec) to build a
reward; every reward maps x0 [B, ...] and cond [B] (or None) to a float tensor [B].
"""

from msdda.rewards.base import (
    CheckedReward,
    FunctionReward,
    Reward,
    RewardError,
    available_rewards,
    get_reward,
    register_reward,
    validate_reward_output,
)
from msdda.rewards.digits import (
    AlignmentReward,
    InkReward,
    SymmetryReward,
    clear_classifier_cache,
    default_classifier_dir,
    load_default_classifier,
    train_and_save_default_classifier,
)

__all__ = [
    "AlignmentReward",
    "CheckedReward",
    "FunctionReward",
    "InkReward",
    "Reward",
    "RewardError",
    "SymmetryReward",
    "available_rewards",
    "clear_classifier_cache",
    "default_classifier_dir",
    "get_reward",
    "load_default_classifier",
    "register_reward",
    "train_and_save_default_classifier",
    "validate_reward_output",
]
