"""The one sampling loop: evaluate K denoisers at the same x_t, build their kernels, apply a step rule."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from msdda.core.kernel import GaussianKernel
from msdda.core.schedule import KernelScheduler, as_kernel_scheduler
from msdda.models.batched import stack_for_sampling
from msdda.models.denoiser import ClassifierFreeGuidance, Denoiser, as_denoiser
from msdda.sampling.cost import Cost, PeakMemory
from msdda.sampling.rules import StepContext, StepRule, StepRuleError

logger = logging.getLogger(__name__)

StepCallback = Callable[[StepContext, Tensor], None]


@dataclass
class SampleOutput:
    """samples [B, C, ...]; trajectory [x_T, ..., x_0] when requested; what the run cost."""

    samples: Tensor
    trajectory: list[Tensor] | None
    cost: Cost

    @property
    def model_evals(self) -> int:
        return self.cost.model_evals

    @property
    def seconds(self) -> float:
        return self.cost.seconds


def make_generator(generator: torch.Generator | None, seed: int | None, device: torch.device | str) -> torch.Generator:
    """The caller's generator, or a new one seeded with `seed` (0 when neither is given)."""
    if generator is not None:
        if seed is not None:
            raise StepRuleError("pass a generator or a seed, not both")
        return generator
    g = torch.Generator(device=device)
    g.manual_seed(0 if seed is None else int(seed))
    return g


def sample(
    models: Sequence[Denoiser],
    scheduler: Any,
    rule: StepRule,
    *,
    shape: Sequence[int] | None = None,
    x_T: Tensor | None = None,
    cond: Any = None,
    reference: Denoiser | None = None,
    num_inference_steps: int | None = 50,
    guidance_scale: float | None = None,
    null_cond: Any = None,
    eta: float | None = None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
    callback: StepCallback | None = None,
    return_trajectory: bool = False,
    batch_models: bool | None = None,
) -> SampleOutput:
    """Run the reverse process with K models under one step rule.

    models: K denoisers evaluated at the same x_t each step. scheduler: a KernelScheduler or a diffusers
    DDPM/DDIM scheduler (its timesteps are set to `num_inference_steps`; None keeps the current ones).
    rule: SingleModel, MSDDA, DBMPA, ... ; `reference` is evaluated only when `rule.uses_reference`.
    shape or x_T: the batch to start from (x_T ~ N(0, I) drawn from the generator when not given).
    cond, guidance_scale, null_cond: classifier-free guidance per model when a scale is given.
    The last step returns the kernel mean; every other step draws mean + sqrt(var) * z.
    batch_models: evaluate the K models in one vmapped call (msdda.models.batched) when they are
    nn.Modules of one architecture: None (auto) batches when they can be stacked and sit on an accelerator
    (on CPU one by one is faster), else evaluates them one by one; True requires it (BatchingError says why
    not); False never batches. Samples agree to float rounding; cost counts are the same.
    Same generator state or seed -> bit-identical samples.
    """
    if not models:
        raise StepRuleError("no models given; pass at least one denoiser")
    models = [as_denoiser(m) for m in models]
    rule.check(len(models))
    if rule.uses_reference and reference is None:
        raise StepRuleError(
            f"rule {rule.name!r} gives the reference a non-zero exponent; pass `reference=` (the base model)"
        )
    ks: KernelScheduler
    if isinstance(scheduler, KernelScheduler):
        ks = as_kernel_scheduler(scheduler, eta=eta)
        if num_inference_steps is not None:
            ks.set_timesteps(num_inference_steps)
    else:
        if num_inference_steps is not None:
            scheduler.set_timesteps(num_inference_steps)
        ks = as_kernel_scheduler(scheduler, eta=eta)

    gen = make_generator(generator, seed, device)
    if x_T is None:
        if shape is None:
            raise StepRuleError("pass `shape` or `x_T` to say what to sample")
        x = torch.randn(tuple(shape), generator=gen, device=device, dtype=dtype)
    else:
        x = x_T.to(device)
    # Built from the unguided models: the batched evaluator applies guidance itself, on the stacked outputs.
    batched = stack_for_sampling(models, batch_models, guidance_scale=guidance_scale, null_cond=null_cond)
    if guidance_scale is not None:
        if cond is None:
            raise StepRuleError("guidance_scale needs `cond` (and `null_cond` for the unconditional pass)")
        models = [ClassifierFreeGuidance(m, guidance_scale, null_cond) for m in models]
        if reference is not None:
            reference = ClassifierFreeGuidance(reference, guidance_scale, null_cond)
    per_call = 2 if guidance_scale is not None else 1

    trajectory = [x] if return_trajectory else None
    timesteps = [int(t) for t in ks.timesteps]
    cost = Cost()

    def evaluate(index: int | None, x_in: Tensor, timestep: int) -> Tensor:
        """Model `index` (None: the reference) at (x_in, timestep), guided, counted in `cost`."""
        net = reference if index is None else models[index]
        if net is None:
            raise StepRuleError("this rule needs the reference model; pass `reference=` to sample()")
        cost.model_evals += per_call
        t_in = torch.full((x_in.shape[0],), timestep, device=x_in.device, dtype=torch.long)
        return net(x_in, t_in, cond)

    def evaluate_all(x_in: Tensor, timestep: int) -> list[Tensor]:
        """All K models at (x_in, timestep): one batched call when possible, counted as K evaluations."""
        if batched is None:
            return [evaluate(k, x_in, timestep) for k in range(len(models))]
        cost.model_evals += per_call * len(models)
        t_in = torch.full((x_in.shape[0],), timestep, device=x_in.device, dtype=torch.long)
        return batched(x_in, t_in, cond)

    draw = getattr(rule, "draw", None)
    start = time.perf_counter()
    with PeakMemory(x.device) as memory, torch.no_grad():
        for i, t in enumerate(tqdm(timesteps, desc=rule.name, disable=None if progress else True, leave=False)):
            prev_t = ks.prev_timestep(t)
            outputs = evaluate_all(x, t)
            kernels = [ks.kernel(o, t, x, prev_timestep=prev_t) for o in outputs]
            ctx = StepContext(
                x_t=x,
                timestep=t,
                prev_timestep=prev_t,
                index=i,
                is_last=i == len(timesteps) - 1,
                outputs=outputs,
                kernels=kernels,
                scheduler=ks,
                generator=gen,
                cond=cond,
                evaluate=evaluate,
                cost=cost,
            )
            if rule.uses_reference:
                ctx.reference_output = evaluate(None, x, t)
                ctx.reference_kernel = ks.kernel(ctx.reference_output, t, x, prev_timestep=prev_t)
            kernel: GaussianKernel = rule(ctx)
            if ctx.is_last:
                x = kernel.mean
            else:
                x = draw(ctx, kernel) if draw is not None else kernel.sample(gen)
            if trajectory is not None:
                trajectory.append(x)
            if callback is not None:
                callback(ctx, x)
    cost.seconds = time.perf_counter() - start
    cost.peak_memory_bytes = memory.peak_bytes
    logger.debug("sampled %s with %s: %s", tuple(x.shape), rule.name, cost)
    return SampleOutput(samples=x, trajectory=trajectory, cost=cost)
