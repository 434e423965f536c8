"""Training beta schedules by diffusers' formulas: shared by the DDPM/DDIM kernels (msdda.core.schedule) and the
sigma-table samplers (msdda.core.samplers), which both start from the training alpha-bar."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from msdda.core.errors import ScheduleError

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def make_betas(
    num_train_timesteps: int,
    beta_schedule: str,
    beta_start: float,
    beta_end: float,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """The training betas [T] by diffusers' formulas (pass dtype=torch.float32 to match its rounding)."""
    t = num_train_timesteps
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, t, dtype=dtype)
    if beta_schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, t, dtype=dtype) ** 2
    if beta_schedule == "squaredcos_cap_v2":

        def alpha_bar(s: float) -> float:
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = [min(1 - alpha_bar((i + 1) / t) / alpha_bar(i / t), 0.999) for i in range(t)]
        return torch.tensor(betas, dtype=dtype)
    raise ScheduleError(f"unknown beta_schedule {beta_schedule!r}; choose one of {BETA_SCHEDULES}")
