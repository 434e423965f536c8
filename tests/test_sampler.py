"""The sampling loop: determinism, final-step mean, guidance, step rules and their errors."""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

import msdda
from msdda import DBMPA, DBMPALS, MSDDA, KernelScheduler, KernelSchedulerConfig, SingleModel
from msdda.models import ClassifierFreeGuidance


class LinearEps(torch.nn.Module):
    """A tiny deterministic 'network': eps = a * x + b * cond + c * t/1000 (cond broadcast per sample)."""

    def __init__(self, a: float, b: float, c: float = 0.1, learned: bool = False, v: float = 0.0):
        super().__init__()
        self.a, self.b, self.c, self.learned, self.v = a, b, c, learned, v
        self.calls = 0

    def forward(self, x, t, cond=None):
        self.calls += 1
        shift = 0.0 if cond is None else self.b * cond.float().reshape(-1, *([1] * (x.dim() - 1)))
        eps = self.a * x + shift + self.c * t.float().reshape(-1, *([1] * (x.dim() - 1))) / 1000
        if self.learned:
            return torch.cat([eps, torch.full_like(eps, self.v)], dim=1)
        return eps


def _ddpm(**kw):
    return KernelScheduler(KernelSchedulerConfig(kind="ddpm", **kw))


def test_single_model_sampler_reproduces_diffusers_loop():
    model = LinearEps(0.3, 0.0)
    s = DDPMScheduler(num_train_timesteps=1000)
    s.set_timesteps(20)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 4, 4, generator=g)
    x_ref = x.clone()
    for t in s.timesteps:
        x_ref = s.step(model(x_ref, t.repeat(2)), t, x_ref, generator=g).prev_sample
    # the same generator stream: re-seed and consume x_T's draw, then the loop draws the step noise
    g2 = torch.Generator().manual_seed(0)
    torch.randn(2, 1, 4, 4, generator=g2)
    out = msdda.sample([model], s, SingleModel(), x_T=x, generator=g2, num_inference_steps=None, progress=False)
    torch.testing.assert_close(out.samples, x_ref, rtol=0, atol=1e-5)


def test_same_seed_bit_identical_and_different_seed_differs():
    models = [LinearEps(0.2, 0.1), LinearEps(-0.1, 0.3)]
    run = lambda seed: (
        msdda.sample(
            models, _ddpm(), MSDDA([0.4, 0.6]), shape=(3, 1, 4, 4), num_inference_steps=10, seed=seed, progress=False
        ).samples
    )  # noqa: E731
    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


def test_final_step_returns_the_mean_and_trajectory_and_callback():
    seen = []
    out = msdda.sample(
        [LinearEps(0.2, 0.0)],
        _ddpm(),
        SingleModel(),
        shape=(2, 1, 3, 3),
        num_inference_steps=5,
        seed=0,
        progress=False,
        return_trajectory=True,
        callback=lambda ctx, x: seen.append((ctx.timestep, ctx.prev_timestep, ctx.is_last, x)),
    )
    assert [s[0] for s in seen] == [800, 600, 400, 200, 0]
    assert seen[-1][1] == -1 and seen[-1][2]
    assert len(out.trajectory) == 6 and torch.equal(out.trajectory[-1], out.samples)
    last_ctx_x = out.trajectory[-2]
    k = _ddpm().kernel(
        LinearEps(0.2, 0.0)(last_ctx_x, torch.zeros(2, dtype=torch.long)), 0, last_ctx_x, prev_timestep=-1
    )
    torch.testing.assert_close(out.samples, k.mean, rtol=0, atol=0)
    assert out.model_evals == 5


def test_msdda_equal_variances_equals_db_mpa():
    """Fixed variance and no clipping: the mean is affine in eps, so fusing kernels = averaging eps."""
    models = [LinearEps(0.2, 0.1), LinearEps(-0.1, 0.3), LinearEps(0.05, -0.2)]
    w = [0.2, 0.3, 0.5]
    s = _ddpm(clip_sample=False)
    a = msdda.sample(models, s, MSDDA(w), shape=(2, 1, 4, 4), num_inference_steps=10, seed=3, progress=False)
    b = msdda.sample(models, s, DBMPA(w), shape=(2, 1, 4, 4), num_inference_steps=10, seed=3, progress=False)
    torch.testing.assert_close(a.samples, b.samples, rtol=1e-5, atol=1e-5)


