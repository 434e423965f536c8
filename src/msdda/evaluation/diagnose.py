"""The step-optimality diagnostic (MSDDA.md §9): how far each model and each fusion rule is from the step optimum.

MSDDA is exact only if every single-objective model IS the step optimum p*_k = p_ref * exp(r_k / beta_k) / Z
(MSDDA.md §3-4). At states x_t taken from the reference's own (guided) trajectories this module estimates
that optimum by self-normalised importance sampling from the reference kernel and compares:

- each aligned model with its objective's optimum: `kl_to_optimum_over_reference` =
  KL(fit(p*_k) || q_k) / KL(fit(p*_k) || p_ref) (0: the model is the optimum; 1: no better than the
  reference), the beta that best explains the model's mean shift (linear regime: shift = Cov_ref(x, r) / beta)
  and the log-variance ratio of the model to the optimum;
- each fusion rule at each preference weight w with the optimum of r_w = sum_k w_k r_k at beta_w =
  sum_k w_k beta_k: J* - J(q), with J(q) = E_q[r_w] - beta_w * KL(q || p_ref) (KL closed form for Gaussian
  q, E_q by Monte Carlo) and J* = beta_w * log E_ref[exp(r_w / beta_w)].

Estimator at one state: N reference draws x^i = mu_ref + sigma_ref * (+-z_i) (antithetic pairs), step rewards
r(x^i) (one batched, chunked reference call for all objectives), weights u_i ∝ exp(r(x^i) / beta) in float64
(log-sum-exp shifted), the weighted mean and per-element variance as the Gaussian fit of p*, ESS =
(sum u)^2 / sum u^2, and delete-a-group jackknife standard errors (pairs are kept together in a group). KLs
from the fit are jackknife bias-corrected (`OptimumFit.kl_to`): the plug-in value carries the fit's own noise,
about D / (2 ESS) nats, which would put even an exact model's ratio well above 0 for a weak reward.
Everything is computed in the reference's standardised coordinates z = (x - mu_ref) / sigma_ref, where the
reference is N(0, 1) and KLs are unchanged.

`run_diagnose(bundle)` runs it and writes `diagnose.json`, `diagnose_config.json` and `diagnose.png`;
`format_diagnose(summary)` renders the summary as a text table. See docs/diagnose.md.
"""

from __future__ import annotations

import copy
import io
import itertools
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from msdda.atomic import check_output_dir, write_bytes_atomic, write_json_atomic
from msdda.config import JSONConfig
from msdda.core.kernel import GaussianKernel
from msdda.errors import MSDDAError
from msdda.evaluation.sweep import simplex_grid as sweep_simplex_grid
from msdda.models.denoiser import ClassifierFreeGuidance, Denoiser, as_denoiser
from msdda.sampling.methods import (
    BASE,
    REWARDED_SOUP,
    STEP_RL,
    MethodPlan,
    MissingPolicyError,
    PlanError,
    default_beta,
    get_method,
    plan_method,
)
from msdda.sampling.rules import DBMPA, DBMPALS, MSDDA, SingleModel, StepContext
from msdda.sampling.sampler import sample
from msdda.tasks.bundle import TaskBundle

logger = logging.getLogger(__name__)

DEFAULT_METHODS = (MSDDA.name, DBMPA.name, DBMPALS.name, REWARDED_SOUP, BASE)
DEFAULT_TIMESTEPS = (960, 720, 480, 240, 100, 20)
# Default conditions per task, as indices into bundle.prompts (digits: the classes 0, 3 and 7).
DEFAULT_PROMPTS = {"digits": (0, 3, 7)}
JSON_FILE = "diagnose.json"
CONFIG_FILE = "diagnose_config.json"
PLOT_FILE = "diagnose.png"
# Per-element arrays (x_t, the fits and their errors) are written for samples up to this many elements.
PER_ELEMENT_LIMIT = 1024


class DiagnoseError(MSDDAError):
    """The diagnostic was configured inconsistently with its task (unknown objective, bad draw count, ...)."""


