"""Errors of the Stable Diffusion face: every one derives from msdda.MSDDAError (a ValueError)."""

from __future__ import annotations

from msdda.errors import MSDDAError


class PipelineError(MSDDAError):
    """The pipeline was built or called with something it cannot use (names the value and the fix)."""


class MissingDependencyError(PipelineError, ImportError):
    """An optional package (diffusers, peft, transformers) is not installed; install the named extra."""


class ObjectiveError(PipelineError):
    """An objective name is unknown, reserved or malformed, or a weight refers to no objective."""


class AdapterError(PipelineError):
    """A LoRA adapter or full UNet cannot be used with this base model (e.g. trained for another base)."""


class RewardModelError(PipelineError):
    """A reward model (CLIP, aesthetic head) is missing files or cannot score the given input."""
