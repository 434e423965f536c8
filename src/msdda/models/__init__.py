"""Layer 2, models: the Denoiser protocol, classifier-free guidance, adapters, batched K-model evaluation,
Rewarded Soups, the model-folder format (save_pretrained / from_pretrained) and the training checkpointer."""

from msdda.models.batched import BatchingError, StackedDenoisers, StackedGuidance, can_stack
from msdda.models.checkpoint import Checkpoint, Checkpointer
from msdda.models.denoiser import ClassifierFreeGuidance, Denoiser, ModuleDenoiser, as_denoiser, combine_guidance
from msdda.models.io import CheckpointError, from_pretrained, read_model_config, save_pretrained
from msdda.models.soups import SoupError, rewarded_soup

__all__ = [
    "BatchingError",
    "Checkpoint",
    "CheckpointError",
    "Checkpointer",
    "ClassifierFreeGuidance",
    "Denoiser",
    "ModuleDenoiser",
    "SoupError",
    "StackedDenoisers",
    "StackedGuidance",
    "as_denoiser",
    "can_stack",
    "combine_guidance",
    "from_pretrained",
    "read_model_config",
    "rewarded_soup",
    "save_pretrained",
]