@dataclass
class DiagnoseConfig(JSONConfig):
    """Everything that fixes a diagnose run (written to `diagnose_config.json` and into diagnose.json).

    objectives: the objectives diagnosed (None: all of the task's); weights: preference weights
      {objective: w} the fusion rules are scored at (None: the simplex grid with `weight_points` points per
      edge over `objectives`: 3 points for 2 objectives); methods: the fusion rules (planner names).
    prompt_indices: conditions, as indices into bundle.prompts (None: the task's default, digits 0/3/7);
      trajectories: reference trajectories per condition; timesteps: the states' t (each mapped to the nearest
      timestep of the `num_inference_steps` schedule). States = conditions x trajectories x timesteps.
    draws: reference draws per state for the optimum (even: antithetic pairs); kernel_draws: draws per
      state from each rule's kernel for E_q[r_w]; jackknife_groups: groups of pairs for the standard errors.
    t_range_edges: timesteps splitting the states into t-ranges for the summaries ([0, e1), [e1, e2), ...).
    betas: per-objective KL strengths overriding the task's (the beta each model was aligned with).
    chunk_size: draws per reference call (bounds memory); seed: all randomness; per_element: write the
      per-element fits (None: when a sample has at most 1024 elements).
    train_policies: "step-rl" trains a missing policy on first use (True) or reports it skipped (False); None:
      trains when step-rl is named in `methods`, skips when it was added to the default methods (a task with
      step-RL policies adds it there, and training one takes minutes per weight vector).
    """

    config_error = DiagnoseError

    objectives: tuple[str, ...] | None = None
    weights: tuple[dict[str, float], ...] | None = None
    weight_points: int = 3
    methods: tuple[str, ...] = DEFAULT_METHODS
    prompt_indices: tuple[int, ...] | None = None
    trajectories: int = 1
    timesteps: tuple[int, ...] = DEFAULT_TIMESTEPS
    num_inference_steps: int = 50
    draws: int = 4096
    kernel_draws: int = 256
    jackknife_groups: int = 32
    t_range_edges: tuple[int, ...] = (200, 600)
    betas: dict[str, float] | None = None
    chunk_size: int = 4096
    seed: int = 0
    per_element: bool | None = None
    train_policies: bool | None = None

    def validate(self) -> None:
        for name in ("draws", "kernel_draws"):
            n = getattr(self, name)
            if not isinstance(n, int) or n < 4 or n % 2:
                raise DiagnoseError(f"{name}={n!r}; use an even integer >= 4 (draws come in antithetic pairs)")
        g = self.jackknife_groups
        if not isinstance(g, int) or not 2 <= g <= self.draws // 2:
            raise DiagnoseError(
                f"jackknife_groups={g!r}; use an integer in [2, draws/2 = {self.draws // 2}] (groups hold whole pairs)"
            )
        for name in ("trajectories", "num_inference_steps", "chunk_size", "weight_points"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise DiagnoseError(f"{name}={v!r}; it must be an integer >= 1")
        if not self.timesteps:
            raise DiagnoseError("timesteps is empty; pass at least one timestep, e.g. (960, 480, 20)")
        if list(self.t_range_edges) != sorted(set(self.t_range_edges)):
            raise DiagnoseError(f"t_range_edges={list(self.t_range_edges)}; they must be strictly increasing")
        for m in self.methods:
            get_method(m)  # PlanError names the valid ones
        if self.train_policies is not None and not isinstance(self.train_policies, bool):
            raise DiagnoseError(f"train_policies={self.train_policies!r}; use True, False or None")
        if self.betas is not None:
            for o, b in self.betas.items():
                if not (isinstance(b, int | float) and math.isfinite(b) and b > 0):
                    raise DiagnoseError(f"betas[{o!r}]={b!r}; a KL strength must be a finite number > 0")


# ----- small numerics ---------------------------------------------------------------------------------------
def simplex_grid(objectives: Sequence[str], points: int) -> list[dict[str, float]]:
    """The sweep's simplex grid with `points` per edge, first objective's weight descending (2 objectives,
    3 points: 1/0, .5/.5, 0/1); one point (or one objective) gives equal weights."""
    if len(objectives) == 1 or points <= 1:
        return [{o: 1.0 / len(objectives) for o in objectives}]
    return list(reversed(sweep_simplex_grid(objectives, points)))


def weight_label(weights: Mapping[str, float]) -> str:
    """A printable key for a weight vector: 'ink=0.5,symmetry=0.5'."""
    return ",".join(f"{o}={w:g}" for o, w in weights.items())


# A state's KL ratio is reported only where the optimum's (bias-corrected) KL to the reference exceeds this many
# standard errors; elsewhere the ratio would be noise over noise (a saturated reward's optimum is the reference).
RATIO_MIN_Z = 2.0


def jackknife_se(loo: Tensor) -> Tensor:
    """Delete-a-group jackknife standard error from the G leave-one-group-out values [G, ...] -> [...]."""
    g = loo.shape[0]
    centred = loo - loo.mean(0, keepdim=True)
    return ((g - 1) / g * (centred**2).sum(0)).sqrt()


def gaussian_kl(m1: Tensor, v1: Tensor, m2: Tensor, v2: Tensor) -> Tensor:
    """KL(N(m1, v1) || N(m2, v2)) of diagonal Gaussians, summed over the last dim (broadcasting)."""
    dims = len(torch.broadcast_shapes(m1.shape, v1.shape, m2.shape, v2.shape))
    return GaussianKernel(m1, v1).kl(GaussianKernel(m2, v2), batch_dims=dims - 1)


def _finite(x: Any) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def _mean_se(values: Sequence[float], ses: Sequence[float]) -> dict[str, float | None]:
    """Mean of independent per-state estimates and its standard error."""
    n = len(values)
    if n == 0:
        return {"mean": None, "se": None, "states": 0}
    return {
        "mean": _finite(math.fsum(values) / n),
        "se": _finite(math.sqrt(math.fsum(s * s for s in ses)) / n),
        "states": n,
    }


def _median_jk(full: Tensor, loo: Tensor) -> dict[str, float | None]:
    """Median over states [S] with a jackknife error from the leave-group-out values [G, S] (group g of every
    state deleted together: the groups of different states are independent)."""
    if full.numel() == 0:
        return {"median": None, "se": None, "states": 0}
    return {
        "median": _finite(full.median()),
        "se": _finite(jackknife_se(loo.median(dim=1).values)),
        "states": int(full.numel()),
    }


def _pair_stats(values: Tensor) -> tuple[float, float]:
    """Mean and standard error of per-draw values [M] of antithetic pairs (draw i pairs with i + M/2)."""
    half = values.shape[0] // 2
    pair = 0.5 * (values[:half] + values[half:])
    return float(pair.mean()), float(pair.std(unbiased=True) / math.sqrt(half)) if half > 1 else 0.0


# ----- the optimum at one state ---------------------------------------------------------------------------
@dataclass
class OptimumFit:
    """The importance-sampling estimate of p* = p_ref exp(r / beta) / Z at one state, in z coordinates.

    mean, var: [D] the Gaussian fit (weighted mean and variance, jackknife bias-corrected); loo_mean, loo_var:
    [G, D] with group g deleted; j_star, loo_j: J* and its leave-group-out values [G]; ess: the effective sample
    size; raw_mean, raw_var: [D] the plain (not bias-corrected) weighted moments of all draws, which
    `kl_to` needs for its own jackknife.
    """

    mean: Tensor
    var: Tensor
    loo_mean: Tensor
    loo_var: Tensor
    j_star: float
    loo_j: Tensor
    ess: float
    raw_mean: Tensor
    raw_var: Tensor

    @property
    def mean_se(self) -> Tensor:
        return jackknife_se(self.loo_mean)

    @property
    def var_se(self) -> Tensor:
        return jackknife_se(self.loo_var)

    @property
    def j_se(self) -> float:
        return float(jackknife_se(self.loo_j))

    def kl_to(self, mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
        """KL(p* || N(mean, var)), jackknife bias-corrected, and its leave-group-out values [G].

        The plug-in KL of the fitted moments is biased up by the fit's own noise: about sum_d Var(mu_d) / (2 v_d)
        nats, D / (2 ESS) for a model at the optimum, which at 64 dimensions and ESS 1,000 is 0.03 nats, as large
        as the whole optimum shift of a weak reward. KL is quadratic in the fitted mean to leading order, so
        G * KL(full) - (G - 1) * mean_g KL(-g) removes that bias (and the ratio estimator's O(1/N) one). The
        corrected value can dip below 0 by about its standard error when the true KL is near 0.
        """
        g = self.loo_mean.shape[0]
        full = gaussian_kl(self.raw_mean, self.raw_var, mean, var)
        loo = gaussian_kl(self.loo_mean, self.loo_var, mean, var)  # [G]
        return g * full - (g - 1) * loo.mean(), loo


def fit_optimum(z: Tensor, rewards: Tensor, beta: float, groups: Tensor, num_groups: int) -> OptimumFit:
    """Fit p* from reference draws z [N, D] (standardised) and their step rewards [N] at KL strength beta.

    groups: [N] the jackknife group of each draw. Float64 throughout; weights exp(r / beta - max).
    """
    logw = rewards.double() / beta
    shift = logw.max()
    u = torch.exp(logw - shift)  # [N], max 1
    onehot = torch.zeros(num_groups, z.shape[0], dtype=torch.float64)
    onehot[groups, torch.arange(z.shape[0])] = 1.0
    s0_g = onehot @ u  # [G]
    s1_g = onehot @ (u[:, None] * z)  # [G, D]
    s2_g = onehot @ (u[:, None] * z * z)
    n_g = onehot.sum(1)

    def stats(s0: Tensor, s1: Tensor, s2: Tensor, n: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        s0c = s0.clamp_min(torch.finfo(torch.float64).tiny)
        mean = s1 / s0c[..., None]
        var = (s2 / s0c[..., None] - mean**2).clamp_min(1e-300)
        j = beta * (shift + torch.log(s0c / n))
        return mean, var, j

    mean, var, j = stats(s0_g.sum(), s1_g.sum(0), s2_g.sum(0), n_g.sum())
    raw_mean, raw_var = mean, var
    loo_mean, loo_var, loo_j = stats(s0_g.sum() - s0_g, s1_g.sum(0) - s1_g, s2_g.sum(0) - s2_g, n_g.sum() - n_g)
    # Self-normalised ratios and log-mean-exp carry an O(1/N) bias of the size of their standard error when
    # the draws are antithetic; the jackknife removes it: G * theta - (G - 1) * mean_g theta_(-g).
    g = num_groups
    mean = g * mean - (g - 1) * loo_mean.mean(0)
    var = (g * var - (g - 1) * loo_var.mean(0)).clamp_min(1e-12 * var)
    j = g * j - (g - 1) * loo_j.mean()
    ess = float(u.sum() ** 2 / (u * u).sum())
    return OptimumFit(mean, var, loo_mean, loo_var, float(j), loo_j, ess, raw_mean, raw_var)


def reward_covariance(z: Tensor, rewards: Tensor, groups: Tensor, num_groups: int) -> tuple[Tensor, Tensor]:
    """Cov_ref(z, r) per element [D] (unweighted reference draws) and its leave-group-out values [G, D]."""
    r = rewards.double()
    onehot = torch.zeros(num_groups, z.shape[0], dtype=torch.float64)
    onehot[groups, torch.arange(z.shape[0])] = 1.0
    n_g, r_g, z_g, zr_g = onehot.sum(1), onehot @ r, onehot @ z, onehot @ (z * r[:, None])

    def cov(n: Tensor, sr: Tensor, sz: Tensor, szr: Tensor) -> Tensor:
        return szr / n[..., None] - (sz / n[..., None]) * (sr / n)[..., None]

    full = cov(n_g.sum(), r_g.sum(), z_g.sum(0), zr_g.sum(0))
    loo = cov(n_g.sum() - n_g, r_g.sum() - r_g, z_g.sum(0) - z_g, zr_g.sum(0) - zr_g)
    return full, loo


def fitted_inverse_beta(cov: Tensor, shift: Tensor) -> Tensor:
    """Least-squares 1/beta of shift = cov / beta over the last dim (standardised units) -> [...]."""
    return (cov * shift).sum(-1) / (cov * cov).sum(-1).clamp_min(1e-300)


# ----- one run --------------------------------------------------------------------------------------------
@dataclass
class _State:
    """One state: x_t [1, ...] on a reference trajectory, its reference kernel and condition."""

    index: int
    prompt_index: int
    trajectory: int
    t: int
    prev_t: int
    x_t: Tensor
    ref_output: Tensor
    ref_kernel: GaussianKernel
    cond_one: Any


@dataclass
class _Run:
    """What the whole run shares: the bundle, its guided models on this run's schedule, the plans."""

    bundle: TaskBundle
    cfg: DiagnoseConfig
    objectives: list[str]
    betas: dict[str, float]
    weights: list[dict[str, float]]
    scheduler: Any
    guided: dict[int, Denoiser] = field(default_factory=dict)

    def guide(self, model: Denoiser) -> Denoiser:
        """The model under the bundle's classifier-free guidance (as the sampler applies it), cached."""
        key = id(model)
        if key not in self.guided:
            b = self.bundle
            m = as_denoiser(model)
            if hasattr(model, "bind_schedule"):
                model.bind_schedule(self.scheduler)  # the oracle's models encode the step grid's kernels
            self.guided[key] = (
                m if b.guidance_scale is None else ClassifierFreeGuidance(m, b.guidance_scale, b.null_cond)
            )
        return self.guided[key]

    def cond(self, state: _State, n: int) -> Any:
        return self.bundle.make_cond(self.bundle.prompts[state.prompt_index], n)

    def evaluate(self, model: Denoiser, x: Tensor, t: int, cond: Any) -> Tensor:
        steps = torch.full((x.shape[0],), t, dtype=torch.long)
        return self.guide(model)(x.to(self.bundle.dtype), steps, cond)

    def step_rewards(self, state: _State, x_prev: Tensor) -> Tensor:
        """Step rewards [n, K] (float64) of draws x_prev [n, ...] at `state`, for every objective (MSDDA.md §3).

        The reference's Tweedie estimate at prev_t, one guided call per chunk shared by all objectives; at the
        final step (prev_t = -1) the reward of x_prev itself; the bundle's exact step_reward when it has one.
        """
        b, prev = self.bundle, state.prev_t
        cols = []
        for start in range(0, x_prev.shape[0], self.cfg.chunk_size):
            chunk = x_prev[start : start + self.cfg.chunk_size].to(b.dtype)
            cond = self.cond(state, chunk.shape[0])
            if b.step_reward is not None:
                values = [b.step_reward(o, chunk, prev, cond) for o in self.objectives]
            else:
                if prev < 0:
                    x0 = chunk
                else:
                    out = self.evaluate(b.base, chunk, prev, cond)
                    x0 = self.scheduler.predict_x0(out, prev, chunk)
                    sc = self.scheduler.config
                    if sc.clip_sample:  # the clean estimate the kernels (and the DPO trainer) use
                        x0 = x0.clamp(-sc.clip_sample_range, sc.clip_sample_range)
                values = [b.rewards[o](x0, cond) for o in self.objectives]
            cols.append(torch.stack([torch.as_tensor(v).reshape(-1).double() for v in values], dim=1))
        rewards = torch.cat(cols)
        if not torch.isfinite(rewards).all():
            raise DiagnoseError(f"a step reward is not finite at t={state.t}; check the rewards {self.objectives}")
        return rewards


def _states(run: _Run, progress: bool) -> list[_State]:
    """States on the reference's guided trajectories, captured by a step callback (x_t and its kernel)."""
    b, cfg, ks = run.bundle, run.cfg, run.scheduler
    grid = [int(t) for t in ks.timesteps]
    wanted: list[int] = []
    for t in cfg.timesteps:
        nearest = min(grid, key=lambda g, t=t: (abs(g - int(t)), -g))
        if nearest != int(t):
            logger.info("timestep %d is not on the %d-step grid; using %d", t, cfg.num_inference_steps, nearest)
        if nearest not in wanted:
            wanted.append(nearest)
    indices = cfg.prompt_indices
    if indices is None:
        indices = DEFAULT_PROMPTS.get(b.name, tuple(range(min(3, len(b.prompts)))))
    for i in indices:
        if not 0 <= int(i) < len(b.prompts):
            raise DiagnoseError(f"prompt index {i} out of range for {len(b.prompts)} prompts of task {b.name!r}")
    states: list[_State] = []
    gen = torch.Generator().manual_seed(cfg.seed)
    n = cfg.trajectories
    owners = [int(p) for p in indices for _ in range(n)]  # the prompt of each trajectory
    together = _concat_conds([b.make_cond(b.prompts[p], n) for p in indices])
    # one sampler call for every condition when they concatenate (tensors), else one call per condition
    batches = (
        [(owners, together)]
        if together is not _NO_CONCAT
        else [([int(p)] * n, b.make_cond(b.prompts[p], n)) for p in indices]
    )
    for prompt_of, cond in batches:
        captured: list[tuple[int, int, Tensor, Tensor, GaussianKernel]] = []

        def keep(ctx: StepContext, x: Tensor, captured: list = captured) -> None:
            if ctx.timestep in wanted:
                captured.append((ctx.timestep, ctx.prev_timestep, ctx.x_t, ctx.outputs[0], ctx.kernels[0]))
            return None

        sample(
            [b.base],
            ks,
            SingleModel(),
            shape=(len(prompt_of), *b.sample_shape),
            cond=cond,
            num_inference_steps=cfg.num_inference_steps,
            guidance_scale=b.guidance_scale,
            null_cond=b.null_cond,
            generator=gen,
            dtype=b.dtype,
            progress=progress,
            callback=keep,
        )
        for t, prev, x, out, k in captured:
            for j, p in enumerate(prompt_of):
                kern = _as64(GaussianKernel(k.mean[j : j + 1], torch.broadcast_to(k.var, k.mean.shape)[j : j + 1]))
                cond_one = b.make_cond(b.prompts[p], 1)
                states.append(_State(0, p, j % n, t, prev, x[j : j + 1], out[j : j + 1], kern, cond_one))
    states.sort(key=lambda s: (-s.t, s.prompt_index, s.trajectory))
    for i, s in enumerate(states):
        s.index = i
    return states


_NO_CONCAT = object()


def _concat_conds(conds: Sequence[Any]) -> Any:
    """The conditions of several batches as one batch: tensors concatenate, all-None stays None; anything
    else (a task's own condition objects) returns _NO_CONCAT and is evaluated batch by batch."""
    if all(c is None for c in conds):
        return None
    if all(isinstance(c, Tensor) for c in conds):
        return torch.cat(list(conds))
    return _NO_CONCAT


def _precompute_outputs(run: _Run, states: list[_State], models: Sequence[Denoiser]) -> list[dict[int, Tensor]]:
    """Guided outputs of every model at every state, one call per (model, timestep) when conditions
    concatenate; [state.index] -> {id(model): output [1, ...]}."""
    outputs: list[dict[int, Tensor]] = [{id(run.bundle.base): s.ref_output} for s in states]
    by_t: dict[int, list[_State]] = {}
    for s in states:
        by_t.setdefault(s.t, []).append(s)
    for t, group in by_t.items():
        x = torch.cat([s.x_t for s in group]).to(run.bundle.dtype)
        cond = _concat_conds([s.cond_one for s in group])
        for m in models:
            if id(m) in outputs[group[0].index]:
                continue
            if cond is _NO_CONCAT:
                for s in group:
                    outputs[s.index][id(m)] = run.evaluate(m, s.x_t, t, s.cond_one)
                continue
            out = run.evaluate(m, x, t, cond)
            for j, s in enumerate(group):
                outputs[s.index][id(m)] = out[j : j + 1]
    return outputs


def _as64(kernel: GaussianKernel) -> GaussianKernel:
    """A plain float64 kernel with a full-shape variance."""
    mean = kernel.mean.double()
    return GaussianKernel(mean, torch.broadcast_to(kernel.var.double(), mean.shape).clone())


def _antithetic(n: int, shape: Sequence[int], gen: torch.Generator) -> Tensor:
    """n standard-normal draws [n, D] in antithetic pairs: row i + n/2 is -row i."""
    half = torch.randn((n // 2, *shape), generator=gen, dtype=torch.float64)
    return torch.cat([half, -half])


def _kernel_of_plan(run: _Run, plan: MethodPlan, state: _State, outputs: dict[int, Tensor]) -> Any:
    """The kernel the plan's rule returns at `state` (for DB-MPA-LS: its components and probabilities)."""
    ks = run.scheduler
    x = state.x_t.to(run.bundle.dtype)
    outs = []
    for m in plan.models:
        if id(m) not in outputs:
            outputs[id(m)] = run.evaluate(m, x, state.t, state.cond_one)
        outs.append(outputs[id(m)])
    kernels = [ks.kernel(o, state.t, x, prev_timestep=state.prev_t) for o in outs]
    rule = plan.rule
    if isinstance(rule, DBMPALS):  # a mixture, never a Gaussian: keep the components
        probs = [*rule.weights, *([rule.reference_weight] if rule.uses_reference else [])]
        comps = [_as64(k) for k in kernels] + ([state.ref_kernel] if rule.uses_reference else [])
        return [(p, k) for p, k in zip(probs, comps, strict=True) if p > 0]
    ctx = StepContext(
        x_t=x,
        timestep=state.t,
        prev_timestep=state.prev_t,
        index=0,
        is_last=state.prev_t < 0,
        outputs=outs,
        kernels=kernels,
        scheduler=ks,
        generator=torch.Generator().manual_seed(0),
        cond=state.cond_one,
    )
    if rule.uses_reference:
        ref = plan.reference if plan.reference is not None else run.bundle.base
        if id(ref) not in outputs:
            outputs[id(ref)] = run.evaluate(ref, x, state.t, state.cond_one)
        ctx.reference_output = outputs[id(ref)]
        ctx.reference_kernel = ks.kernel(ctx.reference_output, state.t, x, prev_timestep=state.prev_t)
    return _as64(rule(ctx))


class _KernelDraws:
    """Monte Carlo step rewards of draws from Gaussian kernels at one state, shared across rules and weights
    (a kernel equal to one already drawn reuses its draws)."""

    def __init__(self, run: _Run, state: _State, gen: torch.Generator) -> None:
        self.run, self.state, self.gen = run, state, gen
        self.done: list[tuple[GaussianKernel, Tensor, Tensor]] = []  # (kernel, draws [M, ...], rewards [M, K])

    def get(self, kernel: GaussianKernel) -> tuple[Tensor, Tensor]:
        for k, x, r in self.done:
            if torch.allclose(k.mean, kernel.mean, rtol=1e-7, atol=0) and torch.allclose(
                k.var, kernel.var, rtol=1e-7, atol=0
            ):
                return x, r
        shape = kernel.mean.shape[1:]
        z = _antithetic(self.run.cfg.kernel_draws, shape, self.gen)
        x = kernel.mean + kernel.var.sqrt() * z  # [M, ...]
        r = self.run.step_rewards(self.state, x)
        self.done.append((kernel, x, r))
        return x, r


def _rule_value(draws: _KernelDraws, kernel: Any, ref: GaussianKernel, w: Tensor, beta: float) -> dict[str, float]:
    """J(q) = E_q[r_w] - beta KL(q || p_ref) with its Monte Carlo standard error, for a Gaussian kernel (KL in
    closed form) or a DB-MPA-LS mixture [(p, kernel)] (J of the mixture; its KL by Monte Carlo)."""
    if isinstance(kernel, GaussianKernel):
        _, r = draws.get(kernel)
        e, e_se = _pair_stats(r @ w)
        kl = float(kernel.kl(ref))
        return {
            "expected_reward": e,
            "expected_reward_se": e_se,
            "kl_to_reference": kl,
            "j": e - beta * kl,
            "j_se": e_se,
        }
    total = {"expected_reward": 0.0, "kl_to_reference": 0.0, "j": 0.0}
    var = {"expected_reward": 0.0, "kl_to_reference": 0.0, "j": 0.0}
    probs = torch.tensor([p for p, _ in kernel], dtype=torch.float64)
    for p, comp in kernel:
        x, r = draws.get(comp)
        flat = x.flatten(1)
        log_mix = torch.logsumexp(
            torch.stack([GaussianKernel(k.mean.flatten(1), k.var.flatten(1)).log_prob(flat) for _, k in kernel])
            + probs.log()[:, None],
            dim=0,
        )
        log_ref = GaussianKernel(ref.mean.flatten(1), ref.var.flatten(1)).log_prob(flat)
        parts = {"expected_reward": r @ w, "kl_to_reference": log_mix - log_ref}
        parts["j"] = parts["expected_reward"] - beta * parts["kl_to_reference"]
        for key, values in parts.items():
            m, se = _pair_stats(values)
            total[key] += p * m
            var[key] += (p * se) ** 2
    return {
        "expected_reward": total["expected_reward"],
        "expected_reward_se": math.sqrt(var["expected_reward"]),
        "kl_to_reference": total["kl_to_reference"],
        "kl_to_reference_se": math.sqrt(var["kl_to_reference"]),
        "j": total["j"],
        "j_se": math.sqrt(var["j"]),
    }


def _resolve(bundle: TaskBundle, cfg: DiagnoseConfig, models: Mapping[str, Denoiser] | None) -> tuple[Any, ...]:
    objectives = list(cfg.objectives) if cfg.objectives is not None else list(bundle.objectives)
    unknown = [o for o in objectives if o not in bundle.objectives]
    if unknown or not objectives:
        raise DiagnoseError(f"objectives {unknown or objectives}; choose from {list(bundle.objectives)}")
    extra = sorted(set(models or {}) - set(bundle.objectives))
    if extra:
        raise DiagnoseError(f"models name unknown objective(s) {extra}; valid: {list(bundle.objectives)}")
    skipped: dict[str, str] = {}
    if models:
        soup = None if set(models) & set(objectives) else bundle.soup
        if bundle.soup is not None and soup is None:
            skipped[REWARDED_SOUP] = "the aligned models were replaced, so the task's soup would mix the old ones"
        bundle = replace(bundle, aligned={**bundle.aligned, **models}, soup=soup)
    betas = {o: float((cfg.betas or {}).get(o, bundle.beta_of(o))) for o in objectives}
    weights = [dict(w) for w in cfg.weights] if cfg.weights is not None else simplex_grid(objectives, cfg.weight_points)
    for w in weights:
        bad = [k for k in w if k not in objectives]
        if bad or not w:
            raise DiagnoseError(f"weights {w} name {bad or 'no'} objective(s); use keys from {objectives}")
        if any(not math.isfinite(float(v)) or float(v) < 0 for v in w.values()) or math.fsum(w.values()) <= 0:
            raise DiagnoseError(f"weights {w}; use finite weights >= 0 with a positive sum")
    return bundle, objectives, betas, weights, skipped


def run_diagnose(
    bundle: TaskBundle,
    *,
    objectives: Sequence[str] | None = None,
    models: Mapping[str, Denoiser] | None = None,
    policies: Mapping[str, Denoiser] | None = None,
    weights: Sequence[Mapping[str, float]] | None = None,
    methods: Sequence[str] = DEFAULT_METHODS,
    prompt_indices: Sequence[int] | None = None,
    trajectories: int = 1,
    timesteps: Sequence[int] = DEFAULT_TIMESTEPS,
    draws: int = 4096,
    kernel_draws: int = 256,
    seed: int = 0,
    train_policies: bool | None = None,
    out_dir: str | Path | None = None,
    progress: bool = True,
    config: DiagnoseConfig | None = None,
) -> dict[str, Any]:
    """Measure how far the task's models and fusion rules are from the step optimum (module docstring).

    bundle: the task (`msdda.evaluation.tasks.get_task_bundle`). models: {objective: denoiser} replacing the
    task's aligned models (e.g. a newly trained policy; diagnosed with the objective's beta). policies:
    {name: denoiser} extra single models scored like a fusion rule at every weight (e.g. a model trained by
    multi-objective step-RL). When the task has step-RL policies (`bundle.weighted_policy`) and "step-rl" is
    among the methods (the default methods include it then), the policy trained AT each weight is scored as rule
    "step-rl", exactly like `policies`; a missing one is trained or, per `train_policies`, reported in
    `skipped`. The other keywords are the `DiagnoseConfig` fields (see there); `config` replaces all of them.
    out_dir: writes diagnose.json, diagnose_config.json and diagnose.png there.
    Returns the summary (the content of diagnose.json).
    """
    if config is None:
        config = DiagnoseConfig(
            objectives=tuple(objectives) if objectives is not None else None,
            weights=tuple(dict(w) for w in weights) if weights is not None else None,
            methods=tuple(methods),
            prompt_indices=tuple(int(i) for i in prompt_indices) if prompt_indices is not None else None,
            trajectories=trajectories,
            timesteps=tuple(int(t) for t in timesteps),
            draws=draws,
            kernel_draws=kernel_draws,
            seed=seed,
            train_policies=train_policies,
        )
    cfg = config
    cfg.validate()
    if out_dir is not None:
        out_dir = check_output_dir(out_dir)
    start = time.perf_counter()
    bundle, objs, betas, wgrid, skipped = _resolve(bundle, cfg, models)
    # outside torch.no_grad(): a missing step-RL policy may be trained here
    step_rl_plans = _step_rl_plans(bundle, cfg, betas, wgrid, skipped)
    ks = copy.deepcopy(bundle.scheduler)
    ks.set_timesteps(cfg.num_inference_steps)
    run = _Run(bundle, cfg, objs, betas, wgrid, ks)
    for m in [bundle.base, *bundle.aligned.values(), *(policies or {}).values()]:
        run.guide(m)  # binds schedule-aware models to this run's grid before any use

    with torch.no_grad():
        states = _states(run, progress)
        for m in [bundle.base, *bundle.aligned.values(), *(policies or {}).values()]:
            if hasattr(m, "bind_schedule"):
                m.bind_schedule(ks)  # the trajectory sampler bound its own copy; use this run's grid again
        plans: dict[str, list[MethodPlan | None]] = {}
        for method in cfg.methods:
            if method == STEP_RL:
                if step_rl_plans is not None:
                    plans[method] = list(step_rl_plans)
                continue
            if method == REWARDED_SOUP and bundle.soup is None:
                skipped.setdefault(method, "the task has no soup (models without parameters to interpolate)")
                continue
            plans[method] = [
                plan_method(method, bundle, w, betas=betas, skip_zero_weights=True) if method != BASE else None
                for w in wgrid
            ]
        if step_rl_plans is not None and STEP_RL not in plans:  # added to the default methods
            plans[STEP_RL] = list(step_rl_plans)
        for name, m in (policies or {}).items():
            plans[f"policy:{name}"] = [MethodPlan(f"policy:{name}", [m], SingleModel(), None) for _ in wgrid]
        summary = _diagnose_states(run, states, plans, progress)

    skipped.update(summary.pop("rule_errors"))
    summary.update(
        {
            "task": bundle.name,
            "config": cfg.to_dict(),
            "objectives": objs,
            "betas": betas,
            "skipped": skipped,
            "seconds": time.perf_counter() - start,
        }
    )
    summary = _clean(summary)
    if out_dir is not None:
        write_json_atomic(Path(out_dir) / CONFIG_FILE, cfg.to_dict())
        write_json_atomic(Path(out_dir) / JSON_FILE, summary)
        write_bytes_atomic(Path(out_dir) / PLOT_FILE, plot_diagnose(summary))
    return summary


def _step_rl_plans(
    bundle: TaskBundle,
    cfg: DiagnoseConfig,
    betas: Mapping[str, float],
    wgrid: Sequence[Mapping[str, float]],
    skipped: dict[str, str],
) -> list[MethodPlan | None] | None:
    """The plan of the step-RL policy trained at each weight (rule "step-rl"), or None (reason in `skipped`).

    step-rl runs when named in cfg.methods, or when the methods are the defaults and the task has step-RL
    policies; cfg.train_policies None trains only in the first case."""
    named = STEP_RL in cfg.methods
    has = getattr(bundle, "weighted_policy", None) is not None
    if not named and not (has and tuple(cfg.methods) == DEFAULT_METHODS):
        return None
    if not has:
        skipped[STEP_RL] = f"task {bundle.name!r} has no step-RL policies (no weighted_policy)"
        return None
    train = cfg.train_policies if cfg.train_policies is not None else named
    plans: list[MethodPlan | None] = []
    for w in wgrid:
        try:
            plans.append(plan_method(STEP_RL, bundle, w, betas=betas, options={"train": train}, skip_zero_weights=True))
        except MissingPolicyError as exc:
            skipped[STEP_RL] = f"{exc} (policies missing and train_policies={train})"
            return None
        except MSDDAError as exc:  # e.g. aligned models without a trainer config to copy
            if named and not isinstance(exc, PlanError):
                raise  # asked for by name: the reason it cannot run is the error
            skipped[STEP_RL] = str(exc)
            return None
    return plans


def _t_ranges(edges: Sequence[int], timesteps: Sequence[int]) -> dict[str, tuple[int, int]]:
    """Named t-ranges [lo, hi) that hold at least one of the states' timesteps."""
    bounds = [0, *edges, 10**9]
    out = {}
    for lo, hi in itertools.pairwise(bounds):
        if any(lo <= t < hi for t in timesteps):
            out[f"{lo}-{hi - 1}" if hi < 10**9 else f">={lo}"] = (lo, hi)
    return out


def _diagnose_states(
    run: _Run, states: list[_State], plans: Mapping[str, list[MethodPlan | None]], progress: bool
) -> dict[str, Any]:
    cfg, objs, betas = run.cfg, run.objectives, run.betas
    g_count = cfg.jackknife_groups
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    groups = torch.arange(cfg.draws // 2) % g_count
    groups = torch.cat([groups, groups])  # a pair stays in one group
    numel = math.prod(run.bundle.sample_shape)
    per_element = cfg.per_element if cfg.per_element is not None else numel <= PER_ELEMENT_LIMIT
    w_vecs = [torch.tensor([w.get(o, 0.0) for o in objs], dtype=torch.float64) for w in run.weights]
    w_betas = [default_beta(w, betas) for w in run.weights]
    onehot = torch.zeros(g_count, cfg.draws, dtype=torch.float64)
    onehot[groups, torch.arange(cfg.draws)] = 1.0

    # per objective: per state values and leave-group-out values, for the aggregates
    model_rows: dict[str, list[dict[str, Any]]] = {o: [] for o in objs}
    model_loo: dict[str, dict[str, list[Tensor]]] = {
        o: {"ratio": [], "inv_beta_cov": [], "shift": [], "opt_shift": [], "kl_q": [], "kl_opt": []} for o in objs
    }
    opt_rows: dict[str, list[dict[str, Any]]] = {o: [] for o in objs}
    wopt_rows: dict[str, list[dict[str, Any]]] = {weight_label(w): [] for w in run.weights}
    rule_rows: dict[str, dict[str, list[dict[str, Any]]]] = {
        m: {weight_label(w): [] for w in run.weights} for m in plans
    }
    state_rows = []

    failed: dict[str, str] = {}
    needed: list[Denoiser] = [run.bundle.aligned[o] for o in objs]
    for plan_list in plans.values():
        for plan in plan_list:
            if plan is not None:
                needed += [*plan.models, *([plan.reference] if plan.rule.uses_reference and plan.reference else [])]
    all_outputs = _precompute_outputs(run, states, list({id(m): m for m in needed}.values()))

    bar = tqdm(states, desc="diagnose", disable=None if progress else True, leave=False)
    for state in bar:
        ref = state.ref_kernel
        mu, var = ref.mean.flatten(1)[0], torch.broadcast_to(ref.var, ref.mean.shape).flatten(1)[0]
        sd = var.sqrt()
        z = _antithetic(cfg.draws, (mu.shape[0],), gen)  # [N, D]
        x = (mu + sd * z).reshape(cfg.draws, *ref.mean.shape[1:])
        rewards = run.step_rewards(state, x)  # [N, K]
        outputs = all_outputs[state.index]
        row: dict[str, Any] = {
            "index": state.index,
            "prompt_index": state.prompt_index,
            "prompt": run.bundle.prompt_label(run.bundle.prompts[state.prompt_index]),
            "trajectory": state.trajectory,
            "t": state.t,
            "prev_t": state.prev_t,
        }
        if per_element:
            row["x_t"] = state.x_t.double().flatten().tolist()
            row["reference_mean"] = mu.tolist()
            row["reference_var"] = var.tolist()
        state_rows.append(row)
        x_t = state.x_t.to(run.bundle.dtype)

        for k, o in enumerate(objs):
            fit = fit_optimum(z, rewards[:, k], betas[o], groups, g_count)
            cov, cov_loo = reward_covariance(z, rewards[:, k], groups, g_count)
            kl_opt_ref, loo_kl_opt_ref = fit.kl_to(torch.zeros_like(mu), torch.ones_like(mu))
            opt_row = {
                "t": state.t,
                "state": state.index,
                "ess": fit.ess,
                "j_star": fit.j_star,
                "j_star_se": fit.j_se,
                "kl_to_reference": float(kl_opt_ref),
                "kl_to_reference_se": float(jackknife_se(loo_kl_opt_ref)),
                "shift_sd": float(fit.mean.norm()),  # ||mu* - mu_ref|| in reference sd
                "log_var_change": float(fit.var.log().mean()),
                "fitted_beta": _finite(1.0 / fitted_inverse_beta(cov, fit.mean)),
            }
            if per_element:
                opt_row.update(
                    {
                        "mean": (mu + sd * fit.mean).tolist(),
                        "mean_se": (sd * fit.mean_se).tolist(),
                        "var": (var * fit.var).tolist(),
                        "var_se": (var * fit.var_se).tolist(),
                    }
                )
            opt_rows[o].append(opt_row)

            model = run.bundle.aligned[o]
            if id(model) not in outputs:
                outputs[id(model)] = run.evaluate(model, x_t, state.t, state.cond_one)
            qk = run.scheduler.kernel(outputs[id(model)], state.t, x_t, prev_timestep=state.prev_t)
            qm = (qk.mean.double().flatten() - mu) / sd
            qv = torch.broadcast_to(qk.var, qk.mean.shape).double().flatten() / var
            kl_q, loo_kl_q = fit.kl_to(qm, qv)
            ratio, loo_ratio = kl_q / kl_opt_ref, loo_kl_q / loo_kl_opt_ref
            if not float(kl_opt_ref) > RATIO_MIN_Z * float(jackknife_se(loo_kl_opt_ref)):
                # the optimum is not told apart from the reference here (a saturated reward): no ratio
                ratio, loo_ratio = torch.tensor(math.nan), torch.full_like(loo_ratio, math.nan)
            inv_b = fitted_inverse_beta(cov, qm)
            model_rows[o].append(
                {
                    "t": state.t,
                    "state": state.index,
                    "kl_to_optimum_over_reference": _finite(ratio),
                    "kl_to_optimum_over_reference_se": _finite(jackknife_se(loo_ratio)),
                    "kl_to_optimum": float(kl_q),
                    "kl_to_optimum_se": float(jackknife_se(loo_kl_q)),
                    "kl_model_to_reference": float(gaussian_kl(qm, qv, torch.zeros_like(qm), torch.ones_like(qv))),
                    "kl_optimum_to_reference": float(kl_opt_ref),
                    "shift_sd": float(qm.norm()),
                    "optimum_shift_sd": opt_row["shift_sd"],
                    "fitted_beta": _finite(1.0 / inv_b),
                    "fitted_beta_se": _finite(float(jackknife_se(1.0 / fitted_inverse_beta(cov_loo, qm)))),
                    "log_var_ratio": float((qv / fit.var).log().mean()),
                    "log_var_ratio_se": float(jackknife_se((qv / fit.loo_var).log().mean(-1))),
                    "ess": fit.ess,
                }
            )
            model_loo[o]["ratio"].append(loo_ratio)
            model_loo[o]["kl_q"].append(loo_kl_q)
            model_loo[o]["kl_opt"].append(loo_kl_opt_ref)
            model_loo[o]["inv_beta_cov"].append(torch.cat([cov[None], cov_loo]))  # [1 + G, D]
            model_loo[o]["shift"].append(qm)
            model_loo[o]["opt_shift"].append(torch.cat([fit.mean[None], fit.loo_mean]))  # [1 + G, D]

        draws = _KernelDraws(run, state, gen)
        for wi, (w, wv, wb) in enumerate(zip(run.weights, w_vecs, w_betas, strict=True)):
            label = weight_label(w)
            rw = rewards @ wv
            fit = fit_optimum(z, rw, wb, groups, g_count)
            wopt = {
                "t": state.t,
                "state": state.index,
                "ess": fit.ess,
                "j_star": fit.j_star,
                "j_star_se": fit.j_se,
                "kl_to_reference": float(fit.kl_to(torch.zeros_like(mu), torch.ones_like(mu))[0]),
            }
            if per_element:
                wopt.update(
                    {
                        "mean": (mu + sd * fit.mean).tolist(),
                        "mean_se": (sd * fit.mean_se).tolist(),
                        "var": (var * fit.var).tolist(),
                        "var_se": (var * fit.var_se).tolist(),
                    }
                )
            wopt_rows[label].append(wopt)
            # the reference's J = E_ref[r_w] from the same draws: jackknife the gap jointly
            n_g, r_g = onehot.sum(1), onehot @ rw
            e_ref, loo_e_ref = float(rw.mean()), (r_g.sum() - r_g) / (n_g.sum() - n_g)
            for method, plan_list in plans.items():
                plan = plan_list[wi]
                if method in failed:
                    continue
                if plan is None:  # base: the reference kernel itself
                    val = {
                        "expected_reward": e_ref,
                        "expected_reward_se": float(jackknife_se(loo_e_ref)),
                        "kl_to_reference": 0.0,
                        "j": e_ref,
                        "j_se": float(jackknife_se(loo_e_ref)),
                    }
                    gap, gap_se = fit.j_star - e_ref, float(jackknife_se(fit.loo_j - loo_e_ref))
                else:
                    try:
                        kernel = _kernel_of_plan(run, plan, state, outputs)
                    except (MSDDAError, RuntimeError) as exc:
                        # e.g. DB-MPA cannot average the outputs of models with different output layouts (a
                        # kernel-offset policy beside a plain model): report the rule as skipped, keep the rest
                        failed[method] = f"{type(exc).__name__}: {exc}"
                        continue
                    val = _rule_value(draws, kernel, ref, wv, wb)
                    gap, gap_se = fit.j_star - val["j"], math.hypot(fit.j_se, val["j_se"])
                rule_rows[method][label].append(
                    {
                        "t": state.t,
                        "state": state.index,
                        "j_star": fit.j_star,
                        "j_star_se": fit.j_se,
                        **val,
                        "j_star_minus_j": gap,
                        "j_star_minus_j_se": gap_se,
                        "j_star_minus_j_reference": fit.j_star - e_ref,
                    }
                )

    for method in failed:
        del rule_rows[method]
    timesteps = sorted({s.t for s in states}, reverse=True)
    ranges = _t_ranges(cfg.t_range_edges, timesteps)
    out = _aggregate(
        run, states, timesteps, ranges, model_rows, model_loo, opt_rows, wopt_rows, rule_rows, state_rows, w_betas
    )
    out["rule_errors"] = failed
    return out


def _aggregate(
    run: _Run,
    states: list[_State],
    timesteps: list[int],
    ranges: Mapping[str, tuple[int, int]],
    model_rows: dict[str, list[dict[str, Any]]],
    model_loo: dict[str, dict[str, list[Tensor]]],
    opt_rows: dict[str, list[dict[str, Any]]],
    wopt_rows: dict[str, list[dict[str, Any]]],
    rule_rows: dict[str, dict[str, list[dict[str, Any]]]],
    state_rows: list[dict[str, Any]],
    w_betas: list[float],
) -> dict[str, Any]:
    """Medians, fitted betas and mean gaps per t and per t-range from the per-state rows."""
    selectors: dict[str, Callable[[int], bool]] = {"all": lambda t: True}
    per_t = {str(t): (lambda s, t=t: s == t) for t in timesteps}
    per_range = {name: (lambda s, lo=lo, hi=hi: lo <= s < hi) for name, (lo, hi) in ranges.items()}
    t_of = [s.t for s in sorted(states, key=lambda s: s.index)]

    models: dict[str, Any] = {}
    for o, rows in model_rows.items():
        ratio_full = torch.tensor(
            [math.nan if (v := r["kl_to_optimum_over_reference"]) is None else v for r in rows],
            dtype=torch.float64,
        )
        ratio_loo = torch.stack(model_loo[o]["ratio"], dim=1) if rows else torch.zeros(0, 0)  # [G, S]
        covs = model_loo[o]["inv_beta_cov"]  # S x [1 + G, D]
        shifts = model_loo[o]["shift"]  # S x [D]

        def ratio_block(select: Callable[[int], bool], rows=rows, ratio_full=ratio_full, ratio_loo=ratio_loo):
            ix = [i for i, r in enumerate(rows) if select(r["t"]) and r["kl_to_optimum_over_reference"] is not None]
            return _median_jk(ratio_full[ix], ratio_loo[:, ix])

        opt_shifts = model_loo[o]["opt_shift"]  # S x [1 + G, D]
        kl_q_loo = torch.stack(model_loo[o]["kl_q"], dim=1) if rows else torch.zeros(0, 0)  # [G, S]
        kl_opt_loo = torch.stack(model_loo[o]["kl_opt"], dim=1) if rows else torch.zeros(0, 0)

        def pooled_block(select: Callable[[int], bool], rows=rows, kl_q_loo=kl_q_loo, kl_opt_loo=kl_opt_loo):
            # sum over states of KL(opt || q) / sum of KL(opt || ref): every state counts, weighted by how far
            # its optimum moves, so near-zero optima cannot swing it as they swing a median of ratios
            ix = [i for i, r in enumerate(rows) if select(r["t"])]
            if not ix:
                return {"value": None, "se": None, "states": 0}
            num = math.fsum(rows[i]["kl_to_optimum"] for i in ix)
            den = math.fsum(rows[i]["kl_optimum_to_reference"] for i in ix)
            loo = kl_q_loo[:, ix].sum(1) / kl_opt_loo[:, ix].sum(1)
            return {
                "value": _finite(num / den) if den > 0 else None,
                "se": _finite(jackknife_se(loo)),
                "states": len(ix),
            }

        def beta_block(select: Callable[[int], bool], rows=rows, covs=covs, shifts=shifts, opt_shifts=opt_shifts):
            ix = [i for i, r in enumerate(rows) if select(r["t"])]
            if not ix:
                return {
                    "value": None,
                    "se": None,
                    "optimum": None,
                    "optimum_se": None,
                    "difference_se": None,
                    "states": 0,
                }
            c = torch.cat([covs[i] for i in ix], dim=-1)  # [1 + G, sum D]
            d = torch.cat([shifts[i] for i in ix])
            inv = fitted_inverse_beta(c, d)
            # the same fit for the optimum's own shift: beyond the linear regime it is not beta either
            inv_opt = fitted_inverse_beta(c, torch.cat([opt_shifts[i] for i in ix], dim=-1))
            return {
                "value": _finite(1.0 / inv[0]),
                "se": _finite(jackknife_se(1.0 / inv[1:])),
                "optimum": _finite(1.0 / inv_opt[0]),
                "optimum_se": _finite(jackknife_se(1.0 / inv_opt[1:])),
                # both come from the same draws: the error of their difference, jackknifed jointly
                "difference_se": _finite(jackknife_se(1.0 / inv[1:] - 1.0 / inv_opt[1:])),
                "states": len(ix),
            }

        def mean_block(key: str, select: Callable[[int], bool], rows=rows):
            sel = [r for r in rows if select(r["t"])]
            return _mean_se([r[key] for r in sel], [r[f"{key}_se"] for r in sel])

        models[o] = {
            "beta": run.betas[o],
            "kl_to_optimum_over_reference": {
                **ratio_block(selectors["all"]),
                "per_t": {k: ratio_block(f) for k, f in per_t.items()},
                "per_range": {k: ratio_block(f) for k, f in per_range.items()},
            },
            "pooled_kl_ratio": {
                **pooled_block(selectors["all"]),
                "per_t": {k: pooled_block(f) for k, f in per_t.items()},
                "per_range": {k: pooled_block(f) for k, f in per_range.items()},
            },
            "fitted_beta": {
                **beta_block(selectors["all"]),
                "per_t": {k: beta_block(f) for k, f in per_t.items()},
                "per_range": {k: beta_block(f) for k, f in per_range.items()},
            },
            "log_var_ratio": {
                **mean_block("log_var_ratio", selectors["all"]),
                "per_t": {k: mean_block("log_var_ratio", f) for k, f in per_t.items()},
                "per_range": {k: mean_block("log_var_ratio", f) for k, f in per_range.items()},
            },
            "per_state": rows,
        }

    def opt_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
        def block(select: Callable[[int], bool]) -> dict[str, Any]:
            sel = [r for r in rows if select(r["t"])]
            if not sel:
                return {}
            out = {
                "ess_min": min(r["ess"] for r in sel),
                "ess_median": sorted(r["ess"] for r in sel)[len(sel) // 2],
                "kl_to_reference_median": sorted(r["kl_to_reference"] for r in sel)[len(sel) // 2],
            }
            if "shift_sd" in sel[0]:
                out["shift_sd_median"] = sorted(r["shift_sd"] for r in sel)[len(sel) // 2]
                out["log_var_change_mean"] = math.fsum(r["log_var_change"] for r in sel) / len(sel)
            return out

        return {
            **block(selectors["all"]),
            "per_t": {k: block(f) for k, f in per_t.items()},
            "per_range": {k: block(f) for k, f in per_range.items()},
            "per_state": rows,
        }

    rules: dict[str, Any] = {}
    for method, by_w in rule_rows.items():
        rules[method] = {}
        for (label, rows), w, wb in zip(by_w.items(), run.weights, w_betas, strict=True):

            def gap_block(select: Callable[[int], bool], rows=rows) -> dict[str, Any]:
                sel = [r for r in rows if select(r["t"])]
                out = _mean_se([r["j_star_minus_j"] for r in sel], [r["j_star_minus_j_se"] for r in sel])
                ref_gap = math.fsum(r["j_star_minus_j_reference"] for r in sel)
                gap = math.fsum(r["j_star_minus_j"] for r in sel)
                # the share of the reference's shortfall this rule leaves (0: optimal, 1: no better than base)
                out["over_reference"] = _finite(gap / ref_gap) if sel and ref_gap > 0 else None
                return out

            rules[method][label] = {
                "weights": dict(w),
                "beta": wb,
                "j_star_minus_j": {
                    **gap_block(selectors["all"]),
                    "per_t": {k: gap_block(f) for k, f in per_t.items()},
                    "per_range": {k: gap_block(f) for k, f in per_range.items()},
                },
                "per_state": rows,
            }

    return {
        "timesteps": timesteps,
        "t_ranges": {k: [lo, hi - 1 if hi < 10**9 else None] for k, (lo, hi) in ranges.items()},
        "num_states": len(states),
        "state_timesteps": t_of,
        "states": state_rows,
        "models": models,
        "optimum": {o: opt_summary(rows) for o, rows in opt_rows.items()},
        "weighted_optimum": {label: opt_summary(rows) for label, rows in wopt_rows.items()},
        "rules": rules,
    }


def _clean(obj: Any) -> Any:
    """JSON-safe: non-finite floats become None, tensors numbers, tuples lists."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    if isinstance(obj, Tensor):
        return _clean(obj.tolist())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    return obj


# ----- output -----------------------------------------------------------------------------------------------
def _num(x: Any, fmt: str = ".3g") -> str:
    return "-" if x is None else format(x, fmt)


def format_diagnose(summary: Mapping[str, Any]) -> str:
    """The summary as text tables: per model (KL ratio, fitted beta, log-variance ratio per t), per rule."""
    lines = [
        f"step-optimality diagnostic: task {summary.get('task')}, {summary.get('num_states')} states, "
        f"{summary['config']['draws']} draws per state ({summary.get('seconds', 0):.0f} s)",
        "",
        "per aligned model: KL(opt||model)/KL(opt||ref) (0 = the optimum, 1 = no better than the reference)",
    ]
    ts = [str(t) for t in summary["timesteps"]]
    header = f"  {'model':<14}{'beta':>8}{'median':>16}" + "".join(f"{'t=' + t:>10}" for t in ts)
    lines.append(header)
    for o, m in summary["models"].items():
        r = m["kl_to_optimum_over_reference"]
        med = f"{_num(r['median'])}±{_num(r['se'], '.2g')}"
        lines.append(
            f"  {o:<14}{m['beta']:>8.3g}{med:>16}" + "".join(f"{_num(r['per_t'][t]['median']):>10}" for t in ts)
        )
    lines += ["", "pooled: sum over states of KL(opt||model) / sum of KL(opt||ref), per t"]
    lines.append(f"  {'model':<14}{'beta':>8}{'all':>16}" + "".join(f"{'t=' + t:>10}" for t in ts))
    for o, m in summary["models"].items():
        p = m["pooled_kl_ratio"]
        pooled = f"{_num(p['value'])}±{_num(p['se'], '.2g')}"
        lines.append(
            f"  {o:<14}{m['beta']:>8.3g}{pooled:>16}" + "".join(f"{_num(p['per_t'][t]['value']):>10}" for t in ts)
        )
    lines += ["", "fitted beta (linear regime: model shift = Cov_ref(x, r)/beta), per t"]
    lines.append(f"  {'model':<14}{'beta':>8}{'all':>16}" + "".join(f"{'t=' + t:>10}" for t in ts))
    for o, m in summary["models"].items():
        b = m["fitted_beta"]
        lines.append(
            f"  {o:<14}{m['beta']:>8.3g}{_num(b['value']):>16}"
            + "".join(f"{_num(b['per_t'][t]['value']):>10}" for t in ts)
        )
    for o, m in summary["models"].items():
        b = m["fitted_beta"]
        lines.append(
            f"  {'optimum:' + o:<14.14}{m['beta']:>8.3g}{_num(b['optimum']):>16}"
            + "".join(f"{_num(b['per_t'][t]['optimum']):>10}" for t in ts)
        )
    lines += ["", "mean log(var_model / var_opt), per t"]
    for o, m in summary["models"].items():
        v = m["log_var_ratio"]
        lines.append(
            f"  {o:<14}{'':>8}{_num(v['mean']):>16}" + "".join(f"{_num(v['per_t'][t]['mean']):>10}" for t in ts)
        )
    lines += ["", "per fusion rule and weight: J* - J (mean over states ± se; share of the reference's shortfall)"]
    for method, by_w in summary["rules"].items():
        for label, entry in by_w.items():
            g = entry["j_star_minus_j"]
            lines.append(
                f"  {method:<14}{label:<36}{_num(g['mean'], '.4g'):>12} ± {_num(g['se'], '.2g'):<8}"
                f" share {_num(g['over_reference'], '.3g')}"
            )
    lines += ["", "importance sampling: ESS of the reference draws per state (reliable when >= ~5% of the draws)"]
    for o, opt in summary["optimum"].items():
        lines.append(
            f"  {o:<14}{'':>8}{'min ' + _num(opt.get('ess_min'), '.0f'):>16}"
            + "".join(f"{_num(opt['per_t'][t].get('ess_min'), '.0f'):>10}" for t in ts)
        )
    if summary.get("skipped"):
        lines += ["", *(f"  skipped {k}: {v}" for k, v in summary["skipped"].items())]
    return "\n".join(lines)


def _median(values: Sequence[float | None]) -> float | None:
    vals = sorted(v for v in values if v is not None)
    return vals[len(vals) // 2] if vals else None


def plot_diagnose(summary: Mapping[str, Any]) -> bytes:
    """PNG bytes: KL ratio per t per model, fitted beta per t (configured beta dashed), J* - J per rule."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ts = summary["timesteps"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    for o, m in summary["models"].items():
        ys = [m["kl_to_optimum_over_reference"]["per_t"][str(t)]["median"] for t in ts]
        ax.plot(ts, [y if y is not None and y > 0 else float("nan") for y in ys], "o-", label=o)
    ax.axhline(1.0, color="grey", lw=0.8, ls=":")
    ax.set(xlabel="t", ylabel="KL(opt||model) / KL(opt||ref)", yscale="log", title="distance to the step optimum")
    ax.invert_xaxis()
    ax.legend(fontsize=8)
    ax = axes[1]
    for i, (o, m) in enumerate(summary["models"].items()):
        ys = [m["fitted_beta"]["per_t"][str(t)]["value"] for t in ts]
        line = ax.plot(ts, [y if y is not None and y > 0 else float("nan") for y in ys], "o-", label=o)[0]
        ax.axhline(m["beta"], color=line.get_color(), ls="--", lw=0.8, alpha=0.7 if i else 1.0)
    ax.set(xlabel="t", ylabel="fitted beta", yscale="log", title="beta explaining the mean shift (dashed: trained)")
    ax.invert_xaxis()
    ax.legend(fontsize=8)
    ax = axes[2]
    methods = list(summary["rules"])
    labels = list(next(iter(summary["rules"].values())).keys()) if methods else []
    width = 0.8 / max(len(methods), 1)
    for i, method in enumerate(methods):
        means = [summary["rules"][method][lab]["j_star_minus_j"]["mean"] or 0.0 for lab in labels]
        ses = [summary["rules"][method][lab]["j_star_minus_j"]["se"] or 0.0 for lab in labels]
        ax.bar([j + i * width for j in range(len(labels))], means, width, yerr=ses, label=method)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))])
    objectives = list(summary.get("objectives", []))
    ax.set_xticklabels(
        [
            "/".join(f"{summary['rules'][methods[0]][lab]['weights'].get(o, 0.0):g}" for o in objectives)
            for lab in labels
        ],
        fontsize=8,
    )
    tops = [
        (e["j_star_minus_j"]["mean"] or 0.0) + (e["j_star_minus_j"]["se"] or 0.0)
        for by_w in summary["rules"].values()
        for e in by_w.values()
    ]
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.set_ylim(top=3 * max([*tops, 1e-3]))
    ax.set(xlabel="weights (" + "/".join(objectives) + ")", ylabel="J* - J (mean over states)")
    ax.set_title("what each rule leaves on the table")
    ax.legend(fontsize=7, ncol=3, loc="upper left")
    fig.suptitle(f"step-optimality diagnostic: {summary.get('task')}")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
