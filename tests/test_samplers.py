"""Sigma-table samplers: Euler ancestral, first-order SDE-DPM-Solver++ and the flow-matching SDE steps.

Each kernel is matched to the scheduler's own step() with the same noise at every timestep (Euler ancestral,
SDE-DPM-Solver++, FlowMatch's ODE step and its stochastic_sampling step), or to the SDE formula written out here
independently (Flow-GRPO, Flow-CPS), and the flow SDE's marginals are checked on a Gaussian toy whose velocity
is known in closed form. Unsupported schedulers raise UnsupportedSchedulerError naming the class and what to use.
"""

import itertools
import logging
import math

import pytest
import torch
from diffusers import (
    DDPMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)

import msdda
from msdda import DBMPA, MSDDA, KernelScheduler, KernelSchedulerConfig, SingleModel
from msdda.core import ScheduleError, UnsupportedSchedulerError, as_kernel_scheduler, reverse_kernel
from msdda.core.samplers import SamplerKernelConfig, SamplerKernelScheduler

SHAPE = (2, 3, 4, 4)
SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}  # SD 1.5's training betas
F64 = torch.float64


@pytest.fixture(autouse=True)
def _quiet_diffusers():
    # diffusers' Euler step() warns once per call when scale_model_input was not called; the tests feed it directly
    logger = logging.getLogger("diffusers.schedulers.scheduling_euler_ancestral_discrete")
    level = logger.level
    logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(level)


def _z(seed: int, dtype=F64) -> torch.Tensor:
    """The noise diffusers' randn_tensor draws from a CPU generator seeded `seed`."""
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


# ----- Euler ancestral ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("prediction", "spacing", "space"),
    list(
        itertools.product(["epsilon", "v_prediction"], ["linspace", "leading", "trailing"], ["sample", "model_input"])
    ),
)
def test_euler_ancestral_kernel_matches_step(prediction, spacing, space):
    s = EulerAncestralDiscreteScheduler(prediction_type=prediction, timestep_spacing=spacing, **SD)
    s.set_timesteps(15)
    ks = as_kernel_scheduler(s, space=space)
    assert ks.init_noise_sigma == pytest.approx(
        float(s.init_noise_sigma) / (1.0 if space == "sample" else math.sqrt(1 + float(s.sigmas[0]) ** 2)), rel=1e-7
    )
    g = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPE, generator=g, dtype=F64) * float(s.init_noise_sigma)
    worst = 0.0
    for i, t in enumerate(s.timesteps):
        out = torch.randn(SHAPE, generator=g, dtype=F64)
        sigma, sigma_to = float(s.sigmas[i]), float(s.sigmas[i + 1])
        # model_input space: the kernel sees x / sqrt(1 + sigma^2) and returns x_prev / sqrt(1 + sigma_to^2)
        c_in, c_out = (1.0, 1.0) if space == "sample" else (math.sqrt(1 + sigma**2), math.sqrt(1 + sigma_to**2))
        k = ks.kernel(out, t, x / c_in)
        prev = s.step(out, t, x, generator=torch.Generator().manual_seed(i)).prev_sample
        mine = (k.mean + k.var.sqrt() * _z(i)) * c_out
        worst = max(worst, _rel(mine, prev))
        # sigma_up from the k-diffusion formula, computed here on its own
        assert k.var.item() * c_out**2 == pytest.approx(sigma_to**2 * (sigma**2 - sigma_to**2) / sigma**2, rel=1e-12)
        x = prev
    assert worst <= 1e-6  # measured ~1e-7: step() computes in float32
    assert k.var.item() == 0.0  # the last step lands on sigma 0: a point mass at x0_hat
    assert torch.allclose(k.mean, k.pred_original_sample)


