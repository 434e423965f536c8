"""Layer 3, sampling: the one reverse-process loop and the step rules it applies."""

from msdda.sampling.cost import Cost, PeakMemory
from msdda.sampling.guided import RGG, CoDe
from msdda.sampling.rules import DBMPA, DBMPALS, MSDDA, SingleModel, StepContext, StepRule, StepRuleError
from msdda.sampling.sampler import SampleOutput, make_generator, sample

__all__ = [
    "RGG",
    "CoDe",
    "Cost",
    "PeakMemory",
    "DBMPA",
    "DBMPALS",
    "MSDDA",
    "SampleOutput",
    "SingleModel",
    "StepContext",
    "StepRule",
    "StepRuleError",
    "make_generator",
    "sample",
]
