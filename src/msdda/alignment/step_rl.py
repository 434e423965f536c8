"""Direct step-level RL (MSDDA.md §5): maximise J(pi) = E_{x~pi(.|x_t)}[r_t(x)] - beta * KL(pi || p_ref) at states.

At a state x_t taken from the current policy's own (guided) sampling trajectories the policy's reverse kernel
pi(.|x_t) and the frozen reference's p_ref(.|x_t) are diagonal Gaussians, so KL(pi || p_ref) is taken in closed
form (`GaussianKernel.kl`); only the expected step reward is estimated, from `samples` draws x^1..x^K per state:

* "reparam": x^i = mean + std * z^i with z^i ~ N(0, I) drawn beforehand, and the gradient flows through a
  differentiable step reward into mean and std (the default for a differentiable reward, see
  `msdda.core.rewards.is_differentiable`);
* "loo": the leave-one-out score-function estimate grad log pi(x^i) * (r_i - mean_{j != i} r_j), unbiased for
  black-box rewards with a baseline that needs no extra reward calls (the default otherwise);
* "moment": regression onto the optimum itself: `samples` draws from the REFERENCE kernel, self-normalised
  importance weights exp(r / beta), their weighted mean and per-element variance as a Gaussian target, and the
  loss KL(target || pi) in closed form. Its fixed point is the moment-matched p* (the forward-KL projection,
  the Gaussian that `msdda diagnose` compares with); black-box rewards work, and no reward gradient is needed.
  The self-normalised target carries an O(1/samples) bias, so use dozens of samples per state.

KL(pi || p*) = -J(pi) / beta + const for p* = p_ref * exp(r_t / beta) / Z, so J's maximiser is the step optimum
(within the Gaussian family, the reverse-KL projection of p*). With a weighted reward sum_k w_k r_k (pass a
list of rewards, or of step rewards, and `StepRLConfig.reward_weights`) it is the multi-objective step-level RL
fine-tuning that MSDDA's fusion is claimed to equal. `StepRLTrainer` implements `collect` and `loss` on top of
`msdda.alignment.trainer.StepTrainer` (loop, checkpoints resumable bit for bit, DDP data shards, logging).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from msdda.alignment.dpo import candidate_log_prob
from msdda.alignment.errors import AlignmentError
from msdda.alignment.trainer import (
    CondSampler,
    RewardFn,
    States,
    StepLoss,
    StepRewardFn,
    StepTrainer,
    StepTrainerConfig,
    TrainResult,
    repeat_cond,
)
from msdda.core.kernel import GaussianKernel
from msdda.core.rewards import is_differentiable, reward_name
from msdda.core.samplers import SamplerKernelScheduler
from msdda.core.schedule import KernelScheduler
from msdda.distributed import DistContext

__all__ = [
    "ESTIMATORS",
    "STATE_WEIGHTS",
    "StepRLBatch",
    "StepRLConfig",
    "StepRLResult",
    "StepRLTrainer",
    "importance_sampled_optimum",
    "loo_advantages",
    "loo_step_rl_loss",
    "reparam_step_rl_loss",
    "train_step_rl",
    "weighted_reward",
]

ESTIMATORS: tuple[str, ...] = ("auto", "reparam", "loo", "moment")
STATE_WEIGHTS: tuple[str, ...] = ("uniform", "inverse_variance")


@dataclass
class StepRLConfig(StepTrainerConfig):
    """Direct step-level RL. Round-trips through to_dict/from_dict; written beside every run.

    Fields of every step trainer: see `StepTrainerConfig`.
    estimator: "reparam" (gradient through a differentiable step reward), "loo" (leave-one-out score
    function, any reward), "moment" (regression onto the importance-sampled optimum, any reward) or "auto"
    (reparam when the reward is differentiable, else loo).
    samples: draws K of x_{t-1} per state for the expected reward (loo needs K >= 2).
    reward_weights: w_k of a weighted reward sum_k w_k r_k when the trainer is given a list of K rewards
    (or step rewards); None for a single reward.
    state_weights: "uniform" (each state's -J counts the same) or "inverse_variance" (each state's -J is
    weighted by 1 / its reference kernel's mean variance, normalised over the global batch). With
    variance-scaled kernel offsets (`msdda.core.schedule.apply_kernel_offsets`) the gradient of J in the
    offsets is var * (g - beta * d_mean), so the last steps (variance ~1e-3 against ~0.3 at t = 1000) would
    barely train; the weights make it t-uniform. Weights per state do not move any state's optimum, so the
    fixed point is the step optimum either way wherever the policy can reach it.
    antithetic: draw the K noises of a state in pairs (z, -z) (K even). Unbiased like independent draws; for the
    reparameterised gradient of a reward that is quadratic in x the pair's first-order noise (Hessian * std * z)
    cancels exactly, which is most of the noise of concave rewards at large t.
    """

    estimator: str = "auto"
    samples: int = 4
    reward_weights: list[float] | None = None
    state_weights: str = "uniform"
    antithetic: bool = False

    def validate(self) -> None:
        super().validate()
        if self.estimator not in ESTIMATORS:
            raise AlignmentError(
                f"StepRLConfig.estimator={self.estimator!r} is not an estimator; choose one of {', '.join(ESTIMATORS)}"
            )
        if self.state_weights not in STATE_WEIGHTS:
            raise AlignmentError(
                f"StepRLConfig.state_weights={self.state_weights!r}; choose one of {', '.join(STATE_WEIGHTS)}"
            )
        if self.samples < 1:
            raise AlignmentError(f"StepRLConfig.samples={self.samples!r} must be >= 1")
        if self.antithetic and self.samples % 2:
            raise AlignmentError(
                f"StepRLConfig.samples={self.samples!r}: antithetic draws come in pairs; use an even number"
            )
        if self.estimator in ("loo", "moment") and self.samples < 2:
            raise AlignmentError(
                f"StepRLConfig.samples={self.samples!r}: the {self.estimator} estimator needs >= 2 samples per state"
            )
        if self.reward_weights is not None:
            w = [float(v) for v in self.reward_weights]
            if not w or not all(torch.isfinite(torch.tensor(w))):
                raise AlignmentError(
                    f"StepRLConfig.reward_weights={self.reward_weights!r} must be a non-empty list of finite numbers"
                )


@dataclass
class StepRLResult(TrainResult):
    """model: the trained policy (LoRA merged); history: the log rows; final_eval: last held-out figures."""


def weighted_reward(fns: Sequence[Callable[..., Tensor]], weights: Sequence[float]) -> Callable[..., Tensor]:
    """sum_k w_k f_k(*args) for rewards (x0, cond) or step rewards (x_prev, prev_t, cond) alike -> [N].

    The result is differentiable when every f_k is, and is named "w1*name1+w2*name2..."."""
    fns, w = list(fns), [float(v) for v in weights]
    if len(fns) != len(w) or not fns:
        raise AlignmentError(
            f"{len(fns)} rewards but {len(w)} reward_weights; pass one weight per reward (StepRLConfig.reward_weights)"
        )

    def combined(*args: Any) -> Tensor:
        return sum(wk * fk(*args).double() for wk, fk in zip(w, fns, strict=True))  # type: ignore[return-value]

    names = [getattr(fk, "name", None) or getattr(fk, "__name__", None) or reward_name(fk) for fk in fns]
    combined.name = "+".join(f"{wk:g}*{nk}" for wk, nk in zip(w, names, strict=True))  # type: ignore[attr-defined]
    combined.differentiable = all(is_differentiable(fk) for fk in fns)  # type: ignore[attr-defined]
    return combined


def reparam_step_rl_loss(
    kernel: GaussianKernel,
    reference: GaussianKernel,
    reward: Callable[[Tensor], Tensor],
    noise: Tensor,
    beta: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-state negated objective -(mean_i r(mean + std * z^i) - beta * KL(pi || ref)) [N], reparameterised.

    kernel, reference: the policy's (with gradient) and the reference's kernels over [N, ...]; noise: [N, K, ...]
    standard-normal draws; reward: x [N*K, ...] -> [N*K], differentiable. Returns (loss [N], rewards [N, K], KL [N]).
    """
    n, k = noise.shape[:2]
    std = kernel.std[:, None] if kernel.var.dim() > 0 else kernel.std
    x = kernel.mean[:, None] + std * noise  # [N, K, ...]
    r = reward(x.reshape(n * k, *noise.shape[2:])).reshape(n, k)
    kl = kernel.kl(reference)
    return -(r.mean(1) - beta * kl), r, kl


def importance_sampled_optimum(draws: Tensor, rewards: Tensor, beta: float) -> GaussianKernel:
    """The Gaussian fit of p* = p_ref exp(r / beta) / Z per state from reference draws [N, K, ...] and their step
    rewards [N, K]: self-normalised weights (log-sum-exp shifted, float64), weighted mean and per-element
    variance (floored at 1e-12 of the draws' own variance) -> GaussianKernel over [N, ...]."""
    u = torch.softmax(rewards.double() / beta, dim=1)  # [N, K]
    u = u.reshape(*u.shape, *([1] * (draws.dim() - 2)))
    x = draws.double()
    mean = (u * x).sum(1)
    var = (u * (x - mean[:, None]) ** 2).sum(1)
    return GaussianKernel(mean, var.clamp_min(1e-12 * x.var(1).clamp_min(1e-300)))


def loo_advantages(rewards: Tensor) -> Tensor:
    """r_i - mean_{j != i} r_j over each state's K >= 2 samples: [N, K] -> [N, K]."""
    k = rewards.shape[1]
    return rewards - (rewards.sum(1, keepdim=True) - rewards) / (k - 1)


def loo_step_rl_loss(
    kernel: GaussianKernel, reference: GaussianKernel, samples: Tensor, rewards: Tensor, beta: float
) -> tuple[Tensor, Tensor]:
    """Per-state surrogate loss [N] whose gradient is -(grad E_pi[r] - beta * grad KL(pi || ref)), with the
    leave-one-out score-function estimate mean_i grad log pi(x^i) * (r_i - mean_{j != i} r_j).

    samples: [N, K, ...] drawn from the policy's kernel (no gradient); rewards: [N, K] their rewards.
    Returns (loss [N], KL [N])."""
    logp = candidate_log_prob(kernel, samples)  # [N, K]
    adv = loo_advantages(rewards.detach().to(logp.dtype))
    kl = kernel.kl(reference)
    return -((logp * adv).mean(1) - beta * kl), kl


@dataclass
class StepRLBatch:
    """The no-gradient part of one data shard's step: states, the reference kernel there and the draws."""

    states: States
    ref_mean: Tensor  # [N, ...]
    ref_var: Tensor  # broadcastable to ref_mean
    noise: Tensor  # [N, K, ...] standard-normal draws (reparam: x = mean + std * z, drawn in `loss`)
    samples: Tensor | None = None  # [N, K, ...] policy draws (loo)
    rewards: Tensor | None = None  # [N, K] their step rewards (loo; moment: of the reference draws)
    target: GaussianKernel | None = None  # moment: the importance-sampled Gaussian fit of the optimum


class StepRLTrainer(StepTrainer[StepRLConfig, StepRLBatch]):
    """Direct step-level RL (see the module docstring).

    reward / step_reward: one callable, or a list of them combined as sum_k w_k r_k with
    `config.reward_weights` (the multi-objective baseline). Everything else as `StepTrainer`.

    >>> trainer = StepRLTrainer(policy, reference, scheduler, reward, StepRLConfig(reward="ink"), out=run_dir,
    ...                         sample_shape=(1, 8, 8), cond_sampler=class_conditions, null_cond=null)
    >>> result = trainer.train()
    """

    config_class: ClassVar[type[StepTrainerConfig]] = StepRLConfig
    result_class: ClassVar[type[TrainResult]] = StepRLResult

    def __init__(
        self,
        policy: nn.Module,
        reference: nn.Module,
        scheduler: KernelScheduler | SamplerKernelScheduler,
        reward: RewardFn | Sequence[RewardFn],
        config: StepRLConfig,
        *,
        step_reward: StepRewardFn | Sequence[StepRewardFn] | None = None,
        **kwargs: Any,
    ) -> None:
        weights = getattr(config, "reward_weights", None)
        reward = self._combine(reward, weights, "reward")
        if step_reward is not None:
            step_reward = self._combine(step_reward, weights, "step_reward")
        super().__init__(policy, reference, scheduler, reward, config, step_reward=step_reward, **kwargs)
        self.estimator = self.resolve_estimator()

    @staticmethod
    def _combine(fns: Any, weights: Sequence[float] | None, what: str) -> Any:
        if callable(fns):
            if weights is not None and len(weights) != 1:
                raise AlignmentError(
                    f"reward_weights={list(weights)} name {len(weights)} rewards but one {what} was given; pass a "
                    f"list of {len(weights)} {what}s or drop reward_weights"
                )
            return fns if weights is None else weighted_reward([fns], weights)
        fns = list(fns)
        if weights is None:
            raise AlignmentError(f"a list of {len(fns)} {what}s needs StepRLConfig.reward_weights (one per {what})")
        return weighted_reward(fns, weights)

    def resolve_estimator(self) -> str:
        """config.estimator, with "auto" resolved: "reparam" when the step reward is differentiable, else "loo"."""
        est = self.config.estimator
        scored = self.custom_step_reward if self.custom_step_reward is not None else self.reward
        if est == "auto":
            est = "reparam" if is_differentiable(scored) else "loo"
        if est in ("loo", "moment") and self.config.samples < 2:
            raise AlignmentError(f"samples={self.config.samples}: the {est} estimator needs >= 2 per state")
        return est

    def progress_description(self) -> str:
        return f"step-rl {self.config.reward}"

    def collect(self, shard: int) -> StepRLBatch:
        """States, the reference kernel there and K standard-normal draws per state (loo: also the policy's
        samples and their rewards), from the shard's own generator."""
        states = self.sample_states(shard)
        gen, k = self.generators[shard], self.config.samples
        x, n = states.x, len(states)
        with torch.no_grad():
            rk = self.kernel(self.reference_guided, states)
            if self.config.antithetic:
                half = torch.randn((n, k // 2, *x.shape[1:]), generator=gen, dtype=torch.float64).to(x.device)
                noise = torch.cat([half, -half], dim=1)
            else:
                noise = torch.randn((n, k, *x.shape[1:]), generator=gen, dtype=torch.float64).to(x.device)
            if self.estimator == "reparam":
                return StepRLBatch(states, rk.mean, rk.var, noise)
            if self.estimator == "moment":
                draws = rk.mean[:, None] + rk.std[:, None] * noise  # [N, K, ...] from the reference
                flat = draws.reshape(n * k, *x.shape[1:])
                r = self.step_reward(flat, states.prev.repeat_interleave(k), repeat_cond(states.cond, k)).reshape(n, k)
                target = importance_sampled_optimum(draws, r, self.config.beta)
                return StepRLBatch(states, rk.mean, rk.var, noise, rewards=r, target=target)
            pk = self.kernel(self.policy_guided, states)
            samples = pk.mean[:, None] + pk.std[:, None] * noise
            flat = samples.reshape(n * k, *x.shape[1:])
            r = self.step_reward(flat, states.prev.repeat_interleave(k), repeat_cond(states.cond, k)).reshape(n, k)
        return StepRLBatch(states, rk.mean, rk.var, noise, samples=samples, rewards=r)

    def loss(self, batches: list[StepRLBatch]) -> StepLoss:
        """-J averaged over the states of the global batch (under DDP too), J = E_pi[r] - beta * KL(pi || ref)."""
        assert self.train_guided is not None
        beta, k = self.config.beta, self.config.samples
        losses, rewards, kls, weights = [], [], [], []
        for b in batches:  # one forward per shard: the same batch shapes as on any other process count
            pk = self.kernel(self.train_guided, b.states)
            ref = GaussianKernel(b.ref_mean, b.ref_var)
            if self.estimator == "moment":
                assert b.target is not None and b.rewards is not None
                per_state, kl, r = b.target.kl(pk), pk.kl(ref), b.rewards
            elif self.estimator == "reparam":
                prev, cond = b.states.prev.repeat_interleave(k), repeat_cond(b.states.cond, k)
                per_state, r, kl = reparam_step_rl_loss(
                    pk, ref, lambda flat, p=prev, c=cond: self.step_reward(flat, p, c), b.noise, beta
                )
            else:
                assert b.samples is not None and b.rewards is not None
                per_state, kl = loo_step_rl_loss(pk, ref, b.samples, b.rewards, beta)
                r = b.rewards
            losses.append(per_state)
            rewards.append(r.detach().mean(1))
            kls.append(kl.detach())
            if self.config.state_weights == "inverse_variance":
                v = torch.broadcast_to(b.ref_var, b.ref_mean.shape).double().flatten(1).mean(1)
                weights.append(1.0 / v.clamp_min(1e-12))
            else:
                weights.append(torch.ones(per_state.shape[0], dtype=torch.float64, device=per_state.device))
        per_state = torch.cat(losses)
        weight = torch.cat(weights).to(per_state.dtype)
        if self.ctx.distributed:
            # DDP averages gradients over ranks, so each rank's loss carries world_size / (global weight sum)
            total = self.ctx.all_sum(weight.sum().detach().double().reshape(1))[0]
            loss = (weight * per_state).sum() * self.ctx.world_size / total.clamp_min(1e-300)
        else:
            loss = (weight * per_state).sum() / weight.sum()
        return StepLoss(loss=loss, parts={"reward": torch.cat(rewards), "kl": torch.cat(kls)})

    def statistics(self, out: StepLoss) -> dict[str, float]:
        """step_reward (mean sampled step reward), kl (mean KL(pi || ref) per state, nats) and objective
        J = step_reward - beta * kl, over the global batch; loss = -J (the loo surrogate's value differs; with
        the moment estimator step_reward is that of the reference's draws, the policy is not sampled)."""
        r, kl = out.parts["reward"], out.parts["kl"]
        sums = torch.stack([r.sum(), kl.sum(), torch.tensor(float(r.numel()), dtype=torch.float64)])
        if self.ctx.distributed:
            sums = self.ctx.all_sum(sums)
        n = sums[2].clamp_min(1.0)
        reward, kl_mean = float(sums[0] / n), float(sums[1] / n)
        objective = reward - self.config.beta * kl_mean
        return {"loss": -objective, "step_reward": reward, "kl": kl_mean, "objective": objective}


def train_step_rl(
    policy: nn.Module,
    reference: nn.Module,
    scheduler: KernelScheduler | SamplerKernelScheduler,
    reward: RewardFn | Sequence[RewardFn],
    config: StepRLConfig,
    *,
    out: Path,
    sample_shape: tuple[int, ...] | list[int],
    cond_sampler: CondSampler,
    null_cond: Any,
    resume: bool = True,
    progress: bool = True,
    throttle: float = 0.0,
    context: DistContext | None = None,
    step_reward: StepRewardFn | Sequence[StepRewardFn] | None = None,
    clip_samples: bool = True,
) -> StepRLResult:
    """Train `policy` (initialised as a copy of `reference`) by direct step-level RL:
    `StepRLTrainer(...).train(...)`; arguments as `msdda.alignment.dpo.train_dpo`, and reward / step_reward may
    be lists combined with `config.reward_weights`."""
    trainer = StepRLTrainer(
        policy,
        reference,
        scheduler,
        reward,
        config,
        out=out,
        sample_shape=sample_shape,
        cond_sampler=cond_sampler,
        null_cond=null_cond,
        context=context,
        step_reward=step_reward,
        clip_samples=clip_samples,
    )
    result: Any = trainer.train(resume=resume, progress=progress, throttle=throttle)
    return result
