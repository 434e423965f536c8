"""Step rules that call rewards at inference: CoDe (blockwise best-of-N) and RGG (reward gradients).

Rewards are plain callables `(x0 [B, ...], cond) -> Tensor [B]` (the Reward protocol of msdda.core.rewards,
whose validate_reward_output checks every value they return); the scalarised reward
is sum_k w_k r_k. Both rules build on one model's kernel (`model`: an index into the sampler's models, or
None for the reference), as the baselines in MSDDA.md §6 do with the base model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from msdda.core.kernel import GaussianKernel, ReverseKernel
from msdda.core.rewards import Reward, is_differentiable, reward_name, validate_reward_output
from msdda.sampling.rules import StepContext, StepRuleBase, StepRuleError, _check_weights

TEMPERING = ("constant", "sqrt_alpha_bar", "alpha_bar")


def _model_kernel(ctx: StepContext, model: int | None) -> ReverseKernel:
    if model is None:
        if ctx.reference_kernel is None:
            raise StepRuleError("the rule works on the reference model; pass `reference=` to sample()")
        return ctx.reference_kernel
    kernel = ctx.kernels[model]
    if kernel is None:  # only if a subclass's select() left its own model out
        raise StepRuleError(f"model {model}'s kernel was not evaluated at this step; include {model} in select()")
    return kernel


def _scalarised(rewards: Sequence[Reward], weights: Sequence[float], x0: Tensor, cond: Any) -> Tensor:
    total = torch.zeros(x0.shape[0], dtype=x0.dtype, device=x0.device)
    for i, (w, reward) in enumerate(zip(weights, rewards, strict=True)):
        if w == 0.0:
            continue
        values = validate_reward_output(reward(x0, cond), x0.shape[0], reward_name(reward, f"reward {i}"))
        total = total + w * values.to(x0.dtype)
    return total


def _check_rewards(rule: str, rewards: Sequence[Reward], weights: Sequence[float]) -> None:
    if len(rewards) != len(weights):
        raise StepRuleError(f"{rule}: {len(rewards)} rewards but {len(weights)} weights; pass one weight per reward")
    for i, r in enumerate(rewards):
        if not callable(r):
            raise StepRuleError(f"{rule}: reward {i} ({type(r).__name__}) is not callable")


@dataclass
class CoDe(StepRuleBase):
    """Blockwise best-of-N: every `block_size` steps draw `num_candidates` x_prev from the kernel and keep,
    per sample, the one whose Tweedie x0_hat (from `model` at prev_t) has the highest sum_k w_k r_k.

    Extra cost per block: num_candidates model evaluations and num_candidates * K reward calls.
    """

    rewards: Sequence[Reward]
    weights: Sequence[float]
    num_candidates: int = 4
    block_size: int = 5
    model: int | None = 0
    name: str = "code"

    def __post_init__(self) -> None:
        self.weights = _check_weights(self.weights, "CoDe")
        _check_rewards("CoDe", self.rewards, self.weights)
        if not isinstance(self.num_candidates, int) or self.num_candidates < 1:
            raise StepRuleError(f"CoDe: num_candidates={self.num_candidates!r}; it must be an integer >= 1")
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise StepRuleError(f"CoDe: block_size={self.block_size!r}; it must be an integer >= 1")

    @property
    def uses_reference(self) -> bool:
        return self.model is None

    def check(self, num_models: int) -> None:
        if self.model is not None and not 0 <= self.model < num_models:
            raise StepRuleError(f"CoDe: model index {self.model} out of range for {num_models} models")

    def __call__(self, ctx: StepContext) -> GaussianKernel:
        return _model_kernel(ctx, self.model)

    def draw(self, ctx: StepContext, kernel: GaussianKernel) -> Tensor:
        if (ctx.index + 1) % self.block_size != 0 or self.num_candidates == 1:
            return ctx.draw(kernel)
        assert ctx.evaluate is not None and ctx.cost is not None
        candidates = torch.stack([ctx.draw(kernel) for _ in range(self.num_candidates)])
        scores = []
        for cand in candidates:
            out = ctx.evaluate(self.model, cand, ctx.prev_timestep)
            x0 = ctx.scheduler.predict_x0(out, ctx.prev_timestep, cand)
            scores.append(_scalarised(self.rewards, self.weights, x0, ctx.cond))
            ctx.cost.reward_evals += sum(1 for w in self.weights if w != 0.0)
        best = torch.stack(scores).argmax(dim=0)  # [B]
        ctx.info["code_best"] = best
        return candidates[best, torch.arange(best.shape[0], device=best.device)]


@dataclass
class RGG(StepRuleBase):
    """Reward-gradient guidance: mean += lambda_t * var * grad_{x_t} sum_k w_k r_k(x0_hat(x_t)).

    lambda_t = scale * tempering(t): "constant" (1), "sqrt_alpha_bar" or "alpha_bar" (weaker at high
    noise, where x0_hat is least reliable). Needs differentiable rewards (a reward with
    `differentiable = False` is refused). Extra cost per step: one model evaluation with gradients and
    K reward gradients.
    """

    rewards: Sequence[Reward]
    weights: Sequence[float]
    scale: float = 1.0
    tempering: str = "sqrt_alpha_bar"
    model: int | None = 0
    name: str = "rgg"

    def __post_init__(self) -> None:
        self.weights = _check_weights(self.weights, "RGG")
        _check_rewards("RGG", self.rewards, self.weights)
        for i, r in enumerate(self.rewards):
            if not is_differentiable(r):
                name = reward_name(r, f"reward {i}")
                raise StepRuleError(
                    f"RGG needs differentiable rewards; {name!r} is not (use CoDe or MSDDA, which only "
                    f"evaluate rewards or need none)"
                )
        if self.tempering not in TEMPERING:
            raise StepRuleError(f"RGG: tempering={self.tempering!r}; choose one of {TEMPERING}")
        if not math.isfinite(self.scale) or self.scale < 0:
            raise StepRuleError(f"RGG: scale={self.scale}; it must be a finite number >= 0")

    @property
    def uses_reference(self) -> bool:
        return self.model is None

    def check(self, num_models: int) -> None:
        if self.model is not None and not 0 <= self.model < num_models:
            raise StepRuleError(f"RGG: model index {self.model} out of range for {num_models} models")

    def _lambda(self, ctx: StepContext) -> float:
        if self.tempering == "constant":
            return self.scale
        ab = float(ctx.scheduler.alpha_bar(ctx.timestep))
        return self.scale * (math.sqrt(ab) if self.tempering == "sqrt_alpha_bar" else ab)

    def __call__(self, ctx: StepContext) -> GaussianKernel:
        base = _model_kernel(ctx, self.model)
        assert ctx.evaluate is not None and ctx.cost is not None
        with torch.enable_grad():
            x = ctx.x_t.detach().requires_grad_(True)
            out = ctx.evaluate(self.model, x, ctx.timestep)
            x0 = ctx.scheduler.predict_x0(out, ctx.timestep, x)
            total = _scalarised(self.rewards, self.weights, x0, ctx.cond)
            if not total.requires_grad:
                raise StepRuleError(
                    "RGG: the scalarised reward has no gradient w.r.t. x_t (a reward detaches x0 or is not a torch "
                    "function of it); use differentiable rewards, or mark such a reward `differentiable = False` "
                    "and use CoDe"
                )
            (grad,) = torch.autograd.grad(total.sum(), x)
        ctx.cost.reward_grads += sum(1 for w in self.weights if w != 0.0)
        ctx.info["rgg_grad_norm"] = float(grad.flatten(1).norm(dim=1).mean())
        return GaussianKernel(base.mean + self._lambda(ctx) * base.var * grad.to(base.mean.dtype), base.var)
