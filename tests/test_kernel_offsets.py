"""Kernel offsets: a parametrisation of aligned models that reaches any Gaussian kernel (MSDDA.md §5)."""

import dataclasses

import pytest
import torch

from msdda import KernelScheduler, KernelSchedulerConfig
from msdda.models import ClassifierFreeGuidance
from msdda.tasks.digits.network import DigitsDenoiser, DigitsDenoiserConfig, with_kernel_offsets


def _sched(**kw):
    s = KernelScheduler(KernelSchedulerConfig(**kw))
    s.set_timesteps(20)
    return s


@pytest.mark.parametrize(
    "cfg",
    [dict(kind="ddpm", variance_type="learned_range"), dict(kind="ddpm"), dict(kind="ddim", eta=0.5)],
)
def test_offsets_move_mean_and_variance_by_the_documented_formula(cfg):
    s = _sched(**cfg)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 4, 4, generator=g)
    base_channels = 4 if cfg.get("variance_type") == "learned_range" else 2
    base_out = torch.randn(3, base_channels, 4, 4, generator=g).clamp(-0.9, 0.9)
    d = torch.randn(3, 4, 4, 4, generator=g) * 0.3
    for t in (int(s.timesteps[0]), int(s.timesteps[10]), int(s.timesteps[-1])):
        plain = s.kernel(base_out, t, x)
        zero = s.kernel(torch.cat([base_out, torch.zeros_like(d)], 1), t, x)
        assert torch.allclose(zero.mean, plain.mean, atol=0) and torch.allclose(
            zero.var, torch.broadcast_to(plain.var, zero.var.shape), atol=0
        )
        moved = s.kernel(torch.cat([base_out, d], 1), t, x)
        v = torch.broadcast_to(plain.var, plain.mean.shape)
        assert torch.allclose(moved.mean, plain.mean + v * d[:, :2], atol=1e-6)
        assert torch.allclose(moved.var, v * torch.exp(v * d[:, 2:]), rtol=1e-5)
        assert torch.equal(moved.pred_original_sample, plain.pred_original_sample)


def test_offsets_pass_x0_clipping():
    """With clip_sample the scheduler's mean is capped at |x0| <= 1; an offset is not."""
    s = _sched(kind="ddpm", variance_type="learned_range", clip_sample=True)
    x = torch.zeros(1, 1, 2, 2)
    t = int(s.timesteps[0])
    huge = torch.full((1, 1, 2, 2), -50.0)  # eps far out: x0_hat is clipped to +1
    capped = s.kernel(torch.cat([huge, torch.zeros(1, 1, 2, 2)], 1), t, x).mean
    more = s.kernel(torch.cat([huge * 10, torch.zeros(1, 1, 2, 2)], 1), t, x).mean
    assert torch.equal(capped, more)  # the cap binds
    moved = s.kernel(
        torch.cat([huge, torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2), torch.zeros(1, 1, 2, 2)], 1), t, x
    )
    assert (moved.mean > capped).all()


def test_guidance_guides_the_prediction_and_keeps_the_conditional_offsets():
    class Net(torch.nn.Module):
        def forward(self, x, t, cond):
            c = cond.float().reshape(-1, 1, 1, 1)
            return torch.cat([x * 0 + c, x * 0 + 2 * c, x * 0 + 3 * c], dim=1)

    guided = ClassifierFreeGuidance(Net(), 3.0, torch.tensor([0]))(
        torch.zeros(2, 1, 2, 2), torch.tensor([5, 5]), torch.tensor([1, 1])
    )
    assert torch.equal(guided[:, 0], torch.full((2, 2, 2), 3.0))  # 0 + 3 * (1 - 0)
    assert torch.equal(guided[:, 1:], torch.cat([torch.full((2, 1, 2, 2), 2.0), torch.full((2, 1, 2, 2), 3.0)], 1))


def test_digits_model_with_a_fresh_offset_head_has_the_base_kernel():
    torch.manual_seed(0)
    base = DigitsDenoiser(DigitsDenoiserConfig(base_channels=8, channel_mult=(1, 2), num_groups=4)).double()
    for p in base.parameters():
        torch.nn.init.normal_(p, std=0.05)
    aligned = with_kernel_offsets(base)
    assert aligned.config.kernel_offsets and aligned.config.out_channels == 4
    x, t, c = torch.randn(3, 1, 8, 8, dtype=torch.float64), torch.tensor([900, 500, 20]), torch.tensor([1, 2, 3])
    s = _sched(kind="ddpm", variance_type="learned_range")
    k_base = s.kernel(base(x, t, c), t, x, prev_timestep=t - 50)
    k_aligned = s.kernel(aligned(x, t, c), t, x, prev_timestep=t - 50)
    assert torch.equal(k_base.mean, k_aligned.mean) and torch.equal(k_base.var, k_aligned.var)
    assert set(base.state_dict()) < set(aligned.state_dict())
    assert all(k.startswith("offset_head.") for k in aligned.state_dict() if k not in base.state_dict())


