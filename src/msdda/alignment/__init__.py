"""Layer 4, alignment: base diffusion training (improved-DDPM hybrid loss) and step-level trainers as objects
(`StepTrainer` with a config dataclass beside each; `DPOTrainer` for step-level DPO with Bradley-Terry,
listwise or hard labels; `StepRLTrainer` for direct step-level RL), with checkpoints."""

from msdda.alignment.diffusion import (
    BaseTrainConfig,
    HybridLoss,
    discretized_gaussian_log_likelihood,
    hybrid_loss,
    train_diffusion,
    training_scheduler_config,
)
from msdda.alignment.dpo import (
    LABEL_RULES,
    DPOBatch,
    DPOConfig,
    DPOResult,
    DPOTrainer,
    bt_dpo_loss,
    calibration_slope,
    dpo_loss,
    listwise_dpo_loss,
    train_dpo,
)
from msdda.alignment.errors import AlignmentError, CheckpointError, TrainingRewardError
from msdda.alignment.step_rl import (
    StepRLConfig,
    StepRLResult,
    StepRLTrainer,
    loo_step_rl_loss,
    reparam_step_rl_loss,
    train_step_rl,
    weighted_reward,
)
from msdda.alignment.trainer import (
    States,
    StepLoss,
    StepTrainer,
    StepTrainerConfig,
    TrainResult,
    check_reward_values,
    evaluate_policy,
)

__all__ = [
    "LABEL_RULES",
    "AlignmentError",
    "BaseTrainConfig",
    "CheckpointError",
    "DPOBatch",
    "DPOConfig",
    "DPOResult",
    "DPOTrainer",
    "HybridLoss",
    "States",
    "StepLoss",
    "StepRLConfig",
    "StepRLResult",
    "StepRLTrainer",
    "StepTrainer",
    "StepTrainerConfig",
    "TrainResult",
    "TrainingRewardError",
    "bt_dpo_loss",
    "calibration_slope",
    "check_reward_values",
    "discretized_gaussian_log_likelihood",
    "dpo_loss",
    "evaluate_policy",
    "hybrid_loss",
    "listwise_dpo_loss",
    "loo_step_rl_loss",
    "reparam_step_rl_loss",
    "train_diffusion",
    "train_dpo",
    "train_step_rl",
    "training_scheduler_config",
    "weighted_reward",
]
