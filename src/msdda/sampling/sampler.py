"""The one sampling loop: evaluate the K denoisers a step rule needs at the same x_t, build their kernels, apply
the rule."""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

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

# callback(ctx, x_prev) after every step: return None to keep x_prev or a tensor of its shape to replace it;
# set ctx.stop = True to end the run there. ctx.kernel is the kernel the rule returned.
StepCallback = Callable[[StepContext, Tensor], "Tensor | None"]
FINAL_STEPS = ("mean", "sample")


@runtime_checkable
class ScheduleAware(Protocol):
    """A denoiser whose output depends on the run's step grid (the exact oracle's models do: their output
    encodes the kernel of the step t -> prev_t). The sampler binds its own scheduler copy before the loop."""

    def bind_schedule(self, scheduler: KernelScheduler) -> None: ...


Generators = torch.Generator | Sequence[torch.Generator]


class GaussianNoise:
    """The default noise source: z ~ N(0, I) from torch.randn on the run's generator.

    generator: one torch.Generator for the whole batch, or a list of B generators, one per sample: row b
    of every draw then comes from generator b alone (drawn as a [1, ...] tensor, as diffusers'
    randn_tensor does), so sample b of a batched run equals a single run seeded like generator b.
    Subclass it to draw like another library (the SD pipeline draws with diffusers' randn_tensor, so a CPU
    generator serves a GPU run and samples match diffusers') or to skip draws for point masses.
    """

    def randn(self, shape: tuple[int, ...], generator: Generators, device: torch.device, dtype: torch.dtype) -> Tensor:
        if isinstance(generator, torch.Generator):
            return torch.randn(shape, generator=generator, device=device, dtype=dtype)
        if len(generator) != shape[0]:
            raise StepRuleError(
                f"{len(generator)} generators for a batch of {shape[0]}; pass one generator per sample (or one)"
            )
        row = (1, *shape[1:])
        return torch.cat([torch.randn(row, generator=g, device=device, dtype=dtype) for g in generator])

    def draw(self, kernel: GaussianKernel, generator: Generators) -> Tensor:
        """mean + sqrt(var) * z with z from `randn`: every drawn step, and the last with final_step='sample'."""
        mean = kernel.mean
        return kernel.sample(noise=self.randn(tuple(mean.shape), generator, mean.device, mean.dtype))


@dataclass
class SampleOutput:
    """samples [B, C, ...]; trajectory [x_T, ..., x_0] when requested; what the run cost.

    interrupted: a step callback set ctx.stop; `samples` is then the sample after that step.
    """

    samples: Tensor
    trajectory: list[Tensor] | None
    cost: Cost
    interrupted: bool = False
    steps_run: int = 0

    @property
    def model_evals(self) -> int:
        return self.cost.model_evals

    @property
    def seconds(self) -> float:
        return self.cost.seconds


def make_generator(generator: Generators | None, seed: int | None, device: torch.device | str) -> Generators:
    """The caller's generator (or list of per-sample generators, returned as a list), or a new one seeded
    with `seed` (0 when neither is given)."""
    if generator is not None:
        if seed is not None:
            raise StepRuleError("pass a generator or a seed, not both")
        if isinstance(generator, torch.Generator):
            return generator
        if not isinstance(generator, Sequence) or isinstance(generator, str):
            raise StepRuleError(
                f"generator is a {type(generator).__name__}; pass a torch.Generator or a list of them (one per sample)"
            )
        gens = list(generator)
        bad = [type(g).__name__ for g in gens if not isinstance(g, torch.Generator)]
        if not gens or bad:
            raise StepRuleError(
                f"generator list {'is empty' if not gens else f'holds {bad}'}; pass one torch.Generator per sample"
            )
        return gens
    g = torch.Generator(device=device)
    g.manual_seed(0 if seed is None else int(seed))
    return g


def _own_scheduler(scheduler: Any, num_inference_steps: int | None, eta: float | None) -> KernelScheduler:
    """A KernelScheduler of our own for this run: the caller's scheduler object is never changed."""
    if isinstance(scheduler, KernelScheduler):
        ks = copy.deepcopy(as_kernel_scheduler(scheduler, eta=eta))
        if num_inference_steps is not None:
            ks.set_timesteps(num_inference_steps)
        return ks
    scheduler = copy.deepcopy(scheduler)
    if num_inference_steps is not None:
        scheduler.set_timesteps(num_inference_steps)
    return as_kernel_scheduler(scheduler, eta=eta)


