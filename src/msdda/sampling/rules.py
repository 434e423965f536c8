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
from msdda.core.kernel import GaussianKernel, ReverseKernel, compute_dtype
from msdda.core.schedule import KernelScheduler
from msdda.errors import MSDDAError
from msdda.sampling.cost import Cost


class StepRuleError(MSDDAError):
    """A step rule was configured or used inconsistently (weights, model count, missing reference)."""


@dataclass
class StepContext:
    """Everything a rule may use at one reverse step t -> prev_t.

    x_t: the current sample [B, C, ...]; outputs: the (guided) model outputs [B, C or 2C, ...], one slot per
    model (K slots); kernels: their reverse kernels, one slot per model; reference_*: the reference model's,
    when it was evaluated. A slot is None for a model the rule's `select` left out at this step (see
    `StepRuleBase.select`); with the default selection every slot is filled.
    selected: what `select` returned at this step (model indices, None for the reference), or None when
    every model was evaluated. num_models: K. While `select` runs, outputs and kernels are still empty.
    """

    x_t: Tensor
    timestep: int
    prev_timestep: int
    index: int
    is_last: bool
    outputs: list[Tensor | None]
    kernels: list[ReverseKernel | None]
    scheduler: KernelScheduler
    generator: torch.Generator | None
    cond: Any = None
    reference_output: Tensor | None = None
    reference_kernel: ReverseKernel | None = None
    # evaluate(model_index or None for the reference, x, timestep) -> guided output, counted in `cost`
    evaluate: Callable[[int | None, Tensor, int], Tensor] | None = None
    cost: Cost | None = None
    info: dict[str, Any] = field(default_factory=dict)
    # draws x_prev from a kernel with the run's noise source and generator (the sampler sets it)
    drawer: Callable[[GaussianKernel], Tensor] | None = None
    # the kernel the rule returned at this step (set by the sampler before the draw and the callback)
    kernel: GaussianKernel | None = None
    # a step callback sets this to end the run after the current step (the sample so far is returned)
    stop: bool = False
    # K, the number of models the sampler was given (set by the sampler before `select`)
    num_models: int | None = None
    # what the rule's `select` returned at this step (None: every model, and the reference if it is used)
    selected: tuple[int | None, ...] | None = None

    def draw(self, kernel: GaussianKernel) -> Tensor:
        """A plain draw mean + sqrt(var) * z from `kernel`, with z from the run's noise source."""
        if self.drawer is None:
            return kernel.sample(self.generator)
        return self.drawer(kernel)


class StepRule(Protocol):
    """A reverse-step rule. `uses_reference`: the sampler must also evaluate the reference model.

    `draw(ctx, kernel) -> x_prev` turns the rule's kernel into the next sample at every step but the last;
    `StepRuleBase.draw` is the plain Gaussian draw, CoDe replaces it (it branches candidates and keeps the
    best). What the last step returns is the sampler's choice (`final_step`).
    Optional: `select(ctx) -> indices | None`, called before any model is evaluated at a step, says which
    models the step needs (see `StepRuleBase.select`); a rule without it gets every model.
    """

    name: str
    uses_reference: bool

    def check(self, num_models: int) -> None: ...

    def __call__(self, ctx: StepContext) -> GaussianKernel: ...

    def draw(self, ctx: StepContext, kernel: GaussianKernel) -> Tensor: ...


class StepRuleBase:
    """What every step rule shares: the plain draw from the kernel through the run's noise source, and the
    default selection (every model, and the reference when `uses_reference`)."""

    def select(self, ctx: StepContext) -> Sequence[int | None] | None:
        """Which models this step needs, decided before any is evaluated.

        Return None (the default) for all K models plus the reference when `uses_reference`, or a sequence of
        model indices in [0, K) with None standing for the reference: only those are evaluated (and counted
        in the run's cost); the other slots of ctx.outputs / ctx.kernels stay None, ctx.reference_* stay None
        unless None is in the sequence. ctx carries x_t, the timesteps, index, is_last, generator, cond, info
        and num_models; outputs and kernels are still empty. Randomness must come from ctx.generator, so a
        seed still fixes the run. `__call__` must also work when `select` was never called (a caller that
        builds its own StepContext, such as the step-optimality diagnostic, fills every slot).
        """
        return None

    def draw(self, ctx: StepContext, kernel: GaussianKernel) -> Tensor:
        return ctx.draw(kernel)


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
class SingleModel(StepRuleBase):
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
class MSDDA(StepRuleBase):
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


def _check_mixture(rule: str, weights: list[float], reference_weight: float) -> float:
    """Mixture weights (the reference's included) must sum to 1: eps_w = sum_k w_k eps_k is a noise estimate only
    then; weights summing to 0.4 would shrink every prediction and blow the samples up."""
    if not math.isfinite(reference_weight):
        raise StepRuleError(f"{rule}: reference_weight is {reference_weight}; it must be finite")
    total = math.fsum(weights) + reference_weight
    if not math.isclose(total, 1.0, rel_tol=SUM_TO_ONE_RTOL):
        raise StepRuleError(
            f"{rule}: weights {weights} (reference {reference_weight:g}) sum to {total:.6g}; mixture weights must "
            f"sum to 1 (give the reference the remainder with reference_weight={1 - math.fsum(weights):.6g})"
        )
    return float(reference_weight)


