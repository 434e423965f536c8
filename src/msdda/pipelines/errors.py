"""Errors of the Stable Diffusion face: every one derives from msdda.MSDDAError (a ValueError)."""

from __future__ import annotations

from msdda.core.rewards import RewardError
from msdda.errors import MSDDAError


class PipelineError(MSDDAError):
    """The pipeline was built or called with something it cannot use (names the value and the fix)."""


class MissingDependencyError(PipelineError, ImportError):
    """An optional package (diffusers, peft, transformers) is not installed; install the named extra."""


class ObjectiveError(PipelineError):
    """An objective name is unknown, reserved or malformed, or a weight refers to no objective."""


class AdapterError(PipelineError):
    """A LoRA adapter or full UNet cannot be used with this base model (e.g. trained for another base)."""


class RewardModelError(PipelineError, RewardError):
    """A reward or reward model (CLIP, aesthetic head) is missing files, cannot score the given input or
    returned bad values. Also a RewardError, the one type for reward mistakes at every entry point."""
