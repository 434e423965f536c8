"""Layer 2, models: the Denoiser protocol, classifier-free guidance, adapters and Rewarded Soups."""

from msdda.models.denoiser import ClassifierFreeGuidance, Denoiser, ModuleDenoiser, as_denoiser
from msdda.models.soups import SoupError, rewarded_soup

__all__ = ["ClassifierFreeGuidance", "Denoiser", "ModuleDenoiser", "SoupError", "as_denoiser", "rewarded_soup"]