def test_db_mpa_blends_a_model_without_offsets_as_one_with_zero_offsets():
    """DB-MPA averages raw outputs; a plain model beside offset models counts as zero offsets (its own kernel)."""
    from msdda.sampling import DBMPA
    from msdda.sampling.rules import StepContext, StepRuleError

    s = _sched(kind="ddpm", variance_type="learned_range")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64)
    plain = torch.randn(2, 2, 4, 4, generator=g, dtype=torch.float64).clamp(-0.9, 0.9)
    offset = torch.cat([plain.flip(0), 0.3 * torch.randn(2, 2, 4, 4, generator=g, dtype=torch.float64)], 1)
    t = int(s.timesteps[5])
    prev = int(s.timesteps[6])

    def ctx(outputs):
        return StepContext(x, t, prev, 5, False, outputs, [], s, None)

    got = DBMPA([0.25, 0.75])(ctx([plain, offset]))
    padded = torch.cat([plain, torch.zeros_like(plain)], 1)
    want = s.kernel(0.25 * padded + 0.75 * offset, t, x, prev_timestep=prev)
    assert torch.equal(got.mean, want.mean) and torch.equal(got.var, want.var)
    eps_only = plain[:, :1]  # 1 channel beside 4: not the offset layout of the other, so not padded
    with pytest.raises(StepRuleError, match=r"shapes \[\(2, 1, 4, 4\), \(2, 4, 4, 4\)\]"):
        DBMPA([0.5, 0.5])(ctx([eps_only, offset]))


def test_offset_heads_per_timestep_range_route_each_sample_by_its_t():
    from msdda.tasks.digits.data import DigitsTaskError

    torch.manual_seed(0)
    base = DigitsDenoiser(DigitsDenoiserConfig(base_channels=8, channel_mult=(1, 2), num_groups=4)).double()
    ranged = with_kernel_offsets(base, (200, 600))
    assert ranged.config.offset_head_ranges == (200, 600) and len(ranged.offset_head.heads) == 3
    x = torch.randn(5, 1, 8, 8, dtype=torch.float64)
    t, c = torch.tensor([100, 199, 200, 599, 980]), torch.tensor([1, 2, 3, 4, 10])
    assert torch.equal(ranged(x, t, c)[:, :2], base(x, t, c)) and not ranged(x, t, c)[:, 2:].any()  # fresh: zero
    for p in ranged.offset_head.parameters():
        torch.nn.init.normal_(p, std=0.1)
    out = ranged(x, t, c)[:, 2:]
    # each sample gets the head of its range (t < 200, 200-599, >= 600), whatever else is in the batch
    for i, head in enumerate([0, 0, 1, 1, 2]):
        single = DigitsDenoiser(dataclasses.replace(ranged.config, offset_head_ranges=()))
        single = single.double()
        state = {k: v for k, v in ranged.state_dict().items() if not k.startswith("offset_head.")}
        state.update({
            k.replace(f"offset_head.heads.{head}.", "offset_head."): v
            for k, v in ranged.state_dict().items()
            if k.startswith(f"offset_head.heads.{head}.")
        })
        single.load_state_dict(state)
        assert torch.allclose(single(x[i : i + 1], t[i : i + 1], c[i : i + 1])[:, 2:], out[i : i + 1], atol=1e-12)
    for bad in ((600, 200), (0, 600), (200, 200)):
        with pytest.raises(DigitsTaskError, match="offset_head_ranges"):
            DigitsDenoiserConfig(kernel_offsets=True, offset_head_ranges=bad)
    with pytest.raises(DigitsTaskError, match="kernel_offsets=True"):
        DigitsDenoiserConfig(offset_head_ranges=(200,))


def test_offset_head_x0_input_is_the_schedules_clipped_tweedie_estimate():
    from msdda.alignment.diffusion import training_scheduler_config
    from msdda.tasks.digits.data import DigitsTaskError

    torch.manual_seed(0)
    base = DigitsDenoiser(DigitsDenoiserConfig(base_channels=8, channel_mult=(1, 2), num_groups=4)).double()
    for p in base.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x, t, c = torch.randn(4, 1, 8, 8, dtype=torch.float64), torch.tensor([980, 450, 120, 3]), torch.tensor([1, 2, 3, 10])
    ranged = with_kernel_offsets(base, (200, 600), x0_input=True)
    assert ranged.config.offset_head_x0 and ranged.config.offset_head_ranges == (200, 600)
    out = ranged(x, t, c)
    assert torch.equal(out[:, :2], base(x, t, c)) and not out[:, 2:].any()  # a fresh head: the base kernel
    model = with_kernel_offsets(base, x0_input=True)  # one head: its input rows are the batch's, in order
    seen = []
    model.offset_head.register_forward_hook(lambda mod, args, res: seen.append(args[1][:, -1:].detach()))
    model(x, t, c)
    sched = KernelScheduler(training_scheduler_config())
    expected = sched.predict_x0(base(x, t, c)[:, :1], t, x).clamp(-1, 1)  # the estimate the step reward scores
    assert torch.allclose(seen[0], expected, atol=1e-10)
    assert "x0_coefs" not in model.state_dict()  # rebuilt from the schedule, not saved
    with pytest.raises(DigitsTaskError, match="offset_head_x0"):
        DigitsDenoiserConfig(offset_head_x0=True)