def test_euler_ancestral_scale_model_input_and_sample_prediction():
    s = EulerAncestralDiscreteScheduler(**SD)
    s.set_timesteps(10)
    ks = as_kernel_scheduler(s, space="sample")
    vp = as_kernel_scheduler(s)  # the sampler's default: model_input space
    g = torch.Generator().manual_seed(1)
    x = torch.randn(SHAPE, generator=g, dtype=F64) * 5
    eps = torch.randn(SHAPE, generator=g, dtype=F64)
    for t in s.timesteps[[0, 4, 9]]:
        sig = float(s.sigmas[s.index_for_timestep(t)])
        # diffusers' scale_model_input follows its step counter, not t: the formula it applies, at this t
        assert torch.allclose(ks.scale_model_input(x, t), x / math.sqrt(sig**2 + 1), rtol=1e-12)
        assert torch.equal(vp.scale_model_input(x, t), x)
        # an x0-predicting model whose x0 is the epsilon model's x0_hat has the same kernel
        k_eps = ks.kernel(eps, t, x)
        x0_cfg = SamplerKernelConfig(kind="euler_ancestral", prediction_type="sample", **SD)
        k_x0 = SamplerKernelScheduler(x0_cfg, s.alphas_cumprod, s.timesteps, s.sigmas).kernel(
            k_eps.pred_original_sample, t, x
        )
        assert torch.allclose(k_x0.mean, k_eps.mean, rtol=1e-12, atol=1e-12)
        assert torch.allclose(ks.predict_x0(eps, t, x), x - sig * eps)
        # VP alpha-bar: the same x_t as DDPM/DDIM at this noise level
        assert vp.alpha_bar(t).item() == pytest.approx(1 / (1 + sig**2))


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_own_euler_tables_match_diffusers(spacing):
    s = EulerAncestralDiscreteScheduler(timestep_spacing=spacing, steps_offset=1, **SD)
    s.set_timesteps(20)
    own = SamplerKernelScheduler(
        SamplerKernelConfig(kind="euler_ancestral", timestep_spacing=spacing, steps_offset=1, **SD)
    )
    own.set_timesteps(20)
    assert torch.allclose(own.timesteps, s.timesteps.to(F64), atol=1e-3)
    # ours start from float64 betas, diffusers' from float32 ones: measured 1.6e-5 apart
    assert torch.allclose(own.sigmas, s.sigmas.to(F64), rtol=5e-5)
    assert own.init_noise_sigma == pytest.approx(float(s.init_noise_sigma), rel=5e-5)


# ----- SDE-DPM-Solver++ (first order) ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("prediction", "spacing", "karras", "final"),
    [
        *itertools.product(
            ["epsilon", "sample", "v_prediction"], ["linspace", "leading", "trailing"], [False], ["zero"]
        ),
        ("epsilon", "linspace", True, "zero"),
        ("v_prediction", "trailing", True, "sigma_min"),
        ("epsilon", "leading", False, "sigma_min"),
    ],
)
def test_sde_dpmsolver_kernel_matches_step(prediction, spacing, karras, final):
    s = DPMSolverMultistepScheduler(
        algorithm_type="sde-dpmsolver++",
        solver_order=1,
        prediction_type=prediction,
        timestep_spacing=spacing,
        use_karras_sigmas=karras,
        final_sigmas_type=final,
        **SD,
    )
    s.set_timesteps(12)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(SHAPE, generator=g, dtype=F64)
    worst = 0.0
    for i, t in enumerate(s.timesteps):
        out = torch.randn(SHAPE, generator=g, dtype=F64)
        k = reverse_kernel(s, out, t, x)
        prev = s.step(out, t, x, generator=torch.Generator().manual_seed(i)).prev_sample
        mine = k.mean + k.var.sqrt() * _z(i, torch.float32).to(F64)  # step() draws its noise in float32
        worst = max(worst, _rel(mine, prev))
        x = prev
    assert worst <= 1e-6  # measured ~1e-7
    if not karras:  # a Karras table ends at sigma_min already: its last step to sigma_min is a point mass too
        assert (k.var.item() == 0.0) == (final == "zero")


