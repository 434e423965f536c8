"""Layer 2, models: the Denoiser protocol, classifier-free guidance, adapters, batched K-model evaluation and
Rewarded Soups."""

from msdda.models.batched import BatchingError, StackedDenoisers, StackedGuidance, can_stack
from msdda.models.denoiser import ClassifierFreeGuidance, Denoiser, ModuleDenoiser, as_denoiser, combine_guidance
from msdda.models.soups import SoupError, rewarded_soup

__all__ = [
    "BatchingError",
    "ClassifierFreeGuidance",
    "Denoiser",
    "ModuleDenoiser",
    "SoupError",
    "StackedDenoisers",
    "StackedGuidance",
    "as_denoiser",
    "can_stack",
    "combine_guidance",
    "rewarded_soup",
]
