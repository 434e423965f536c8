"""Public import path for rewards: a re-export, no logic of its own (layer 5, beside the tasks).

The protocol and validation live in msdda.core.rewards, the registry in msdda.tasks.rewards and the
digits rewards in msdda.tasks.digits.rewards. Use ``get_reward("ink")`` (or "symmetry", "alignment", or
a "package.module:function" spec) to build a reward; every reward maps x0 [B, ...] and cond [B] (or
None) to a float tensor [B].
"""

from msdda.core.rewards import (
    CheckedReward,
    FunctionReward,
    Reward,
    RewardError,
    is_differentiable,
    reward_name,
    validate_reward_output,
)
from msdda.tasks.digits.rewards import (
    AlignmentReward,
    InkReward,
    SymmetryReward,
    clear_classifier_cache,
    default_classifier_dir,
    load_default_classifier,
    train_and_save_default_classifier,
)
from msdda.tasks.rewards import available_rewards, get_reward, register_reward

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
    "is_differentiable",
    "load_default_classifier",
    "register_reward",
    "reward_name",
    "train_and_save_default_classifier",
    "validate_reward_output",
]