def test_msdda_with_learned_variances_differs_from_db_mpa():
    models = [LinearEps(0.2, 0.1, learned=True, v=-0.8), LinearEps(-0.1, 0.3, learned=True, v=0.8)]
    s = _ddpm(clip_sample=False, variance_type="learned_range")
    a = msdda.sample(models, s, MSDDA([0.5, 0.5]), shape=(2, 1, 4, 4), num_inference_steps=10, seed=3, progress=False)
    b = msdda.sample(models, s, DBMPA([0.5, 0.5]), shape=(2, 1, 4, 4), num_inference_steps=10, seed=3, progress=False)
    assert (a.samples - b.samples).abs().max() > 1e-3


def test_one_hot_msdda_equals_single_model():
    models = [LinearEps(0.2, 0.1, learned=True, v=-0.5), LinearEps(-0.1, 0.3, learned=True, v=0.5)]
    s = _ddpm(variance_type="learned_range")
    a = msdda.sample(models, s, MSDDA([0.0, 1.0]), shape=(2, 1, 4, 4), num_inference_steps=8, seed=4, progress=False)
    b = msdda.sample(models, s, SingleModel(1), shape=(2, 1, 4, 4), num_inference_steps=8, seed=4, progress=False)
    assert torch.equal(a.samples, b.samples)


def test_reference_is_evaluated_only_when_exponents_leave_it_weight():
    ref = LinearEps(0.0, 0.0)
    m = LinearEps(0.3, 0.0)
    out = msdda.sample(
        [m], _ddpm(), MSDDA([0.5]), reference=ref, shape=(1, 1, 2, 2), num_inference_steps=4, seed=0, progress=False
    )
    assert ref.calls == 4 and out.model_evals == 8
    ref.calls = 0
    msdda.sample(
        [m], _ddpm(), MSDDA([1.0]), reference=ref, shape=(1, 1, 2, 2), num_inference_steps=4, seed=0, progress=False
    )
    assert ref.calls == 0


