"""Reverse kernels agree with diffusers' own step() at every timestep of every supported configuration."""

import itertools

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler

from msdda import KernelScheduler, KernelSchedulerConfig, ScheduleError, UnsupportedSchedulerError, reverse_kernel

SHAPE = (2, 3, 4, 4)
PREDICTIONS = ["epsilon", "sample", "v_prediction"]
SPACINGS = ["leading", "trailing", "linspace"]


def _inputs(seed: int, learned: bool):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=g)
    out = torch.randn(SHAPE, generator=g)
    if learned:  # the learned-range variance value lives in [-1, 1]
        out = torch.cat([out, torch.rand(SHAPE, generator=g) * 2 - 1], dim=1)
    return x, out


@pytest.mark.parametrize(
    ("variance_type", "clip", "prediction", "spacing"),
    list(itertools.product(["fixed_small", "fixed_large", "learned_range"], [True, False], PREDICTIONS, SPACINGS)),
)
def test_ddpm_kernel_matches_step(variance_type, clip, prediction, spacing):
    s = DDPMScheduler(
        num_train_timesteps=1000,
        variance_type=variance_type,
        clip_sample=clip,
        prediction_type=prediction,
        timestep_spacing=spacing,
    )
    s.set_timesteps(50)
    worst = 0.0
    for t in s.timesteps:
        x, out = _inputs(int(t), variance_type == "learned_range")
        prev = s.step(out, t, x, generator=torch.Generator().manual_seed(int(t))).prev_sample
        z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(int(t)))
        k = reverse_kernel(s, out, t, x)
        assert k.mean.dtype == torch.float32
        # diffusers' DDPM adds no noise at t = 0; everywhere else it draws var with the same z
        mine = k.mean if int(t) == 0 else k.mean + k.var.sqrt() * z
        worst = max(worst, (mine - prev).abs().max().item())
    assert worst <= 1e-5


@pytest.mark.parametrize(
    ("eta", "clip", "prediction", "spacing"),
    list(itertools.product([0.0, 0.5, 1.0], [True, False], PREDICTIONS, SPACINGS)),
)
def test_ddim_kernel_matches_step(eta, clip, prediction, spacing):
    s = DDIMScheduler(num_train_timesteps=1000, clip_sample=clip, prediction_type=prediction, timestep_spacing=spacing)
    s.set_timesteps(50)
    worst = 0.0
    for t in s.timesteps:
        x, out = _inputs(int(t), False)
        prev = s.step(out, t, x, eta=eta, generator=torch.Generator().manual_seed(int(t))).prev_sample
        z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(int(t)))
        k = reverse_kernel(s, out, t, x, eta=eta)
        worst = max(worst, (k.mean + k.var.sqrt() * z - prev).abs().max().item())
        if eta == 0.0:
            assert float(k.var) == 0.0
    assert worst <= 1e-5


