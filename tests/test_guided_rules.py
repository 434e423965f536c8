"""CoDe and RGG on the analytic oracle: exact gradient shifts, best-of-N selection, costs and errors."""

import pytest
import torch

import msdda
from msdda.sampling import RGG, CoDe, SingleModel, StepRuleError
from msdda.tasks.gaussian import GaussianTask, OracleDenoiser

TASK = GaussianTask.default(dim=2, num_objectives=2, seed=0)


def reward(k):
    def r(x0, cond=None):
        return TASK.step_reward(k, x0)

    return r


REWARDS = [reward(0), reward(1)]


def run(rule, seed=0, n=64, steps=20, callback=None):
    return msdda.sample([OracleDenoiser(TASK, None)], TASK.scheduler, rule, shape=(n, 2), dtype=torch.float64,
                        num_inference_steps=steps, seed=seed, progress=False, callback=callback)


def test_rgg_with_zero_scale_equals_base():
    assert torch.equal(run(RGG(REWARDS, [0.5, 0.5], scale=0.0)).samples, run(SingleModel()).samples)


def test_rgg_shift_is_lambda_var_grad_by_finite_differences():
    rule = RGG(REWARDS, [0.3, 0.7], scale=0.5, tempering="sqrt_alpha_bar")
    checked = []

    def check(ctx, x):
        if ctx.is_last or len(checked) >= 3:
            return
        base = ctx.kernels[0]
        shifted = rule(ctx)
        xt = ctx.x_t[:2].clone()
        net = OracleDenoiser(TASK, None)

        def scal(x):
            out = net(x, torch.full((x.shape[0],), ctx.timestep), None)
            x0 = TASK.scheduler.predict_x0(out, ctx.timestep, x)
            return 0.3 * TASK.step_reward(0, x0) + 0.7 * TASK.step_reward(1, x0)

        h = 1e-6
        fd = torch.stack([(scal(xt + h * e) - scal(xt - h * e)) / (2 * h) for e in torch.eye(2, dtype=torch.float64)], 1)
        lam = 0.5 * float(TASK.scheduler.alpha_bar(ctx.timestep)) ** 0.5
        torch.testing.assert_close(shifted.mean[:2], base.mean[:2] + lam * base.var[:2] * fd, rtol=1e-6, atol=1e-8)
        checked.append(True)

    run(rule, callback=check)
    assert len(checked) == 3


def test_rgg_raises_reward_and_counts_gradients():
    w = [0.0, 1.0]
    base = run(SingleModel(), n=512)
    guided = run(RGG(REWARDS, w, scale=2.0, tempering="constant"), n=512)
    assert TASK.step_reward(1, guided.samples).mean() > TASK.step_reward(1, base.samples).mean() + 0.2
    assert guided.cost.reward_grads == 20  # one non-zero weight x 20 steps
    assert guided.cost.model_evals == 40  # the kernel's forward plus the one with gradients, each step


def test_code_with_one_candidate_equals_base():
    assert torch.equal(run(CoDe(REWARDS, [0.5, 0.5], num_candidates=1, block_size=2)).samples, run(SingleModel()).samples)


def test_code_keeps_the_best_candidate_and_counts_costs():
    rule = CoDe(REWARDS, [0.2, 0.8], num_candidates=4, block_size=5)
    seen = []
    out = run(rule, n=256, callback=lambda ctx, x: seen.append(("code_best" in ctx.info, ctx.index)))
    assert [i for flag, i in seen if flag] == [4, 9, 14]  # block ends, the last step returns the mean
    assert out.cost.reward_evals == 3 * 4 * 2
    assert out.cost.model_evals == 20 + 3 * 4
    base = run(SingleModel(), n=256)
    score = lambda x: 0.2 * TASK.step_reward(0, x) + 0.8 * TASK.step_reward(1, x)
    assert score(out.samples).mean() > score(base.samples).mean()


def test_code_draw_picks_argmax_per_sample():
    from msdda.core.kernel import GaussianKernel
    from msdda.sampling import Cost, StepContext

    rule = CoDe(REWARDS, [1.0, 0.0], num_candidates=3, block_size=1)
    s = TASK.scheduler
    s.set_timesteps(10)
    t, prev = int(s.timesteps[3]), int(s.timesteps[4])
    net = OracleDenoiser(TASK, None)
    x_t = torch.randn(8, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    kernel = GaussianKernel(torch.zeros(8, 2, dtype=torch.float64), torch.tensor(4.0, dtype=torch.float64))

    def evaluate(index, x, timestep):
        return net(x, torch.full((x.shape[0],), timestep), None)

    ctx = StepContext(x_t=x_t, timestep=t, prev_timestep=prev, index=0, is_last=False, outputs=[], kernels=[],
                      scheduler=s, generator=torch.Generator().manual_seed(5), evaluate=evaluate, cost=Cost())
    chosen = rule.draw(ctx, kernel)
    g = torch.Generator().manual_seed(5)
    cands = [kernel.sample(g) for _ in range(3)]
    scores = torch.stack([TASK.step_reward(0, s.predict_x0(evaluate(0, c, prev), prev, c)) for c in cands])
    expected = torch.stack(cands)[scores.argmax(0), torch.arange(8)]
    assert torch.equal(chosen, expected)
    assert len(set(scores.argmax(0).tolist())) > 1  # the choice really is per sample


class NonDiff:
    name = "count-ones"
    differentiable = False

    def __call__(self, x0, cond=None):
        return (x0 > 0).float().sum(-1)


@pytest.mark.parametrize(
    ("make", "pattern"),
    [
        (lambda: RGG([NonDiff()], [1.0]), "RGG needs differentiable rewards; 'count-ones' is not"),
        (lambda: CoDe(REWARDS, [0.5, 0.5], num_candidates=0), "num_candidates=0; it must be an integer >= 1"),
        (lambda: CoDe(REWARDS, [0.5, 0.5], block_size=0), "block_size=0"),
        (lambda: CoDe(REWARDS, [1.0]), "2 rewards but 1 weights"),
        (lambda: RGG(REWARDS, [0.5, 0.5], tempering="cosine"), "tempering='cosine'"),
        (lambda: RGG(REWARDS, [0.5, 0.5], scale=-1.0), "scale=-1.0"),
        (lambda: run(RGG(REWARDS, [0.5, 0.5], model=3)), "model index 3 out of range"),
    ],
)
def test_guided_rule_errors(make, pattern):
    with pytest.raises(StepRuleError, match=pattern):
        make()
