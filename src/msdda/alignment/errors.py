"""Errors of the alignment layer (training, checkpoints, model files)."""

from msdda.errors import MSDDAError


class AlignmentError(MSDDAError):
    """A training configuration, reward output or training state is invalid."""


class CheckpointError(AlignmentError):
    """A model or checkpoint directory is missing, corrupt, or belongs to another task or architecture."""
