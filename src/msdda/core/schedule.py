"""Reverse-kernel math for DDPM and DDIM: turn a model output into the Gaussian p(x_prev | x_t).

diffusers' `step()` hides the Gaussian it samples from; this module exposes it. `KernelScheduler` is our
own small schedule object (no diffusers import), and `reverse_kernel` also accepts diffusers'
DDPMScheduler / DDIMScheduler by reading their config, so the math is the same on both paths.
For every supported configuration `mean + sqrt(var) * z` equals the `prev_sample` that diffusers'
`step()` returns with the same noise z (tested at every timestep), except at the final DDPM step
(t -> -1): there `step()` adds no noise and returns the mean, while the kernel keeps the variance its
variance_type defines (beta_0 for fixed_large, ~0 for fixed_small); the sampler returns the mean at the
last step too, so samples agree. Coefficients are computed in float64, and so is the kernel math on the
device, except on MPS (no float64 there): float32, means within ~1e-6 (`msdda.core.kernel.compute_dtype`).
Timesteps are checked: an integer in [0, num_train_timesteps) (prev_timestep may be -1), and a DDIM
schedule must have its inference timesteps set (`set_timesteps`) before a kernel steps back from t.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from msdda.config import JSONConfig
from msdda.core.betas import BETA_SCHEDULES, make_betas  # noqa: F401  (re-exported: msdda.core.schedule.make_betas)
from msdda.core.errors import ScheduleError, UnsupportedSchedulerError
from msdda.core.kernel import ReverseKernel, apply_kernel_offsets, compute_dtype
from msdda.core.samplers import MIRRORED, SamplerKernelScheduler, unsupported_message

PredictionType = Literal["epsilon", "sample", "v_prediction"]
KERNEL_KINDS = ("ddpm", "ddim")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
DDPM_VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "learned", "learned_range")
LEARNED_VARIANCE_TYPES = ("learned", "learned_range")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
# diffusers clamps the posterior variance at this floor before taking logs; we match it.
_VARIANCE_FLOOR = 1e-20


@dataclass
class KernelSchedulerConfig(JSONConfig):
    """Everything that fixes the reverse kernel; mirrors the diffusers config keys of the same name."""

    config_error = ScheduleError

    kind: str = "ddpm"  # "ddpm" | "ddim"
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    beta_start: float = 0.0001
    beta_end: float = 0.02
    prediction_type: str = "epsilon"
    variance_type: str = "fixed_small"  # DDPM only
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    set_alpha_to_one: bool = True  # DDIM only: alpha_prev at the last step is 1 (else alphas_cumprod[0])
    eta: float = 0.0  # DDIM only: 0 = deterministic, 1 = DDPM-like variance

    def validate(self) -> None:
        checks = [
            ("kind", self.kind, KERNEL_KINDS),
            ("prediction_type", self.prediction_type, PREDICTION_TYPES),
            ("timestep_spacing", self.timestep_spacing, TIMESTEP_SPACINGS),
        ]
        if self.kind == "ddpm":
            checks.append(("variance_type", self.variance_type, DDPM_VARIANCE_TYPES))
        for name, value, valid in checks:
            if value not in valid:
                raise ScheduleError(f"{name}={value!r} is not supported; choose one of {valid}")
        if not 0.0 <= self.eta <= 1.0:
            raise ScheduleError(f"eta={self.eta} is outside [0, 1]")


@dataclass
class _StepCoefficients:
    """The scalar (or per-sample [B, 1, ...]) float64 coefficients of one step t -> prev_t."""

    sqrt_a: Tensor
    sqrt_1ma: Tensor
    x0_coeff: Tensor | None = None
    x_coeff: Tensor | None = None  # DDPM: the weight of x_t in the posterior mean
    eps_coeff: Tensor | None = None  # DDIM: the weight of eps_hat
    var: Tensor | None = None  # the variance when it is not per element (learned variance: None)
    log_beta: Tensor | None = None  # learned_range: log beta_t and log of the posterior variance
    log_small: Tensor | None = None


@dataclass
class KernelScheduler:
    """A DDPM or DDIM sampling schedule that returns reverse kernels instead of samples.

    alphas_cumprod: [T] training alpha-bar values (float64); built from the config when not given.
    timesteps: the inference timesteps, descending (set by `set_timesteps`).
    """

    config: KernelSchedulerConfig = field(default_factory=KernelSchedulerConfig)
    alphas_cumprod: Tensor | None = None
    timesteps: Tensor | None = None
    num_inference_steps: int | None = None

    def __post_init__(self) -> None:
        self.config.validate()
        if self.alphas_cumprod is None:
            betas = make_betas(
                self.config.num_train_timesteps,
                self.config.beta_schedule,
                self.config.beta_start,
                self.config.beta_end,
            )
            self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        # Keep the given dtype: coefficients are computed in it, exactly as the source scheduler does.
        self.alphas_cumprod = self.alphas_cumprod.detach().to("cpu")
        if self.timesteps is None:
            self.timesteps = torch.arange(self.config.num_train_timesteps - 1, -1, -1, dtype=torch.long)

    # ----- timesteps -------------------------------------------------------------------------------
    def set_timesteps(self, num_inference_steps: int) -> Tensor:
        """Choose the inference timesteps exactly as diffusers does for the configured spacing."""
        t_train = self.config.num_train_timesteps
        n = int(num_inference_steps)
        if not 1 <= n <= t_train:
            raise ScheduleError(f"num_inference_steps={num_inference_steps} must be in [1, {t_train}]")
        spacing = self.config.timestep_spacing
        if spacing == "linspace":
            ts = np.linspace(0, t_train - 1, n).round()[::-1].copy().astype(np.int64)
        elif spacing == "leading":
            ts = (np.arange(0, n) * (t_train // n)).round()[::-1].copy().astype(np.int64)
            ts += self.config.steps_offset
        else:  # trailing
            ts = np.round(np.arange(t_train, 0, -t_train / n)).astype(np.int64) - 1
        self.timesteps = torch.from_numpy(ts)
        self.num_inference_steps = n
        return self.timesteps

    def prev_timestep(self, timestep: int) -> int:
        """The timestep the kernel at `timestep` moves to (-1 after the last step)."""
        _check_timestep(timestep, self.config.num_train_timesteps)
        t = int(timestep)
        if self.config.kind == "ddim":
            # diffusers' DDIM steps back by T // n whatever the spacing; we match it. Without n the step
            # size is unknown: guessing n = T (1000 steps) would silently give a different sampler.
            n = self.num_inference_steps
            if not n:
                raise ScheduleError(
                    "this DDIM schedule has no inference timesteps; call scheduler.set_timesteps(num_inference_steps) "
                    "first (or pass prev_timestep), so the kernel knows how far each step goes back"
                )
            return t - self.config.num_train_timesteps // n
        # t -> prev_t for every inference timestep, rebuilt when `timesteps` is replaced or changed in place
        ts = self.timesteps
        cache = self.__dict__.get("_prev_cache")
        if cache is None or cache[0] is not ts or cache[1] != ts._version:
            values = [int(v) for v in ts.tolist()]
            steps: dict[int, int] = {}
            for i, v in enumerate(values):
                steps.setdefault(v, values[i + 1] if i + 1 < len(values) else -1)  # the first occurrence wins
            cache = (ts, ts._version, steps)
            self.__dict__["_prev_cache"] = cache
        prev = cache[2].get(t)
        if prev is None:
            raise ScheduleError(
                f"timestep {t} is not in this schedule's timesteps {ts.tolist()[:6]}...; "
                "call set_timesteps first or pass one of its timesteps"
            )
        return prev

    def alpha_bar(self, timestep: int | Tensor) -> Tensor:
        """alpha-bar at `timestep` (float64); -1 means 'before the first noise' and gives the final value."""
        if isinstance(timestep, Tensor) and timestep.dim() > 0:
            _check_timestep(timestep, self.config.num_train_timesteps, lowest=-math.inf)
            t = timestep.to("cpu", torch.long)
            final = self._final_alpha_bar()
            out = self.alphas_cumprod[t.clamp_min(0)]
            return torch.where(t >= 0, out, torch.full_like(out, final))
        _check_timestep(timestep, self.config.num_train_timesteps, lowest=-math.inf)
        t = int(timestep)
        if t >= 0:
            return self.alphas_cumprod[t]
        return torch.tensor(self._final_alpha_bar(), dtype=self.alphas_cumprod.dtype)

    def _final_alpha_bar(self) -> float:
        if self.config.kind == "ddim" and not self.config.set_alpha_to_one:
            return float(self.alphas_cumprod[0])
        return 1.0

    # ----- forward process -------------------------------------------------------------------------
    def add_noise(self, x0: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """q(x_t | x0): sqrt(ab_t) x0 + sqrt(1 - ab_t) noise; timesteps [B] (long)."""
        _check_timestep(timesteps, self.config.num_train_timesteps, "timesteps")
        ab = _bc(self.alpha_bar(timesteps), x0)
        return (ab.sqrt() * _hi(x0) + (1 - ab).sqrt() * _hi(noise)).to(x0.dtype)

    def q_posterior(
        self, x0: Tensor, x_t: Tensor, timestep: int | Tensor, prev_timestep: int | Tensor
    ) -> tuple[Tensor, Tensor]:
        """The true posterior q(x_prev | x_t, x0) = N(mean, var); var broadcastable (float64 math)."""
        _check_timestep(timestep, self.config.num_train_timesteps)
        a_t = _bc(self.alpha_bar(timestep), x_t)
        a_p = _bc(self.alpha_bar(prev_timestep), x_t)
        beta_t = 1 - a_t / a_p
        mean = (a_p.sqrt() * beta_t / (1 - a_t)) * _hi(x0) + ((a_t / a_p).sqrt() * (1 - a_p) / (1 - a_t)) * _hi(x_t)
        var = ((1 - a_p) / (1 - a_t) * beta_t).clamp_min(_VARIANCE_FLOOR)
        return mean.to(x_t.dtype), var.to(x_t.dtype)

    # ----- the reverse kernel ----------------------------------------------------------------------
    def kernel(
        self,
        model_output: Tensor,
        timestep: int | Tensor,
        sample: Tensor,
        *,
        prev_timestep: int | Tensor | None = None,
        eta: float | None = None,
        use_clipped_model_output: bool = False,
    ) -> ReverseKernel:
        """p(x_prev | x_t = sample) for the model output at `timestep`.

        model_output: [B, C, ...] (or [B, 2C, ...] for learned variance: prediction then variance value; a
          further 2C channels are kernel offsets, see `apply_kernel_offsets`).
        timestep: an int, or a LongTensor [B] with one timestep per sample (training); then pass
          `prev_timestep` [B] too (default t - 1).
        Returns a ReverseKernel whose mean has the shape and dtype of `sample` and whose var is 0-dim
        (fixed variance) or per element (learned variance). At the final step (prev_timestep -1) var is
        what the variance type defines there (DDPM fixed_large: beta_0 > 0), although diffusers' `step()`
        adds no noise at that step; the sampler returns the mean at the last step, so samples agree, and
        the variance is the one log_prob / kl use. Raises ScheduleError for a timestep outside
        [0, num_train_timesteps) (prev_timestep may be -1) and for a DDIM schedule without set_timesteps.
        """
        cfg = self.config
        _check_timestep(timestep, cfg.num_train_timesteps)
        if prev_timestep is not None:
            _check_timestep(prev_timestep, cfg.num_train_timesteps, "prev_timestep", lowest=-math.inf)
        if not isinstance(model_output, Tensor) or not isinstance(sample, Tensor):
            raise ScheduleError(
                f"model_output and sample must be tensors, got {type(model_output).__name__} and "
                f"{type(sample).__name__}"
            )
        if sample.dim() < 2 or not sample.is_floating_point() or not model_output.is_floating_point():
            raise ScheduleError(
                f"sample {tuple(sample.shape)} ({sample.dtype}) and model_output ({model_output.dtype}) must be "
                "floating-point tensors [B, C, ...]"
            )
        if model_output.shape[0] != sample.shape[0] or model_output.shape[2:] != sample.shape[2:]:
            raise ScheduleError(
                f"model_output shape {tuple(model_output.shape)} does not match sample shape {tuple(sample.shape)}"
            )
        c = sample.shape[1]
        learned = cfg.kind == "ddpm" and cfg.variance_type in LEARNED_VARIANCE_TYPES
        predicted_variance = None
        offsets = None
        if model_output.shape[1] in (3 * c, 4 * c):
            # Kernel offsets (aligned models that must reach the step optimum): the last 2C channels move the
            # mean past x0 clipping and the variance out of [beta_tilde_t, beta_t]; see `apply_kernel_offsets`.
            split = model_output.shape[1] - 2 * c
            model_output, offsets = model_output[:, :split], model_output[:, split:]
        if model_output.shape[1] == 2 * c:
            # A learned-variance model: the second half is the variance; fixed-variance kernels ignore it,
            # as diffusers pipelines do before calling DDIM.
            model_output, predicted_variance = model_output[:, :c], model_output[:, c:]
        elif model_output.shape[1] != c:
            raise ScheduleError(
                f"model_output has {model_output.shape[1]} channels; expected {c} or {2 * c} (or {3 * c} / {4 * c} "
                f"with kernel offsets) for sample channels {c}"
            )
        if learned and predicted_variance is None:
            raise ScheduleError(
                f"variance_type={cfg.variance_type!r} needs a model output with {2 * c} channels "
                f"(prediction and variance), got {model_output.shape[1]}"
            )

        batched_t = isinstance(timestep, Tensor) and timestep.dim() > 0
        if batched_t:
            t_val: int | Tensor = timestep
            prev = timestep - 1 if prev_timestep is None else prev_timestep
        else:
            t_val = int(timestep)
            prev = self.prev_timestep(t_val) if prev_timestep is None else int(prev_timestep)
        if cfg.kind == "ddim":
            eta = cfg.eta if eta is None else float(eta)
            if not 0.0 <= eta <= 1.0:
                raise ScheduleError(f"eta={eta} is outside [0, 1]")
        elif eta is not None:
            raise ScheduleError("eta applies to DDIM only; a DDPM kernel's variance is set by variance_type")
        coef = self._coefficients(t_val, prev, sample, eta, batched_t)
        x = _hi(sample)
        out = _hi(model_output)
        x0, eps = _x0_eps(out, x, coef.sqrt_a, coef.sqrt_1ma, cfg.prediction_type)
        x0 = self._clip_or_threshold(x0)

        if cfg.kind == "ddim":
            if use_clipped_model_output:
                eps = (x - coef.sqrt_a * x0) / coef.sqrt_1ma
            mean = coef.x0_coeff * x0 + coef.eps_coeff * eps
            var = coef.var
        else:
            mean = coef.x0_coeff * x0 + coef.x_coeff * x
            var = self._ddpm_variance(coef, predicted_variance)

        if offsets is not None:
            mean, var = apply_kernel_offsets(mean, var, _hi(offsets))
        dtype = sample.dtype
        return ReverseKernel(
            mean=mean.to(dtype),
            # a cached coefficient is never handed out: the caller gets its own tensor
            var=var.to(dtype, copy=var is coef.var),
            pred_original_sample=x0.to(dtype),
            pred_epsilon=eps.to(dtype),
            timestep=-2 if batched_t else int(t_val),
            prev_timestep=-2 if batched_t else int(prev),
        )

    def _coefficients(
        self, t_val: int | Tensor, prev: int | Tensor, like: Tensor, eta: float | None, batched_t: bool
    ) -> _StepCoefficients:
        """The step's scalar coefficients, as float64 on `like`'s device, shaped to broadcast against it.

        For an int timestep they are cached per (t, prev_t, device, configuration): the sampler asks for the
        same step once per model, and recomputing ~25 0-dim tensor operations per kernel costs as much as the
        elementwise math on a small batch. The cached values are the very tensors the computation gives (same
        operations, same order), so kernels are bit-identical with and without the cache. The cache is
        dropped when `alphas_cumprod` is replaced or changed in place.
        """
        cfg = self.config
        if batched_t:
            return self._compute_coefficients(t_val, prev, like, eta)
        alphas = self.alphas_cumprod
        key = (t_val, prev, like.device, cfg.kind, cfg.variance_type, cfg.set_alpha_to_one, eta)
        cache = self.__dict__.get("_coef_cache")
        if cache is None or cache[0] is not alphas or cache[1] != alphas._version or len(cache[2]) > 4096:
            cache = (alphas, alphas._version, {})
            self.__dict__["_coef_cache"] = cache
        coef = cache[2].get(key)
        if coef is None:
            coef = cache[2][key] = self._compute_coefficients(t_val, prev, like, eta)
        return coef

    def _compute_coefficients(
        self, t_val: int | Tensor, prev: int | Tensor, like: Tensor, eta: float | None
    ) -> _StepCoefficients:
        # Scalar coefficients in the dtype of alphas_cumprod and in diffusers' operation order, so a
        # mirrored diffusers scheduler (float32 alphas) gives the same rounding as its step().
        a_t = self.alpha_bar(t_val)
        a_p = self.alpha_bar(prev)
        coef = _StepCoefficients(sqrt_a=_bc(a_t**0.5, like), sqrt_1ma=_bc((1 - a_t) ** 0.5, like))
        if self.config.kind == "ddim":
            assert eta is not None
            std = eta * ((1 - a_p) / (1 - a_t) * (1 - a_t / a_p)) ** 0.5
            coef.x0_coeff = _bc(a_p**0.5, like)
            coef.eps_coeff = _bc((1 - a_p - std**2).clamp_min(0) ** 0.5, like)
            coef.var = _bc(std**2, like)
            return coef
        alpha_t = a_t / a_p
        beta_t = 1 - alpha_t
        coef.x0_coeff = _bc((a_p**0.5 * beta_t) / (1 - a_t), like)
        coef.x_coeff = _bc(alpha_t**0.5 * (1 - a_p) / (1 - a_t), like)
        # the DDPM variance: beta_t (fixed_large), the posterior variance (fixed_small), or between the two
        small = ((1 - a_p) / (1 - a_t) * beta_t).clamp_min(_VARIANCE_FLOOR)
        vt = self.config.variance_type
        if vt in ("fixed_small", "fixed_small_log"):
            coef.var = _bc(small, like)
        elif vt == "fixed_large":
            coef.var = _bc(beta_t, like)
        elif vt == "learned_range":
            coef.log_beta = _bc(torch.log(beta_t), like)
            coef.log_small = _bc(torch.log(small), like)
        return coef

    def _ddpm_variance(self, coef: _StepCoefficients, predicted_variance: Tensor | None) -> Tensor:
        vt = self.config.variance_type
        if vt not in LEARNED_VARIANCE_TYPES:
            assert coef.var is not None
            return coef.var
        assert predicted_variance is not None
        v = _hi(predicted_variance)
        if vt == "learned":
            return v
        frac = (v + 1) / 2  # learned_range: interpolate log-variance between posterior and beta_t
        return torch.exp(frac * coef.log_beta + (1 - frac) * coef.log_small)

    def _clip_or_threshold(self, x0: Tensor) -> Tensor:
        cfg = self.config
        if cfg.thresholding:
            b = x0.shape[0]
            flat = x0.reshape(b, -1)
            s = torch.quantile(flat.abs(), cfg.dynamic_thresholding_ratio, dim=1)
            s = s.clamp(min=1, max=cfg.sample_max_value).unsqueeze(1)
            return (flat.clamp(-s, s) / s).reshape(x0.shape)
        if cfg.clip_sample:
            return x0.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)
        return x0

    def predict_x0(self, model_output: Tensor, timestep: int | Tensor, sample: Tensor) -> Tensor:
        """Tweedie's one-step clean estimate x0_hat (unclipped), shape and dtype of `sample`."""
        _check_timestep(timestep, self.config.num_train_timesteps)
        c = sample.shape[1]
        out = model_output[:, :c] if model_output.shape[1] > c else model_output  # the prediction comes first
        a_t = self.alpha_bar(timestep)
        x = _hi(sample)
        x0, _ = _x0_eps(_hi(out), x, _bc(a_t**0.5, x), _bc((1 - a_t) ** 0.5, x), self.config.prediction_type)
        return x0.to(sample.dtype)

    # ----- conversion ------------------------------------------------------------------------------
    @classmethod
    def from_diffusers(cls, scheduler: Any, *, eta: float | None = None) -> KernelScheduler:
        """Mirror a diffusers DDPMScheduler or DDIMScheduler (its config, alphas and current timesteps)."""
        name = type(scheduler).__name__
        kinds = {"DDPMScheduler": "ddpm", "DDIMScheduler": "ddim"}
        if name in MIRRORED:
            raise UnsupportedSchedulerError(
                f"{name} has no reverse kernel implemented; use DDPMScheduler or DDIMScheduler here: KernelScheduler "
                f"mirrors DDPM/DDIM only; {name} is a sigma-table sampler, mirrored by "
                "msdda.core.samplers.SamplerKernelScheduler.from_diffusers (as_kernel_scheduler and reverse_kernel "
                "accept it directly)"
            )
        if name not in kinds:
            raise UnsupportedSchedulerError(
                unsupported_message(name) + " (e.g. DDIMScheduler.from_config(pipe.scheduler.config))"
            )
        sc = scheduler.config
        known = {f.name for f in dataclasses.fields(KernelSchedulerConfig)}
        values = {k: sc[k] for k in known if k in sc}
        values["kind"] = kinds[name]
        if eta is not None:
            values["eta"] = float(eta)
        cfg = KernelSchedulerConfig(**values)
        return cls(
            config=cfg,
            alphas_cumprod=scheduler.alphas_cumprod,
            timesteps=scheduler.timesteps.detach().to("cpu", torch.long).clone(),
            num_inference_steps=scheduler.num_inference_steps,
        )


