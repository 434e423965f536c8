"""Batched timesteps in SamplerKernelScheduler.kernel / predict_x0 (what the step trainers pass): one timestep per
row, and the result must equal the single-timestep kernels of each row exactly (bit for bit)."""

from __future__ import annotations

import pytest
import torch

from msdda.core import ScheduleError
from msdda.core.samplers import SamplerKernelConfig, SamplerKernelScheduler

F64 = torch.float64
N, SHAPE = 6, (3, 4, 4)

CONFIGS = {
    "flow_sde": dict(kind="flow_sde", prediction_type="flow_prediction", shift=3.0, noise_level=0.7),
    "flow_cps": dict(kind="flow_sde", prediction_type="flow_prediction", sde_type="cps", noise_level=0.5),
    "euler_eps": dict(kind="euler_ancestral"),
    "euler_v_model_input": dict(kind="euler_ancestral", prediction_type="v_prediction", space="model_input"),
    "dpm_eps": dict(kind="sde-dpmsolver++"),
    "dpm_v_thresholded": dict(kind="sde-dpmsolver++", prediction_type="v_prediction", thresholding=True),
}


def _scheduler(name: str, steps: int = 8) -> SamplerKernelScheduler:
    ks = SamplerKernelScheduler(SamplerKernelConfig(**CONFIGS[name]))
    ks.set_timesteps(steps)
    return ks


def _inputs(seed: int, dtype=F64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, *SHAPE, generator=g, dtype=dtype), torch.randn(N, *SHAPE, generator=g, dtype=dtype)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("skip", [False, True])
def test_batched_kernel_equals_per_row_kernels(name: str, skip: bool) -> None:
    ks = _scheduler(name)
    out, x = _inputs(0)
    # rows at different steps, repeats included; never the last step when skipping ahead two
    idx = torch.tensor([0, 3, 1, 3, 5, 2])
    t = ks.timesteps[idx]
    prev = ks.timesteps[idx + 2] if skip else None
    batched = ks.kernel(out, t, x, prev_timestep=prev)
    assert batched.var.shape == (N, 1, 1, 1)
    for r in range(N):
        single = ks.kernel(out[r : r + 1], float(t[r]), x[r : r + 1], prev_timestep=None if prev is None else prev[r])
        assert torch.equal(batched.mean[r], single.mean[0]), name
        assert torch.equal(batched.var[r].reshape(()), single.var), name
        assert torch.equal(batched.pred_original_sample[r], single.pred_original_sample[0])
        assert torch.equal(batched.pred_epsilon[r], single.pred_epsilon[0])
        assert torch.equal(batched.log_prob(x)[r], single.log_prob(x[r : r + 1])[0])


@pytest.mark.parametrize("name", list(CONFIGS))
def test_batched_predict_x0_equals_per_row(name: str) -> None:
    ks = _scheduler(name)
    out, x = _inputs(1, torch.float32)
    # float32 timesteps, as the trainers feed the model, still find their schedule rows (within 1e-3)
    t = ks.timesteps[torch.tensor([7, 0, 4, 4, 2, 6])].float()
    batched = ks.predict_x0(out, t, x)
    assert batched.dtype == torch.float32
    for r in range(N):
        assert torch.equal(batched[r], ks.predict_x0(out[r : r + 1], float(t[r]), x[r : r + 1])[0])


def test_batched_flow_kernel_matches_the_formula() -> None:
    """An independent check of one row against Flow-GRPO's step written out here."""
    ks = _scheduler("flow_sde")
    out, x = _inputs(2)
    t = ks.timesteps[torch.tensor([1, 2, 3, 4, 5, 6])]
    k = ks.kernel(out, t, x, eta=0.3)
    s, s_next = float(ks.sigmas[3]), float(ks.sigmas[4])
    std = 0.3 * (s / (1 - s)) ** 0.5
    dt = s_next - s
    mean = x[2] * (1 + std**2 / (2 * s) * dt) + out[2] * (1 + std**2 * (1 - s) / (2 * s)) * dt
    torch.testing.assert_close(k.mean[2], mean, rtol=1e-14, atol=1e-14)
    assert float(k.var[2]) == pytest.approx(std**2 * -dt, rel=1e-14)


def test_batched_timesteps_refused_when_misshapen() -> None:
    ks = _scheduler("flow_sde")
    out, x = _inputs(3)
    with pytest.raises(ScheduleError, match="prev_timestep is \\(5,\\) for a batch of 6"):
        ks.kernel(out, ks.timesteps[:6], x, prev_timestep=ks.timesteps[1:6])
    with pytest.raises(ScheduleError, match="is not in this schedule"):
        ks.kernel(out, ks.timesteps[:6] + 0.5, x)
