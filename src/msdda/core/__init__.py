"""Layer 1, the math core: Gaussian kernels, their closed-form fusion, reverse-kernel schedules, and the
Reward protocol with its output validation.

Pure torch; diffusers is never imported here (its schedulers are read through their config).
"""

from msdda.core.errors import FusionError, ScheduleError, UnsupportedSchedulerError
from msdda.core.fusion import exponents_from_preferences, fuse_gaussians
from msdda.core.kernel import GaussianKernel, ReverseKernel
from msdda.core.rewards import (
    CheckedReward,
    FunctionReward,
    Reward,
    RewardError,
    is_differentiable,
    reward_name,
    validate_reward_output,
)
from msdda.core.samplers import SamplerKernelConfig, SamplerKernelScheduler
from msdda.core.schedule import (
    KernelScheduler,
    KernelSchedulerConfig,
    as_kernel_scheduler,
    make_betas,
    reverse_kernel,
)

__all__ = [
    "CheckedReward",
    "FunctionReward",
    "FusionError",
    "GaussianKernel",
    "KernelScheduler",
    "KernelSchedulerConfig",
    "ReverseKernel",
    "SamplerKernelConfig",
    "SamplerKernelScheduler",
    "Reward",
    "RewardError",
    "ScheduleError",
    "UnsupportedSchedulerError",
    "as_kernel_scheduler",
    "exponents_from_preferences",
    "fuse_gaussians",
    "is_differentiable",
    "make_betas",
    "reverse_kernel",
    "reward_name",
    "validate_reward_output",
]