def _check_inputs(
    shape: Sequence[int] | None,
    x_T: Tensor | None,
    guidance_scale: float | None,
    dtype: torch.dtype,
    device: torch.device | str,
    final_step: str,
    num_inference_steps: int | None,
) -> torch.device:
    """Refuse what would fail deep inside torch, or silently do something else, before any work."""
    if final_step not in FINAL_STEPS:
        raise StepRuleError(f"final_step={final_step!r}; choose one of {FINAL_STEPS}")
    if num_inference_steps is not None and (
        isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1
    ):
        raise StepRuleError(f"num_inference_steps={num_inference_steps!r}; it must be an integer >= 1 (or None)")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or dtype.is_complex:
        raise StepRuleError(f"dtype={dtype!r}; sample in a real floating dtype such as torch.float32 or torch.float64")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise StepRuleError(f"device={device!r} is not a torch device; pass e.g. 'cpu' or 'cuda'") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise StepRuleError(f"device={device!r} but this torch build has no usable CUDA device; pass device='cpu'")
    if guidance_scale is not None:
        try:
            g = float(guidance_scale)
        except (TypeError, ValueError) as exc:
            raise StepRuleError(f"guidance_scale={guidance_scale!r} is not a number") from exc
        if not math.isfinite(g):
            raise StepRuleError(f"guidance_scale={guidance_scale!r}; it must be finite (None disables guidance)")
    if x_T is not None:
        if not isinstance(x_T, Tensor):
            raise StepRuleError(f"x_T is a {type(x_T).__name__}; pass a tensor [B, ...] or `shape`")
        if shape is not None and tuple(shape) != tuple(x_T.shape):
            raise StepRuleError(f"shape={tuple(shape)} but x_T has shape {tuple(x_T.shape)}; pass one of them")
        if x_T.dim() == 0 or x_T.shape[0] == 0 or x_T.numel() == 0:
            raise StepRuleError(f"x_T has shape {tuple(x_T.shape)}; it needs a batch of at least one sample")
    elif shape is not None:
        try:
            dims = tuple(int(d) for d in shape)
        except (TypeError, ValueError) as exc:
            raise StepRuleError(f"shape={shape!r}; pass a tuple of positive integers, e.g. (8, 1, 8, 8)") from exc
        if not dims or any(d < 1 for d in dims):
            raise StepRuleError(f"shape={tuple(shape)}; every dimension must be >= 1 (batch first)")
    return dev


