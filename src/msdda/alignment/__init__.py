"""Layer 4, alignment: base diffusion training (improved-DDPM hybrid loss) and step-level DPO, with checkpoints."""

from msdda.alignment.diffusion import (
    BaseTrainConfig,
    HybridLoss,
    discretized_gaussian_log_likelihood,
    hybrid_loss,
    train_diffusion,
    training_scheduler_config,
)
from msdda.alignment.dpo import DPOConfig, DPOResult, check_reward_values, dpo_loss, evaluate_policy, train_dpo
from msdda.alignment.errors import AlignmentError, CheckpointError
from msdda.alignment.io import load_tensors, read_model_config, save_model_dir

__all__ = [
    "AlignmentError",
    "BaseTrainConfig",
    "CheckpointError",
    "DPOConfig",
    "DPOResult",
    "HybridLoss",
    "check_reward_values",
    "discretized_gaussian_log_likelihood",
    "dpo_loss",
    "evaluate_policy",
    "hybrid_loss",
    "load_tensors",
    "read_model_config",
    "save_model_dir",
    "train_diffusion",
    "train_dpo",
    "training_scheduler_config",
]
