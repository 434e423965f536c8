"""The diagonal Gaussian kernel: the one object every reverse step produces and every step rule consumes."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

_LOG_2PI = math.log(2.0 * math.pi)


def compute_dtype(device: torch.device | str) -> torch.dtype:
    """The dtype of the kernel and fusion math on `device`: float64, except on Apple's MPS, which has no
    float64 and computes in float32 instead (the schedule's coefficients are still computed in float64 on the
    CPU and rounded once). Measured on CPU with float32 forced, 50 steps of DDPM (fixed and learned_range
    variance) and DDIM (eta 0 and 0.5) on unit-scale samples: kernel means within 7.2e-7 absolute (a few
    float32 ulps) and variances within 5.8e-6 relative of the float64 path (tests/test_schedule.py checks
    2e-6 and 2e-5). A float32 model output carries about as much rounding already. MPS itself was not run."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def _event_sum(x: Tensor, batch_dims: int) -> Tensor:
    """Sum over every dimension after the first `batch_dims` ones."""
    if x.dim() <= batch_dims:
        return x
    return x.flatten(batch_dims).sum(-1)


@dataclass(frozen=True)
class GaussianKernel:
    """N(mean, diag(var)).

    mean: Tensor [B, ...] (the shape of the sample).
    var:  Tensor broadcastable to `mean` (0-dim for fixed-variance schedulers, full for learned variance).
          A zero variance is a point mass (DDIM with eta = 0); `sample` then returns the mean.
    """

    mean: Tensor
    var: Tensor

    @property
    def std(self) -> Tensor:
        return self.var.clamp_min(0).sqrt()

    def sample(self, generator: torch.Generator | None = None, noise: Tensor | None = None) -> Tensor:
        """Draw mean + sqrt(var) * z; z from `generator` unless `noise` is given. Shape of `mean`."""
        if noise is None:
            noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std.to(self.mean.dtype) * noise

    def log_prob(self, x: Tensor, batch_dims: int = 1) -> Tensor:
        """Exact log-density of `x` [B, ...], summed over all but the first `batch_dims` dims -> [B]."""
        var = torch.broadcast_to(self.var.to(x.dtype), torch.broadcast_shapes(self.var.shape, x.shape))
        elem = -0.5 * ((x - self.mean) ** 2 / var + torch.log(var) + _LOG_2PI)
        return _event_sum(elem, batch_dims)

    def kl(self, other: GaussianKernel, batch_dims: int = 1) -> Tensor:
        """KL(self || other) in nats, summed over all but the first `batch_dims` dims -> [B]."""
        shape = torch.broadcast_shapes(self.mean.shape, other.mean.shape, self.var.shape, other.var.shape)
        v1 = torch.broadcast_to(self.var, shape)
        v2 = torch.broadcast_to(other.var, shape)
        diff2 = torch.broadcast_to((self.mean - other.mean) ** 2, shape)
        elem = 0.5 * (v1 / v2 + diff2 / v2 - 1.0 + torch.log(v2) - torch.log(v1))
        return _event_sum(elem, batch_dims)

    def entropy(self, batch_dims: int = 1) -> Tensor:
        """Differential entropy in nats, summed over all but the first `batch_dims` dims -> [B]."""
        var = torch.broadcast_to(self.var, self.mean.shape)
        return _event_sum(0.5 * (torch.log(var) + 1.0 + _LOG_2PI), batch_dims)

    def to(self, *args, **kwargs) -> GaussianKernel:
        return GaussianKernel(self.mean.to(*args, **kwargs), self.var.to(*args, **kwargs))


@dataclass(frozen=True)
class ReverseKernel(GaussianKernel):
    """A reverse-step kernel p(x_prev | x_t) plus the quantities the scheduler derived on the way.

    pred_original_sample: the model's clean estimate x0_hat (after clipping/thresholding), shape of mean.
    pred_epsilon: the noise estimate the mean was built from, shape of mean.
    timestep, prev_timestep: the step t -> prev_t this kernel describes (prev_t = -1 at the last step).

    At the last step (prev_t = -1) the kernel is the model's Gaussian over x_{-1} = the final sample, with the
    variance its schedule defines: for DDPM `fixed_large` that is beta_0 > 0, although diffusers' `step()`
    adds no noise there and returns the mean. Samplers return `mean` at the last step, so samples agree
    with `step()`; `var` is what `log_prob`, `kl` and the fusion see at that step.
    """

    pred_original_sample: Tensor | None = None
    pred_epsilon: Tensor | None = None
    timestep: int = 0
    prev_timestep: int = -1


def apply_kernel_offsets(mean: Tensor, var: Tensor, offsets: Tensor) -> tuple[Tensor, Tensor]:
    """The kernel-offset parametrisation of aligned models: mean + var * d_mean, var * exp(var * d_logvar).

    offsets: [B, 2C, ...] = (d_mean, d_logvar); mean, var: the scheduler's kernel before the offsets. Both
    offsets are scaled by the kernel's own variance because the step optimum is: for a step reward with gradient
    g and curvature -h, p* = p_ref * exp(r / beta) / Z has mean shift var * g / beta and log-variance change
    -log(1 + var * h / beta) ~ -var * h / beta. So d_mean ~ g / beta and d_logvar ~ -h / beta are of the
    same size at every timestep, while the shifts themselves span three decades from t = 1000 to t = 0 (a
    network whose offsets barely depend on t, as a fresh head's do, then is right everywhere, not at one t).
    Both are 0 for a fresh copy of the reference (zero-initialised head), which then has the reference's kernel
    exactly; a deterministic kernel (variance 0, DDIM with eta = 0) is left as it is. Unlike the scheduler's own
    parametrisation, this reaches any Gaussian kernel of positive variance: the mean is not capped by x0
    clipping and the variance is not confined to [beta_tilde_t, beta_t].
    """
    c = offsets.shape[1] // 2
    d_mean, d_logvar = offsets[:, :c], offsets[:, c:]
    var = torch.broadcast_to(var, mean.shape)
    return mean + var * d_mean, var * torch.exp(var * d_logvar)