def test_cfg_batched_equals_two_passes_and_counts_evals():
    net = LinearEps(0.2, 0.5, learned=True, v=0.3)
    x = torch.randn(3, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    t = torch.full((3,), 100)
    cond = torch.tensor([1, 2, 3])
    batched = ClassifierFreeGuidance(net, 3.0, torch.tensor([0]))(x, t, cond)
    eps_c, eps_u = net(x, t, cond)[:, :1], net(x, t, torch.zeros(3, dtype=torch.long))[:, :1]
    torch.testing.assert_close(batched[:, :1], eps_u + 3.0 * (eps_c - eps_u), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(batched[:, 1:], torch.full_like(eps_c, 0.3))
    out = msdda.sample(
        [net, net],
        _ddpm(variance_type="learned_range"),
        MSDDA([0.5, 0.5]),
        shape=(3, 1, 2, 2),
        cond=cond,
        guidance_scale=2.0,
        null_cond=torch.tensor([0]),
        num_inference_steps=3,
        seed=0,
        progress=False,
    )
    assert out.model_evals == 2 * 2 * 3


def test_diffusers_ddim_eta_zero_is_deterministic_given_x_T():
    s = DDIMScheduler()
    x = torch.randn(2, 1, 3, 3, generator=torch.Generator().manual_seed(0))
    a = msdda.sample([LinearEps(0.1, 0.0)], s, SingleModel(), x_T=x, seed=1, num_inference_steps=6, progress=False)
    b = msdda.sample([LinearEps(0.1, 0.0)], s, SingleModel(), x_T=x, seed=2, num_inference_steps=6, progress=False)
    assert torch.equal(a.samples, b.samples)


def test_db_mpa_ls_picks_models_from_the_generator():
    models = [LinearEps(0.2, 0.0), LinearEps(-0.2, 0.0)]
    chosen = []
    cb = lambda ctx, x: chosen.append(ctx.info["chosen_model"])  # noqa: E731
    msdda.sample(
        models,
        _ddpm(),
        DBMPALS([0.25, 0.75]),
        shape=(1, 1, 2, 2),
        num_inference_steps=200,
        seed=0,
        progress=False,
        callback=cb,
    )
    assert 0.6 < sum(chosen) / len(chosen) < 0.9
    chosen2 = []
    msdda.sample(
        models,
        _ddpm(),
        DBMPALS([0.25, 0.75]),
        shape=(1, 1, 2, 2),
        num_inference_steps=200,
        seed=0,
        progress=False,
        callback=lambda ctx, x: chosen2.append(ctx.info["chosen_model"]),
    )
    assert chosen == chosen2


@pytest.mark.parametrize(
    ("call", "pattern"),
    [
        (lambda m: msdda.sample([], _ddpm(), SingleModel(), shape=(1, 1, 2, 2)), "no models given"),
        (lambda m: msdda.sample([m], _ddpm(), MSDDA([0.5, 0.5]), shape=(1, 1, 2, 2)), "MSDDA: 2 weights for 1 models"),
        (lambda m: msdda.sample([m], _ddpm(), MSDDA([0.5]), shape=(1, 1, 2, 2)), "pass `reference=`"),
        (lambda m: msdda.sample([m], _ddpm(), SingleModel(3), shape=(1, 1, 2, 2)), "index 3 out of range for 1"),
        (lambda m: msdda.sample([m], _ddpm(), SingleModel()), "pass `shape` or `x_T`"),
        (lambda m: msdda.sample([m], _ddpm(), SingleModel(), shape=(1, 1, 2, 2), guidance_scale=2.0), "needs `cond`"),
        (
            lambda m: msdda.sample(
                [m], _ddpm(), SingleModel(), shape=(1, 1, 2, 2), seed=1, generator=torch.Generator()
            ),
            "not both",
        ),
        (lambda m: DBMPALS([0.5, -0.5]), "must be >= 0"),
        (lambda m: MSDDA([float("inf")]), "weight 0 is inf"),
        (lambda m: msdda.sample([42], _ddpm(), SingleModel(), shape=(1, 1, 2, 2)), "int is not callable"),
    ],
)
def test_sampler_errors(call, pattern):
    with pytest.raises(msdda.MSDDAError, match=pattern):
        call(LinearEps(0.1, 0.0))


# ----- hooks: noise source, final step, step callback, the kernel on the context ---------------------------
class CountingNoise(msdda.sampling.GaussianNoise):
    """The default draws, counted: a custom noise source changes nothing but where z comes from."""

    def __init__(self):
        self.draws = 0

    def randn(self, shape, generator, device, dtype):
        self.draws += 1
        return super().randn(shape, generator, device, dtype)


def test_a_noise_source_is_the_only_randomness_and_the_default_is_torch_randn():
    kw = dict(shape=(3, 1, 2, 2), num_inference_steps=6, seed=4, progress=False)
    plain = msdda.sample([LinearEps(0.2, 0.0)], _ddpm(), SingleModel(), **kw)
    noise = CountingNoise()
    counted = msdda.sample([LinearEps(0.2, 0.0)], _ddpm(), SingleModel(), noise=noise, **kw)
    assert torch.equal(plain.samples, counted.samples)
    assert noise.draws == 1 + 5  # x_T, then every step but the last (which returns the mean)

    class Zeros(msdda.sampling.GaussianNoise):
        def randn(self, shape, generator, device, dtype):
            return torch.zeros(shape, device=device, dtype=dtype)

    x_T = torch.randn(3, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    zero = msdda.sample([LinearEps(0.2, 0.0)], _ddpm(), SingleModel(), x_T=x_T, noise=Zeros(), **{**kw, "shape": None})
    means = msdda.sample(
        [LinearEps(0.2, 0.0)],
        _ddpm(),
        SingleModel(),
        x_T=x_T,
        callback=lambda ctx, x: ctx.kernel.mean,  # replace every draw by its kernel's mean
        **{**kw, "shape": None},
    )
    assert torch.equal(zero.samples, means.samples)


def test_final_step_sample_draws_once_more():
    kw = dict(shape=(2, 1, 2, 2), num_inference_steps=4, seed=0, progress=False)
    noise = CountingNoise()
    mean = msdda.sample([LinearEps(0.2, 0.0)], _ddpm(variance_type="fixed_large"), SingleModel(), **kw)
    drawn = msdda.sample(
        [LinearEps(0.2, 0.0)], _ddpm(variance_type="fixed_large"), SingleModel(), noise=noise, final_step="sample", **kw
    )
    assert noise.draws == 1 + 4 and not torch.equal(mean.samples, drawn.samples)
    with pytest.raises(msdda.StepRuleError, match="final_step='last'"):
        msdda.sample([LinearEps(0.2, 0.0)], _ddpm(), SingleModel(), final_step="last", **kw)


def test_callback_sees_the_rules_kernel_can_replace_x_and_stop():
    seen = []

    def callback(ctx, x):
        seen.append((ctx.index, ctx.kernel))
        if ctx.index == 2:
            ctx.stop = True
        return torch.zeros_like(x) if ctx.index == 1 else None

    rule = MSDDA([0.5, 0.5])
    out = msdda.sample(
        [LinearEps(0.2, 0.0, learned=True, v=-0.5), LinearEps(-0.1, 0.0, learned=True, v=0.5)],
        _ddpm(variance_type="learned_range"),
        rule,
        shape=(2, 1, 2, 2),
        num_inference_steps=10,
        seed=0,
        progress=False,
        return_trajectory=True,
    )
    stopped = msdda.sample(
        [LinearEps(0.2, 0.0, learned=True, v=-0.5), LinearEps(-0.1, 0.0, learned=True, v=0.5)],
        _ddpm(variance_type="learned_range"),
        rule,
        shape=(2, 1, 2, 2),
        num_inference_steps=10,
        seed=0,
        progress=False,
        callback=callback,
        return_trajectory=True,
    )
    assert [i for i, _ in seen] == [0, 1, 2] and stopped.interrupted and stopped.steps_run == 3
    assert out.steps_run == 10 and not out.interrupted
    assert torch.equal(stopped.trajectory[2], torch.zeros(2, 1, 2, 2))  # step 1's sample was replaced
    assert torch.equal(stopped.trajectory[1], out.trajectory[1])
    # the kernel on the context is the one the rule fused (per-element variance here)
    assert seen[0][1].var.shape == (2, 1, 2, 2)
    with pytest.raises(msdda.StepRuleError, match="the step callback returned"):
        msdda.sample(
            [LinearEps(0.2, 0.0)], _ddpm(), SingleModel(), shape=(2, 2), progress=False, callback=lambda c, x: x[:1]
        )


def test_sampler_refuses_inputs_that_would_fail_deep_inside_torch():
    m = [LinearEps(0.2, 0.0)]
    cases = [
        (dict(shape=(2, 2), dtype=torch.int64), "dtype=torch.int64"),
        (dict(shape=(0, 2)), r"shape=\(0, 2\)"),
        (dict(shape=(2, 2), x_T=torch.zeros(3, 2)), r"shape=\(2, 2\) but x_T has shape \(3, 2\)"),
        (dict(shape=(2, 2), guidance_scale=float("nan"), cond=torch.zeros(2)), "guidance_scale=nan"),
        (dict(shape=(2, 2), num_inference_steps=0), "num_inference_steps=0"),
        (dict(shape=(2, 2), device="nonsense"), "device='nonsense'"),
        (dict(shape=("a", 2)), "shape="),
    ]
    if not torch.cuda.is_available():
        cases.append((dict(shape=(2, 2), device="cuda"), "no usable CUDA"))
    for kw, pattern in cases:
        with pytest.raises(msdda.StepRuleError, match=pattern):
            msdda.sample(m, _ddpm(), SingleModel(), progress=False, **kw)
    with pytest.raises(msdda.StepRuleError, match="is not a step rule"):
        msdda.sample(m, _ddpm(), "msdda", shape=(2, 2))
    with pytest.raises(msdda.StepRuleError, match="sum to 0.4"):
        DBMPA([0.2, 0.2])


# ----- rules that select their models: DB-MPA-LS evaluates only the model it drew ---------------------------
class _AllModelsLS(msdda.sampling.StepRuleBase):
    """DB-MPA-LS as it ran before rules could select: every model (and the reference) evaluated at every step,
    the draw made inside the rule call. The reference implementation the selecting rule must reproduce."""

    name = "db-mpa-ls-all"

    def __init__(self, weights, reference_weight=0.0):
        self.weights, self.reference_weight = list(weights), float(reference_weight)
        self.uses_reference = self.reference_weight != 0.0

    def check(self, num_models):
        pass

    def select(self, ctx):
        return None  # every model, the reference too

    def __call__(self, ctx):
        w = [*self.weights, self.reference_weight] if self.uses_reference else self.weights
        probs = torch.tensor(w, dtype=torch.float64, device=ctx.generator.device)
        choice = int(torch.multinomial(probs, 1, generator=ctx.generator).item())
        ctx.info["chosen_model"] = choice
        return ctx.reference_kernel if choice == len(self.weights) else ctx.kernels[choice]


def _ls_models():
    return [LinearEps(0.2, 0.1), LinearEps(-0.1, 0.3), LinearEps(0.05, -0.2)]


_LS_CASES = {
    # (rule args, reference?, guidance?): samples and draws pinned from the all-models implementation
    "reference": (
        ([0.2, 0.3, 0.1], 0.4),
        True,
        False,
        [3, 2, 3, 3, 0, 3, 0, 2, 2, 3, 3, 2],
        [-0.9425147175788879, 1.0, -0.8462291359901428, 0.5017518997192383, -0.9983336329460144, 1.0,
         -0.9613820910453796, -1.0],
    ),
    "cfg": (
        ([0.2, 0.3, 0.5], 0.0),
        False,
        True,
        [2, 2, 2, 2, 2, 0, 1, 1, 0, 2, 2, 2],
        [-0.8717457056045532, 0.3244854509830475, 0.8409122228622437, -0.4454335570335388, -0.26906073093414307,
         -0.8215319514274597, -0.4274783134460449, -0.743184506893158],
    ),
}


def _ls_run(rule, models, reference, guided, seen=None):
    kw = dict(cond=torch.tensor([1, 2]), guidance_scale=2.0, null_cond=torch.tensor([0])) if guided else {}
    seen = [] if seen is None else seen
    out = msdda.sample(
        models,
        _ddpm(),
        rule,
        reference=reference,
        shape=(2, 1, 2, 2),
        num_inference_steps=12,
        seed=5,
        progress=False,
        callback=lambda ctx, x: seen.append(ctx),
        **kw,
    )
    return out, seen


@pytest.mark.parametrize("case", list(_LS_CASES))
def test_db_mpa_ls_evaluates_only_the_drawn_model_with_the_same_samples(case):
    (weights, ref_w), with_ref, guided, pinned_choices, pinned = _LS_CASES[case]
    models, ref = _ls_models(), LinearEps(0.0, 0.0) if with_ref else None
    out, seen = _ls_run(DBMPALS(weights, reference_weight=ref_w), models, ref, guided)
    old_models, old_ref = _ls_models(), LinearEps(0.0, 0.0) if with_ref else None
    old, _ = _ls_run(_AllModelsLS(weights, ref_w), old_models, old_ref, guided)
    choices = [c.info["chosen_model"] for c in seen]
    assert choices == pinned_choices
    assert torch.equal(out.samples, old.samples)
    assert torch.equal(out.samples.flatten(), torch.tensor(pinned))
    per_call = 2 if guided else 1
    # one model per step (the reference counts when it is the one drawn), instead of K (+1) per step
    assert out.model_evals == per_call * 12
    assert old.model_evals == per_call * 12 * (len(models) + with_ref)
    for k, m in enumerate(models):
        assert m.calls == choices.count(k)  # a guided call is one forward on the 2B batch
    if with_ref:
        assert ref.calls == choices.count(len(weights)) and old_ref.calls == 12
    for ctx, choice in zip(seen, choices, strict=True):
        drawn_ref = choice == len(weights)
        assert ctx.selected == ((None,) if drawn_ref else (choice,))
        assert (ctx.reference_kernel is not None) == drawn_ref
        assert [k is not None for k in ctx.kernels] == [k == choice for k in range(len(models))]


def test_db_mpa_ls_without_select_draws_in_the_call():
    """A caller that builds its own context (every slot filled) gets the same draw from the same stream."""
    models = _ls_models()
    s = _ddpm()
    s.set_timesteps(4)
    x = torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    t = int(s.timesteps[0])
    kernels = [s.kernel(m(x, torch.full((2,), t)), t, x, prev_timestep=s.prev_timestep(t)) for m in models]
    ctx = lambda: msdda.sampling.StepContext(  # noqa: E731
        x, t, s.prev_timestep(t), 0, False, [None] * 3, kernels, s, torch.Generator().manual_seed(3)
    )
    a, b = ctx(), ctx()
    rule = DBMPALS([0.2, 0.3, 0.5])
    k = rule(a)
    assert k is kernels[a.info["chosen_model"]]
    assert rule.select(b) == [a.info["chosen_model"]]


def test_select_results_are_checked():
    class Bad(msdda.sampling.StepRuleBase):
        name, uses_reference = "bad", False

        def __init__(self, picked):
            self.picked = picked

        def check(self, num_models):
            pass

        def select(self, ctx):
            return self.picked

        def __call__(self, ctx):
            return ctx.kernels[0]

    kw = dict(shape=(1, 1, 2, 2), num_inference_steps=2, progress=False)
    for picked, pattern in [(3, "returned 3"), ([5], "model index 5"), ([True], "model index True")]:
        with pytest.raises(msdda.StepRuleError, match=pattern):
            msdda.sample([LinearEps(0.1, 0.0)], _ddpm(), Bad(picked), **kw)
    with pytest.raises(msdda.StepRuleError, match="selected the reference"):
        msdda.sample([LinearEps(0.1, 0.0)], _ddpm(), Bad([None]), **kw)
    out = msdda.sample([LinearEps(0.1, 0.0), LinearEps(0.2, 0.0)], _ddpm(), Bad([0, 0]), **kw)
    assert out.model_evals == 2  # duplicates are evaluated once


def test_generator_list_draws_each_sample_from_its_own_generator():
    """Sample b of a batched run with generators [g_0, ..., g_B-1] equals a single run with g_b (x_T and every
    step's noise per sample); a wrong-length or malformed list fails before any model runs."""
    seeds = [3, 11, 5]
    kw = dict(num_inference_steps=5, progress=False, final_step="sample")
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    batched = msdda.sample([LinearEps(0.2, 0.0)], _ddpm(), SingleModel(), shape=(3, 1, 2, 2), generator=gens, **kw)
    for b, s in enumerate(seeds):
        single = msdda.sample([LinearEps(0.2, 0.0)], _ddpm(), SingleModel(), shape=(1, 1, 2, 2), seed=s, **kw)
        assert torch.allclose(batched.samples[b : b + 1], single.samples, atol=1e-6)
    assert not torch.allclose(batched.samples[0], batched.samples[1])
    # a list of one generator is the single-generator path
    one = msdda.sample([LinearEps(0.2, 0.0)], _ddpm(), SingleModel(), shape=(1, 1, 2, 2), seed=3, **kw)
    listed = msdda.sample(
        [LinearEps(0.2, 0.0)],
        _ddpm(),
        SingleModel(),
        shape=(1, 1, 2, 2),
        generator=[torch.Generator().manual_seed(3)],
        **kw,
    )
    assert torch.equal(one.samples, listed.samples)
    # DB-MPA-LS's model choice comes from the first generator: sample 0 equals its single run
    models = [LinearEps(0.2, 0.0), LinearEps(-0.2, 0.0)]
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    ls = msdda.sample(models, _ddpm(), DBMPALS([0.5, 0.5]), shape=(3, 1, 2, 2), generator=gens, **kw)
    ls0 = msdda.sample(models, _ddpm(), DBMPALS([0.5, 0.5]), shape=(1, 1, 2, 2), seed=3, **kw)
    assert torch.allclose(ls.samples[:1], ls0.samples, atol=1e-6)
    model = LinearEps(0.2, 0.0)
    for generator, pattern in (
        ([torch.Generator()] * 2, "2 generators for a batch of 3"),
        ([], "generator list is empty"),
        ([torch.Generator(), 7], r"holds \['int'\]"),
        ("seed", "generator is a str"),
    ):
        with pytest.raises(msdda.MSDDAError, match=pattern):
            msdda.sample([model], _ddpm(), SingleModel(), shape=(3, 1, 2, 2), generator=generator, **kw)
    assert model.calls == 0
