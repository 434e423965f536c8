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
from torch import Tensor, nn

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


class OracleDenoiser(nn.Module):
    """A denoiser whose DDPM learned-range kernel is exactly the task's reference or aligned kernel.

    objective: None for the reference, else the index k of the aligned model. Outputs [B, 2D]:
    the epsilon that gives the exact mean, then the variance value v with frac = (v + 1) / 2.
    """

    def __init__(self, task: GaussianTask, objective: int | None = None) -> None:
        super().__init__()
        if objective is not None and not 0 <= objective < task.num_objectives:
            raise OracleError(f"objective {objective} out of range for {task.num_objectives} objectives")
        self.task = task
        self.objective = objective
        self.schedule: KernelScheduler | None = None

    def bind_schedule(self, scheduler: KernelScheduler) -> None:
        """Use the sampler's step grid (prev_t of each t); without a binding, the task's scheduler's."""
        self.schedule = scheduler

    @property
    def _grid(self) -> KernelScheduler:
        return self.schedule if self.schedule is not None else self.task.scheduler

    def kernel(self, x_t: Tensor, timestep: int) -> GaussianKernel:
        s = self._grid
        ref = self.task.reference_kernel(x_t, timestep, s.prev_timestep(timestep))
        return ref if self.objective is None else self.task.aligned_kernel(self.objective, ref)

    def forward(self, x_t: Tensor, t: Tensor, cond: object = None) -> Tensor:
        """x_t [B, D], t [B] (one timestep per sample allowed, as in training) -> [B, 2D]."""
        t = t.reshape(-1)
        out = torch.empty(x_t.shape[0], 2 * x_t.shape[1], dtype=x_t.dtype, device=x_t.device)
        for timestep in torch.unique(t).tolist():
            rows = t == timestep
            out[rows] = self._output(x_t[rows], int(timestep))
        return out

    def _output(self, x_t: Tensor, timestep: int) -> Tensor:
        s = self._grid
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


class OraclePolicy(nn.Module):
    """A learnable policy on the oracle: the reference's kernel moved by kernel offsets (MSDDA.md §5).

    Output [B, 4D]: the reference's [eps, variance value] and the offsets (d_mean, d_logvar) of
    `msdda.core.schedule.apply_kernel_offsets`, set so that the mean moves by sqrt(1 - alpha_bar_t / alpha_bar_prev)
    * (A_t * x_t + b_t) and the log-variance by l_t per timestep and dimension (the offsets' own scaling by the
    kernel variance is divided out: these units keep the parameters O(1) at every t, which the per-timestep tables
    of this policy, unlike a network, need for one learning rate to suit all of them). The step optimum of a
    quadratic step reward is in this family exactly (its mean is affine in x_t and its variance does not depend on
    x_t), so a correct trainer can reach it; all parameters start at 0, where the policy is the reference.
    """

    def __init__(self, task: GaussianTask) -> None:
        super().__init__()
        self.reference = OracleDenoiser(task, None)
        n, d = task.scheduler.config.num_train_timesteps, task.dim
        self.scale = nn.Parameter(torch.zeros(n, d, dtype=torch.float64))
        self.shift = nn.Parameter(torch.zeros(n, d, dtype=torch.float64))
        self.log_var = nn.Parameter(torch.zeros(n, d, dtype=torch.float64))

    def bind_schedule(self, scheduler: KernelScheduler) -> None:
        self.reference.bind_schedule(scheduler)

    def forward(self, x_t: Tensor, t: Tensor, cond: object = None) -> Tensor:
        t = t.reshape(-1).long().expand(x_t.shape[0])
        ref = self.reference(x_t, t, cond)
        inv_var = torch.empty(x_t.shape, dtype=torch.float64, device=x_t.device)  # 1 / the reference's variance
        step_sd = torch.empty(x_t.shape[0], 1, dtype=torch.float64, device=x_t.device)
        grid = self.reference._grid
        for timestep in torch.unique(t).tolist():
            rows = t == timestep
            kernel = self.reference.kernel(x_t[rows].double(), int(timestep))
            inv_var[rows] = 1.0 / torch.broadcast_to(kernel.var, kernel.mean.shape)
            a_t, a_p = grid.alpha_bar(int(timestep)), grid.alpha_bar(grid.prev_timestep(int(timestep)))
            step_sd[rows] = float(1 - a_t / a_p) ** 0.5
        d_mean = (self.scale[t] * x_t.double() + self.shift[t]) * step_sd * inv_var
        return torch.cat([ref.double(), d_mean, self.log_var[t] * inv_var], dim=1).to(x_t.dtype)


