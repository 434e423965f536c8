"""Layer 3, sampling: the one reverse-process loop and the step rules it applies."""

from msdda.sampling.cost import Cost, PeakMemory
from msdda.sampling.guided import RGG, CoDe
from msdda.sampling.methods import (
    REFERENCE,
    MethodPlan,
    MethodSpec,
    ObjectiveSet,
    PlanError,
    PlanRequest,
    get_method,
    method_names,
    plan_method,
    register_method,
    resolve_exponents,
)
from msdda.sampling.rules import (
    DBMPA,
    DBMPALS,
    MSDDA,
    SingleModel,
    StepContext,
    StepRule,
    StepRuleBase,
    StepRuleError,
)
from msdda.sampling.sampler import GaussianNoise, SampleOutput, ScheduleAware, make_generator, sample

__all__ = [
    "RGG",
    "CoDe",
    "Cost",
    "PeakMemory",
    "DBMPA",
    "DBMPALS",
    "MSDDA",
    "REFERENCE",
    "GaussianNoise",
    "MethodPlan",
    "MethodSpec",
    "ObjectiveSet",
    "PlanError",
    "PlanRequest",
    "SampleOutput",
    "ScheduleAware",
    "StepRuleBase",
    "get_method",
    "method_names",
    "plan_method",
    "register_method",
    "resolve_exponents",
    "SingleModel",
    "StepContext",
    "StepRule",
    "StepRuleError",
    "make_generator",
    "sample",
]
