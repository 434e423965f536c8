"""The exact oracle (MSDDA.md §8): Gaussian data, quadratic step rewards, everything in closed form.

Data x0 ~ N(m0, diag(s0)) makes every reverse kernel of the forward process Gaussian and analytic.
Objective k has step reward r_k(x_prev) = -||x_prev - c_k||^2 / (2 rho_k^2) and was aligned with KL
strength beta_k, so its step-optimal kernel p_k ∝ p_ref * exp(r_k / beta_k) is Gaussian too. The
multi-objective optimum pi* ∝ p_ref * exp(sum_k w_k r_k / beta) and the step objective
J(pi) = E_pi[sum_k w_k r_k] - beta * KL(pi || p_ref) are derived here directly from p_ref and the
rewards, independently of the fusion code, so the fusion can be checked against them.

`OracleDenoiser` turns any of these kernels into an epsilon + learned-range-variance output that a DDPM
`KernelScheduler` maps back to exactly that kernel, so the whole sampler can be run on the oracle.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from msdda.core.kernel import GaussianKernel
from msdda.core.schedule import KernelScheduler, KernelSchedulerConfig
from msdda.errors import MSDDAError


class OracleError(MSDDAError):
    """The oracle task was configured or queried inconsistently."""


def oracle_scheduler(num_train_timesteps: int = 1000) -> KernelScheduler:
    """A DDPM schedule whose learned-range variance channel can express any positive variance."""
    return KernelScheduler(
        KernelSchedulerConfig(
            kind="ddpm", num_train_timesteps=num_train_timesteps, variance_type="learned_range", clip_sample=False
        )
    )


@dataclass
class GaussianTask:
    """An analytic diffusion task. Samples are [B, D] (float64 recommended).

    data_mean, data_var: [D] mean and variance of the data distribution (diagonal).
    centres: [K, D] reward centres c_k; widths: [K] rho_k; betas: [K] alignment strengths beta_k.
    """

    data_mean: Tensor
    data_var: Tensor
    centres: Tensor
    widths: Tensor
    betas: Tensor
    scheduler: KernelScheduler

    def __post_init__(self) -> None:
        self.data_mean = torch.as_tensor(self.data_mean, dtype=torch.float64)
        self.data_var = torch.as_tensor(self.data_var, dtype=torch.float64)
        self.centres = torch.as_tensor(self.centres, dtype=torch.float64)
        self.widths = torch.as_tensor(self.widths, dtype=torch.float64)
        self.betas = torch.as_tensor(self.betas, dtype=torch.float64)
        d = self.data_mean.shape[0]
        k = self.centres.shape[0]
        if self.data_var.shape != (d,) or self.centres.shape != (k, d):
            raise OracleError(
                f"shapes disagree: data_mean {tuple(self.data_mean.shape)}, data_var {tuple(self.data_var.shape)}, "
                f"centres {tuple(self.centres.shape)}; expected [D], [D], [K, D]"
            )
        if self.widths.shape != (k,) or self.betas.shape != (k,):
            raise OracleError(f"widths and betas must have shape [K]=[{k}]")
        if (self.data_var <= 0).any() or (self.widths <= 0).any() or (self.betas <= 0).any():
            raise OracleError("data_var, widths and betas must all be > 0")

    @classmethod
    def default(
        cls, dim: int = 2, num_objectives: int = 2, seed: int = 0, betas: Sequence[float] | None = None
    ) -> GaussianTask:
        """A reproducible task: unit-ish data, K reward centres spread around the data."""
        g = torch.Generator().manual_seed(seed)
        centres = 2.0 * torch.randn(num_objectives, dim, generator=g, dtype=torch.float64)
        if num_objectives <= dim:  # readable default: objective k pulls along axis k
            centres = torch.zeros(num_objectives, dim, dtype=torch.float64)
            centres[range(num_objectives), range(num_objectives)] = 2.0
        return cls(
            data_mean=torch.zeros(dim, dtype=torch.float64),
            data_var=0.5 + torch.rand(dim, generator=g, dtype=torch.float64),
            centres=centres,
            widths=0.5 + torch.rand(num_objectives, generator=g, dtype=torch.float64),
            betas=torch.tensor(betas if betas is not None else [1.0] * num_objectives, dtype=torch.float64),
            scheduler=oracle_scheduler(),
        )

    @property
    def dim(self) -> int:
        return int(self.data_mean.shape[0])

    @property
    def num_objectives(self) -> int:
        return int(self.centres.shape[0])

    # ----- the reference -------------------------------------------------------------------------
    def reference_kernel(self, x_t: Tensor, timestep: int, prev_timestep: int) -> GaussianKernel:
        """The exact p_ref(x_prev | x_t) of the forward process on Gaussian data; x_t [B, D]."""
        a_t = float(self.scheduler.alpha_bar(timestep))
        a_p = float(self.scheduler.alpha_bar(prev_timestep))
        alpha = a_t / a_p  # x_t = sqrt(alpha) x_prev + sqrt(1 - alpha) noise
        m_p = math.sqrt(a_p) * self.data_mean  # marginal of x_prev
        v_p = a_p * self.data_var + (1 - a_p)
        denom = alpha * v_p + (1 - alpha)
        gain = math.sqrt(alpha) * v_p / denom
        mean = m_p + gain * (x_t.double() - math.sqrt(alpha) * m_p)
        var = v_p * (1 - alpha) / denom
        return GaussianKernel(mean, var.expand_as(mean).clone())

    # ----- rewards and the aligned models ------------------------------------------------------------
    def step_reward(self, k: int, x_prev: Tensor) -> Tensor:
        """r_k(x_prev) = -||x_prev - c_k||^2 / (2 rho_k^2); x_prev [B, D] -> [B]."""
        return -((x_prev.double() - self.centres[k]) ** 2).sum(-1) / (2 * self.widths[k] ** 2)

    def expected_reward(self, k: int, kernel: GaussianKernel) -> Tensor:
        """E_{x ~ kernel}[r_k(x)] in closed form -> [B]."""
        var = torch.broadcast_to(kernel.var, kernel.mean.shape)
        return -(((kernel.mean - self.centres[k]) ** 2).sum(-1) + var.sum(-1)) / (2 * self.widths[k] ** 2)

    def aligned_kernel(self, k: int, ref: GaussianKernel) -> GaussianKernel:
        """Objective k's step-optimal kernel p_ref * exp(r_k / beta_k) / Z (Gaussian)."""
        lam = 1.0 / (self.betas[k] * self.widths[k] ** 2)
        precision = 1.0 / ref.var + lam
        var = 1.0 / precision
        return GaussianKernel(var * (ref.mean / ref.var + lam * self.centres[k]), var)

    def optimal_kernel(self, ref: GaussianKernel, preferences: Sequence[float], beta: float) -> GaussianKernel:
        """argmax_pi E_pi[sum_k w_k r_k] - beta KL(pi || p_ref), derived from p_ref and the rewards alone."""
        w = torch.as_tensor(preferences, dtype=torch.float64)
        lam = w / (beta * self.widths**2)  # [K]
        precision = 1.0 / ref.var + lam.sum()
        if not (precision > 0).all():
            raise OracleError(f"preferences {w.tolist()} with beta={beta} give no optimum (precision <= 0)")
        var = 1.0 / precision
        return GaussianKernel(var * (ref.mean / ref.var + (lam[:, None] * self.centres).sum(0)), var)

    def objective(
        self, kernel: GaussianKernel, ref: GaussianKernel, preferences: Sequence[float], beta: float
    ) -> Tensor:
        """J(pi) = sum_k w_k E_pi[r_k] - beta KL(pi || p_ref) in closed form -> [B]."""
        total = -beta * kernel.kl(ref)
        for k, wk in enumerate(preferences):
            total = total + float(wk) * self.expected_reward(k, kernel)
        return total

    def exponents(self, preferences: Sequence[float], beta: float) -> list[float]:
        """Fusion exponents a_k = w_k beta_k / beta for this task's betas."""
        return [float(w) * float(b) / beta for w, b in zip(preferences, self.betas, strict=True)]

    # ----- data ---------------------------------------------------------------------------------------
    def sample_data(self, n: int, generator: torch.Generator) -> Tensor:
        """n draws of x0 ~ N(m0, diag(s0)) -> [n, D]."""
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.data_mean + self.data_var.sqrt() * z