def gaussian_bundle(
    num_objectives: int = 2, dim: int = 2, seed: int = 0, betas: Sequence[float] | None = None
) -> Any:
    """The oracle as a TaskBundle: unconditional, rewards = quadratic rewards of the final sample.

    betas: the aligned models' KL strengths beta_k (default 1 each)."""
    from msdda.tasks.bundle import TaskBundle

    task = GaussianTask.default(dim=dim, num_objectives=num_objectives, seed=seed, betas=betas)
    names = [f"objective_{k + 1}" for k in range(num_objectives)]

    def reward_for(k: int) -> Any:
        def reward(x0: Tensor, cond: object = None) -> Tensor:
            return task.step_reward(k, x0)

        reward.name = names[k]  # type: ignore[attr-defined]
        reward.differentiable = True  # type: ignore[attr-defined]
        return reward

    def step_reward(objective: str, x_prev: Tensor, prev_t: int, cond: object = None) -> Tensor:
        # The aligned models are exactly p_ref * exp(r_k(x_prev) / beta_k) / Z for this reward of x_prev itself.
        return task.step_reward(names.index(objective), x_prev)

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
        step_reward=step_reward,
    )


# ----- training learnable policies on the oracle (MSDDA.md §5) ---------------------------------------------
GAUSSIAN_TRAINERS: tuple[str, ...] = ("bt", "listwise", "hard", "step-rl")
POLICY_MODEL_TYPE = "oracle-policy"
POLICY_TASK = "gaussian"
# Defaults that land every exact trainer within a few percent of the step optimum in well under a minute on
# CPU (the oracle's models are closed-form, so a step costs tens of milliseconds): 9 training timesteps on a
# 10-step grid, 32 trajectories x 4 states a step, 300 Adam steps at lr 0.03 (measured: KL(opt || policy) /
# KL(opt || ref) about 1e-4 for bt / listwise and 5e-3 for step-rl; hard labels overshoot by orders of magnitude).
GAUSSIAN_TRAIN_DEFAULTS: dict[str, Any] = {
    "steps": 300,
    "lr": 0.03,
    "trajectories": 32,
    "states_per_trajectory": 4,
    "num_inference_steps": 50,  # the grid of sweeps and of the diagnostic: a policy is exact on its own grid
    "grad_clip": 0.0,
    "checkpoint_every": 200,
    "log_every": 50,
    "eval_samples": 256,
}


@dataclass
class GaussianAlignResult:
    """model: the trained OraclePolicy (frozen); train: the trainer's TrainResult (history, seconds);
    fit: `policy_fit` at the end (kl_to_optimum_over_reference and per-timestep figures); out: the run dir."""

    model: nn.Module
    train: Any
    fit: dict[str, Any]
    out: Any


def _objective_index(names: Sequence[str], objective: str | int) -> int:
    if isinstance(objective, int) and not isinstance(objective, bool):
        if not 0 <= objective < len(names):
            raise OracleError(f"objective index {objective} out of range; the task has {len(names)} objectives")
        return objective
    if objective not in names:
        raise OracleError(f"objective {objective!r} is not one of {', '.join(names)}; pass one of those names")
    return list(names).index(str(objective))


def gaussian_train_config(
    trainer: str = "bt",
    objective: str | int = "objective_1",
    *,
    beta: float | None = None,
    task_options: dict[str, Any] | None = None,
    **overrides: Any,
) -> Any:
    """The default config of `trainer` on the oracle: a DPOConfig (labels=trainer) or a StepRLConfig with
    GAUSSIAN_TRAIN_DEFAULTS, reward = the objective's name and beta = the task's beta_k for that objective
    unless `beta` is given; `overrides` replace any field (e.g. steps=200)."""
    from msdda.alignment.dpo import DPOConfig
    from msdda.alignment.step_rl import StepRLConfig

    if trainer not in GAUSSIAN_TRAINERS:
        raise OracleError(f"trainer {trainer!r} is not one of {', '.join(GAUSSIAN_TRAINERS)}")
    opts = dict(task_options or {})
    task = GaussianTask.default(
        dim=int(opts.get("dim", 2)),
        num_objectives=int(opts.get("num_objectives", 2)),
        seed=int(opts.get("seed", 0)),
        betas=opts.get("betas"),
    )
    names = [f"objective_{k + 1}" for k in range(task.num_objectives)]
    k = _objective_index(names, objective)
    fields = {**GAUSSIAN_TRAIN_DEFAULTS, "reward": names[k], "beta": float(task.betas[k]) if beta is None else beta}
    if trainer == "step-rl":
        return StepRLConfig(**{**fields, "samples": 4, **overrides})
    return DPOConfig(**{**fields, "candidates": 4, "labels": trainer, **overrides})