@dataclass
class DBMPA(StepRuleBase):
    """Diffusion Blend (DB-MPA): eps_w = sum_k w_k eps_k (+ w_0 eps_ref), then an ordinary scheduler step.

    weights (and reference_weight, 0 by default) must sum to 1. The learned-variance half of the outputs,
    if any, is averaged with the same weights.
    """

    weights: Sequence[float]
    reference_weight: float = 0.0
    name: str = "db-mpa"

    def __post_init__(self) -> None:
        self.weights = _check_weights(self.weights, "DB-MPA")
        self.reference_weight = _check_mixture("DB-MPA", self.weights, float(self.reference_weight))

    @property
    def uses_reference(self) -> bool:
        return self.reference_weight != 0.0

    def check(self, num_models: int) -> None:
        _check_count("DB-MPA", self.weights, num_models)

    def __call__(self, ctx: StepContext) -> GaussianKernel:
        outputs = list(ctx.outputs)
        weights = list(self.weights)
        if self.uses_reference:
            if ctx.reference_output is None:
                raise StepRuleError("DB-MPA with a reference weight needs the reference; pass `reference=`")
            outputs.append(ctx.reference_output)
            weights.append(self.reference_weight)
        outputs = _zero_offsets_where_missing(outputs, ctx.x_t.shape[1])
        blended = sum(w * out for w, out in zip(weights, outputs, strict=True))
        return ctx.scheduler.kernel(blended, ctx.timestep, ctx.x_t, prev_timestep=ctx.prev_timestep)


def _zero_offsets_where_missing(outputs: list[Tensor], channels: int) -> list[Tensor]:
    """Give outputs without kernel offsets zero ones (the same kernel) when others have them, so models with
    and without an offset head blend: an output of n channels next to one of n + 2C is padded with 2C zeros.
    Any other mismatch is refused (summing would broadcast a 1-channel output silently)."""
    widest = max(out.shape[1] for out in outputs)
    padded = [
        torch.nn.functional.pad(out, (0, 0) * (out.dim() - 2) + (0, 2 * channels))
        if out.shape[1] + 2 * channels == widest
        else out
        for out in outputs
    ]
    shapes = {tuple(out.shape) for out in padded}
    if len(shapes) > 1:
        raise StepRuleError(
            f"DB-MPA: the models' outputs have shapes {[tuple(o.shape) for o in outputs]}; they can be averaged only "
            "with one layout (models without kernel offsets are padded with zero offsets, nothing else is)"
        )
    return padded


@dataclass
class DBMPALS(StepRuleBase):
    """DB-MPA-LS: at each step use one model's kernel, drawn with probability w_k (caller's generator).

    reference_weight: the probability of the reference's kernel (drawn as model K, after the K models).
    The draw happens in `select`, before any model runs, so a step evaluates only the drawn model (the
    reference only on steps that draw it): 1 model evaluation per step, as the method is published, not K.
    The draw is torch.multinomial on the run's generator (on the generator's device), one per step before
    that step's noise draw; Diffusion Blend's released code draws with the global RNG instead, so seeds
    do not carry over between the two. `ctx.info["chosen_model"]` records the choice (K: the reference).
    """

    weights: Sequence[float]
    reference_weight: float = 0.0
    name: str = "db-mpa-ls"

    def __post_init__(self) -> None:
        self.weights = _check_weights(self.weights, "DB-MPA-LS")
        probs = [*self.weights, float(self.reference_weight)]
        if any(not math.isfinite(w) or w < 0 for w in probs) or math.fsum(probs) <= 0:
            raise StepRuleError(
                f"DB-MPA-LS: weights {self.weights} (reference {self.reference_weight:g}) must be >= 0 with "
                "a positive sum (they are probabilities)"
            )
        self.reference_weight = float(self.reference_weight)

    @property
    def uses_reference(self) -> bool:
        return self.reference_weight != 0.0

    def check(self, num_models: int) -> None:
        _check_count("DB-MPA-LS", self.weights, num_models)

    def _draw_choice(self, ctx: StepContext) -> int:
        """One draw in [0, K] (K: the reference) with probabilities w_k, from ctx.generator."""
        # on the generator's device, so one generator serves the noise and the draw (CPU or GPU)
        device = ctx.generator.device if ctx.generator is not None else ctx.x_t.device
        weights = [*self.weights, self.reference_weight] if self.uses_reference else list(self.weights)
        probs = torch.tensor(weights, dtype=compute_dtype(device), device=device)  # float32 on MPS only
        choice = int(torch.multinomial(probs, 1, generator=ctx.generator).item())
        ctx.info["chosen_model"] = choice
        return choice

    def select(self, ctx: StepContext) -> list[int | None]:
        """Draw this step's model; only it is evaluated ([None]: the reference)."""
        choice = self._draw_choice(ctx)
        return [None] if choice == len(self.weights) else [choice]

    def __call__(self, ctx: StepContext) -> GaussianKernel:
        choice = ctx.info.get("chosen_model")
        if choice is None:  # no select at this step (a caller's own context): draw here, from the same stream
            choice = self._draw_choice(ctx)
        if choice == len(self.weights):
            if ctx.reference_kernel is None:
                raise StepRuleError("DB-MPA-LS with a reference weight needs the reference; pass `reference=`")
            return ctx.reference_kernel
        kernel = ctx.kernels[choice] if choice < len(ctx.kernels) else None
        if kernel is None:
            raise StepRuleError(
                f"DB-MPA-LS drew model {choice} but its kernel was not evaluated at this step; let the sampler "
                "call select() first, or fill ctx.kernels for every model"
            )
        return kernel