class OracleDenoiser:
    """A denoiser whose DDPM learned-range kernel is exactly the task's reference or aligned kernel.

    objective: None for the reference, else the index k of the aligned model. Outputs [B, 2D]:
    the epsilon that gives the exact mean, then the variance value v with frac = (v + 1) / 2.
    """

    def __init__(self, task: GaussianTask, objective: int | None = None) -> None:
        if objective is not None and not 0 <= objective < task.num_objectives:
            raise OracleError(f"objective {objective} out of range for {task.num_objectives} objectives")
        self.task = task
        self.objective = objective

    def kernel(self, x_t: Tensor, timestep: int) -> GaussianKernel:
        s = self.task.scheduler
        ref = self.task.reference_kernel(x_t, timestep, s.prev_timestep(timestep))
        return ref if self.objective is None else self.task.aligned_kernel(self.objective, ref)

    def __call__(self, x_t: Tensor, t: Tensor, cond: object = None) -> Tensor:
        timestep = int(t.reshape(-1)[0])
        s = self.task.scheduler
        prev = s.prev_timestep(timestep)
        target = self.kernel(x_t, timestep)
        a_t = float(s.alpha_bar(timestep))
        a_p = float(s.alpha_bar(prev))
        beta_t = 1 - a_t / a_p
        x0_coeff = math.sqrt(a_p) * beta_t / (1 - a_t)
        x_coeff = math.sqrt(a_t / a_p) * (1 - a_p) / (1 - a_t)
        x = x_t.double()
        x0 = (target.mean - x_coeff * x) / x0_coeff
        eps = (x - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)
        log_small = math.log(max((1 - a_p) / (1 - a_t) * beta_t, 1e-20))
        frac = (torch.log(torch.broadcast_to(target.var, x.shape)) - log_small) / (math.log(beta_t) - log_small)
        return torch.cat([eps, 2 * frac - 1], dim=1).to(x_t.dtype)


def gaussian_bundle(num_objectives: int = 2, dim: int = 2, seed: int = 0) -> Any:
    """The oracle as a TaskBundle: unconditional, rewards = quadratic rewards of the final sample."""
    from msdda.tasks.bundle import TaskBundle

    task = GaussianTask.default(dim=dim, num_objectives=num_objectives, seed=seed)
    names = [f"objective_{k + 1}" for k in range(num_objectives)]

    def reward_for(k: int) -> Any:
        def reward(x0: Tensor, cond: object = None) -> Tensor:
            return task.step_reward(k, x0)

        reward.name = names[k]  # type: ignore[attr-defined]
        reward.differentiable = True  # type: ignore[attr-defined]
        return reward

    return TaskBundle(
        name="gaussian",
        objectives=names,
        base=OracleDenoiser(task, None),
        aligned={n: OracleDenoiser(task, k) for k, n in enumerate(names)},
        scheduler=task.scheduler,
        rewards={n: reward_for(k) for k, n in enumerate(names)},
        prompts=[None],
        sample_shape=(dim,),
        betas={n: float(task.betas[k]) for k, n in enumerate(names)},
        dtype=torch.float64,
        prompt_label=lambda p: "none",
    )