def policy_fit(
    policy: nn.Module,
    task: GaussianTask,
    objective: int,
    num_inference_steps: int,
    *,
    beta: float | None = None,
    states: int = 64,
    candidates: int = 8,
    seed: int = 0,
) -> dict[str, Any]:
    """How close `policy`'s kernels are to objective `objective`'s step optimum p_ref * exp(r_k / beta) / Z
    (beta: default the task's beta_k, where the optimum is `task.aligned_kernel`), in closed form.

    At `states` states per grid timestep (all but the last) from exact reference trajectories (generator
    `seed`): kl_to_optimum_over_reference = sum KL(opt || policy) / sum KL(opt || ref) (0 at the optimum,
    1 at the reference), its median over timesteps, per timestep {t: ratio}, and calibration_slope: the
    slope through 0 of beta * delta log(policy/ref) on delta r over all pairs of `candidates` policy draws
    per state (1 at the optimum).
    """
    from msdda.alignment.dpo import calibration_sums, candidate_log_prob

    beta = float(task.betas[objective]) if beta is None else float(beta)
    onehot = [1.0 if j == objective else 0.0 for j in range(task.num_objectives)]
    ks = KernelScheduler(task.scheduler.config, task.scheduler.alphas_cumprod)
    ks.set_timesteps(num_inference_steps)
    if hasattr(policy, "bind_schedule"):
        policy.bind_schedule(ks)
    gen = torch.Generator().manual_seed(int(seed))
    x = torch.randn(states, task.dim, generator=gen, dtype=torch.float64)
    timesteps = [int(t) for t in ks.timesteps]
    num, den, per_t, cal_num, cal_den = 0.0, 0.0, {}, 0.0, 0.0
    with torch.no_grad():
        for t in timesteps[:-1]:
            prev = ks.prev_timestep(t)
            ref = task.reference_kernel(x, t, prev)
            opt = task.optimal_kernel(ref, onehot, beta)
            out = policy(x, torch.full((states,), t, dtype=torch.long), None)
            got = ks.kernel(out.double(), t, x)
            a, b = float(opt.kl(got).sum()), float(opt.kl(ref).sum())
            num, den = num + a, den + b
            per_t[t] = a / b if b > 0 else float("nan")
            z = torch.randn(states, candidates, task.dim, generator=gen, dtype=torch.float64)
            cands = got.mean[:, None] + got.std[:, None] * z
            ratio = candidate_log_prob(got, cands) - candidate_log_prob(ref, cands)
            r = task.step_reward(objective, cands.reshape(-1, task.dim)).reshape(states, candidates)
            cn, cd = calibration_sums(ratio, r, beta)
            cal_num, cal_den = cal_num + float(cn), cal_den + float(cd)
            x = ref.sample(gen)
    ratios = sorted(per_t.values())
    return {
        "kl_to_optimum_over_reference": num / den if den > 0 else float("nan"),
        "median_over_timesteps": ratios[len(ratios) // 2] if ratios else float("nan"),
        "per_timestep": per_t,
        "kl_optimum_reference_per_state": den / (states * max(1, len(per_t))),
        "calibration_slope": cal_num / cal_den if cal_den > 0 else float("nan"),
    }


def align_gaussian(
    objective: str | int,
    out: Any,
    config: Any = None,
    *,
    trainer: str = "bt",
    seed: int | None = None,
    progress: bool = True,
    resume: bool = True,
    task_options: dict[str, Any] | None = None,
) -> GaussianAlignResult:
    """Train an `OraclePolicy` towards objective `objective` (name or index) of the Gaussian oracle and save it.

    trainer: "bt" / "listwise" / "hard" (DPOTrainer with those labels) or "step-rl" (StepRLTrainer).
    config: a DPOConfig / StepRLConfig (default `gaussian_train_config(trainer, objective)`: beta = the
    task's beta_k); its labels must agree with `trainer`. seed: overrides config.seed when given.
    task_options: `gaussian_bundle` options (num_objectives, dim, seed, betas), recorded in config.json.
    The step reward is the oracle's exact one (the quadratic reward of x_prev itself). Writes `out`/
    model.safetensors + config.json (task options, trainer, config, fit), train_log.jsonl, checkpoints/.
    """
    from pathlib import Path

    from msdda.alignment.dpo import DPOConfig, DPOTrainer
    from msdda.alignment.step_rl import StepRLConfig, StepRLTrainer
    from msdda.models.io import save_pretrained

    opts = {"num_objectives": 2, "dim": 2, "seed": 0, "betas": None, **dict(task_options or {})}
    bundle = gaussian_bundle(**opts)
    task: GaussianTask = bundle.base.task
    k = _objective_index(bundle.objectives, objective)
    name = bundle.objectives[k]
    if config is None:
        config = gaussian_train_config(trainer, k, task_options=opts)
    if trainer == "step-rl":
        if not isinstance(config, StepRLConfig):
            raise OracleError(f"trainer 'step-rl' needs a StepRLConfig, got {type(config).__name__}")
        cls: Any = StepRLTrainer
    elif trainer in GAUSSIAN_TRAINERS:
        if not isinstance(config, DPOConfig) or config.labels != trainer:
            raise OracleError(
                f"trainer {trainer!r} needs a DPOConfig with labels={trainer!r}, got {type(config).__name__}"
                f"{' with labels=' + repr(config.labels) if isinstance(config, DPOConfig) else ''}"
            )
        cls = DPOTrainer
    else:
        raise OracleError(f"trainer {trainer!r} is not one of {', '.join(GAUSSIAN_TRAINERS)}")
    if seed is not None:
        config.seed = int(seed)
    out = Path(out)

    def step_reward(x_prev: Tensor, prev_t: Tensor, cond: object = None) -> Tensor:
        return bundle.step_reward(name, x_prev, prev_t, cond)

    policy = OraclePolicy(task)
    reference = OracleDenoiser(task, None)
    runner = cls(
        policy,
        reference,
        task.scheduler,
        bundle.rewards[name],
        config,
        out=out,
        sample_shape=(task.dim,),
        cond_sampler=lambda n, gen: None,
        null_cond=None,
        step_reward=step_reward,
        clip_samples=False,
    )
    result = runner.train(resume=resume, progress=progress)
    fit = policy_fit(result.model, task, k, config.num_inference_steps, beta=config.beta)
    if runner.ctx.is_main:
        save_pretrained(
            result.model,
            out,
            model_type=POLICY_MODEL_TYPE,
            task=POLICY_TASK,
            architecture=opts,
            scheduler=task.scheduler.config.to_dict(),
            metadata={
                "trainer": trainer,
                "objective": name,
                "train_config": config.to_dict(),
                "num_inference_steps": config.num_inference_steps,
                "fit": {kk: v for kk, v in fit.items() if kk != "per_timestep"}
                | {"per_timestep": {str(t): v for t, v in fit["per_timestep"].items()}},
                "final_eval": result.final_eval,
                "seconds": result.seconds,
            },
        )
    return GaussianAlignResult(model=result.model, train=result, fit=fit, out=out)


def load_gaussian_policy(directory: Any) -> OraclePolicy:
    """A trained OraclePolicy from `align_gaussian`'s directory (frozen, eval mode), bound to the step grid it
    was trained on (sampling rebinds it to the sampler's own grid)."""
    from msdda.models.io import from_pretrained

    def build(arch: dict[str, Any]) -> OraclePolicy:
        return OraclePolicy(gaussian_bundle(**arch).base.task)

    policy, doc = from_pretrained(directory, build, model_type=POLICY_MODEL_TYPE, task=POLICY_TASK)
    steps = doc.get("metadata", {}).get("num_inference_steps")
    if steps is not None:
        ks = KernelScheduler(policy.reference.task.scheduler.config, policy.reference.task.scheduler.alphas_cumprod)
        ks.set_timesteps(int(steps))
        policy.bind_schedule(ks)
    return policy
