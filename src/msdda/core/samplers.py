"""Gaussian reverse kernels of the sigma-table samplers: Euler ancestral, first-order SDE-DPM-Solver++, and
the flow-matching SDE steps of Flow-GRPO / Flow-CPS.

These samplers do not step on alpha-bar at integer timesteps, as DDPM/DDIM do (msdda.core.schedule), but along
a table of noise levels `sigmas` [n + 1] beside their timesteps [n] (descending; the last sigma is where the final
step lands). Every step here is an exact Gaussian given x_t, N(mean, var) with a variance that depends on the
schedule only, so MSDDA can fuse it in closed form; and since each mean is affine in the model output (without
thresholding), MSDDA with normalised weights equals DB-MPA on them, as it does on DDIM (MSDDA.md §4).

Kinds (`SamplerKernelConfig.kind`), with sigma_s the current and sigma_t the next noise level:

- "euler_ancestral" (diffusers' EulerAncestralDiscreteScheduler; k-diffusion's sample_euler_ancestral, eta 1).
  In step()'s own space ("sample": x = x0 + sigma * eps, the latents diffusers carries, x_T = init_noise_sigma *
  z): sigma_up = sqrt(sigma_t^2 (sigma_s^2 - sigma_t^2) / sigma_s^2), sigma_down = sqrt(sigma_t^2 - sigma_up^2),
  mean = x + (sigma_down - sigma_s) (x - x0_hat) / sigma_s, var = sigma_up^2. With space="model_input" the same
  step is written over x / sqrt(1 + sigma^2), what `scale_model_input` gives the model: the variance-preserving
  x_t of DDPM/DDIM (alpha-bar = 1 / (1 + sigma^2)); mean and var are divided by sqrt(1 + sigma_t^2) and
  1 + sigma_t^2. That is the space the msdda sampler can run in unchanged (it feeds x_t to the model as is).
- "sde-dpmsolver++" (DPMSolverMultistepScheduler, algorithm_type="sde-dpmsolver++", solver_order=1). Over the
  VP x_t, with alpha = 1 / sqrt(1 + sigma^2), s = sigma * alpha and r = sigma_t / sigma_s (= e^{-h}):
  mean = (s_t / s_s) r x + alpha_t (1 - r^2) x0_hat, var = s_t^2 (1 - r^2): on alpha-bar's own sigmas it is
  DDPM's posterior (fixed_small) kernel, on a Karras or other sigma table it is not.
- "flow_sde" (FlowMatchEulerDiscreteScheduler, SD3/FLUX; x_sigma = (1 - sigma) x0 + sigma * noise, the model
  predicts v = noise - x0). diffusers' step() is the ODE step x + (sigma_t - sigma_s) v, a point mass; the
  Gaussian steps are those of Flow-GRPO and Flow-CPS, noise level a = `noise_level` (sde_type):
  "sde" (Flow-GRPO, Liu et al. 2025, arXiv 2505.05470, eq. 9; code: github.com/yifan123/flow_grpo,
  flow_grpo/diffusers_patch/sd3_sde_with_logprob.py, sde_step_with_logprob): dt = sigma_t - sigma_s < 0,
  std_dev = a sqrt(sigma_s / (1 - sigma_s)) (at sigma_s = 1 the denominator uses sigma table[1], as that code
  does), mean = x (1 + std_dev^2 dt / (2 sigma_s)) + v (1 + std_dev^2 (1 - sigma_s) / (2 sigma_s)) dt,
  var = std_dev^2 (-dt). It is the Euler-Maruyama step of the reverse SDE with diffusion std_dev, whose
  marginals are the ODE's; a = 0 is the ODE step.
  "cps" (Flow-CPS, Wang & Yu 2025, arXiv 2509.05952; the same file, sde_type='cps'): std = sigma_t sin(a pi/2),
  mean = (1 - sigma_t) x0_hat + sqrt(sigma_t^2 - std^2) x1_hat with x0_hat = x - sigma_s v, x1_hat = x +
  (1 - sigma_s) v, var = std^2 (a DDIM-like step that keeps the marginal's coefficients). With a = 1 it is
  diffusers' own `stochastic_sampling=True` step, which `from_diffusers` mirrors as such.

What is refused, and why (UNSUPPORTED names each class with its alternative): a sampler whose step is a point
mass (PNDM, DEIS, UniPC, DPM-Solver++ ODE, Euler without churn, Heun, LMS, ...) gives MSDDA nothing to fuse: the
step-level objective's KL to a point mass is infinite for every other kernel, and "fusing" point masses is only a
weighted average of the updates (DB-MPA); a multistep solver of order >= 2 (DPM-Solver++ 2M/3M SDE, UniPC,
DEIS, SA-Solver) is a Gaussian given x_t AND the previous model outputs — see SDE_MULTISTEP_NOTE.

Numbers: the sigma tables are float64 (a mirrored diffusers scheduler's float32 tables, converted exactly); the
kernel math runs in float64 (float32 on MPS, `compute_dtype`). Kernels match step() with the same noise at every
timestep to ~1e-6 relative (step() itself computes in float32); tests/test_samplers.py measures it.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from msdda.config import JSONConfig
from msdda.core.betas import make_betas
from msdda.core.errors import ScheduleError, UnsupportedSchedulerError
from msdda.core.kernel import ReverseKernel, apply_kernel_offsets, compute_dtype

SAMPLER_KINDS = ("euler_ancestral", "sde-dpmsolver++", "flow_sde")
SPACES = ("sample", "model_input")
FLOW_SDE_TYPES = ("sde", "cps")
_VP_PREDICTIONS = ("epsilon", "sample", "v_prediction")
_SPACINGS = ("linspace", "leading", "trailing")
# diffusers scheduler class -> the kind it is mirrored as
MIRRORED = {
    "EulerAncestralDiscreteScheduler": "euler_ancestral",
    "DPMSolverMultistepScheduler": "sde-dpmsolver++",
    "FlowMatchEulerDiscreteScheduler": "flow_sde",
}

SDE_MULTISTEP_NOTE = (
    "a multistep SDE solver (order 2 or 3) is a Gaussian given x_t and the model outputs of the previous steps; "
    "under MSDDA each of the K models would need its own history (its step would extrapolate its own earlier "
    "outputs at states the fused chain, not that model, produced), so the fused kernel would be the product of "
    "K kernels that are not the models' one-step kernels p_k(x_prev | x_t), and the step-level optimum "
    "p_ref^a0 * prod p_k^ak (MSDDA.md §4) is a statement about those one-step kernels: the result is not the "
    "multi-objective optimum of the step, so it is not offered"
)

# Classes whose step() is not one Gaussian given x_t: why, and what to use instead.
_POINT_MASS = "its step() is deterministic (an ODE step: a point mass), which MSDDA cannot fuse"
UNSUPPORTED: dict[str, str] = {
    "PNDMScheduler": f"{_POINT_MASS} and a linear multistep one (it uses earlier model outputs)",
    "UniPCMultistepScheduler": f"{_POINT_MASS} and multistep; {SDE_MULTISTEP_NOTE}",
    "DEISMultistepScheduler": f"{_POINT_MASS} and multistep",
    "DPMSolverSinglestepScheduler": f"{_POINT_MASS} (its stages evaluate the model at intermediate states)",
    "EulerDiscreteScheduler": (
        f"with s_churn=0 {_POINT_MASS}; with s_churn>0 its churn is Gaussian but not implemented here"
    ),
    "HeunDiscreteScheduler": f"{_POINT_MASS} (a second-order, two-evaluation step)",
    "KDPM2DiscreteScheduler": f"{_POINT_MASS} (a two-evaluation step)",
    "KDPM2AncestralDiscreteScheduler": "its noisy step needs a second model evaluation at a midpoint state",
    "LMSDiscreteScheduler": f"{_POINT_MASS} and a linear multistep one",
    "DPMSolverSDEScheduler": (
        "it draws Brownian-tree noise (torchsde) across a two-evaluation step; its step is not one Gaussian given x_t"
    ),
    "SASolverScheduler": f"it is a multistep SDE solver; {SDE_MULTISTEP_NOTE}",
    "LCMScheduler": "its step() denoises then re-noises with a consistency model's boundary conditions; not mirrored",
    "TCDScheduler": "not mirrored (a consistency-model step)",
}
_ALTERNATIVE = (
    "EulerAncestralDiscreteScheduler, DPMSolverMultistepScheduler(algorithm_type='sde-dpmsolver++', "
    "solver_order=1), or FlowMatchEulerDiscreteScheduler with a noise level (eta=0.7: Flow-GRPO's SDE) for "
    "flow-matching models, e.g. EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)"
)


def unsupported_message(name: str) -> str:
    """The refusal for a diffusers scheduler class without a Gaussian kernel here: what to use, and why."""
    why = UNSUPPORTED.get(name, "its step() is not mirrored as a Gaussian kernel")
    return f"{name} has no reverse kernel implemented; use DDPMScheduler or DDIMScheduler, or {_ALTERNATIVE}: {why}"


@dataclass
class SamplerKernelConfig(JSONConfig):
    """What fixes a sigma-table sampler's kernel; keys mirror the diffusers config keys of the same name."""

    config_error = ScheduleError

    kind: str = "euler_ancestral"  # one of SAMPLER_KINDS
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"  # VP kinds: the training alpha-bar (flow: unused)
    beta_start: float = 0.0001
    beta_end: float = 0.02
    prediction_type: str = "epsilon"  # VP kinds: epsilon | sample | v_prediction; flow_sde: flow_prediction
    timestep_spacing: str = "linspace"  # VP kinds, for our own set_timesteps
    steps_offset: int = 0
    space: str = "sample"  # euler_ancestral: "sample" (step()'s latents) or "model_input" (x / sqrt(1 + sigma^2))
    thresholding: bool = False  # sde-dpmsolver++ only (dynamic thresholding of x0_hat, as diffusers)
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    final_sigmas_type: str = "zero"  # sde-dpmsolver++: "zero" | "sigma_min" (where the last step lands)
    shift: float = 1.0  # flow_sde: the timestep shift of our own set_timesteps
    noise_level: float = 0.7  # flow_sde: a
    sde_type: str = "sde"  # flow_sde: "sde" (Flow-GRPO) | "cps" (Flow-CPS)
    # "computed": set_timesteps builds the table; "mirrored": the table came from a diffusers schedule that
    # set_timesteps cannot rebuild (Karras/exponential/beta sigmas, dynamic shifting, custom sigmas)
    sigma_schedule: str = "computed"

    def validate(self) -> None:
        flow = self.kind == "flow_sde"
        checks = [
            ("kind", self.kind, SAMPLER_KINDS),
            ("prediction_type", self.prediction_type, ("flow_prediction",) if flow else _VP_PREDICTIONS),
            ("timestep_spacing", self.timestep_spacing, _SPACINGS),
            ("space", self.space, SPACES),
            ("sde_type", self.sde_type, FLOW_SDE_TYPES),
            ("final_sigmas_type", self.final_sigmas_type, ("zero", "sigma_min")),
            ("sigma_schedule", self.sigma_schedule, ("computed", "mirrored")),
        ]
        for name, value, valid in checks:
            if value not in valid:
                raise ScheduleError(f"{name}={value!r} is not supported for kind {self.kind!r}; choose one of {valid}")
        if self.space != "sample" and self.kind != "euler_ancestral":
            raise ScheduleError(
                f"space={self.space!r} applies to euler_ancestral only; {self.kind} steps on the model's input "
                "already (the two spaces coincide), so leave space='sample'"
            )
        if self.thresholding and self.kind != "sde-dpmsolver++":
            raise ScheduleError(f"thresholding applies to sde-dpmsolver++ only, not {self.kind}")
        a = self.noise_level
        if not isinstance(a, numbers.Real) or not math.isfinite(a) or a < 0:
            raise ScheduleError(f"noise_level={a!r}; it must be a finite number >= 0 (Flow-GRPO uses 0.7)")
        if flow and self.sde_type == "cps" and a > 1:
            raise ScheduleError(
                f"noise_level={a} > 1 for sde_type='cps' (std = sigma_t sin(a pi / 2)); use a in [0, 1]"
            )
        if not (isinstance(self.shift, numbers.Real) and self.shift > 0):
            raise ScheduleError(f"shift={self.shift!r}; it must be a number > 0")


