"""msdda: multi-objective step-level denoising-time alignment of diffusion models.

At every reverse step the Gaussian kernels (mean and variance) of single-objective aligned models are
fused in closed form with the user's preference weights (see docs/method.md).
"""

from msdda.core import (
    FusionError,
    GaussianKernel,
    KernelScheduler,
    KernelSchedulerConfig,
    ReverseKernel,
    ScheduleError,
    UnsupportedSchedulerError,
    exponents_from_preferences,
    fuse_gaussians,
    reverse_kernel,
)
from msdda.errors import MSDDAError
from msdda.models import ClassifierFreeGuidance, Denoiser
from msdda.sampling import (
    DBMPA,
    DBMPALS,
    MSDDA,
    MethodPlan,
    ObjectiveSet,
    PlanError,
    SampleOutput,
    SingleModel,
    StepRuleError,
    method_names,
    plan_method,
    sample,
)

__version__ = "0.1.0"

__all__ = [
    "DBMPA",
    "DBMPALS",
    "MSDDA",
    "ClassifierFreeGuidance",
    "Denoiser",
    "FusionError",
    "GaussianKernel",
    "KernelScheduler",
    "KernelSchedulerConfig",
    "MSDDAError",
    "MethodPlan",
    "ObjectiveSet",
    "PlanError",
    "ReverseKernel",
    "SampleOutput",
    "ScheduleError",
    "SingleModel",
    "StepRuleError",
    "UnsupportedSchedulerError",
    "__version__",
    "exponents_from_preferences",
    "fuse_gaussians",
    "method_names",
    "plan_method",
    "reverse_kernel",
    "sample",
]
