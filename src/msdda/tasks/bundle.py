"""What a task hands to sweeps and demos: its models, scheduler, rewards and conditions, in one object.

A TaskBundle is an `msdda.sampling.ObjectiveSet`, so `msdda.sampling.plan_method` plans every method on it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from msdda.core.schedule import KernelScheduler
from msdda.models.denoiser import Denoiser


@dataclass
class TaskBundle:
    """A ready-to-sample multi-objective task.

    objectives: names, in order; aligned[name] is the single-objective model for that objective and
      rewards[name] its reward `(x0 [B, ...], cond) -> [B]`; betas[name] the KL strength it was aligned with.
    base: the reference model. prompts: the default conditions a sweep iterates over (None: unconditional);
      make_cond(prompt, batch) -> the cond the denoisers take. sample_shape: one sample's shape (no batch).
    guidance_scale / null_cond: classifier-free guidance per model, if the task uses it.
    soup: builds the Rewarded-Soups model for preference weights {objective: w} (None: not supported).
    rgg_scale: the RGG guidance scale calibrated for this task (reward gradients differ in size by task).
    prompt_label: a printable name for a prompt (used in results and reports).
    step_reward: the per-step reward r_t (MSDDA.md §3) as `(objective, x_prev [B, ...], prev_t, cond) -> [B]`,
      when the task defines it exactly (the Gaussian oracle); None: the reward of the reference's Tweedie
      estimate x0_hat(x_prev) at prev_t (of x_prev itself at the final step, prev_t = -1).
    weighted_policy: `(weights {objective: w}, beta, *, train=True) -> WeightedPolicy` (msdda.sampling.methods),
      the policy trained by multi-objective step-level RL on sum_k w_k r_k at KL strength beta, trained on first
      use and cached (the "step-rl" method); None: the task has no step-RL policies. It may carry
      `aligned_train_seconds` {objective: s}, the training time of each aligned model (for cost tables).
    Sampling settings a sweep passes to `msdda.sampling.sample` (the defaults are the embedded tasks'):
    device (where sampling runs), noise (a GaussianNoise; None: the sampler's), final_step ("mean" or
    "sample"), eta (DDIM's; None: the scheduler's default), generator_device (where a unit's generator lives;
    None: `device`), init_noise_sigma (x_T = sigma * randn, as diffusers' prepare_latents does).
    decode: samples [B, ...] -> images [B, 3, H, W] (or [B, 1, H, W]) in [0, 1]; when given, a sweep stores
      each sample as a PNG image (uint8) instead of the raw tensors (None: raw samples in safetensors).
    """

    name: str
    objectives: list[str]
    base: Denoiser
    aligned: Mapping[str, Denoiser]
    scheduler: KernelScheduler
    rewards: Mapping[str, Callable[..., torch.Tensor]]
    prompts: Sequence[Any]
    sample_shape: tuple[int, ...]
    make_cond: Callable[[Any, int], Any] = lambda prompt, batch: None
    betas: Mapping[str, float] = field(default_factory=dict)
    guidance_scale: float | None = None
    null_cond: Any = None
    soup: Callable[[Mapping[str, float]], Denoiser] | None = None
    dtype: torch.dtype = torch.float32
    prompt_label: Callable[[Any], str] = str
    rgg_scale: float = 1.0
    step_reward: Callable[[str, torch.Tensor, int, Any], torch.Tensor] | None = None
    weighted_policy: Callable[..., Any] | None = None
    device: torch.device | str = "cpu"
    noise: Any = None
    final_step: str = "mean"
    eta: float | None = None
    generator_device: torch.device | str | None = None
    init_noise_sigma: float = 1.0
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None

    @property
    def reference(self) -> Denoiser:
        """The base model (the ObjectiveSet name for it)."""
        return self.base

    def beta_of(self, objective: str) -> float:
        return float(self.betas.get(objective, 1.0))
