"""Layer 2, models: the Denoiser protocol, classifier-free guidance, and adapters around networks."""

from msdda.models.denoiser import ClassifierFreeGuidance, Denoiser, ModuleDenoiser, as_denoiser

__all__ = ["ClassifierFreeGuidance", "Denoiser", "ModuleDenoiser", "as_denoiser"]
