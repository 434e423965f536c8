"""`MSDDAPipeline`: Stable Diffusion (1.x / 2.x) through diffusers, with K objectives fused at every step.

The base pipeline (a diffusers `StableDiffusionPipeline`) supplies the text encoder, VAE, tokenizer,
scheduler and the base UNet. Each objective is a LoRA adapter inside that UNet (switched per forward
pass, so memory is about one UNet plus the adapters) or a full UNet. A call encodes the prompt and draws
the initial latents exactly as diffusers does, wraps every objective as a Denoiser over latents
`(x_t, t, cond=prompt_embeds) -> eps`, runs `msdda.sampling.sample` with the chosen step rule, and
decodes with the VAE exactly as diffusers does.

SDXL is not supported: its UNet needs pooled text embeddings and time ids beside the prompt embeddings,
which this pipeline's shared `cond` does not carry.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from msdda.core.errors import UnsupportedSchedulerError
from msdda.core.fusion import SUM_TO_ONE_RTOL, exponents_from_preferences
from msdda.core.kernel import GaussianKernel
from msdda.core.schedule import KernelScheduler
from msdda.pipelines._deps import dtype_kwargs, require
from msdda.pipelines.errors import ObjectiveError, PipelineError
from msdda.pipelines.objectives import (
    AdapterSwitch,
    Objective,
    UNetDenoiser,
    build_lora_soup,
    build_unet_soup,
    resolve_objective,
)
from msdda.sampling import DBMPA, DBMPALS, MSDDA, RGG, CoDe, Cost, SingleModel, StepContext, sample

logger = logging.getLogger(__name__)

METHODS = ("msdda", "db-mpa", "db-mpa-ls", "rewarded-soup", "code", "rgg", "base", "single:<name>")
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
REFERENCE = "reference"
SOUP_ADAPTER = "msdda_rewarded_soup"
SCHEDULERS = ("ddim", "ddpm")
_CALLBACK_TENSOR_INPUTS = ("latents",)

RewardCallable = Callable[[Tensor, Any], Tensor]


@dataclass
class MSDDAPipelineOutput:
    """What a call returns.

    images: per `output_type`: "pil" list of PIL images, "np" float array [B, H, W, 3] in [0, 1],
      "pt" tensor [B, 3, H, W] in [0, 1], "latent" the final latents [B, 4, H/8, W/8].
    nsfw_content_detected: the safety checker's flags (None without a checker).
    cost: model evaluations (CFG pairs count 2), reward calls, seconds and peak memory of the denoising.
    config: the resolved settings of the call (method, weights, exponents, steps, scheduler, ...).
    """

    images: Any
    nsfw_content_detected: list[bool] | None
    cost: Cost
    config: dict[str, Any] = field(default_factory=dict)


def _draw_like_diffusers(kernel: GaussianKernel, generator: torch.Generator | None) -> Tensor:
    """mean + sqrt(var) * z with z from diffusers' randn_tensor (so a CPU generator serves a GPU run).

    A zero variance (DDIM with eta = 0) draws nothing, as diffusers' DDIM step does.
    """
    var = kernel.var
    if (var.dim() == 0 and float(var) == 0.0) or (var.dim() > 0 and not bool((var != 0).any())):
        return kernel.mean
    from diffusers.utils.torch_utils import randn_tensor

    mean = kernel.mean
    z = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return mean + kernel.std.to(mean.dtype) * z


class _PipelineRule:
    """Wraps a step rule: draws like diffusers and runs `callback_on_step_end` after each drawn step.

    final_noise: at the last step draw from the kernel as diffusers' step() does (DDIM with eta > 0 adds
    noise there) instead of returning its mean, which msdda.sample does on its own.
    """

    def __init__(
        self, rule: Any, on_step: Callable[[int, int, Tensor], Tensor] | None, *, final_noise: bool = True
    ) -> None:
        self.rule = rule
        self.name = rule.name
        self.on_step = on_step
        self.final_noise = final_noise

    @property
    def uses_reference(self) -> bool:
        return bool(self.rule.uses_reference)

    def check(self, num_models: int) -> None:
        self.rule.check(num_models)

    def __call__(self, ctx: StepContext) -> GaussianKernel:
        kernel = self.rule(ctx)
        if ctx.is_last and self.final_noise:
            # The sampler returns the mean at the last step; a point mass at a diffusers-style draw keeps parity.
            x = _draw_like_diffusers(kernel, ctx.generator)
            return GaussianKernel(x, torch.zeros((), dtype=x.dtype, device=x.device))
        return kernel

    def draw(self, ctx: StepContext, kernel: GaussianKernel) -> Tensor:
        inner = getattr(self.rule, "draw", None)
        x = inner(ctx, kernel) if inner is not None else _draw_like_diffusers(kernel, ctx.generator)
        if self.on_step is not None:
            x = self.on_step(ctx.index, ctx.timestep, x)
        return x


class _LatentReward:
    """Adapts a user reward to CoDe/RGG's `(x0_latents, cond) -> [B]` signature.

    reward_input "image": the Tweedie latents are decoded by the VAE to images [B, 3, H, W] in [0, 1]
    (differentiably, for RGG) and the reward is called as `reward(images, prompts)`.
    reward_input "latent": the reward gets the latents [B, 4, h, w] themselves: `reward(latents, prompts)`.
    prompts: the list of B prompt strings (None when the call gave prompt_embeds).
    """

    def __init__(self, fn: Callable[..., Tensor], name: str, vae: nn.Module | None, prompts: list[str] | None):
        self.fn = fn
        self.name = name
        self.vae = vae
        self.prompts = prompts
        self.differentiable = bool(getattr(fn, "differentiable", True))

    def __call__(self, x0: Tensor, cond: Any = None) -> Tensor:
        if self.vae is None:
            values = self.fn(x0, self.prompts)
        else:
            latents = x0.to(self.vae.dtype) / self.vae.config.scaling_factor
            images = self.vae.decode(latents, return_dict=False)[0]
            values = self.fn((images / 2 + 0.5).clamp(0, 1), self.prompts)
        if not isinstance(values, Tensor) or values.shape != (x0.shape[0],):
            shape = tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__
            raise PipelineError(
                f"reward {self.name!r} returned {shape}; it must return a tensor of shape [{x0.shape[0]}]"
            )
        return values.to(x0.dtype)


def _check_base(base: Any) -> None:
    name = type(base).__name__
    if "XL" in name or getattr(base, "text_encoder_2", None) is not None:
        raise PipelineError(
            f"{name} is an SDXL pipeline; MSDDAPipeline supports StableDiffusionPipeline (SD 1.x / 2.x) only, "
            "because SDXL's UNet needs pooled embeddings and time ids that the shared condition does not carry"
        )
    for attr in ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "encode_prompt", "prepare_latents"):
        if getattr(base, attr, None) is None:
            raise PipelineError(
                f"{name} has no {attr!r}; pass a diffusers StableDiffusionPipeline (SD 1.x / 2.x) as the base"
            )
    if getattr(base.unet.config, "time_cond_proj_dim", None) is not None:
        raise PipelineError("the base UNet has time_cond_proj_dim set (an LCM model); its kernels are not DDPM/DDIM")


def convert_scheduler(base: Any, scheduler: str | None) -> None:
    """Replace the base pipeline's scheduler by DDIM or DDPM built from its config (None: keep it)."""
    if scheduler is None:
        return
    diffusers = require("diffusers", "MSDDAPipeline")
    classes = {"ddim": diffusers.DDIMScheduler, "ddpm": diffusers.DDPMScheduler}
    if scheduler not in classes:
        raise PipelineError(f"scheduler={scheduler!r}; choose one of {SCHEDULERS} (or None to keep the base's)")
    base.scheduler = classes[scheduler].from_config(base.scheduler.config)


