"""Step rules: how the kernels of K models (and optionally the reference) become the next kernel.

A rule sees one `StepContext` per reverse step and returns the Gaussian kernel the sampler draws from.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from msdda.core.fusion import SUM_TO_ONE_RTOL, exponents_from_preferences, fuse_gaussians
from msdda.core.kernel import GaussianKernel, ReverseKernel
from msdda.core.schedule import KernelScheduler
from msdda.errors import MSDDAError
from msdda.sampling.cost import Cost


class StepRuleError(MSDDAError):
    """A step rule was configured or used inconsistently (weights, model count, missing reference)."""


@dataclass
class StepContext:
    """Everything a rule may use at one reverse step t -> prev_t.

    x_t: the current sample [B, C, ...]; outputs: the (guided) model outputs, one per model;
    kernels: their reverse kernels; reference_*: the reference model's, when the rule asked for it.
    """

    x_t: Tensor
    timestep: int
    prev_timestep: int
    index: int
    is_last: bool
    outputs: list[Tensor]
    kernels: list[ReverseKernel]
    scheduler: KernelScheduler
    generator: torch.Generator | None
    cond: Any = None
    reference_output: Tensor | None = None
    reference_kernel: ReverseKernel | None = None
    # evaluate(model_index or None for the reference, x, timestep) -> guided output, counted in `cost`
    evaluate: Callable[[int | None, Tensor, int], Tensor] | None = None
    cost: Cost | None = None
    info: dict[str, Any] = field(default_factory=dict)


class StepRule(Protocol):
    """A reverse-step rule. `uses_reference`: the sampler must also evaluate the reference model.

    A rule may also define `draw(ctx, kernel) -> x_prev` to replace the plain Gaussian draw (CoDe does:
    it branches candidates and keeps the best); the final step always returns the kernel mean.
    """

    name: str
    uses_reference: bool

    def check(self, num_models: int) -> None: ...

    def __call__(self, ctx: StepContext) -> GaussianKernel: ...


def _check_weights(weights: Sequence[float], what: str) -> list[float]:
    w = [float(x) for x in weights]
    if not w:
        raise StepRuleError(f"{what}: empty weight list; pass one weight per model")
    for i, x in enumerate(w):
        if not math.isfinite(x):
            raise StepRuleError(f"{what}: weight {i} is {x}; weights must be finite")
    return w


def _check_count(rule: str, weights: Sequence[float], num_models: int) -> None:
    if len(weights) != num_models:
        raise StepRuleError(f"{rule}: {len(weights)} weights for {num_models} models; pass one per model")


@dataclass
class SingleModel:
    """Sample from one model's own kernel (the plain sampler; Base when the model is the reference)."""

    index: int = 0
    name: str = "single"
    uses_reference: bool = False

    def check(self, num_models: int) -> None:
        if not 0 <= self.index < num_models:
            raise StepRuleError(f"single-model rule: index {self.index} out of range for {num_models} models")

    def __call__(self, ctx: StepContext) -> GaussianKernel:
        return ctx.kernels[self.index]


@dataclass
class MSDDA:
    """Exact fusion of the models' kernels, mean and variance (MSDDA.md §4).

    exponents: a_k per model. When they do not sum to 1 the reference takes a_0 = 1 - sum a_k and the
    sampler evaluates it. Build from preference weights and KL strengths with `from_preferences`.
    """

    exponents: Sequence[float]
    name: str = "msdda"

    def __post_init__(self) -> None:
        self.exponents = _check_weights(self.exponents, "MSDDA")

    @classmethod
    def from_preferences(cls, preferences: Sequence[float], betas: Sequence[float] | float, beta: float) -> MSDDA:
        """a_k = w_k * beta_k / beta (see `msdda.exponents_from_preferences`)."""
        return cls(exponents_from_preferences(preferences, betas, beta))

    @property
    def uses_reference(self) -> bool:
        return not math.isclose(math.fsum(self.exponents), 1.0, rel_tol=SUM_TO_ONE_RTOL)

    def check(self, num_models: int) -> None:
        _check_count("MSDDA", self.exponents, num_models)

    def __call__(self, ctx: StepContext) -> GaussianKernel:
        ref = ctx.reference_kernel
        mean, var = fuse_gaussians(
            [k.mean for k in ctx.kernels],
            [k.var for k in ctx.kernels],
            self.exponents,
            ref_mean=None if ref is None else ref.mean,
            ref_var=None if ref is None else ref.var,
        )
        return GaussianKernel(mean, var)


@dataclass
class DBMPA:
    """Diffusion Blend (DB-MPA): eps_w = sum_k w_k eps_k, then an ordinary scheduler step.

    The learned-variance half of the outputs, if any, is averaged with the same weights.
    """

    weights: Sequence[float]
    name: str = "db-mpa"
    uses_reference: bool = False

    def __post_init__(self) -> None:
        self.weights = _check_weights(self.weights, "DB-MPA")

    def check(self, num_models: int) -> None:
        _check_count("DB-MPA", self.weights, num_models)

    def __call__(self, ctx: StepContext) -> GaussianKernel:
        blended = sum(w * out for w, out in zip(self.weights, ctx.outputs, strict=True))
        return ctx.scheduler.kernel(blended, ctx.timestep, ctx.x_t, prev_timestep=ctx.prev_timestep)


@dataclass
class DBMPALS:
    """DB-MPA-LS: at each step use one model's kernel, drawn with probability w_k (caller's generator)."""

    weights: Sequence[float]
    name: str = "db-mpa-ls"
    uses_reference: bool = False

    def __post_init__(self) -> None:
        self.weights = _check_weights(self.weights, "DB-MPA-LS")
        if any(w < 0 for w in self.weights) or math.fsum(self.weights) <= 0:
            raise StepRuleError(f"DB-MPA-LS: weights {self.weights} must be >= 0 with a positive sum")

    def check(self, num_models: int) -> None:
        _check_count("DB-MPA-LS", self.weights, num_models)

    def __call__(self, ctx: StepContext) -> GaussianKernel:
        # on the generator's device, so one generator serves the noise and the draw (CPU or GPU)
        device = ctx.generator.device if ctx.generator is not None else ctx.x_t.device
        probs = torch.tensor(self.weights, dtype=torch.float64, device=device)
        choice = int(torch.multinomial(probs, 1, generator=ctx.generator).item())
        ctx.info["chosen_model"] = choice
        return ctx.kernels[choice]