def test_sde_dpmsolver_on_alpha_bar_sigmas_is_the_ddpm_posterior_kernel():
    # independent math: on alpha-bar's own sigmas, first-order SDE-DPM-Solver++ is DDPM's fixed_small posterior step
    s = DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", solver_order=1, **SD)
    s.set_timesteps(10)
    ddpm = KernelScheduler(KernelSchedulerConfig(kind="ddpm", clip_sample=False, variance_type="fixed_small", **SD))
    ks = as_kernel_scheduler(s)
    g = torch.Generator().manual_seed(3)
    for t in s.timesteps:
        x, out = torch.randn(SHAPE, generator=g, dtype=F64), torch.randn(SHAPE, generator=g, dtype=F64)
        prev = ks.prev_timestep(t)
        k, ref = ks.kernel(out, t, x), ddpm.kernel(out, int(t), x, prev_timestep=prev)
        # the mirrored sigmas are float32 roundings of alpha-bar's: agreement to ~1e-6, not 1e-12
        assert torch.allclose(k.mean, ref.mean, rtol=1e-5, atol=1e-6)
        assert k.var.item() == pytest.approx(ref.var.item(), rel=1e-5, abs=1e-12)


def test_sde_dpmsolver_thresholding_matches_step():
    s = DPMSolverMultistepScheduler(
        algorithm_type="sde-dpmsolver++", solver_order=1, thresholding=True, sample_max_value=1.5, **SD
    )
    s.set_timesteps(8)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(SHAPE, generator=g, dtype=F64) * 3
    for i, t in enumerate(s.timesteps):
        out = torch.randn(SHAPE, generator=g, dtype=F64) * 3
        k = reverse_kernel(s, out, t, x)
        prev = s.step(out, t, x, generator=torch.Generator().manual_seed(i)).prev_sample
        assert _rel(k.mean + k.var.sqrt() * _z(i, torch.float32).to(F64), prev) <= 1e-6
        assert k.pred_original_sample.abs().max() <= 1.0 + 1e-12  # thresholded x0 lies in [-1, 1]
        x = prev


# ----- flow matching -----------------------------------------------------------------------------------------------
def _flow(steps: int = 12, shift: float = 3.0, **kw) -> FlowMatchEulerDiscreteScheduler:
    s = FlowMatchEulerDiscreteScheduler(shift=shift, **kw)
    s.set_timesteps(steps)
    return s


def test_flow_sde_with_noise_level_zero_is_the_ode_step():
    s = _flow()
    ks = as_kernel_scheduler(s, eta=0.0)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(SHAPE, generator=g, dtype=F64)
    for t in s.timesteps:
        v = torch.randn(SHAPE, generator=g, dtype=F64)
        k = ks.kernel(v, t, x)
        prev = s.step(v, t, x).prev_sample
        assert k.var.item() == 0.0
        assert _rel(k.mean, prev) <= 1e-6  # step() computes x + dt * v in float32
        x = prev


def _grpo_reference(x, v, sigma, sigma_next, a, sigma_guard):
    """Flow-GRPO's SDE step written as ODE drift + Langevin correction with the flow's score, on its own.

    score(x) = -(x + (1 - sigma) v) / sigma (the noise estimate over sigma); the reverse SDE step of diffusion g is
    x + v dt - g^2/2 * score * dt + g sqrt(-dt) z, with g = a sqrt(sigma / (1 - sigma)) and dt < 0."""
    dt = sigma_next - sigma
    g2 = a**2 * sigma / (1 - (sigma_guard if sigma == 1 else sigma))
    score = -(x + (1 - sigma) * v) / sigma
    return x + v * dt - 0.5 * g2 * score * dt, g2 * -dt


@pytest.mark.parametrize("a", [0.3, 0.7, 1.2])
def test_flow_grpo_sde_kernel_is_the_sde_formula(a):
    s = _flow(steps=10, shift=3.0)
    ks = as_kernel_scheduler(s, eta=a)
    sig = s.sigmas.to(F64)
    assert float(sig[0]) == 1.0  # the first step exercises Flow-GRPO's sigma = 1 guard
    g = torch.Generator().manual_seed(6)
    for i, t in enumerate(s.timesteps):
        x, v = torch.randn(SHAPE, generator=g, dtype=F64), torch.randn(SHAPE, generator=g, dtype=F64)
        k = ks.kernel(v, t, x)
        mean, var = _grpo_reference(x, v, float(sig[i]), float(sig[i + 1]), a, float(sig[1]))
        assert torch.allclose(k.mean, mean, rtol=1e-12, atol=1e-12)
        assert k.var.item() == pytest.approx(var, rel=1e-12)
        assert torch.allclose(k.pred_original_sample, x - float(sig[i]) * v)