def _selection(
    rule: StepRule, chosen: Sequence[int | None] | None, num_models: int, reference: Denoiser | None
) -> tuple[int | None, ...] | None:
    """A rule's `select` result checked: None (every model), or distinct indices in [0, K) / None (reference)."""
    if chosen is None:
        return None
    if isinstance(chosen, str | bytes) or not isinstance(chosen, Sequence):
        raise StepRuleError(
            f"rule {rule.name!r}: select() returned {chosen!r}; return None (every model) or a sequence of model "
            "indices (None for the reference)"
        )
    picked: list[int | None] = []
    for k in chosen:
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < num_models):
            raise StepRuleError(
                f"rule {rule.name!r}: select() returned model index {k!r}; indices must be integers in "
                f"[0, {num_models}) (None for the reference)"
            )
        if k is None and reference is None:
            raise StepRuleError(f"rule {rule.name!r} selected the reference at this step; pass `reference=`")
        if k not in picked:
            picked.append(k)
    return tuple(picked)


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
    generator: Generators | None = None,
    seed: int | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
    callback: StepCallback | None = None,
    return_trajectory: bool = False,
    batch_models: bool | None = None,
    noise: GaussianNoise | None = None,
    final_step: str = "mean",
) -> SampleOutput:
    """Run the reverse process with K models under one step rule.

    models: K denoisers evaluated at the same x_t each step. scheduler: a KernelScheduler or a diffusers
    DDPM/DDIM scheduler; the run works on its own copy (timesteps set to `num_inference_steps`; None keeps
    the current ones), so the caller's scheduler is never changed.
    rule: SingleModel, MSDDA, DBMPA, ... ; `reference` is evaluated only when `rule.uses_reference`.
    shape or x_T: the batch to start from (x_T ~ N(0, I) drawn from the generator when not given).
    cond, guidance_scale, null_cond: classifier-free guidance per model when a scale is given.
    Hooks: `noise` (a GaussianNoise: where the standard-normal draws come from), `final_step` ("mean":
    the last step returns the kernel mean; "sample": it draws, as diffusers' DDIM step with eta > 0 does),
    `callback(ctx, x_prev)` after every step (may return a replacement x_prev, or set ctx.stop = True to
    end the run; ctx.kernel is the kernel the rule returned). Every step but the last draws with
    `rule.draw(ctx, kernel)`. A rule's `select(ctx)` hook, when it has one, runs first at every step and
    names the models that step needs (DB-MPA-LS: the one it drew); only those are evaluated and counted.
    batch_models: evaluate the K models in one vmapped call (msdda.models.batched) when they are
    nn.Modules of one architecture: None (auto) batches when they can be stacked and sit on an accelerator
    (on CPU one by one is faster), else evaluates them one by one; True requires it (BatchingError says why
    not); False never batches. Samples agree to float rounding; cost counts are the same. Denoisers that
    batch themselves (msdda.models.batched.BatchesItself: the SD pipeline's LoRA objectives, one UNet call
    for K adapters through peft's mixed-adapter batches, and its full UNets, vmapped) build their own
    evaluator under the same three settings; it also takes the reference when the rule uses it, and a step
    whose rule selects >= 2 of them. Otherwise a step whose rule selects a subset of the models evaluates
    just those, one by one, even when batching.
    generator: one torch.Generator, or a list of B (one per sample: row b of x_T and of every step's noise
    comes from generator b, so sample b equals a single run with that generator). Rules that draw their
    own randomness from `ctx.generator` (DB-MPA-LS's model choice) get the first generator of a list.
    Same generator state or seed -> bit-identical samples.
    """
    if not models:
        raise StepRuleError("no models given; pass at least one denoiser")
    if isinstance(rule, str) or not callable(rule) or not hasattr(rule, "check"):
        raise StepRuleError(
            f"rule={rule!r} is not a step rule; pass e.g. msdda.MSDDA(exponents) (msdda.plan_method turns a "
            "method name and weights into one)"
        )
    dev = _check_inputs(shape, x_T, guidance_scale, dtype, device, final_step, num_inference_steps)
    models = [as_denoiser(m) for m in models]
    rule.check(len(models))
    if rule.uses_reference and reference is None:
        raise StepRuleError(
            f"rule {rule.name!r} gives the reference a non-zero exponent; pass `reference=` (the base model)"
        )
    ks = _own_scheduler(scheduler, num_inference_steps, eta)
    for m in [*models, reference]:
        if isinstance(m, ScheduleAware):
            m.bind_schedule(ks)
    noise = noise if noise is not None else GaussianNoise()

    gen = make_generator(generator, seed, dev)
    rule_gen = gen if isinstance(gen, torch.Generator) else gen[0]  # ctx.generator: one generator
    if not isinstance(gen, torch.Generator):
        batch = int(x_T.shape[0]) if x_T is not None else int(shape[0]) if shape is not None else None
        if batch is not None and len(gen) != batch:
            raise StepRuleError(f"{len(gen)} generators for a batch of {batch}; pass one generator per sample (or one)")
    if x_T is None:
        if shape is None:
            raise StepRuleError("pass `shape` or `x_T` to say what to sample")
        x = noise.randn(tuple(int(d) for d in shape), gen, dev, dtype)
        sigma0 = float(getattr(ks, "init_noise_sigma", 1.0))  # x_T's std in the kernel's space (1 for DDPM/DDIM)
        if sigma0 != 1.0:
            x = x * sigma0
    else:
        x = x_T.to(dev)
    # Built from the unguided models: the batched evaluator applies guidance itself, on the stacked outputs.
    # The reference is offered too when every full step needs it (denoisers that batch themselves, such as
    # the SD pipeline's adapters of one UNet, then evaluate it in the same call).
    batched = stack_for_sampling(
        models,
        batch_models,
        guidance_scale=guidance_scale,
        null_cond=null_cond,
        reference=reference if rule.uses_reference else None,
    )
    with_reference = bool(getattr(batched, "includes_reference", False))
    subsets = getattr(batched, "evaluate", None)  # evaluators that can run any subset of their members
    if guidance_scale is not None:
        if cond is None:
            raise StepRuleError("guidance_scale needs `cond` (and `null_cond` for the unconditional pass)")
        models = [ClassifierFreeGuidance(m, guidance_scale, null_cond) for m in models]
        if reference is not None:
            reference = ClassifierFreeGuidance(reference, guidance_scale, null_cond)
    per_call = 2 if guidance_scale is not None else 1

    trajectory = [x] if return_trajectory else None
    # Integer timesteps stay ints (DDPM/DDIM, and models indexing tables by t); a schedule with fractional ones
    # (Euler ancestral with linspace spacing, flow matching) passes them as floats, as diffusers does.
    fractional = bool(torch.is_floating_point(ks.timesteps) and (ks.timesteps != ks.timesteps.round()).any())
    timesteps = [float(t) if fractional else int(t) for t in ks.timesteps]
    t_dtype = torch.float32 if fractional else torch.long
    cost = Cost()

    def evaluate(index: int | None, x_in: Tensor, timestep: int) -> Tensor:
        """Model `index` (None: the reference) at (x_in, timestep), guided, counted in `cost`."""
        net = reference if index is None else models[index]
        if net is None:
            raise StepRuleError("this rule needs the reference model; pass `reference=` to sample()")
        cost.model_evals += per_call
        t_in = torch.full((x_in.shape[0],), timestep, device=x_in.device, dtype=t_dtype)
        return net(x_in, t_in, cond)

    def evaluate_many(wanted: Sequence[int | None], x_in: Tensor, timestep: int) -> list[Tensor]:
        """Models `wanted` (None: the reference) at (x_in, timestep), in that order, counted as one evaluation
        each. Batched where the evaluator can: an evaluator with `evaluate` runs any >= 2 of its members in
        one go (the reference among them when it joined the batch); the vmap path runs all K models only
        (the reference then on its own). Everything else one by one."""
        if batched is not None and subsets is not None and len(wanted) >= 2 and (with_reference or None not in wanted):
            cost.model_evals += per_call * len(wanted)
            t_in = torch.full((x_in.shape[0],), timestep, device=x_in.device, dtype=t_dtype)
            return list(subsets(x_in, t_in, cond, [num_models if k is None else k for k in wanted]))
        if batched is not None and subsets is None and list(wanted[:num_models]) == list(range(num_models)):
            cost.model_evals += per_call * num_models
            t_in = torch.full((x_in.shape[0],), timestep, device=x_in.device, dtype=t_dtype)
            return [*batched(x_in, t_in, cond), *[evaluate(k, x_in, timestep) for k in wanted[num_models:]]]
        return [evaluate(k, x_in, timestep) for k in wanted]

    def drawer(kernel_: GaussianKernel) -> Tensor:
        return noise.draw(kernel_, gen)

    select = getattr(rule, "select", None)
    num_models = len(models)

    interrupted = False
    steps_run = 0
    start = time.perf_counter()
    with PeakMemory(x.device) as memory, torch.no_grad():
        for i, t in enumerate(tqdm(timesteps, desc=rule.name, disable=None if progress else True, leave=False)):
            prev_t = ks.prev_timestep(t)
            ctx = StepContext(
                x_t=x,
                timestep=t,
                prev_timestep=prev_t,
                index=i,
                is_last=i == len(timesteps) - 1,
                outputs=[],
                kernels=[],
                scheduler=ks,
                generator=rule_gen,
                cond=cond,
                evaluate=evaluate,
                cost=cost,
                drawer=drawer,
                num_models=num_models,
            )
            chosen = _selection(rule, select(ctx) if select is not None else None, num_models, reference)
            ctx.selected = chosen
            if chosen is None:
                wanted: list[int | None] = [*range(num_models), *([None] if rule.uses_reference else [])]
            else:
                wanted = list(chosen)
            outputs: list[Tensor | None] = [None] * num_models
            reference_output = None
            for k, out_k in zip(wanted, evaluate_many(wanted, x, t), strict=True):
                if k is None:
                    reference_output = out_k
                else:
                    outputs[k] = out_k
            ctx.outputs = outputs
            ctx.kernels = [None if o is None else ks.kernel(o, t, x, prev_timestep=prev_t) for o in outputs]
            if reference_output is not None:
                ctx.reference_output = reference_output
                ctx.reference_kernel = ks.kernel(ctx.reference_output, t, x, prev_timestep=prev_t)
            kernel: GaussianKernel = rule(ctx)
            ctx.kernel = kernel
            if not ctx.is_last:
                x = rule.draw(ctx, kernel)
            elif final_step == "sample":
                x = noise.draw(kernel, gen)
            else:
                x = kernel.mean
            steps_run = i + 1
            if callback is not None:
                replaced = callback(ctx, x)
                if replaced is not None:
                    if not isinstance(replaced, Tensor) or replaced.shape != x.shape:
                        got = tuple(replaced.shape) if isinstance(replaced, Tensor) else type(replaced).__name__
                        raise StepRuleError(
                            f"the step callback returned {got}; return None or a tensor of shape {tuple(x.shape)}"
                        )
                    x = replaced
            if trajectory is not None:
                trajectory.append(x)
            if ctx.stop:
                interrupted = not ctx.is_last
                break
    cost.seconds = time.perf_counter() - start
    cost.peak_memory_bytes = memory.peak_bytes
    cost.peak_memory_bound = memory.bound
    logger.debug("sampled %s with %s: %s", tuple(x.shape), rule.name, cost)
    return SampleOutput(samples=x, trajectory=trajectory, cost=cost, interrupted=interrupted, steps_run=steps_run)
