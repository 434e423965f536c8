"""Base diffusion training with the improved-DDPM hybrid loss (Nichol & Dhariwal 2021).

L_hybrid = L_simple + lambda * L_vlb, where
  L_simple = mean over elements of (eps_theta(x_t, t, c) - eps)^2,
  L_vlb    = T * E_t[L_t], L_t in bits per dimension:
     t > 0:  KL( q(x_{t-1} | x_t, x0) || p_theta(x_{t-1} | x_t) ) / log 2, mean over dimensions,
     t = 0:  -log2 of the discretised Gaussian likelihood of x0 under p_theta(x_{-1} | x_1) (decoder term).
The vlb term sees the *mean* with a stop-gradient (the eps half of the output is detached), so it only
trains the learned_range variance, exactly as improved DDPM does. With lambda = 0.001 and T = 1000 the
vlb weight is 1 on the per-timestep mean, which is what improved-diffusion's code computes.
Simplification (documented): at t = 0 the learned_range lower bound is the floored posterior variance of
our KernelScheduler (diffusers' convention), not improved DDPM's 'clipped' log variance; the sampler
returns the mean at that step, so only the decoder likelihood is affected.
All schedule math (x_t, posterior, kernel) goes through msdda.core.KernelScheduler with batched timesteps.

Optional checkpoints (`checkpoint_dir` and `checkpoint_every`) go through the one training checkpointer,
msdda.models.checkpoint.Checkpointer (weights, EMA weights, optimiser, generator, global RNG, step and the
running loss window); resuming from one continues bit for bit as the uninterrupted run would.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from msdda.alignment.errors import AlignmentError, CheckpointError
from msdda.config import JSONConfig
from msdda.core.schedule import KernelScheduler, KernelSchedulerConfig
from msdda.models.checkpoint import Checkpoint, Checkpointer

logger = logging.getLogger(__name__)
_LN2 = math.log(2.0)


def training_scheduler_config(num_train_timesteps: int = 1000) -> KernelSchedulerConfig:
    """The schedule of the digits models: linear betas 1e-4..0.02, epsilon, learned_range variance."""
    return KernelSchedulerConfig(
        kind="ddpm",
        num_train_timesteps=num_train_timesteps,
        beta_schedule="linear",
        beta_start=0.0001,
        beta_end=0.02,
        prediction_type="epsilon",
        variance_type="learned_range",
        clip_sample=True,
        timestep_spacing="leading",
    )


@dataclass
class BaseTrainConfig(JSONConfig):
    """Base (reference) model training. Round-trips through to_dict/from_dict.

    steps: optimiser steps; batch_size: images per step; lr: peak AdamW learning rate (linear warm-up over
    `warmup_steps`, cosine decay to 10%); vlb_weight: lambda of the hybrid loss; label_dropout: probability
    that a label is replaced by the null class (classifier-free guidance); ema_decay: EMA of the weights
    (0 disables); data_levels: number of grey levels of the data in [-1, 1] (17 for 8x8 digits), which
    sets the decoder's bin width 2 / (data_levels - 1).
    """

    config_error = AlignmentError

    steps: int = 3000
    batch_size: int = 256
    lr: float = 2e-3
    warmup_steps: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    vlb_weight: float = 0.001
    label_dropout: float = 0.1
    ema_decay: float = 0.999
    num_train_timesteps: int = 1000
    data_levels: int = 17
    seed: int = 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for name in ("steps", "batch_size", "num_train_timesteps"):
            if int(getattr(self, name)) < 1:
                raise AlignmentError(f"BaseTrainConfig.{name}={getattr(self, name)!r} must be >= 1")
        if not self.lr > 0:
            raise AlignmentError(f"BaseTrainConfig.lr={self.lr!r} must be > 0")
        if not 0.0 <= self.label_dropout < 1.0:
            raise AlignmentError(f"BaseTrainConfig.label_dropout={self.label_dropout!r} must be in [0, 1)")
        if not 0.0 <= self.ema_decay < 1.0:
            raise AlignmentError(f"BaseTrainConfig.ema_decay={self.ema_decay!r} must be in [0, 1)")
        if self.vlb_weight < 0:
            raise AlignmentError(f"BaseTrainConfig.vlb_weight={self.vlb_weight!r} must be >= 0")
        if self.data_levels < 2:
            raise AlignmentError(f"BaseTrainConfig.data_levels={self.data_levels!r} must be >= 2")


@dataclass
class HybridLoss:
    """total = mse + vlb_weight * T * vlb.mean(); mse scalar; vlb [B] in bits per dimension."""

    total: Tensor
    mse: Tensor
    vlb: Tensor


def _std_normal_cdf(x: Tensor) -> Tensor:
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, var: Tensor, half_bin: float) -> Tensor:
    """log P(x's bin) per element for data on a grid in [-1, 1] with bins [x - half_bin, x + half_bin].

    The edge bins extend to -inf / +inf (as in improved DDPM). All tensors broadcast to x's shape; nats.
    """
    x, mean, var = x.double(), mean.double(), var.double()
    inv_std = torch.rsqrt(var)
    cdf_plus = _std_normal_cdf((x - mean + half_bin) * inv_std)
    cdf_minus = _std_normal_cdf((x - mean - half_bin) * inv_std)
    log_cdf_plus = torch.log(cdf_plus.clamp_min(1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_minus).clamp_min(1e-12))
    log_delta = torch.log((cdf_plus - cdf_minus).clamp_min(1e-12))
    edge = 1.0 - 1e-6
    return torch.where(x < -edge, log_cdf_plus, torch.where(x > edge, log_one_minus_cdf_min, log_delta))


def hybrid_loss(
    model_output: Tensor,
    x0: Tensor,
    x_t: Tensor,
    noise: Tensor,
    timesteps: Tensor,
    scheduler: KernelScheduler,
    *,
    vlb_weight: float = 0.001,
    data_levels: int = 17,
) -> HybridLoss:
    """The improved-DDPM hybrid loss for an eps + learned_range model.

    model_output: [B, 2C, ...] (eps then variance value v); x0, x_t, noise: [B, C, ...]; timesteps: [B] long
    in [0, T). Returns HybridLoss (total and mse scalars, vlb [B] in bits/dim).
    """
    c = x0.shape[1]
    if model_output.shape[1] != 2 * c:
        raise AlignmentError(
            f"hybrid_loss needs a learned-variance output with {2 * c} channels, got {model_output.shape[1]}"
        )
    eps = model_output[:, :c]
    mse = ((eps.float() - noise.float()) ** 2).mean()
    frozen = torch.cat([eps.detach(), model_output[:, c:]], dim=1)
    prev = timesteps - 1
    kern = scheduler.kernel(frozen, timesteps, x_t, prev_timestep=prev)
    # KL from the unclipped x0 estimate: improved DDPM trains with clip_denoised=False.
    x0_hat = scheduler.predict_x0(frozen, timesteps, x_t)
    mean_unclipped, _ = scheduler.q_posterior(x0_hat, x_t, timesteps, prev)
    var = kern.var.double()
    q_mean, q_var = scheduler.q_posterior(x0, x_t, timesteps, prev)
    q_mean, q_var = q_mean.double(), torch.broadcast_to(q_var.double(), var.shape)
    m = mean_unclipped.double()
    kl = 0.5 * (q_var / var + (q_mean - m) ** 2 / var - 1.0 + torch.log(var) - torch.log(q_var))
    kl_bits = kl.flatten(1).mean(1) / _LN2
    half_bin = 1.0 / (data_levels - 1)
    nll_bits = -discretized_gaussian_log_likelihood(x0, m, var, half_bin).flatten(1).mean(1) / _LN2
    vlb = torch.where(timesteps == 0, nll_bits, kl_bits)
    total = mse + vlb_weight * scheduler.config.num_train_timesteps * vlb.float().mean()
    return HybridLoss(total=total, mse=mse, vlb=vlb)


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter (buffers copied)."""
    for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
        pe.mul_(decay).add_(pm.detach(), alpha=1.0 - decay)
    for be, bm in zip(ema.buffers(), model.buffers(), strict=True):
        be.copy_(bm)


def train_diffusion(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    config: BaseTrainConfig,
    *,
    null_class: int,
    scheduler: KernelScheduler | None = None,
    progress: bool = True,
    on_log: Callable[[dict[str, float]], None] | None = None,
    log_every: int = 100,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    checkpoint_every: int = 0,
    keep_checkpoints: int = 2,
    resume: bool = True,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train a class-conditional eps + learned_range denoiser `model(x_t, t, cond)` with the hybrid loss.

    images: [N, C, H, W] in [-1, 1]; labels: [N] long. Labels are replaced by `null_class` with probability
    `config.label_dropout`. Deterministic given `config.seed` (an explicit torch.Generator drives batches,
    timesteps, noise and label dropout). Returns (the EMA model, or `model` when ema_decay = 0; stats dict
    with final losses and seconds).
    checkpoint_dir, checkpoint_every: when both are set (every > 0), write a checkpoint every that many
    steps (the newest `keep_checkpoints` are kept; none at the last step). resume: continue from the newest
    one (it must come from the same config and log_every); False removes old ones first.
    """
    config.validate()
    if checkpoint_every < 0:
        raise AlignmentError(f"checkpoint_every={checkpoint_every!r} must be >= 0 (0: no checkpoints)")
    sched = scheduler or KernelScheduler(training_scheduler_config(config.num_train_timesteps))
    gen = torch.Generator().manual_seed(int(config.seed))
    torch.manual_seed(int(config.seed))
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)

    def lr_at(step: int) -> float:
        if step < config.warmup_steps:
            return config.lr * (step + 1) / config.warmup_steps
        frac = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    ema = copy.deepcopy(model).requires_grad_(False) if config.ema_decay > 0 else None
    n = images.shape[0]
    t_max = config.num_train_timesteps
    model.train()
    stats: dict[str, Any] = {}
    running = {"loss": 0.0, "mse": 0.0, "vlb": 0.0}
    modules = {"model": model, **({"ema": ema} if ema is not None else {})}
    run_doc = {"config": config.to_dict(), "log_every": int(log_every)}
    checkpointer = None
    start_step, elapsed = 0, 0.0
    if checkpoint_dir is not None and checkpoint_every > 0:
        checkpointer = Checkpointer(checkpoint_dir, keep=keep_checkpoints)

        def same_run(ckpt: Checkpoint) -> None:
            saved = {k: ckpt.state.get(k) for k in run_doc}
            if saved != run_doc:
                raise CheckpointError(
                    f"checkpoint {ckpt.path} was written by a run with another configuration ({saved}, now "
                    f"{run_doc}); rerun with the same options, or pass resume=False to start over"
                )

        found = checkpointer.load_latest(modules, opt, {"generator": gen}, validate=same_run) if resume else None
        if not resume:
            checkpointer.clear()
        if found is not None:
            start_step, elapsed = found.step, float(found.state.get("elapsed_seconds", 0.0))
            running, stats = dict(found.state["running"]), dict(found.state["stats"])
            logger.info("train-base resuming from %s (step %d)", found.path, start_step)
    start = time.perf_counter() - elapsed
    bar = tqdm(
        range(start_step, config.steps), desc="train-base", disable=not progress, initial=start_step, total=config.steps
    )
    for step in bar:
        idx = torch.randint(0, n, (config.batch_size,), generator=gen)
        x0 = images[idx]
        cond = labels[idx].clone()
        drop = torch.rand(config.batch_size, generator=gen) < config.label_dropout
        cond[drop] = null_class
        t = torch.randint(0, t_max, (config.batch_size,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        x_t = sched.add_noise(x0, noise, t)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        out = model(x_t, t, cond)
        loss = hybrid_loss(out, x0, x_t, noise, t, sched, vlb_weight=config.vlb_weight, data_levels=config.data_levels)
        opt.zero_grad(set_to_none=True)
        loss.total.backward()
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        opt.step()
        if ema is not None:
            ema_update(ema, model, config.ema_decay)
        running["loss"] += float(loss.total.detach())
        running["mse"] += float(loss.mse.detach())
        running["vlb"] += float(loss.vlb.detach().mean())
        if (step + 1) % log_every == 0 or step + 1 == config.steps:
            k = (step % log_every) + 1
            row = {"step": step + 1, **{key: v / k for key, v in running.items()}}
            bar.set_postfix(loss=f"{row['loss']:.4f}", mse=f"{row['mse']:.4f}")
            logger.info("train-base step %d: %s", step + 1, row)
            if on_log is not None:
                on_log(row)
            stats = row
            running = dict.fromkeys(running, 0.0)
        done = step + 1
        if checkpointer is not None and done % checkpoint_every == 0 and done < config.steps:
            state = {**run_doc, "running": running, "stats": stats, "elapsed_seconds": time.perf_counter() - start}
            checkpointer.save(done, modules, opt, {"generator": gen}, state)
    stats["seconds"] = time.perf_counter() - start
    model.eval()
    if ema is not None:
        ema.eval()
        return ema, stats
    return model, stats