def test_flow_cps_kernel_formula_and_stochastic_sampling_step():
    # Flow-CPS written out here; with a = 1 it is diffusers' own stochastic_sampling step (fresh noise at sigma_t)
    s = _flow(steps=10, stochastic_sampling=True)
    ks = as_kernel_scheduler(s)
    assert (ks.config.sde_type, ks.config.noise_level) == ("cps", 1.0)
    half = SamplerKernelScheduler(
        SamplerKernelConfig(kind="flow_sde", prediction_type="flow_prediction", sde_type="cps", noise_level=0.5),
        timesteps=s.timesteps,
        sigmas=s.sigmas,
    )
    g = torch.Generator().manual_seed(7)
    x = torch.randn(SHAPE, generator=g, dtype=F64)
    for i, t in enumerate(s.timesteps):
        v = torch.randn(SHAPE, generator=g, dtype=F64)
        sigma, nxt = float(s.sigmas[i]), float(s.sigmas[i + 1])
        x0, x1 = x - sigma * v, x + (1 - sigma) * v
        std = nxt * math.sin(0.5 * math.pi / 2)
        kh = half.kernel(v, t, x)
        assert torch.allclose(kh.mean, (1 - nxt) * x0 + math.sqrt(nxt**2 - std**2) * x1, rtol=1e-12, atol=1e-12)
        assert kh.var.item() == pytest.approx(std**2, rel=1e-12, abs=1e-300)
        k = ks.kernel(v, t, x)
        prev = s.step(v, t, x, generator=torch.Generator().manual_seed(i)).prev_sample
        assert _rel(k.mean + k.var.sqrt() * _z(i, torch.float32).to(F64), prev) <= 1e-6
        x = prev


def _toy_flow_sde(a: float, steps: int, n: int, s2: float, seed: int) -> list[tuple[float, float]]:
    """Run Flow-GRPO's SDE on data ~ N(0, s2) with the exact velocity; (sigma, sample var / exact var - 1) at five
    points, the last being the final sample (the kernel mean at the last step, as the sampler returns it)."""
    ks = SamplerKernelScheduler(SamplerKernelConfig(kind="flow_sde", prediction_type="flow_prediction", noise_level=a))
    ks.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, generator=g, dtype=F64)
    x = (x - x.mean()) / x.std()  # x_T with exactly unit sample variance: what remains is the SDE's own error
    errors = []
    for i, t in enumerate(ks.timesteps):
        sigma = float(ks.sigmas[i])
        # x_sigma = (1 - sigma) x0 + sigma * noise ~ N(0, var); the exact velocity E[noise - x0 | x] is linear in x
        var = (1 - sigma) ** 2 * s2 + sigma**2
        k = ks.kernel((sigma - (1 - sigma) * s2) / var * x, t, x)
        last = i == len(ks.timesteps) - 1
        x = k.mean if last else k.sample(generator=g)
        nxt = float(ks.sigmas[i + 1])
        if (i + 1) % (steps // 4) == 0 or last:
            errors.append((nxt, x.var().item() / ((1 - nxt) ** 2 * s2 + nxt**2) - 1))
    return errors


def test_flow_sde_preserves_the_marginal_of_a_gaussian_toy():
    # the SDE with any noise level keeps the ODE's marginals N(0, (1 - sigma)^2 s^2 + sigma^2), up to its
    # Euler-Maruyama error, which is largest just after sigma = 1 (the guarded first step) and shrinks with the step
    errors = _toy_flow_sde(a=0.7, steps=400, n=100_000, s2=0.25, seed=8)
    # measured (seeds 8-10): +1.9..2.4% at sigma 0.75, within 0.8% at the end (sampling error alone: 0.45%);
    # 100 steps: +4.3..5.2% at sigma 0.75
    assert all(abs(e) <= 0.04 for _, e in errors), errors
    assert abs(errors[-1][1]) <= 0.02, errors
    coarse = _toy_flow_sde(a=0.7, steps=100, n=100_000, s2=0.25, seed=8)
    assert coarse[0][1] > errors[0][1]  # the discrepancy is the discretisation's: fewer steps, larger


def test_own_flow_tables_match_diffusers():
    s = _flow(steps=16, shift=3.0)
    own = SamplerKernelScheduler(SamplerKernelConfig(kind="flow_sde", prediction_type="flow_prediction", shift=3.0))
    own.set_timesteps(16)
    assert torch.allclose(own.timesteps, s.timesteps.to(F64), rtol=1e-6)
    assert torch.allclose(own.sigmas, s.sigmas.to(F64), rtol=1e-6, atol=1e-7)


# ----- the msdda sampler, unchanged, on Euler ancestral ------------------------------------------------------------
class GaussianEps(torch.nn.Module):
    """The exact noise prediction for data ~ N(mu, s^2 I) over the VP x_t (what scale_model_input gives a model)."""

    def __init__(self, mu: float, s2: float, alphas_cumprod: torch.Tensor):
        super().__init__()
        self.mu, self.s2, self.ab = mu, s2, alphas_cumprod.to(F64)

    def forward(self, x, t, cond=None):
        ab = self.ab[t.long()].reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)
        return (1 - ab).sqrt() * (x - ab.sqrt() * self.mu) / (ab * self.s2 + 1 - ab)


