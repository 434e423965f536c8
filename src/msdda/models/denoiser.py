"""The uniform model interface every sampler and step rule sees: `(x_t, t, cond) -> output`."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from msdda.errors import MSDDAError


class DenoiserError(MSDDAError):
    """A denoiser was called with, or returned, something it cannot handle."""


@runtime_checkable
class Denoiser(Protocol):
    """A diffusion model as the sampler sees it.

    __call__(x_t [B, C, ...], t LongTensor [B], cond or None) -> model output [B, C, ...] (epsilon, x0 or v
    as the scheduler's prediction_type says), or [B, 2C, ...] with a learned variance in the second half.
    """

    def __call__(self, x_t: Tensor, t: Tensor, cond: Any = None) -> Tensor: ...


class ModuleDenoiser(nn.Module):
    """Wrap an nn.Module whose forward is `forward(x_t, t, cond)` (or `forward(x_t, t)` if unconditional)."""

    def __init__(self, module: nn.Module, conditional: bool = True) -> None:
        super().__init__()
        self.module = module
        self.conditional = conditional

    def forward(self, x_t: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        if self.conditional:
            return self.module(x_t, t, cond)
        return self.module(x_t, t)


def as_denoiser(model: Any) -> Denoiser:
    """Accept any callable with the Denoiser signature; reject what cannot be one."""
    if not callable(model):
        raise DenoiserError(f"{type(model).__name__} is not callable; a denoiser is `(x_t, t, cond) -> output`")
    return model


def _concat_cond(cond: Any, null_cond: Any) -> Any:
    if isinstance(cond, Tensor) and isinstance(null_cond, Tensor):
        if null_cond.shape[0] != cond.shape[0]:
            null_cond = null_cond.expand(cond.shape[0], *null_cond.shape[1:])
        return torch.cat([cond, null_cond.to(cond.device, cond.dtype)], dim=0)
    return None


class ClassifierFreeGuidance:
    """out = uncond + scale * (cond - uncond), applied to the prediction channels only.

    For a learned-variance model (outputs [B, 2C] for samples [B, C]) the variance half is taken from the
    conditional pass, as improved-DDPM/GLIDE do. Conditional and unconditional passes
    run as one batched call when both conditions are tensors (one forward of 2B), else as two calls.
    `calls` counts network forwards (a batched CFG call counts 2: it does the work of two).
    """

    def __init__(self, denoiser: Denoiser, scale: float, null_cond: Any) -> None:
        self.denoiser = as_denoiser(denoiser)
        self.scale = float(scale)
        self.null_cond = null_cond
        self.calls = 0

    def __call__(self, x_t: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        if cond is None:
            raise DenoiserError("classifier-free guidance needs a condition; got cond=None")
        b = x_t.shape[0]
        both = _concat_cond(cond, self.null_cond)
        if both is not None:
            out = self.denoiser(torch.cat([x_t, x_t]), torch.cat([t, t]), both)
            out_c, out_u = out[:b], out[b:]
        else:
            out_c = self.denoiser(x_t, t, cond)
            out_u = self.denoiser(x_t, t, self.null_cond)
        self.calls += 2
        return combine_guidance(out_c, out_u, self.scale, x_t.shape[1])


def combine_guidance(out_c: Tensor, out_u: Tensor, scale: float, channels: int) -> Tensor:
    """Guided output uncond + scale * (cond - uncond) from the two passes, each [B, C, ...] or wider.

    channels: C, the sample's channel count. Channels past the first C carry a learned variance (and kernel
    offsets, see msdda.core.schedule.apply_kernel_offsets); they are taken from the conditional pass unguided
    (improved-DDPM/GLIDE). Shared by ClassifierFreeGuidance and the batched K-model path so both apply the
    very same arithmetic.
    """
    if out_c.shape[1] > channels:
        guided = out_u[:, :channels] + scale * (out_c[:, :channels] - out_u[:, :channels])
        return torch.cat([guided, out_c[:, channels:]], dim=1)
    return out_u + scale * (out_c - out_u)
