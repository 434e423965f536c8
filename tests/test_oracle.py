"""MSDDA against the exact oracle (MSDDA.md §8): it attains the step optimum, and every other rule falls short."""

import math

import pytest
import torch

import msdda
from msdda import GaussianKernel, fuse_gaussians
from msdda.tasks.gaussian import GaussianTask, OracleDenoiser, OracleError


def _state(task: GaussianTask, n: int = 8, seed: int = 0):
    """A batch of x_t at a mid-schedule step, with its exact reference kernel."""
    s = task.scheduler
    s.set_timesteps(50)
    t = int(s.timesteps[20])
    x_t = torch.randn(n, task.dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 1.3
    return t, x_t, task.reference_kernel(x_t, t, s.prev_timestep(t))


def _msdda_kernel(task, ref, preferences, beta, with_reference=True):
    kernels = [task.aligned_kernel(k, ref) for k in range(task.num_objectives)]
    a = task.exponents(preferences, beta)
    mean, var = fuse_gaussians(
        [k.mean for k in kernels],
        [k.var for k in kernels],
        a,
        ref_mean=ref.mean if with_reference else None,
        ref_var=ref.var if with_reference else None,
    )
    return GaussianKernel(mean, var)


@pytest.mark.parametrize("num_objectives", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("case", ["simplex", "reference", "per-objective-betas"])
def test_fused_kernel_equals_independent_optimum(num_objectives, case):
    g = torch.Generator().manual_seed(num_objectives)
    betas = (
        [1.0] * num_objectives
        if case != "per-objective-betas"
        else (0.5 + torch.rand(num_objectives, generator=g)).tolist()
    )
    task = GaussianTask.default(dim=6, num_objectives=num_objectives, seed=num_objectives, betas=betas)
    _, _, ref = _state(task)
    w = torch.rand(num_objectives, generator=g, dtype=torch.float64) + 0.1
    w = (w / w.sum()).tolist()
    beta = 1.0
    if case == "reference":  # weights not summing to 1: the reference takes 1 - sum(a_k)
        w = [0.6 * x for x in w]
        beta = 1.3
    if case == "per-objective-betas":
        beta = 0.8
    with_ref = not math.isclose(sum(task.exponents(w, beta)), 1.0, rel_tol=1e-6)
    fused = _msdda_kernel(task, ref, w, beta, with_reference=with_ref)
    optimum = task.optimal_kernel(ref, w, beta)
    torch.testing.assert_close(fused.mean, optimum.mean, rtol=0, atol=1e-10)
    torch.testing.assert_close(
        torch.broadcast_to(fused.var, optimum.mean.shape),
        torch.broadcast_to(optimum.var, optimum.mean.shape),
        rtol=0,
        atol=1e-10,
    )
    if case == "simplex":
        assert not with_ref  # the paper's main case: the reference drops out


def test_msdda_attains_the_maximum_and_every_other_rule_falls_short():
    task = GaussianTask.default(dim=4, num_objectives=3, seed=7)
    _, _, ref = _state(task)
    w, beta = [0.2, 0.5, 0.3], 1.0
    aligned = [task.aligned_kernel(k, ref) for k in range(3)]
    best = task.objective(_msdda_kernel(task, ref, w, beta), ref, w, beta)
    optimum = task.objective(task.optimal_kernel(ref, w, beta), ref, w, beta)
    torch.testing.assert_close(best, optimum, rtol=0, atol=1e-10)

    mean_avg = sum(wk * k.mean for wk, k in zip(w, aligned, strict=True))
    others = {
        # DB-MPA / mean averaging with the reference's variance (noise averaging gives the same mean here)
        "mean-avg+ref-var": GaussianKernel(mean_avg, ref.var),
        # mean averaging with the averaged variance (ignores that precisions, not variances, add)
        "mean-avg+avg-var": GaussianKernel(mean_avg, sum(wk * k.var for wk, k in zip(w, aligned, strict=True))),
        **{f"one-hot-{k}": aligned[k] for k in range(3)},
        "reference": ref,
    }
    gaps = {}
    for name, kernel in others.items():
        j = task.objective(kernel, ref, w, beta)
        gap = (best - j).min().item()
        gaps[name] = gap
        assert gap > 1e-6, f"{name} is not worse than MSDDA (gap {gap})"
    g = torch.Generator().manual_seed(0)
    fused = _msdda_kernel(task, ref, w, beta)
    for _ in range(20):  # random perturbations of the fused kernel never help
        dm = 0.05 * torch.randn(fused.mean.shape, generator=g, dtype=torch.float64)
        dv = torch.exp(0.1 * torch.randn(fused.mean.shape, generator=g, dtype=torch.float64))
        j = task.objective(GaussianKernel(fused.mean + dm, fused.var * dv), ref, w, beta)
        assert (best - j >= -1e-12).all()
    print("J gaps vs MSDDA:", {k: round(v, 6) for k, v in gaps.items()})


def test_special_cases_hold_exactly():
    task = GaussianTask.default(dim=3, num_objectives=2, seed=1)
    _, _, ref = _state(task)
    aligned = [task.aligned_kernel(k, ref) for k in range(2)]
    # one-hot returns that kernel unchanged
    m, v = fuse_gaussians([a.mean for a in aligned], [a.var for a in aligned], [1.0, 0.0])
    assert torch.equal(m, aligned[0].mean) and torch.equal(v, aligned[0].var)
    # K = 1 with lam on the aligned model: the optimum at strength beta/lam
    for lam in (0.5, 1.5):
        m, v = fuse_gaussians([aligned[0].mean], [aligned[0].var], [lam], ref_mean=ref.mean, ref_var=ref.var)
        opt = task.optimal_kernel(ref, [1.0, 0.0], task.betas[0].item() / lam)
        torch.testing.assert_close(m, opt.mean, rtol=0, atol=1e-12)
        torch.testing.assert_close(v, opt.var, rtol=1e-12, atol=0)


def test_sampler_on_oracle_denoisers_follows_the_optimum_every_step():
    task = GaussianTask.default(dim=2, num_objectives=2, seed=0)
    w = [0.3, 0.7]
    worst = []

    def check(ctx, x):
        ref = task.reference_kernel(ctx.x_t, ctx.timestep, ctx.prev_timestep)
        opt = task.optimal_kernel(ref, w, 1.0)
        fused = msdda.MSDDA(w)(ctx)
        worst.append((fused.mean - opt.mean).abs().max().item())
        worst.append(((fused.var - opt.var) / opt.var).abs().max().item())

    out = msdda.sample(
        [OracleDenoiser(task, 0), OracleDenoiser(task, 1)],
        task.scheduler,
        msdda.MSDDA(w),
        shape=(256, 2),
        dtype=torch.float64,
        num_inference_steps=50,
        seed=0,
        progress=False,
        callback=check,
    )
    assert max(worst) < 1e-9
    assert out.samples.shape == (256, 2) and torch.isfinite(out.samples).all()


def test_oracle_errors():
    with pytest.raises(OracleError, match="expected \\[D\\], \\[D\\], \\[K, D\\]"):
        GaussianTask(
            torch.zeros(2),
            torch.ones(3),
            torch.zeros(1, 2),
            torch.ones(1),
            torch.ones(1),
            GaussianTask.default().scheduler,
        )
    with pytest.raises(OracleError, match="objective 5 out of range"):
        OracleDenoiser(GaussianTask.default(), 5)


def test_oracle_policy_starts_at_the_reference_and_can_represent_the_optimum():
    """Kernel offsets reach the step optimum exactly: mean affine in x_t, variance independent of x_t."""
    from msdda.tasks.gaussian import OraclePolicy

    task = GaussianTask.default(dim=2, num_objectives=2, seed=0)
    sched = task.scheduler
    sched.set_timesteps(10)
    policy = OraclePolicy(task)
    policy.bind_schedule(sched)
    x = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for t in (int(sched.timesteps[0]), int(sched.timesteps[5]), int(sched.timesteps[-1])):
        prev = sched.prev_timestep(t)
        tt = torch.full((5,), t)
        ref = task.reference_kernel(x, t, prev)
        fresh = sched.kernel(policy(x, tt), tt, x, prev_timestep=torch.full((5,), prev))
        assert torch.allclose(fresh.mean, ref.mean, atol=1e-10) and torch.allclose(fresh.var, ref.var, rtol=1e-10)
        # the optimum's offsets in closed form: mean* = s * mean_ref + d, var* = s * var_ref
        opt = task.aligned_kernel(0, ref)
        unit = (1 - float(sched.alpha_bar(t)) / float(sched.alpha_bar(prev))) ** 0.5
        s = opt.var[0] / ref.var[0]
        # mean_ref is affine in x: mean_ref = g * x + h (fit from two points)
        g = (ref.mean[1] - ref.mean[0]) / (x[1] - x[0])
        h = ref.mean[0] - g * x[0]
        d = opt.mean[0] - s * ref.mean[0]
        with torch.no_grad():
            policy.scale[t] = (s - 1) * g / unit
            policy.shift[t] = ((s - 1) * h + d) / unit
            policy.log_var[t] = torch.log(s)
        moved = sched.kernel(policy(x, tt), tt, x, prev_timestep=torch.full((5,), prev))
        assert torch.allclose(moved.mean, opt.mean, atol=1e-9) and torch.allclose(moved.var, opt.var, rtol=1e-9)