def _sampler(kind: str):
    if kind == "euler_ancestral":
        return EulerAncestralDiscreteScheduler(timestep_spacing="leading", steps_offset=1, **SD)
    return DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", solver_order=1, **SD)


@pytest.mark.parametrize(
    ("kind", "rule"), list(itertools.product(["euler_ancestral", "sde-dpmsolver++"], ["single", "msdda"]))
)
def test_sample_reproduces_the_diffusers_loop(kind, rule):
    # msdda.sample, unchanged, with the diffusers scheduler passed as is (integer timesteps)
    s = _sampler(kind)
    models = [GaussianEps(0.5, 0.3, s.alphas_cumprod), GaussianEps(-1.0, 0.6, s.alphas_cumprod)]
    shape = (3, 2, 4, 4)
    step_rule = SingleModel(0) if rule == "single" else MSDDA([0.3, 0.7])
    got = msdda.sample(models, s, step_rule, shape=shape, num_inference_steps=15, seed=0, progress=False).samples

    # diffusers' own loop: x_T = init_noise_sigma * z, the model at scale_model_input(x), step() with the generator;
    # MSDDA's fixed-variance fusion is the DB-MPA average of the noise predictions
    s.set_timesteps(15)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g) * s.init_noise_sigma
    weights = [1.0, 0.0] if rule == "single" else [0.3, 0.7]
    for t in s.timesteps:
        inp = s.scale_model_input(x, t)
        t_in = torch.full((shape[0],), int(t), dtype=torch.long)
        eps = sum(w * m(inp, t_in) for w, m in zip(weights, models, strict=True))
        x = s.step(eps, t, x, generator=g).prev_sample
    assert (got - x).abs().max().item() <= 1e-5 * x.abs().max().item()  # measured <= 3.8e-7 relative (float32)
    dbmpa = msdda.sample(models, s, DBMPA([0.3, 0.7]), shape=shape, num_inference_steps=15, seed=0, progress=False)
    if rule == "msdda":  # schedule-only variance: MSDDA and DB-MPA are the same sampler here
        assert torch.allclose(got, dbmpa.samples, atol=1e-5)