class MSDDAPipeline:
    """Multi-objective Stable Diffusion: K objectives (LoRA adapters or full UNets) fused at every step.

    base: a diffusers StableDiffusionPipeline (SD 1.x / 2.x). Its UNet is the reference model; LoRA
      objectives are loaded into it as adapters named after the objectives.
    objectives: {name: source}; a source is a LoRA path (diffusers or peft format, `.safetensors` only),
      the name of an adapter already loaded into base.unet, a full-UNet folder, or a UNet module.
    scheduler: "ddim" or "ddpm" to rebuild the base scheduler from its config (SD 1.5 ships PNDM, whose
      kernel is not implemented); None keeps it (it must then be DDIM or DDPM at call time).
    """

    def __init__(self, base: Any, objectives: Mapping[str, Any], *, scheduler: str | None = None) -> None:
        require("diffusers", "MSDDAPipeline")
        _check_base(base)
        if not isinstance(objectives, Mapping):
            raise ObjectiveError(
                f"objectives must be a mapping name -> source, got {type(objectives).__name__}; e.g. "
                "{'aesthetic': 'loras/aesthetic', 'alignment': 'loras/alignment'}"
            )
        self.base = base
        convert_scheduler(base, scheduler)
        self.unet: nn.Module = base.unet.eval()
        self.objectives: dict[str, Objective] = {}
        self.switch = AdapterSwitch(self.unet)
        try:
            for name, source in objectives.items():
                self.add_objective(name, source)
        finally:
            self.switch.refresh()
            self.switch.disable()

    # ----- construction -------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        base: str | Path,
        objectives: Mapping[str, Any],
        *,
        scheduler: str | None = "ddim",
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        **base_kwargs: Any,
    ) -> MSDDAPipeline:
        """Load the base StableDiffusionPipeline from a local folder (safetensors only), then the objectives.

        dtype: e.g. torch.float16 on GPUs. base_kwargs go to `StableDiffusionPipeline.from_pretrained` (e.g.
        safety_checker=None). The objectives load in the base UNet's dtype and device.
        """
        diffusers = require("diffusers", "MSDDAPipeline")
        path = Path(base).expanduser()
        index = path / "model_index.json"
        if not index.is_file():
            raise PipelineError(
                f"{path} is not a diffusers pipeline folder (no model_index.json); save one with "
                "pipe.save_pretrained(folder) or download it first"
            )
        cls_name = json.loads(index.read_text()).get("_class_name", "")
        if cls_name != "StableDiffusionPipeline":
            raise PipelineError(
                f"{path} holds a {cls_name or 'unknown'} pipeline; MSDDAPipeline supports StableDiffusionPipeline "
                "(SD 1.x / 2.x) only"
            )
        kwargs: dict[str, Any] = {"use_safetensors": True, "local_files_only": True, **dtype_kwargs(diffusers, dtype)}
        kwargs.update(base_kwargs)
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(path), **kwargs)
        if device is not None:
            pipe = pipe.to(device)
        return cls(pipe, objectives, scheduler=scheduler)

    def add_objective(self, name: str, source: Any) -> Objective:
        """Add one objective (see the class docstring for sources); its adapter is left disabled."""
        if name in self.objectives:
            raise ObjectiveError(f"objective {name!r} already exists; choose another name")
        try:
            obj = resolve_objective(self.unet, name, source)
        finally:
            self.switch.refresh()
            self.switch.disable()
        self.objectives[name] = obj
        logger.info("objective %r: %s from %s", name, obj.kind, obj.source)
        return obj

    def to(self, *args: Any, **kwargs: Any) -> MSDDAPipeline:
        """Move the base pipeline and every full-UNet objective (same arguments as nn.Module.to)."""
        self.base = self.base.to(*args, **kwargs)
        for obj in self.objectives.values():
            if obj.unet is not None:
                obj.unet.to(*args, **kwargs)
        return self

    @property
    def device(self) -> torch.device:
        return self.base._execution_device

    @property
    def objective_names(self) -> list[str]:
        return list(self.objectives)

    def denoiser(self, name: str | None) -> UNetDenoiser:
        """The Denoiser for objective `name` (None or "reference": the base UNet, adapters disabled)."""
        if name is None or name == REFERENCE:
            return UNetDenoiser(self.unet, name=REFERENCE, adapter=None, switch=self.switch)
        obj = self._objective(name)
        if obj.kind == "lora":
            return UNetDenoiser(self.unet, name=name, adapter=obj.adapter, switch=self.switch)
        return UNetDenoiser(obj.unet, name=name)

    def _objective(self, name: str) -> Objective:
        if name not in self.objectives:
            raise ObjectiveError(
                f"unknown objective {name!r}; this pipeline has {sorted(self.objectives)} (and {REFERENCE!r} for the "
                "base model)"
            )
        return self.objectives[name]

    # ----- weights and rules --------------------------------------------------------------------------
    def _check_weights(
        self, weights: Mapping[str, float] | None, method: str, allowed: Sequence[str]
    ) -> dict[str, float]:
        if weights is None or not isinstance(weights, Mapping):
            raise PipelineError(
                f"method {method!r} needs weights={{name: weight}} over {sorted(allowed)}, got {weights!r}"
            )
        unknown = sorted(k for k in weights if k not in allowed)
        if unknown:
            raise ObjectiveError(
                f"weights name unknown objective(s) {unknown}; valid names for method {method!r} are {sorted(allowed)}"
            )
        out = {}
        for k, v in weights.items():
            try:
                out[k] = float(v)
            except (TypeError, ValueError) as exc:
                raise PipelineError(f"weight {k}={v!r} is not a number") from exc
            if not math.isfinite(out[k]):
                raise PipelineError(f"weight {k}={v!r} is not finite")
        return out

    def _fill_reference(self, w: dict[str, float], method: str) -> dict[str, float]:
        """Objective weights plus the reference's: explicit, or 1 - sum of the others when that is non-zero."""
        objs = {k: v for k, v in w.items() if k != REFERENCE}
        total = math.fsum(objs.values())
        if REFERENCE in w:
            if not math.isclose(total + w[REFERENCE], 1.0, rel_tol=SUM_TO_ONE_RTOL):
                raise PipelineError(
                    f"{method}: with an explicit {REFERENCE!r} weight all weights must sum to 1, got "
                    f"{total + w[REFERENCE]:.9g}; drop {REFERENCE!r} (it then takes 1 - sum = {1 - total:.6g}) "
                    "or fix them"
                )
            ref = w[REFERENCE]
        else:
            ref = 0.0 if math.isclose(total, 1.0, rel_tol=SUM_TO_ONE_RTOL) else 1.0 - total
        out = {k: v for k, v in objs.items() if v != 0.0}
        if ref != 0.0:
            out[REFERENCE] = ref
        if not out:
            raise PipelineError(f"{method}: every weight is zero; give at least one objective a non-zero weight")
        return out

    def _plan(
        self,
        method: str,
        weights: Mapping[str, float] | None,
        betas: Mapping[str, float] | None,
        beta: float,
        rewards: Mapping[str, Callable[..., Tensor]] | None,
        reward_input: str,
        method_options: Mapping[str, Any],
        prompts: list[str] | None,
    ) -> tuple[list[UNetDenoiser], Any, dict[str, Any], Callable[[], None]]:
        """(denoisers, step rule, record, cleanup) for a method. Only rewarded-soup builds anything here."""
        names = list(self.objectives)
        record: dict[str, Any] = {}

        def nothing() -> None:
            return None

        if method == "base":
            return [self.denoiser(None)], SingleModel(0), record, nothing
        if method.startswith("single:"):
            name = method.split(":", 1)[1]
            self._objective(name)
            return [self.denoiser(name)], SingleModel(0), record, nothing
        if method in ("msdda", "db-mpa", "db-mpa-ls"):
            w = self._check_weights(weights, method, [*names, REFERENCE])
            if method == "msdda" and (betas is not None or beta != 1.0):
                b = dict(betas or {})
                unknown = sorted(k for k in b if k not in names)
                if unknown:
                    raise ObjectiveError(f"betas name unknown objective(s) {unknown}; valid names are {sorted(names)}")
                objs = [k for k in w if k != REFERENCE]
                a = exponents_from_preferences([w[k] for k in objs], [float(b.get(k, 1.0)) for k in objs], beta)
                w = {**dict(zip(objs, a, strict=True)), **({REFERENCE: w[REFERENCE]} if REFERENCE in w else {})}
            full = self._fill_reference(w, method)
            values = list(full.values())
            models = [self.denoiser(k) for k in full]
            record["exponents" if method == "msdda" else "model_weights"] = full
            if method == "msdda":
                return models, MSDDA(values), record, nothing
            if method == "db-mpa":
                return models, DBMPA(values), record, nothing
            if any(v < 0 for v in values):
                raise PipelineError(
                    f"db-mpa-ls: weights {full} include a negative probability (the reference takes 1 - sum of the "
                    "others); use weights in [0, 1] that sum to at most 1"
                )
            return models, DBMPALS(values), record, nothing
        if method == "rewarded-soup":
            w = self._check_weights(weights, method, [*names, REFERENCE])
            objs = {k: v for k, v in w.items() if k != REFERENCE and v != 0.0}
            if not objs:
                return [self.denoiser(None)], SingleModel(0), {"soup": {}}, nothing
            kinds = {self.objectives[k].kind for k in objs}
            record["soup"] = objs
            if kinds == {"lora"}:
                adapters = {self.objectives[k].adapter: v for k, v in objs.items()}
                ranks = build_lora_soup(self.unet, adapters, SOUP_ADAPTER)
                record["soup_layers"] = len(ranks)
                record["soup_max_rank"] = max(ranks.values())
                self.switch.refresh()
                self.switch.disable()

                def drop_soup() -> None:
                    self.switch.delete(SOUP_ADAPTER)

                soup = UNetDenoiser(self.unet, name="rewarded-soup", adapter=SOUP_ADAPTER, switch=self.switch)
                return [soup], SingleModel(0), record, drop_soup
            if kinds == {"unet"}:
                unet_soup = build_unet_soup(self.unet, {k: self.objectives[k].unet for k in objs}, objs)
                return [UNetDenoiser(unet_soup, name="rewarded-soup")], SingleModel(0), record, nothing
            raise PipelineError(
                f"rewarded-soup mixes LoRA and full-UNet objectives ({sorted(objs)}); interpolate objectives of one "
                "kind, or use method='msdda'"
            )
        if method in ("code", "rgg"):
            if not rewards:
                raise PipelineError(
                    f"method {method!r} needs rewards={{name: callable}} (callables on decoded images [B, 3, H, W] in "
                    "[0, 1] and the prompts, or on latents with reward_input='latent')"
                )
            w = self._check_weights(weights, method, list(rewards))
            if reward_input not in ("image", "latent"):
                raise PipelineError(f"reward_input={reward_input!r}; choose 'image' or 'latent'")
            vae = self.base.vae if reward_input == "image" else None
            reward_names = [k for k in rewards if w.get(k, 0.0) != 0.0]
            if not reward_names:
                raise PipelineError(f"{method}: every reward weight is zero")
            fns = [_LatentReward(rewards[k], k, vae, prompts) for k in reward_names]
            wl = [w[k] for k in reward_names]
            opts = dict(method_options)
            model = opts.pop("model", None)
            model_name = REFERENCE if model in (None, REFERENCE) else self._objective(model).name
            record.update(reward_weights=dict(zip(reward_names, wl, strict=True)), reward_input=reward_input)
            try:
                rule = CoDe(fns, wl, model=0, **opts) if method == "code" else RGG(fns, wl, model=0, **opts)
            except TypeError as exc:
                opts_text = dict(method_options)
                raise PipelineError(f"method_options {opts_text} are not valid for {method!r}: {exc}") from exc
            return [self.denoiser(model_name)], rule, record, nothing
        raise PipelineError(f"unknown method {method!r}; choose one of {METHODS}")

    # ----- the call -----------------------------------------------------------------------------------
    def _check_scheduler(self, eta: float) -> str:
        scheduler = self.base.scheduler
        try:
            kind = KernelScheduler.from_diffusers(scheduler).config.kind
        except UnsupportedSchedulerError as exc:
            raise UnsupportedSchedulerError(
                f"{exc}; or build the pipeline with scheduler='ddim' / 'ddpm' (MSDDAPipeline(base, objectives, "
                "scheduler='ddim'))"
            ) from None
        if kind == "ddpm" and eta != 0.0:
            raise PipelineError(f"eta={eta} applies to DDIM only; the base scheduler is DDPM (pass eta=0)")
        if not 0.0 <= eta <= 1.0:
            raise PipelineError(f"eta={eta} is outside [0, 1]")
        return kind

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        weights: Mapping[str, float] | None = None,
        *,
        method: str = "msdda",
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: Tensor | None = None,
        negative_prompt_embeds: Tensor | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        eta: float = 0.0,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        latents: Tensor | None = None,
        output_type: str = "pil",
        betas: Mapping[str, float] | None = None,
        beta: float = 1.0,
        rewards: Mapping[str, Callable[..., Tensor]] | None = None,
        reward_input: str = "image",
        method_options: Mapping[str, Any] | None = None,
        callback_on_step_end: Callable[..., dict[str, Tensor]] | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        clip_skip: int | None = None,
        final_noise: bool = True,
        progress: bool | None = None,
    ) -> MSDDAPipelineOutput:
        """Generate images for `prompt` (or `prompt_embeds`) under preference `weights`.

        weights: {objective name: w}; "reference" may carry an explicit weight (then all must sum to 1);
          otherwise, when the objective weights do not sum to 1, the base UNet (adapters disabled) takes
          1 - sum as the reference exponent (KL-strength control; > 1 total extrapolates while valid).
          For "code"/"rgg" the keys are the names of `rewards`. Ignored by "base" and "single:<name>".
        method: "msdda" (exact kernel fusion, default), "db-mpa" (average the guided noise predictions),
          "db-mpa-ls" (one model per step, drawn with probability w), "rewarded-soup" (one model with
          dW = sum_k w_k B_k A_k, exact), "code" / "rgg" (reward-guided baselines on the base model, or on
          method_options["model"]), "single:<name>" (one objective), "base" (the reference alone).
        betas, beta: KL strengths for MSDDA exponents a_k = w_k beta_k / beta (default 1 each).
        rewards, reward_input: for "code"/"rgg": {name: reward(images [B, 3, H, W] in [0, 1], prompts)
          -> [B]} ("image": Tweedie latents are decoded by the VAE) or reward(latents, prompts) ("latent").
        method_options: CoDe's num_candidates / block_size, RGG's scale / tempering, and "model".
        guidance_scale: classifier-free guidance applied per objective (cond and uncond batched); <= 1
          disables it, as in diffusers. eta: DDIM only. generator or seed: the only randomness (neither:
          seed 0). latents: initial noise [B, 4, H/8, W/8] (scaled by init_noise_sigma like diffusers).
        callback_on_step_end(pipeline, i, t, {"latents": x}) -> dict: may return replacement "latents".
        final_noise: the last step draws from its kernel as diffusers' step() does (True, for parity with
          diffusers: DDIM with eta > 0 adds noise there); False returns the kernel mean as msdda.sample.
        Returns MSDDAPipelineOutput. Raises before any denoising on bad names, weights, scheduler, shapes.
        """
        if output_type not in OUTPUT_TYPES:
            raise PipelineError(f"output_type={output_type!r}; choose one of {OUTPUT_TYPES}")
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise PipelineError(f"num_inference_steps={num_inference_steps!r}; it must be an integer >= 1")
        if isinstance(generator, list):
            raise PipelineError("pass one torch.Generator (a list of generators is not supported), or seed=")
        if generator is not None and seed is not None:
            raise PipelineError("pass a generator or a seed, not both")
        tensor_inputs = list(getattr(callback_on_step_end, "tensor_inputs", callback_on_step_end_tensor_inputs))
        bad_inputs = [k for k in tensor_inputs if k not in _CALLBACK_TENSOR_INPUTS]
        if bad_inputs:
            raise PipelineError(
                f"callback_on_step_end_tensor_inputs {bad_inputs} are not supported; the callback can see "
                f"{list(_CALLBACK_TENSOR_INPUTS)}"
            )
        kind = self._check_scheduler(float(eta))
        base = self.base
        height = height or base.unet.config.sample_size * base.vae_scale_factor
        width = width or base.unet.config.sample_size * base.vae_scale_factor
        try:
            base.check_inputs(prompt, height, width, None, negative_prompt, prompt_embeds, negative_prompt_embeds)
        except ValueError as exc:
            if isinstance(exc, PipelineError):
                raise
            raise PipelineError(str(exc)) from exc
        device = base._execution_device
        do_cfg = guidance_scale > 1.0
        prompts = None
        if prompt is not None:
            plist = [prompt] if isinstance(prompt, str) else list(prompt)
            prompts = [p for p in plist for _ in range(num_images_per_prompt)]

        models, rule, record, cleanup = self._plan(
            method, weights, betas, float(beta), rewards, reward_input, method_options or {}, prompts
        )
        try:
            for den in models:
                p = next(den.unet.parameters())
                if p.device != self.unet.device or p.dtype != self.unet.dtype:
                    raise PipelineError(
                        f"objective {den.name!r} is on {p.device}/{p.dtype} but the base UNet on "
                        f"{self.unet.device}/{self.unet.dtype}; call pipeline.to(...) to move both"
                    )
            if isinstance(rule, CoDe) and kind == "ddim" and eta == 0.0:
                raise PipelineError("CoDe with DDIM and eta=0 draws identical candidates; pass eta>0 or use DDPM")
            return self._run(
                models=models,
                rule=rule,
                record=record,
                method=method,
                weights=weights,
                prompt=prompt,
                negative_prompt=negative_prompt,
                prompt_embeds=prompt_embeds,
                negative_prompt_embeds=negative_prompt_embeds,
                height=height,
                width=width,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                do_cfg=do_cfg,
                eta=float(eta),
                kind=kind,
                num_images_per_prompt=num_images_per_prompt,
                generator=generator,
                seed=seed,
                latents=latents,
                output_type=output_type,
                callback_on_step_end=callback_on_step_end,
                tensor_inputs=tensor_inputs,
                clip_skip=clip_skip,
                final_noise=final_noise,
                progress=progress,
                device=device,
            )
        finally:
            cleanup()
            self.switch.disable()

    def _run(self, *, models: list[UNetDenoiser], rule: Any, record: dict[str, Any], **kw: Any) -> MSDDAPipelineOutput:
        base = self.base
        device = kw["device"]
        prompt_embeds, negative_prompt_embeds = base.encode_prompt(
            kw["prompt"],
            device,
            kw["num_images_per_prompt"],
            kw["do_cfg"],
            kw["negative_prompt"],
            prompt_embeds=kw["prompt_embeds"],
            negative_prompt_embeds=kw["negative_prompt_embeds"],
            lora_scale=None,
            clip_skip=kw["clip_skip"],
        )
        if kw["generator"] is not None:
            generator = kw["generator"]
        else:
            generator = torch.Generator(device="cpu").manual_seed(0 if kw["seed"] is None else int(kw["seed"]))
        batch = prompt_embeds.shape[0]
        latents = base.prepare_latents(
            batch,
            base.unet.config.in_channels,
            kw["height"],
            kw["width"],
            prompt_embeds.dtype,
            device,
            generator,
            kw["latents"],
        )

        callback = kw["callback_on_step_end"]
        n_steps = kw["num_inference_steps"]

        def on_step(i: int, t: int, x: Tensor) -> Tensor:
            out = callback(self, i, torch.tensor(t), {"latents": x}) if callback is not None else None
            new = (out or {}).get("latents", x)
            if not isinstance(new, Tensor) or new.shape != x.shape:
                raise PipelineError(f"callback_on_step_end returned latents of shape {getattr(new, 'shape', new)}")
            return new

        wrapped = _PipelineRule(rule, on_step if callback is not None else None, final_noise=kw["final_noise"])
        progress = kw["progress"]
        if progress is None:
            progress = not getattr(base, "_progress_bar_config", {}).get("disable", False)
        start = time.perf_counter()
        out = sample(
            models,
            base.scheduler,
            wrapped,
            x_T=latents,
            cond=prompt_embeds,
            guidance_scale=kw["guidance_scale"] if kw["do_cfg"] else None,
            null_cond=negative_prompt_embeds,
            num_inference_steps=n_steps,
            eta=kw["eta"] if kw["kind"] == "ddim" else None,
            generator=generator,
            device=device,
            dtype=latents.dtype,
            progress=progress,
        )
        final = out.samples
        if callback is not None:
            final = on_step(n_steps - 1, int(base.scheduler.timesteps[-1]), final)
        if kw["output_type"] == "latent":
            images, nsfw = final, None
        else:
            image = base.vae.decode(final / base.vae.config.scaling_factor, return_dict=False, generator=generator)[0]
            image, nsfw = base.run_safety_checker(image, device, prompt_embeds.dtype)
            denorm = [True] * image.shape[0] if nsfw is None else [not x for x in nsfw]
            images = base.image_processor.postprocess(image, output_type=kw["output_type"], do_denormalize=denorm)
        base.maybe_free_model_hooks()
        config = {
            "method": kw["method"],
            "weights": dict(kw["weights"]) if kw["weights"] is not None else None,
            "models": [m.name for m in models],
            **record,
            "objectives": {k: {"kind": o.kind, "source": o.source} for k, o in self.objectives.items()},
            "num_inference_steps": n_steps,
            "guidance_scale": kw["guidance_scale"],
            "eta": kw["eta"],
            "scheduler": type(base.scheduler).__name__,
            "height": kw["height"],
            "width": kw["width"],
            "num_images": batch,
            "seed": kw["seed"],
            "seconds_total": time.perf_counter() - start,
        }
        logger.info("generated %d image(s) with %s in %.2fs (%s)", batch, kw["method"], out.seconds, out.cost)
        return MSDDAPipelineOutput(images=images, nsfw_content_detected=nsfw, cost=out.cost, config=config)