def test_ddim_use_clipped_model_output_and_no_alpha_to_one():
    s = DDIMScheduler(num_train_timesteps=1000, clip_sample=True, set_alpha_to_one=False)
    s.set_timesteps(20)
    for t in s.timesteps:
        x, out = _inputs(int(t), False)
        x = x * 3  # push x0_hat outside the clip range so clipping matters
        prev = s.step(
            out, t, x, eta=0.7, use_clipped_model_output=True, generator=torch.Generator().manual_seed(1)
        ).prev_sample
        z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
        k = reverse_kernel(s, out, t, x, eta=0.7, use_clipped_model_output=True)
        torch.testing.assert_close(k.mean + k.var.sqrt() * z, prev, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_dynamic_thresholding_matches_step(kind):
    cls = DDPMScheduler if kind == "ddpm" else DDIMScheduler
    s = cls(num_train_timesteps=1000, thresholding=True, sample_max_value=1.5, clip_sample=False)
    s.set_timesteps(10)
    for t in s.timesteps:
        x, out = _inputs(int(t), False)
        prev = s.step(out, t, x, generator=torch.Generator().manual_seed(2)).prev_sample
        z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
        k = reverse_kernel(s, out, t, x)
        mine = k.mean if (kind == "ddpm" and int(t) == 0) else k.mean + k.var.sqrt() * z
        torch.testing.assert_close(mine, prev, rtol=0, atol=1e-5)


def test_pred_original_sample_matches_step():
    s = DDPMScheduler(num_train_timesteps=1000, clip_sample=True)
    s.set_timesteps(10)
    t = s.timesteps[3]
    x, out = _inputs(0, False)
    ref = s.step(out, t, x, generator=torch.Generator().manual_seed(0)).pred_original_sample
    torch.testing.assert_close(reverse_kernel(s, out, t, x).pred_original_sample, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_own_scheduler_matches_diffusers_timesteps_and_kernels(kind, spacing):
    """The diffusers-free KernelScheduler (float64 alphas) gives the same timesteps and kernels."""
    ours = KernelScheduler(KernelSchedulerConfig(kind=kind, timestep_spacing=spacing, steps_offset=1))
    ours.set_timesteps(25)
    theirs = (DDPMScheduler if kind == "ddpm" else DDIMScheduler)(timestep_spacing=spacing, steps_offset=1)
    theirs.set_timesteps(25)
    assert ours.timesteps.tolist() == theirs.timesteps.tolist()
    torch.testing.assert_close(ours.alphas_cumprod.float(), theirs.alphas_cumprod, rtol=1e-6, atol=0)
    for t in ours.timesteps[::5]:
        x, out = _inputs(int(t), False)
        a, b = ours.kernel(out, int(t), x), reverse_kernel(theirs, out, int(t), x)
        torch.testing.assert_close(a.mean, b.mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(a.var, b.var, rtol=1e-4, atol=1e-9)


def test_batched_timesteps_equal_per_sample_kernels():
    ks = KernelScheduler(KernelSchedulerConfig(variance_type="learned_range", clip_sample=False))
    x, out = _inputs(5, True)
    t = torch.tensor([999, 10])
    batched = ks.kernel(out, t, x)
    for i, ti in enumerate(t.tolist()):
        single = ks.kernel(out[i : i + 1], ti, x[i : i + 1], prev_timestep=ti - 1)
        torch.testing.assert_close(batched.mean[i : i + 1], single.mean, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(batched.var[i : i + 1], single.var, rtol=1e-6, atol=0)


def test_q_posterior_is_the_fixed_small_kernel_of_the_true_noise():
    ks = KernelScheduler(KernelSchedulerConfig(clip_sample=False))
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    eps = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    t = torch.full((SHAPE[0],), 500)
    xt = ks.add_noise(x0, eps, t)
    mean, var = ks.q_posterior(x0, xt, 500, 499)
    k = ks.kernel(eps, 500, xt, prev_timestep=499)
    torch.testing.assert_close(k.mean, mean, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(k.var, var.reshape(()), rtol=1e-12, atol=0)


def test_config_round_trip():
    cfg = KernelSchedulerConfig(kind="ddim", eta=0.3, prediction_type="v_prediction")
    assert KernelSchedulerConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ScheduleError, match="unknown KernelSchedulerConfig keys \\['bogus'\\]"):
        KernelSchedulerConfig.from_dict({"bogus": 1})


@pytest.mark.parametrize(
    ("make", "pattern", "exc"),
    [
        (
            lambda: reverse_kernel(EulerDiscreteScheduler(), torch.zeros(SHAPE), 10, torch.zeros(SHAPE)),
            "EulerDiscreteScheduler has no reverse kernel implemented; use DDPMScheduler or DDIMScheduler",
            UnsupportedSchedulerError,
        ),
        (
            lambda: reverse_kernel(DDPMScheduler(), torch.zeros(SHAPE), 10, torch.zeros(SHAPE), eta=0.5),
            "eta applies to DDIM only",
            ScheduleError,
        ),
        (
            lambda: reverse_kernel(DDIMScheduler(), torch.zeros(SHAPE), 10, torch.zeros(SHAPE), eta=1.5),
            "eta=1.5 is outside",
            ScheduleError,
        ),
        (
            lambda: reverse_kernel(
                DDPMScheduler(variance_type="learned_range"), torch.zeros(SHAPE), 10, torch.zeros(SHAPE)
            ),
            "needs a model output with 6 channels",
            ScheduleError,
        ),
        (
            lambda: reverse_kernel(DDPMScheduler(), torch.zeros(2, 5, 4, 4), 10, torch.zeros(SHAPE)),
            "has 5 channels; expected 3 or 6",
            ScheduleError,
        ),
        (
            lambda: reverse_kernel(DDPMScheduler(), torch.zeros(2, 3, 5, 4), 10, torch.zeros(SHAPE)),
            "does not match sample shape",
            ScheduleError,
        ),
        (
            lambda: KernelScheduler(KernelSchedulerConfig(prediction_type="score")),
            "prediction_type='score' is not supported",
            ScheduleError,
        ),
        (lambda: KernelScheduler().set_timesteps(0), "num_inference_steps=0 must be in", ScheduleError),
        (
            lambda: KernelScheduler().kernel(torch.zeros(SHAPE), 5000, torch.zeros(SHAPE), prev_timestep=4999),
            "timestep 5000 >= num_train_timesteps 1000",
            ScheduleError,
        ),
    ],
)
def test_schedule_errors(make, pattern, exc):
    with pytest.raises(exc, match=pattern):
        make()


def test_unknown_timestep_for_ddpm_names_it():
    ks = KernelScheduler()
    ks.set_timesteps(10)
    with pytest.raises(ScheduleError, match="timestep 7 is not in this schedule"):
        ks.prev_timestep(7)


def test_cached_step_coefficients_follow_the_schedule():
    """Per-step coefficients are cached: kernels equal a fresh scheduler's bit for bit, also after the alphas,
    the configuration or the timesteps change, and a kernel's variance is never the cached tensor itself."""
    cfg = KernelSchedulerConfig(variance_type="fixed_small")
    ks = KernelScheduler(cfg)
    ks.set_timesteps(10)
    x, out = _inputs(0, False)
    x, out = x.double(), out.double()

    def fresh() -> KernelScheduler:
        other = KernelScheduler(KernelSchedulerConfig(**cfg.to_dict()), ks.alphas_cumprod.clone(), ks.timesteps.clone())
        other.num_inference_steps = ks.num_inference_steps
        return other

    def assert_same(t: int) -> None:
        a, b = ks.kernel(out, t, x), fresh().kernel(out, t, x)
        for name in ("mean", "var", "pred_original_sample", "pred_epsilon"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
        assert a.prev_timestep == b.prev_timestep

    assert_same(900)
    ks.kernel(out, 900, x).var.mul_(0)  # the caller's own tensor: the cache is untouched
    assert float(ks.kernel(out, 900, x).var) > 0
    ks.alphas_cumprod.mul_(0.999)  # changed in place
    assert_same(900)
    ks.alphas_cumprod = ks.alphas_cumprod.clone() * 0.999  # replaced
    assert_same(900)
    cfg.variance_type = "fixed_large"
    assert_same(900)
    ks.timesteps[1] = 850  # the step grid changed in place: 900 now steps to 850
    assert ks.prev_timestep(900) == 850
    assert_same(900)


# ----- MPS has no float64: the kernel math there runs in float32 ------------------------------------------
@pytest.mark.parametrize(
    "cfg",
    [dict(kind="ddpm"), dict(kind="ddpm", variance_type="learned_range"), dict(kind="ddim", eta=0.5),
     dict(kind="ddim", eta=0.0, clip_sample=False)],
    ids=["ddpm", "ddpm-learned", "ddim-eta", "ddim-det"],
)
def test_float32_kernel_math_is_within_the_documented_tolerance(cfg, monkeypatch):
    """What an MPS device computes (compute_dtype -> float32), forced on the CPU, against the float64 path."""
    import msdda.core.schedule as schedule
    from msdda.core.kernel import compute_dtype

    assert compute_dtype("mps") is torch.float32 and compute_dtype("cpu") is torch.float64

    def kernels():
        s = KernelScheduler(KernelSchedulerConfig(**cfg))
        s.set_timesteps(50)
        g = torch.Generator().manual_seed(0)
        channels = 4 if cfg.get("variance_type") == "learned_range" else 2
        out = []
        for t in [int(x) for x in s.timesteps]:
            x = torch.randn(4, 2, 8, 8, generator=g)
            k = s.kernel(torch.randn(4, channels, 8, 8, generator=g).clamp(-1, 1), t, x, prev_timestep=s.prev_timestep(t))
            out.append((k.mean, torch.broadcast_to(k.var, k.mean.shape), s.predict_x0(torch.ones(4, 2, 8, 8), t, x)))
        return out

    exact = kernels()
    seen = []
    monkeypatch.setattr(schedule, "compute_dtype", lambda device: seen.append(1) or torch.float32)
    rounded = kernels()
    assert seen  # the float32 path ran
    for (m64, v64, x64), (m32, v32, x32) in zip(exact, rounded, strict=True):
        assert m32.dtype == torch.float32
        assert float((m64 - m32).abs().max()) <= 2e-6 * max(1.0, float(m64.abs().max()))
        assert float(((v64 - v32).abs() / v64.abs().clamp_min(1e-30)).max()) <= 2e-5
        assert float((x64 - x32).abs().max()) <= 2e-6 * max(1.0, float(x64.abs().max()))