@pytest.mark.parametrize("spacing", ["linspace", "trailing"])
def test_sample_runs_fractional_timesteps_as_the_diffusers_loop(spacing):
    # linspace/trailing Euler schedules have fractional timesteps (and x_T's std in the model's input space is
    # not 1): the sampler passes float timesteps to the models and scales x_T by the kernel's init_noise_sigma
    s = EulerAncestralDiscreteScheduler(timestep_spacing=spacing, **SD)
    models = [GaussianEps(0.5, 0.3, s.alphas_cumprod), GaussianEps(-1.0, 0.6, s.alphas_cumprod)]
    shape = (3, 2, 4, 4)
    got = msdda.sample(models, s, MSDDA([0.3, 0.7]), shape=shape, num_inference_steps=15, seed=0, progress=False)
    s.set_timesteps(15)
    # linspace: fractional timesteps; trailing: integer ones, but x_T's std in the model's space is not 1 either
    assert bool((s.timesteps != s.timesteps.round()).any()) == (spacing == "linspace")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g) * s.init_noise_sigma
    for t in s.timesteps:
        inp = s.scale_model_input(x, t)
        t_in = torch.full((shape[0],), float(t))
        eps = 0.3 * models[0](inp, t_in) + 0.7 * models[1](inp, t_in)
        x = s.step(eps, t, x, generator=g).prev_sample
    assert (got.samples - x).abs().max().item() <= 1e-5 * x.abs().max().item()


# ----- refusals and errors -----------------------------------------------------------------------------------------
class DPMSolverSDEScheduler:  # noqa: D101  (the real one needs torchsde; only its class name is looked at)
    config: dict = {}


@pytest.mark.parametrize(
    ("scheduler", "pattern"),
    [
        (PNDMScheduler(), "PNDMScheduler has no reverse kernel.*EulerAncestralDiscreteScheduler.*deterministic"),
        (UniPCMultistepScheduler(), "UniPCMultistepScheduler has no reverse kernel.*point mass.*multistep"),
        (DEISMultistepScheduler(), "DEISMultistepScheduler has no reverse kernel.*sde-dpmsolver\\+\\+"),
        (EulerDiscreteScheduler(), "EulerDiscreteScheduler has no reverse kernel.*s_churn=0.*point mass"),
        (HeunDiscreteScheduler(), "HeunDiscreteScheduler has no reverse kernel.*point mass"),
        (LMSDiscreteScheduler(), "LMSDiscreteScheduler has no reverse kernel"),
        (DPMSolverSDEScheduler(), "DPMSolverSDEScheduler has no reverse kernel.*Brownian-tree"),
        (DPMSolverMultistepScheduler(), "algorithm_type='dpmsolver\\+\\+'.*point mass.*solver_order=1"),
        (
            DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", solver_order=2),
            "solver_order=2 has no reverse kernel.*previous steps.*not the multi-objective optimum",
        ),
        (_flow(), "FlowMatchEulerDiscreteScheduler's step\\(\\) is the deterministic flow ODE step.*eta=0.7"),
    ],
)
def test_unsupported_schedulers_name_the_class_and_the_alternative(scheduler, pattern):
    with pytest.raises(UnsupportedSchedulerError, match=pattern):
        as_kernel_scheduler(scheduler)
    with pytest.raises(UnsupportedSchedulerError, match=pattern):
        reverse_kernel(scheduler, torch.zeros(SHAPE), 10, torch.zeros(SHAPE))


def test_kernel_scheduler_from_diffusers_points_sigma_samplers_to_their_mirror():
    with pytest.raises(UnsupportedSchedulerError, match="SamplerKernelScheduler.from_diffusers"):
        KernelScheduler.from_diffusers(EulerAncestralDiscreteScheduler())