def _check_timestep(timestep: Any, num_train_timesteps: int, what: str = "timestep", lowest: float = 0) -> None:
    """An integer timestep (or an integer tensor of them) in [lowest, num_train_timesteps), else ScheduleError.

    A previous timestep may be negative (lowest=-inf): any value < 0 means 'after the last step'."""
    if isinstance(timestep, Tensor):
        integral = not (timestep.is_complex() or timestep.dtype == torch.bool) and (
            not timestep.is_floating_point() or bool((timestep == timestep.round()).all())
        )
        if not integral:
            raise ScheduleError(f"{what} has dtype {timestep.dtype}; pass integer timesteps (a LongTensor)")
        if timestep.numel() == 0:
            raise ScheduleError(f"{what} is an empty tensor; pass one timestep per sample")
        lo, hi = int(timestep.min()), int(timestep.max())
    elif isinstance(timestep, numbers.Real) and not isinstance(timestep, bool) and float(timestep).is_integer():
        lo = hi = int(timestep)  # ints, numpy integers, and floats with an integer value (999.0)
    else:
        raise ScheduleError(f"{what} is {timestep!r:.60} ({type(timestep).__name__}); pass an integer timestep")
    if hi >= num_train_timesteps:
        raise ScheduleError(f"{what} {hi} >= num_train_timesteps {num_train_timesteps}")
    if lo < lowest:
        raise ScheduleError(
            f"{what} {lo} is negative; timesteps run from 0 to {num_train_timesteps - 1}"
            + " (a negative value only as the previous timestep of the last step)"
        )


