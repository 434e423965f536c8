"""The step trainers on flow matching (flow_sde, Flow-GRPO's SDE step): a Gaussian data toy where the step
optimum is known in closed form.

Data x0 ~ N(MU, S0^2 I) in D = 3 dimensions; the reference is the exact velocity E[z - x0 | x_sigma] of
x_sigma = (1 - sigma) x0 + sigma z. Its kernel at a state is N(m, var I) with m = c_x x + c_v v_ref and var
fixed by the schedule (Flow-GRPO's step, written out below from the sigma table). For the linear step reward
r(x_prev) = C . x_prev the step optimum p_ref exp(r / beta) / Z is N(m + var C / beta, var): the mean shifted by
var C / beta. The policy adds a learnable per-timestep offset delta_i to the velocity, which moves the mean by
c_v(i) delta_i, so the optimum is delta_i* = var_i C / (beta c_v(i)) at every trained step i (all but the
last, where the sampler returns the mean and no state is drawn).
"""

import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from torch import nn

from msdda.alignment import AlignmentError, StepRLConfig, StepRLTrainer
from msdda.core import as_kernel_scheduler

MU = torch.tensor([0.5, -0.3, 0.2], dtype=torch.float64)
S0 = 0.6
C = torch.tensor([0.4, -0.8, 0.2], dtype=torch.float64)
BETA, ETA, STEPS = 0.5, 0.7, 6


class ExactVelocity(nn.Module):
    """E[z - x0 | x_sigma] for Gaussian data; sigma = t / 1000 (t must be a float: the fractional timesteps)."""

    def forward(self, x, t, cond=None):
        assert t.is_floating_point(), t.dtype  # the trainer keeps flow timesteps fractional
        s = (t.double() / 1000).reshape(-1, 1)
        var = (1 - s) ** 2 * S0**2 + s**2  # Var x_sigma per element
        r = x - (1 - s) * MU
        return s / var * r - (MU + (1 - s) * S0**2 / var * r)


class OffsetPolicy(nn.Module):
    """The exact velocity plus a learnable offset per step of the trainer's grid (bound by bind_schedule)."""

    def __init__(self):
        super().__init__()
        self.reference = ExactVelocity()
        self.delta = nn.Parameter(torch.zeros(STEPS, 3, dtype=torch.float64))
        self.register_buffer("grid", torch.zeros(STEPS, dtype=torch.float64))

    def bind_schedule(self, ks):
        self.grid.copy_(ks.timesteps)

    def forward(self, x, t, cond=None):
        row = (t.double().reshape(-1, 1) - self.grid).abs().argmin(1)
        return self.reference(x, t) + self.delta[row]


def _scheduler(eta=ETA):
    sch = FlowMatchEulerDiscreteScheduler()  # shift 1, no dynamic shifting: the trainer rebuilds its table
    sch.set_timesteps(STEPS)
    return as_kernel_scheduler(sch, eta=eta)


def _optimum() -> torch.Tensor:
    """delta_i* from Flow-GRPO's step on the sigma table written out here: FlowMatchEulerDiscreteScheduler's
    linspace(1, 1/1000, n) with shift 1; at sigma = 1 the std uses the next sigma in its denominator."""
    sig = np.append(np.linspace(1.0, 1.0 / 1000, STEPS), 0.0)
    out = torch.zeros(STEPS, 3, dtype=torch.float64)
    for i in range(STEPS - 1):
        s, dt = sig[i], sig[i + 1] - sig[i]
        std2 = ETA**2 * s / (1 - (sig[1] if s == 1.0 else s))
        var = std2 * -dt
        c_v = (1 + std2 * (1 - s) / (2 * s)) * dt
        out[i] = var * C / (BETA * c_v)
    return out


def _reward(x, cond=None):
    return (x * C).sum(-1)


def _trainer(tmp_path, scheduler, **kw):
    cfg = StepRLConfig(
        reward="linear",
        beta=BETA,
        estimator="reparam",
        samples=2,
        steps=300,
        lr=0.1,
        lr_schedule="cosine",
        trajectories=8,
        states_per_trajectory=STEPS - 1,
        num_inference_steps=STEPS,
        guidance_scale=1.0,
        eval_samples=8,
        log_every=1000,
        checkpoint_every=1000,
        **kw,
    )
    return StepRLTrainer(
        OffsetPolicy(),
        ExactVelocity(),
        scheduler,
        _reward,
        cfg,
        out=tmp_path,
        sample_shape=(3,),
        cond_sampler=lambda n, gen: None,
        null_cond=None,
        step_reward=lambda x, t, c: _reward(x),
        clip_samples=False,
    )


def test_step_rl_lands_on_the_flow_step_optimum(tmp_path):
    trainer = _trainer(tmp_path, _scheduler())
    assert all(not t.is_integer() for t in trainer.timesteps[1:-1])  # fractional floats: 800.2, 600.4, ...
    assert trainer.t_dtype == torch.float32
    states = trainer.sample_states(trainer.shards[0])
    assert states.t.dtype == torch.float32 and states.prev.dtype == torch.float32
    res = trainer.train(progress=False)
    delta, opt = res.model.delta.detach(), _optimum()
    # the linear reward's reparameterised gradient and the closed-form KL carry no noise: only the optimiser's
    # finite run (Adam, cosine to 0) separates the offsets from the optimum. Measured: max relative error
    # 1.7e-5 per element (6.5e-5 absolute of |delta*| in [0.04, 3.9]); asserted 2e-4.
    rel = ((delta[: STEPS - 1] - opt[: STEPS - 1]).abs() / opt[: STEPS - 1].abs()).max()
    assert rel < 2e-4, (delta, opt)
    assert torch.equal(delta[STEPS - 1], torch.zeros(3, dtype=torch.float64))  # the last step is never trained


def test_kernel_shift_of_the_optimum_is_var_c_over_beta(tmp_path):
    """The trainer's own kernels at the optimum offsets: policy mean - reference mean = var * C / beta."""
    trainer = _trainer(tmp_path, _scheduler())
    trainer.module.delta.data.copy_(_optimum())
    states = trainer.sample_states(trainer.shards[0])
    with torch.no_grad():
        pk, rk = trainer.kernel(trainer.policy_guided, states), trainer.kernel(trainer.reference_guided, states)
    torch.testing.assert_close(pk.mean - rk.mean, rk.var * C / BETA, rtol=1e-10, atol=1e-12)
    assert torch.equal(pk.var, rk.var)


def test_flow_eta_zero_is_refused(tmp_path):
    with pytest.raises(AlignmentError, match="no step-level problem: pass eta > 0"):
        _trainer(tmp_path, _scheduler(eta=0.0))
    assert math.isfinite(ETA)