@pytest.mark.parametrize(
    ("make", "pattern"),
    [
        (
            lambda: reverse_kernel(
                EulerAncestralDiscreteScheduler(), torch.zeros(SHAPE), 999, torch.zeros(SHAPE), eta=0.5
            ),
            "eta applies to DDIM and flow-matching",
        ),
        (
            lambda: SamplerKernelConfig(kind="sde-dpmsolver++", space="model_input").validate(),
            "applies to euler_ancestral only",
        ),
        (
            lambda: SamplerKernelConfig(kind="flow_sde", prediction_type="epsilon").validate(),
            "prediction_type='epsilon' is not supported",
        ),
        (
            lambda: SamplerKernelConfig(kind="flow_sde", prediction_type="flow_prediction", noise_level=-1).validate(),
            "noise_level=-1",
        ),
        (lambda: SamplerKernelConfig.from_dict({"bogus": 1}), "unknown SamplerKernelConfig keys \\['bogus'\\]"),
        (
            lambda: SamplerKernelScheduler().kernel(
                torch.zeros(SHAPE), torch.tensor([999, 998, 997]), torch.zeros(SHAPE)
            ),
            "timestep is \\(3,\\) for a batch of 2",
        ),
        (
            lambda: SamplerKernelScheduler().kernel(torch.zeros(SHAPE), 999.5, torch.zeros(SHAPE)),
            "timestep 999.5 is not in",
        ),
        (lambda: SamplerKernelScheduler().kernel(torch.zeros(2, 5, 4, 4), 999, torch.zeros(SHAPE)), "has 5 channels"),
        (lambda: as_kernel_scheduler(_flow(stochastic_sampling=True), eta=0.7), "stochastic_sampling=True"),
        (lambda: SamplerKernelScheduler.from_diffusers(EulerAncestralDiscreteScheduler(), space="vp"), "space='vp'"),
    ],
)
def test_sampler_errors(make, pattern):
    with pytest.raises(ScheduleError, match=pattern):
        make()


def test_config_round_trip_and_mirrored_schedules_refuse_to_rebuild():
    cfg = SamplerKernelConfig(kind="flow_sde", prediction_type="flow_prediction", noise_level=0.8, sde_type="cps")
    assert SamplerKernelConfig.from_dict(cfg.to_dict()) == cfg
    karras = DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", solver_order=1, use_karras_sigmas=True)
    karras.set_timesteps(10)
    ks = as_kernel_scheduler(karras)
    with pytest.raises(ScheduleError, match="call set_timesteps on the diffusers scheduler and mirror it again"):
        ks.set_timesteps(20)
    with pytest.raises(ScheduleError, match="call scheduler.set_timesteps"):
        as_kernel_scheduler(DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", solver_order=1))
    # DDPM/DDIM are untouched by the new dispatch
    assert isinstance(as_kernel_scheduler(DDPMScheduler()), KernelScheduler)


class GaussianVelocity(torch.nn.Module):
    """The exact flow-matching velocity for data ~ N(mu, s2): x_t = (1 - sigma) x0 + sigma z, v = z - x0,
    with sigma = t / 1000 (the model is called with the scheduler's float timesteps)."""

    def __init__(self, mu: float, s2: float):
        super().__init__()
        self.mu, self.s2 = mu, s2

    def forward(self, x, t, cond=None):
        sig = (t.to(F64) / 1000).reshape(-1, *([1] * (x.dim() - 1)))
        var = (1 - sig) ** 2 * self.s2 + sig**2
        x0_hat = self.mu + (1 - sig) * self.s2 * (x.to(F64) - (1 - sig) * self.mu) / var
        z_hat = (x.to(F64) - (1 - sig) * x0_hat) / sig
        return (z_hat - x0_hat).to(x.dtype)


def test_sample_runs_flow_matching_as_the_diffusers_ode_at_noise_level_zero():
    # float timesteps (1000 sigma) reach the model; eta=0 is the ODE step, which diffusers' step() is
    s = FlowMatchEulerDiscreteScheduler(shift=3.0)
    model = GaussianVelocity(0.5, 0.2)
    shape = (4, 1, 3, 3)
    got = msdda.sample([model], s, SingleModel(0), shape=shape, num_inference_steps=12, eta=0.0, seed=0, progress=False)
    s.set_timesteps(12)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    for t in s.timesteps:
        x = s.step(model(x, torch.full((shape[0],), float(t))), t, x).prev_sample
    assert (got.samples - x).abs().max().item() <= 1e-5 * x.abs().max().item()