def _hi(x: Tensor) -> Tensor:
    """`x` in the kernel math's dtype on its device: float64, or float32 on MPS (`compute_dtype`)."""
    return x.to(compute_dtype(x.device))


def _bc(value: Tensor, like: Tensor) -> Tensor:
    """A 0-dim or [B] coefficient in the kernel math's dtype (float64; float32 on MPS, rounded on the CPU
    before the move, as MPS cannot hold float64) on `like`'s device, shaped to broadcast against [B, ...]."""
    cdt = compute_dtype(like.device)
    value = value.to(cdt).to(like.device) if cdt != torch.float64 else value.to(like.device, torch.float64)
    if value.dim() == 0:
        return value
    return value.reshape(-1, *([1] * (like.dim() - 1)))


def _x0_eps(out: Tensor, x: Tensor, sqrt_a: Tensor, sqrt_1ma: Tensor, prediction_type: str) -> tuple[Tensor, Tensor]:
    """x0_hat and eps_hat from a model output, in diffusers' operation order; sqrt(a_t), sqrt(1 - a_t) as `_bc`
    gives them (0-dim, or shaped to broadcast against [B, ...])."""
    if prediction_type == "epsilon":
        eps = out
        x0 = (x - sqrt_1ma * eps) / sqrt_a
    elif prediction_type == "sample":
        x0 = out
        eps = (x - sqrt_a * x0) / sqrt_1ma
    elif prediction_type == "v_prediction":
        x0 = sqrt_a * x - sqrt_1ma * out
        eps = sqrt_a * out + sqrt_1ma * x
    else:
        raise ScheduleError(f"prediction_type={prediction_type!r}; choose one of {PREDICTION_TYPES}")
    return x0, eps


