"""Errors of the math core (kernels, fusion, reverse-kernel schedules)."""

from msdda.errors import MSDDAError


class FusionError(MSDDAError):
    """The kernels or weights given to the fusion are invalid, or their fusion is not a Gaussian."""


class ScheduleError(MSDDAError):
    """A scheduler, timestep or model output cannot be turned into a reverse kernel."""


class UnsupportedSchedulerError(ScheduleError):
    """The scheduler has no Gaussian reverse kernel here (DDPM, DDIM and the samplers of msdda.core.samplers do)."""