def _train_alphas_cumprod(cfg: SamplerKernelConfig) -> Tensor:
    betas = make_betas(cfg.num_train_timesteps, cfg.beta_schedule, cfg.beta_start, cfg.beta_end)
    return torch.cumprod(1.0 - betas, dim=0)


@dataclass
class SamplerKernelScheduler:
    """A sigma-table sampling schedule (Euler ancestral, SDE-DPM-Solver++ order 1, flow SDE) returning kernels.

    timesteps: [n] float64, descending: what the model is evaluated at (flow: sigma * num_train_timesteps).
    sigmas: [n + 1] float64: the noise level at each timestep, then where the last step lands (0 or sigma_min).
    alphas_cumprod: [T] training alpha-bar (VP kinds; None for flow_sde). Built from the config when not given;
    the tables are built by `set_timesteps` when not given.
    Interface: the same as KernelScheduler's where the sampler uses it (set_timesteps, timesteps, prev_timestep,
    kernel, predict_x0, alpha_bar), plus init_noise_sigma and scale_model_input as diffusers has them.
    """

    config: SamplerKernelConfig = field(default_factory=SamplerKernelConfig)
    alphas_cumprod: Tensor | None = None
    timesteps: Tensor | None = None
    sigmas: Tensor | None = None
    num_inference_steps: int | None = None

    def __post_init__(self) -> None:
        self.config.validate()
        flow = self.config.kind == "flow_sde"
        if self.alphas_cumprod is None and not flow:
            self.alphas_cumprod = _train_alphas_cumprod(self.config)
        if self.alphas_cumprod is not None:
            self.alphas_cumprod = self.alphas_cumprod.detach().to("cpu", torch.float64)
        if (self.timesteps is None) != (self.sigmas is None):
            raise ScheduleError("pass both timesteps and sigmas (a table), or neither (set_timesteps builds it)")
        if self.timesteps is None:
            self.set_timesteps(self.config.num_train_timesteps)
        else:
            self.timesteps = self.timesteps.detach().to("cpu", torch.float64).reshape(-1)
            self.sigmas = self.sigmas.detach().to("cpu", torch.float64).reshape(-1)
            if self.sigmas.numel() != self.timesteps.numel() + 1:
                raise ScheduleError(
                    f"{self.timesteps.numel()} timesteps need {self.timesteps.numel() + 1} sigmas (one per timestep, "
                    f"then the final one), got {self.sigmas.numel()}; call set_timesteps on the diffusers scheduler "
                    "first"
                )
            self.num_inference_steps = self.num_inference_steps or self.timesteps.numel()

    # ----- the schedule ----------------------------------------------------------------------------
    def _train_sigmas(self) -> np.ndarray:
        """sigma at every training timestep 0..T-1: sqrt((1 - ab) / ab) (VP kinds), float64."""
        ab = self.alphas_cumprod.numpy()
        return ((1 - ab) / ab) ** 0.5

    def set_timesteps(self, num_inference_steps: int) -> Tensor:
        """Build the timestep and sigma tables as diffusers' set_timesteps does for this kind (default schedules)."""
        cfg = self.config
        if cfg.sigma_schedule == "mirrored":
            raise ScheduleError(
                "this schedule was mirrored from a diffusers scheduler whose sigmas set_timesteps cannot rebuild "
                "(Karras/exponential/beta sigmas, dynamic shifting or custom sigmas); call set_timesteps on the "
                "diffusers scheduler and mirror it again (as_kernel_scheduler), or pass it to sample() as is"
            )
        n = num_inference_steps
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or not 1 <= n <= cfg.num_train_timesteps:
            raise ScheduleError(f"num_inference_steps={n!r} must be an integer in [1, {cfg.num_train_timesteps}]")
        n, t_train = int(n), cfg.num_train_timesteps
        if cfg.kind == "flow_sde":
            # FlowMatchEulerDiscreteScheduler without dynamic shifting: linspace of the shifted training sigmas
            train = np.linspace(1, t_train, t_train)[::-1] / t_train
            train = cfg.shift * train / (1 + (cfg.shift - 1) * train)
            ts = np.linspace(train[0] * t_train, train[-1] * t_train, n)
            sig = ts / t_train
            sig = cfg.shift * sig / (1 + (cfg.shift - 1) * sig)
            ts, sig = sig * t_train, np.concatenate([sig, [0.0]])
        elif cfg.kind == "euler_ancestral":
            if cfg.timestep_spacing == "linspace":
                ts = np.linspace(0, t_train - 1, n)[::-1].copy()
            elif cfg.timestep_spacing == "leading":
                ts = (np.arange(0, n) * (t_train // n)).round()[::-1].astype(np.float64) + cfg.steps_offset
            else:
                ts = np.arange(t_train, 0, -t_train / n).round() - 1.0
            sig = np.concatenate([np.interp(ts, np.arange(t_train), self._train_sigmas()), [0.0]])
        else:  # sde-dpmsolver++: diffusers' DPMSolverMultistepScheduler spacing (n + 1 points, the last dropped)
            if cfg.timestep_spacing == "linspace":
                ts = np.linspace(0, t_train - 1, n + 1).round()[::-1][:-1].astype(np.int64)
            elif cfg.timestep_spacing == "leading":
                ts = (np.arange(0, n + 1) * (t_train // (n + 1))).round()[::-1][:-1].astype(np.int64) + cfg.steps_offset
            else:
                ts = np.arange(t_train, 0, -t_train / n).round().astype(np.int64) - 1
            train = self._train_sigmas()
            last = train[0] if cfg.final_sigmas_type == "sigma_min" else 0.0
            sig = np.concatenate([np.interp(ts, np.arange(t_train), train), [last]])
            ts = ts.astype(np.float64)
        self.timesteps = torch.from_numpy(np.ascontiguousarray(ts, dtype=np.float64))
        self.sigmas = torch.from_numpy(np.ascontiguousarray(sig, dtype=np.float64))
        self.num_inference_steps = n
        return self.timesteps

    def _index(self, timestep: Any, what: str = "timestep") -> int | None:
        """The first index of `timestep` in the schedule (within 1e-3), None if absent; ScheduleError if no number."""
        t = _scalar(timestep, what)
        hits = (self.timesteps - t).abs() <= 1e-3
        return int(hits.nonzero()[0]) if bool(hits.any()) else None

    def _require_index(self, timestep: Any) -> int:
        i = self._index(timestep)
        if i is None:
            shown = [round(v, 3) for v in self.timesteps.tolist()[:6]]
            fractional = bool((self.timesteps != self.timesteps.round()).any())
            hint = (
                " This schedule's timesteps are fractional: pass them as floats (msdda.sample does), not rounded."
                if fractional
                else ""
            )
            raise ScheduleError(
                f"timestep {_scalar(timestep, 'timestep')!r} is not in this schedule's timesteps {shown}...; call "
                f"set_timesteps first or pass one of its timesteps.{hint}"
            )
        return i

    def prev_timestep(self, timestep: Any) -> float | int:
        """The timestep the kernel at `timestep` moves to (-1 after the last step); an int when integral."""
        i = self._require_index(timestep)
        if i + 1 >= self.timesteps.numel():
            return -1
        return _plain(float(self.timesteps[i + 1]))

    def sigma_at(self, timestep: Any) -> float:
        """The noise level at a schedule timestep (its table value), between them (interpolated on the training
        table, as diffusers builds its tables), or after the last step (a negative timestep: the final sigma)."""
        t = _scalar(timestep, "timestep")
        if t < 0:
            return float(self.sigmas[-1])
        i = self._index(t)
        if i is not None:
            return float(self.sigmas[i])
        t_train = self.config.num_train_timesteps
        if t > t_train:
            raise ScheduleError(f"timestep {t} > num_train_timesteps {t_train}")
        if self.config.kind == "flow_sde":
            return t / t_train
        return float(np.interp(t, np.arange(t_train), self._train_sigmas()))

    def alpha_bar(self, timestep: Any) -> Tensor:
        """The VP alpha-bar of `timestep`'s noise level, 1 / (1 + sigma^2) (float64; VP kinds only)."""
        if self.config.kind == "flow_sde":
            raise ScheduleError(
                "a flow-matching schedule has no alpha-bar (x = (1 - sigma) x0 + sigma * noise); use sigma_at(t), "
                "or a rule that does not need alpha-bar (RGG with tempering='constant')"
            )
        return torch.tensor(1.0 / (1.0 + self.sigma_at(timestep) ** 2), dtype=torch.float64)

    @property
    def init_noise_sigma(self) -> float:
        """The std of x_T in this kernel's space (diffusers' `init_noise_sigma` for step()'s space)."""
        if self.config.kind != "euler_ancestral":
            return 1.0
        smax = float(self.sigmas.max())
        diffusers = smax if self.config.timestep_spacing in ("linspace", "trailing") else math.sqrt(smax**2 + 1)
        if self.config.space == "sample":
            return diffusers
        return diffusers / math.sqrt(1.0 + float(self.sigmas[0]) ** 2)  # 1 for 'leading', ~0.998 otherwise

    def scale_model_input(self, sample: Tensor, timestep: Any) -> Tensor:
        """What the model is evaluated at: sample / sqrt(1 + sigma^2) for Euler in step()'s space, else sample."""
        if self.config.kind == "euler_ancestral" and self.config.space == "sample":
            return sample / math.sqrt(1.0 + self.sigma_at(timestep) ** 2)
        return sample

    # ----- the reverse kernel ----------------------------------------------------------------------
    def kernel(
        self,
        model_output: Tensor,
        timestep: Any,
        sample: Tensor,
        *,
        prev_timestep: Any = None,
        eta: float | None = None,
        use_clipped_model_output: bool = False,
    ) -> ReverseKernel:
        """p(x_prev | x_t = sample) for the model output at `timestep` (one of the schedule's timesteps).

        model_output, sample: [B, C, ...] (a learned-variance model's [B, 2C, ...] output: the variance half is
        ignored, as diffusers' DPM-Solver does). timestep: one schedule timestep, or a tensor [B] of them (one per
        row, as the step trainers pass; then prev_timestep is None or a tensor [B] too, and the kernel's var is
        [B, 1, ...] and its timestep / prev_timestep are -2, as KernelScheduler's batched kernels). prev_timestep:
        default the schedule's next timestep (-1 after the last); another one steps to its interpolated sigma.
        eta: flow_sde's noise level for this call (default config.noise_level); refused for the other kinds.
        Returns a ReverseKernel with the mean in the dtype of `sample`, var 0 where the step lands on sigma 0
        (the last Euler / DPM step), x0_hat and the noise estimate. A batched kernel equals the per-row kernels
        exactly: every row's scalar coefficients are computed as the single-timestep call computes them.
        """
        cfg = self.config
        if use_clipped_model_output:
            raise ScheduleError("use_clipped_model_output applies to DDIM only")
        if eta is not None and cfg.kind != "flow_sde":
            raise ScheduleError(
                f"eta applies to DDIM and flow_sde (its noise level) only, not {cfg.kind} (got eta={eta}); pass None"
            )
        model_output, offsets = _split_offsets(model_output, sample)
        out, x = _check_tensors(model_output, sample)
        a = cfg.noise_level if eta is None else float(eta)
        if cfg.kind == "flow_sde" and (not math.isfinite(a) or a < 0 or (cfg.sde_type == "cps" and a > 1)):
            raise ScheduleError(f"eta (the noise level) {eta!r} must be finite, >= 0 (and <= 1 for cps)")
        batched = isinstance(timestep, Tensor) and timestep.dim() > 0
        if batched:
            ts, prevs = _rows(timestep, prev_timestep, x.shape[0])
            rows = [self._step_coefs(t, p, a) for t, p in zip(ts, prevs, strict=True)]
            coefs = {k: _per_row([r[1][k] for r in rows], x) for k in rows[0][1]}
            t_out: float | int = -2
            prev: float | int = -2
        else:
            t_out, (prev, coefs) = None, self._step_coefs(timestep, prev_timestep, a)
        mean, var, x0, eps = self._apply(out, x, coefs)
        dt = sample.dtype
        if not isinstance(var, Tensor):
            var = torch.tensor(var, dtype=x.dtype, device=sample.device)
        if offsets is not None:  # a per-objective variance head (or kernel-offset head), as for DDPM/DDIM
            mean, var = apply_kernel_offsets(mean, var, offsets.to(x.dtype))
        return ReverseKernel(
            mean=mean.to(dt),
            var=var.to(dt),
            pred_original_sample=x0.to(dt),
            pred_epsilon=eps.to(dt),
            timestep=_plain(float(self.timesteps[self._require_index(timestep)])) if t_out is None else t_out,
            prev_timestep=prev,
        )

    def _step_coefs(self, timestep: Any, prev_timestep: Any, a: float) -> tuple[float | int, dict[str, float]]:
        """One step's prev timestep and scalar coefficients (python floats, float64) for `_apply`."""
        i = self._require_index(timestep)
        s_from = float(self.sigmas[i])
        if prev_timestep is None:
            prev = -1 if i + 1 >= self.timesteps.numel() else _plain(float(self.timesteps[i + 1]))
            s_to = float(self.sigmas[i + 1])
        else:
            prev = _plain(_scalar(prev_timestep, "prev_timestep"))
            nxt = -1 if i + 1 >= self.timesteps.numel() else float(self.timesteps[i + 1])
            s_to = (
                float(self.sigmas[i + 1]) if abs(prev - nxt) <= 1e-3 or (prev < 0 and nxt < 0) else self.sigma_at(prev)
            )
        if s_to > s_from:
            raise ScheduleError(f"prev_timestep {prev} is noisier (sigma {s_to:.6g}) than timestep's ({s_from:.6g})")
        kind = self.config.kind
        if kind == "euler_ancestral":
            return prev, self._euler_coefs(s_from, s_to)
        if kind == "sde-dpmsolver++":
            return prev, self._dpm_coefs(s_from, s_to)
        return prev, self._flow_coefs(s_from, s_to, a)

    def _apply(self, out: Tensor, x: Tensor, c: dict[str, Any]) -> tuple[Tensor, Any, Tensor, Tensor]:
        """mean, var, x0_hat, noise estimate from the coefficients (floats, or [N, 1, ...] tensors per row: the
        same operations in the same order either way, so both give the same values)."""
        kind = self.config.kind
        if kind == "euler_ancestral":
            xs = x * c["c_in"] if self.config.space == "model_input" else x  # step()'s latents
            x0 = self._euler_x0(out, xs, c)
            eps = (xs - x0) / c["s"]  # the ODE derivative
            mean = xs + eps * c["step"]
            var = c["var"]
            if self.config.space == "model_input":  # back to x_prev / sqrt(1 + sigma_to^2): the model's next input
                mean, var = mean / c["c_out"], var / c["c_out2"]
            return mean, var, x0, eps
        if kind == "sde-dpmsolver++":
            x0 = _vp_x0(out, x, c, self.config.prediction_type)
            if self.config.thresholding:
                x0 = _threshold(x0, self.config.dynamic_thresholding_ratio, self.config.sample_max_value)
            mean = c["cx"] * x + c["cx0"] * x0
            eps = (x - c["a"] * x0) / c["sd"]
            return mean, c["var"], x0, eps
        x0 = x - c["s"] * out
        x1 = x + c["one_minus_s"] * out  # the noise estimate
        if self.config.sde_type == "cps":
            return c["cx0"] * x0 + c["cx1"] * x1, c["var"], x0, x1
        return x * c["cx"] + out * c["cv"], c["var"], x0, x1

    def predict_x0(self, model_output: Tensor, timestep: Any, sample: Tensor) -> Tensor:
        """Tweedie's x0_hat at `timestep` (one, or a tensor [B]: one per row), before thresholding; shape and
        dtype of `sample`."""
        out, x = _check_tensors(model_output, sample)
        if isinstance(timestep, Tensor) and timestep.dim() > 0:
            ts, _ = _rows(timestep, None, x.shape[0])
            rows = [self._x0_coefs(self.sigma_at(t)) for t in ts]
            c = {k: _per_row([r[k] for r in rows], x) for k in rows[0]}
        else:
            c = self._x0_coefs(self.sigma_at(timestep))
        kind = self.config.kind
        if kind == "flow_sde":
            return (x - c["s"] * out).to(sample.dtype)
        if kind == "euler_ancestral":
            xs = x * c["c_in"] if self.config.space == "model_input" else x
            return self._euler_x0(out, xs, c).to(sample.dtype)
        return _vp_x0(out, x, c, self.config.prediction_type).to(sample.dtype)

    def _x0_coefs(self, s: float) -> dict[str, float]:
        kind = self.config.kind
        if kind == "flow_sde":
            return {"s": s}
        if kind == "euler_ancestral":
            return {"s": s, "c_in": math.sqrt(1 + s * s), **_euler_x0_coefs(s)}
        return _vp_coefs(s)

    def _euler_x0(self, out: Tensor, x: Tensor, c: dict[str, Any]) -> Tensor:
        """x0_hat from the output, with x in step()'s space (x = x0 + sigma * eps), in diffusers' formulas."""
        pt = self.config.prediction_type
        if pt == "epsilon":
            return x - c["s"] * out
        if pt == "v_prediction":
            return out * c["v_out"] + x / c["v_x"]
        return out  # "sample": x0 directly (diffusers' Euler ancestral step() raises NotImplementedError for it)

    def _euler_coefs(self, s_from: float, s_to: float) -> dict[str, float]:
        s_up = math.sqrt(s_to**2 * (s_from**2 - s_to**2) / s_from**2)
        s_down = math.sqrt(max(s_to**2 - s_up**2, 0.0))
        c = math.sqrt(1 + s_to**2)
        return {
            "s": s_from,
            "c_in": math.sqrt(1 + s_from**2),
            "step": s_down - s_from,
            "var": s_up**2,
            "c_out": c,
            "c_out2": c**2,
            **_euler_x0_coefs(s_from),
        }

    def _dpm_coefs(self, s_from: float, s_to: float) -> dict[str, float]:
        a_s, a_t = 1 / math.sqrt(1 + s_from**2), 1 / math.sqrt(1 + s_to**2)
        sd_s, sd_t = s_from * a_s, s_to * a_t  # the VP noise std at both ends
        r = s_to / s_from  # e^{-h}: h = lambda_t - lambda_s with lambda = -log sigma
        return {**_vp_coefs(s_from), "cx": sd_t / sd_s * r, "cx0": a_t * (1 - r * r), "var": sd_t**2 * (1 - r * r)}

    def _flow_coefs(self, s: float, s_next: float, a: float) -> dict[str, float]:
        if self.config.sde_type == "cps":
            std = s_next * math.sin(a * math.pi / 2)
            k = math.sqrt(max(s_next**2 - std**2, 0.0))
            return {"s": s, "one_minus_s": 1 - s, "cx0": 1 - s_next, "cx1": k, "var": std**2}
        dt = s_next - s
        # Flow-GRPO guards sigma = 1 (pure noise) with the schedule's second sigma in the denominator
        denom = 1 - (float(self.sigmas[1]) if s == 1.0 and self.sigmas.numel() > 1 else s)
        std_dev = a * math.sqrt(s / denom) if denom > 0 else math.inf
        if not math.isfinite(std_dev):
            raise ScheduleError(f"flow SDE std is infinite at sigma={s} (sigma table {self.sigmas[:2].tolist()})")
        return {
            "s": s,
            "one_minus_s": 1 - s,
            "cx": 1 + std_dev**2 / (2 * s) * dt,
            "cv": (1 + std_dev**2 * (1 - s) / (2 * s)) * dt,
            "var": std_dev**2 * (-dt),
        }

    # ----- conversion ------------------------------------------------------------------------------
    def with_options(self, *, eta: float | None = None, space: str | None = None) -> SamplerKernelScheduler:
        """This schedule as is, or a copy with flow_sde's noise level (eta) or Euler's space replaced."""
        if eta is None and (space is None or space == self.config.space):
            return self
        changes: dict[str, Any] = {}
        if eta is not None:
            if self.config.kind != "flow_sde":
                raise ScheduleError(
                    f"eta applies to DDIM and flow_sde (its noise level) only, not {self.config.kind} (got eta={eta})"
                )
            changes["noise_level"] = float(eta)
        if space is not None and space != self.config.space:
            if self.config.kind != "euler_ancestral":
                space = self.config.space  # the two spaces coincide for the other kinds
            changes["space"] = space
        cfg = dataclasses.replace(self.config, **changes)
        return SamplerKernelScheduler(
            cfg, self.alphas_cumprod, self.timesteps.clone(), self.sigmas.clone(), self.num_inference_steps
        )

    @classmethod
    def from_diffusers(
        cls, scheduler: Any, *, eta: float | None = None, space: str = "sample", sde_type: str = "sde"
    ) -> SamplerKernelScheduler:
        """Mirror a diffusers EulerAncestralDiscreteScheduler, DPMSolverMultistepScheduler (sde-dpmsolver++,
        solver_order=1) or FlowMatchEulerDiscreteScheduler: its config, training alphas and current tables.

        eta: the flow SDE's noise level a (required for a FlowMatch scheduler, whose own step() is the ODE step,
        unless it has stochastic_sampling=True, mirrored as Flow-CPS with a = 1); refused for the other kinds.
        space: Euler ancestral's sample space ("sample": step()'s latents; "model_input": x / sqrt(1 + sigma^2)).
        """
        name = type(scheduler).__name__
        kind = MIRRORED.get(name)
        if kind is None:
            raise UnsupportedSchedulerError(unsupported_message(name))
        sc = scheduler.config
        values: dict[str, Any] = {"kind": kind, "space": space if kind == "euler_ancestral" else "sample"}
        for key in ("num_train_timesteps", "prediction_type", "timestep_spacing", "steps_offset"):
            if key in sc:
                values[key] = sc[key]
        if kind == "sde-dpmsolver++":
            _check_dpm(sc)
            for key in ("thresholding", "dynamic_thresholding_ratio", "sample_max_value", "final_sigmas_type"):
                values[key] = sc[key]
            custom = any(
                sc.get(k) for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas")
            )
            custom = custom or sc.get("lambda_min_clipped", -math.inf) != -math.inf
        elif kind == "flow_sde":
            for key in ("invert_sigmas", "per_token_timesteps"):
                if sc.get(key):
                    raise UnsupportedSchedulerError(f"{name} with {key}=True (Mochi-style schedules) is not mirrored")
            values["prediction_type"] = "flow_prediction"
            values["shift"] = float(sc.get("shift", 1.0))
            if sc.get("stochastic_sampling"):
                if eta is not None:
                    raise ScheduleError(
                        f"{name} has stochastic_sampling=True: its step() already is a Gaussian (Flow-CPS with "
                        "noise level 1), mirrored as such; pass eta=None, or set stochastic_sampling=False to use "
                        "Flow-GRPO's SDE with noise level eta"
                    )
                values.update(sde_type="cps", noise_level=1.0)
            elif eta is None:
                raise UnsupportedSchedulerError(
                    f"{name}'s step() is the deterministic flow ODE step (a point mass), which MSDDA cannot fuse; pass "
                    "a noise level eta=a (e.g. eta=0.7: Flow-GRPO's SDE step, which keeps the ODE's marginals; "
                    "eta=0 is the ODE step itself), or use stochastic_sampling=True"
                )
            else:
                values.update(sde_type=sde_type, noise_level=float(eta))
            custom = any(
                sc.get(k)
                for k in (
                    "use_dynamic_shifting",
                    "shift_terminal",
                    "use_karras_sigmas",
                    "use_exponential_sigmas",
                    "use_beta_sigmas",
                )
            )
        else:
            custom = False  # trained or zero-SNR betas need nothing more: set_timesteps uses the copied alpha-bar
        if eta is not None and kind != "flow_sde":
            raise ScheduleError(
                f"eta applies to DDIM and flow-matching (its noise level) only; {name}'s variance is set by its "
                f"schedule (got eta={eta}; pass None)"
            )
        if kind != "flow_sde" and "beta_schedule" in sc:
            values.update(beta_schedule=sc["beta_schedule"], beta_start=sc["beta_start"], beta_end=sc["beta_end"])
        if custom:
            values["sigma_schedule"] = "mirrored"
        cfg = SamplerKernelConfig(**values)
        timesteps = torch.as_tensor(scheduler.timesteps).detach().to("cpu", torch.float64)
        sigmas = torch.as_tensor(scheduler.sigmas).detach().to("cpu", torch.float64)
        if sigmas.numel() != timesteps.numel() + 1:
            raise ScheduleError(
                f"{name} has {timesteps.numel()} timesteps and {sigmas.numel()} sigmas; call "
                "scheduler.set_timesteps(num_inference_steps) before mirroring it"
            )
        alphas = getattr(scheduler, "alphas_cumprod", None) if kind != "flow_sde" else None
        return cls(cfg, alphas, timesteps, sigmas, getattr(scheduler, "num_inference_steps", None))


def _check_dpm(sc: Any) -> None:
    """Only the first-order SDE variant of DPMSolverMultistepScheduler is one Gaussian given x_t."""
    algo, order = sc["algorithm_type"], int(sc["solver_order"])
    if algo != "sde-dpmsolver++":
        raise UnsupportedSchedulerError(
            f"DPMSolverMultistepScheduler with algorithm_type={algo!r} has no reverse kernel implemented: "
            + (
                f"{_POINT_MASS}"
                if algo in ("dpmsolver++", "dpmsolver")
                else "the noise-prediction SDE variant is not mirrored"
            )
            + "; use algorithm_type='sde-dpmsolver++', solver_order=1"
        )
    if order != 1:
        raise UnsupportedSchedulerError(
            f"DPMSolverMultistepScheduler with solver_order={order} has no reverse kernel implemented: "
            f"{SDE_MULTISTEP_NOTE}; "
            "use solver_order=1 (DPMSolverMultistepScheduler.from_config(config, algorithm_type='sde-dpmsolver++', "
            "solver_order=1))"
        )
    if sc.get("use_flow_sigmas"):
        raise UnsupportedSchedulerError(
            "DPMSolverMultistepScheduler with use_flow_sigmas=True is not mirrored; for flow-matching models use "
            "FlowMatchEulerDiscreteScheduler with a noise level (eta)"
        )
    if sc.get("variance_type") not in (None, "learned", "learned_range"):
        raise UnsupportedSchedulerError(f"variance_type={sc.get('variance_type')!r} is not mirrored")


def _vp_coefs(s: float) -> dict[str, float]:
    """alpha = 1 / sqrt(1 + sigma^2) and the VP noise std sigma * alpha at noise level sigma."""
    a = 1 / math.sqrt(1 + s * s)
    return {"a": a, "sd": s * a}


def _euler_x0_coefs(s: float) -> dict[str, float]:
    """diffusers' v_prediction x0_hat in Euler's space, out * (-s / sqrt(s^2 + 1)) + x / (s^2 + 1): its factors."""
    return {"v_out": -s / math.sqrt(s * s + 1), "v_x": s * s + 1}


def _vp_x0(out: Tensor, x: Tensor, c: dict[str, Any], prediction_type: str) -> Tensor:
    """x0_hat over the VP x_t (coefficients `_vp_coefs`: floats or per-row tensors), as diffusers' DPM-Solver."""
    if prediction_type == "epsilon":
        return (x - c["sd"] * out) / c["a"]
    if prediction_type == "v_prediction":
        return c["a"] * x - c["sd"] * out
    return out


def _threshold(x0: Tensor, ratio: float, max_value: float) -> Tensor:
    """diffusers' dynamic thresholding of x0_hat (per sample)."""
    b = x0.shape[0]
    flat = x0.reshape(b, -1)
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1, max=max_value).unsqueeze(1)
    return (flat.clamp(-s, s) / s).reshape(x0.shape)


def _split_offsets(model_output: Any, sample: Any) -> tuple[Any, Tensor | None]:
    """(the prediction part, the kernel offsets or None): an output with 2C channels more than its prediction
    ([B, 3C] or [B, 4C]) carries kernel offsets (d_mean, d_logvar), as `KernelScheduler.kernel` reads them."""
    if isinstance(model_output, Tensor) and isinstance(sample, Tensor) and sample.dim() >= 2:
        c = sample.shape[1]
        if model_output.dim() == sample.dim() and model_output.shape[1] in (3 * c, 4 * c):
            split = model_output.shape[1] - 2 * c
            return model_output[:, :split], model_output[:, split:]
    return model_output, None


def _check_tensors(model_output: Any, sample: Any) -> tuple[Tensor, Tensor]:
    """The prediction channels of the output and the sample, in the kernel math's dtype; ScheduleError if unfit."""
    if not isinstance(model_output, Tensor) or not isinstance(sample, Tensor):
        raise ScheduleError(
            f"model_output and sample must be tensors, got {type(model_output).__name__} and {type(sample).__name__}"
        )
    if sample.dim() < 2 or not sample.is_floating_point() or not model_output.is_floating_point():
        raise ScheduleError(
            f"sample {tuple(sample.shape)} ({sample.dtype}) and model_output ({model_output.dtype}) must be "
            "floating-point tensors [B, C, ...]"
        )
    c = sample.shape[1]
    if model_output.shape[0] != sample.shape[0] or model_output.shape[2:] != sample.shape[2:]:
        raise ScheduleError(
            f"model_output shape {tuple(model_output.shape)} does not match sample shape {tuple(sample.shape)}"
        )
    if model_output.shape[1] == 2 * c:
        model_output = model_output[:, :c]  # a learned-variance output: these samplers use the prediction only
    elif model_output.shape[1] != c:
        raise ScheduleError(
            f"model_output has {model_output.shape[1]} channels; expected {c} (or {2 * c}) for sample channels {c}"
        )
    cdt = compute_dtype(sample.device)
    return model_output.to(cdt), sample.to(cdt)


def _scalar(timestep: Any, what: str) -> float:
    """One real timestep as a float (a 0-dim or one-element tensor, an int or a float); else ScheduleError."""
    if isinstance(timestep, Tensor):
        if timestep.numel() != 1:
            raise ScheduleError(
                f"{what} is a tensor of {timestep.numel()} values where one timestep is expected; pass one value "
                "(or, to kernel / predict_x0, a tensor [B] of timesteps with one per row)"
            )
        if timestep.is_complex() or timestep.dtype == torch.bool:
            raise ScheduleError(f"{what} has dtype {timestep.dtype}; pass a real timestep")
        timestep = timestep.item()
    if isinstance(timestep, bool) or not isinstance(timestep, numbers.Real) or not math.isfinite(float(timestep)):
        raise ScheduleError(f"{what} is {timestep!r:.60} ({type(timestep).__name__}); pass a real, finite timestep")
    return float(timestep)


def _rows(timestep: Tensor, prev_timestep: Any, n: int) -> tuple[list[float], list[Any]]:
    """The per-row timesteps (and prev timesteps, None for the defaults) of a batched call; ScheduleError if a
    tensor does not have one value per row of the batch."""
    for what, value in (("timestep", timestep), ("prev_timestep", prev_timestep)):
        if value is None:
            continue
        if not isinstance(value, Tensor) or value.dim() != 1 or value.numel() != n:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ScheduleError(
                f"{what} is {shape} for a batch of {n}; batched timesteps need one per row, a tensor [{n}] "
                "(with timestep and prev_timestep both batched)"
            )
        if value.is_complex() or value.dtype == torch.bool:
            raise ScheduleError(f"{what} has dtype {value.dtype}; pass real timesteps")
    ts = [float(v) for v in timestep.tolist()]
    prevs = [None] * n if prev_timestep is None else [float(v) for v in prev_timestep.tolist()]
    return ts, prevs


def _per_row(values: list[float], like: Tensor) -> Tensor:
    """Per-row scalars as a [N, 1, ...] tensor in `like`'s dtype and device, broadcasting over a row."""
    return torch.tensor(values, dtype=like.dtype, device=like.device).reshape(-1, *([1] * (like.dim() - 1)))


def _plain(t: float) -> float | int:
    """An integral timestep as an int (what ReverseKernel and the sampler expect), else the float."""
    return int(t) if float(t).is_integer() else t