def as_kernel_scheduler(
    scheduler: Any, *, eta: float | None = None, space: str | None = None
) -> KernelScheduler | SamplerKernelScheduler:
    """A kernel scheduler for `scheduler`: ours as is (eta overridden if given), or a diffusers scheduler mirrored.

    DDPM/DDIM -> KernelScheduler. Euler ancestral, DPM-Solver++ (sde-dpmsolver++, order 1) and flow matching ->
    SamplerKernelScheduler (msdda.core.samplers); eta is then flow matching's SDE noise level (required there:
    its own step() is an ODE step). space: Euler ancestral's sample space. A mirrored diffusers Euler ancestral
    scheduler defaults to "model_input" (x / sqrt(1 + sigma^2), what the model is fed): the msdda sampler, which
    calls this function, feeds x_t to the model as is and draws x_T ~ N(0, I); reverse_kernel defaults to step()'s
    own space instead. Other schedulers raise UnsupportedSchedulerError naming the class, why, and what to use.
    """
    if isinstance(scheduler, SamplerKernelScheduler):
        return scheduler.with_options(eta=eta, space=space)
    if type(scheduler).__name__ in MIRRORED:
        return SamplerKernelScheduler.from_diffusers(scheduler, eta=eta, space=space or "model_input")
    if space not in (None, "sample", "model_input"):
        raise ScheduleError(f"space={space!r}; choose 'sample' or 'model_input' (they coincide for DDPM/DDIM)")
    ks = scheduler if isinstance(scheduler, KernelScheduler) else KernelScheduler.from_diffusers(scheduler)
    if eta is not None and ks.config.kind != "ddim":
        raise ScheduleError(
            f"eta applies to DDIM only (got eta={eta}); a DDPM kernel's variance is set by variance_type "
            "(pass eta=0 or None)"
        )
    if isinstance(scheduler, KernelScheduler):
        if eta is None:
            return scheduler
        cfg = dataclasses.replace(scheduler.config, eta=float(eta))
        return KernelScheduler(cfg, scheduler.alphas_cumprod, scheduler.timesteps, scheduler.num_inference_steps)
    if eta is not None:
        ks.config.eta = float(eta)
        ks.config.validate()
    return ks


