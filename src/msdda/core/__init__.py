"""Layer 1, the math core: Gaussian kernels, their closed-form fusion, and reverse-kernel schedules.

Pure torch; diffusers is never imported here (its schedulers are read through their config).
"""

from msdda.core.errors import FusionError, ScheduleError, UnsupportedSchedulerError
from msdda.core.fusion import exponents_from_preferences, fuse_gaussians
from msdda.core.kernel import GaussianKernel, ReverseKernel
from msdda.core.schedule import (
    KernelScheduler,
    KernelSchedulerConfig,
    as_kernel_scheduler,
    make_betas,
    reverse_kernel,
)

__all__ = [
    "FusionError",
    "GaussianKernel",
    "KernelScheduler",
    "KernelSchedulerConfig",
    "ReverseKernel",
    "ScheduleError",
    "UnsupportedSchedulerError",
    "as_kernel_scheduler",
    "exponents_from_preferences",
    "fuse_gaussians",
    "make_betas",
    "reverse_kernel",
]
