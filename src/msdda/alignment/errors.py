"""Errors of the alignment layer (training configurations, reward outputs, training state).

`CheckpointError` belongs to the models layer (model folders and training checkpoints); it is re-exported
here because training raises it when a checkpoint cannot be resumed.
"""

from msdda.core.rewards import RewardError
from msdda.errors import MSDDAError
from msdda.models.io import CheckpointError


class AlignmentError(MSDDAError):
    """A training configuration, reward output or training state is invalid."""


class TrainingRewardError(AlignmentError, RewardError):
    """A reward returned bad values during training or evaluation (both an AlignmentError and a RewardError)."""


__all__ = ["AlignmentError", "CheckpointError", "TrainingRewardError"]