def reverse_kernel(
    scheduler: Any,
    model_output: Tensor,
    timestep: int | float | Tensor,
    sample: Tensor,
    *,
    eta: float | None = None,
    use_clipped_model_output: bool = False,
    space: str | None = None,
) -> ReverseKernel:
    """The Gaussian reverse kernel p(x_prev | x_t) that `scheduler.step()` would sample from.

    At the final step (t -> -1) `step()` adds no noise and returns the mean, while this kernel keeps the
    variance of the scheduler's variance type (DDPM fixed_large: beta_0); the sampler returns the mean there,
    so samples agree. Negative timesteps, and a DDIM scheduler without `set_timesteps`, raise ScheduleError.

    scheduler: a KernelScheduler or SamplerKernelScheduler, or diffusers' DDPMScheduler / DDIMScheduler /
      EulerAncestralDiscreteScheduler / DPMSolverMultistepScheduler (sde-dpmsolver++, solver_order=1) /
      FlowMatchEulerDiscreteScheduler (with eta = its SDE noise level) after `set_timesteps`.
    eta: DDIM (default: the KernelScheduler's config, 0 for diffusers as in its `step()`), or flow matching's
      noise level. space: Euler ancestral only; a diffusers scheduler defaults to step()'s own space ("sample":
      `sample` and the kernel are the latents step() takes and returns), ours to its configured space.
    Returns a ReverseKernel: `.mean` [shape of sample], `.var` (0-dim or per element), `.pred_original_sample`.
    """
    if type(scheduler).__name__ in MIRRORED:
        space = space or "sample"
    ks = as_kernel_scheduler(scheduler, eta=eta, space=space)
    return ks.kernel(model_output, timestep, sample, use_clipped_model_output=use_clipped_model_output)
