"""`MSDDAPipeline`: Stable Diffusion (1.x / 2.x) through diffusers, with K objectives fused at every step.

The base pipeline (a diffusers `StableDiffusionPipeline`) supplies the text encoder, VAE, tokenizer,
scheduler and the base UNet. Each objective is a LoRA adapter inside that UNet (switched per forward
pass, so memory is about one UNet plus the adapters) or a full UNet. A call encodes the prompt and draws
the initial latents exactly as diffusers does, wraps every objective as a Denoiser over latents
`(x_t, t, cond=prompt_embeds) -> eps`, runs `msdda.sampling.sample` with the chosen step rule, and
decodes with the VAE exactly as diffusers does.

SDXL has a pipeline of its own, `msdda.pipelines.sdxl.MSDDAXLPipeline`, built on this one: the few places
where the model families differ (checking the base, assembling the diffusers pipeline, encoding the
prompt, decoding) are the hook methods marked "family hook" below.
"""

from __future__ import annotations

import copy
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
from msdda.core.kernel import GaussianKernel
from msdda.core.rewards import is_differentiable, validate_reward_output
from msdda.core.schedule import as_kernel_scheduler
from msdda.errors import MSDDAError
from msdda.models.batched import BatchingError
from msdda.models.denoiser import combine_guidance
from msdda.pipelines._deps import dtype_kwargs, require
from msdda.pipelines.conditioning import AddedConditions
from msdda.pipelines.errors import ObjectiveError, PipelineError, RewardModelError
from msdda.pipelines.objectives import (
    AdapterSwitch,
    Objective,
    UNetDenoiser,
    UNetRestorePoint,
    build_lora_soup,
    build_unet_soup,
    resolve_objective,
)
from msdda.sampling import MSDDA, CoDe, Cost, GaussianNoise, StepContext, make_generator, sample
from msdda.sampling.methods import REFERENCE, REWARDED_SOUP, MethodPlan, method_names, plan_method

logger = logging.getLogger(__name__)

METHODS = tuple(method_names())  # the planner's registry (msdda.sampling.methods)
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
SOUP_ADAPTER = "msdda_rewarded_soup"
SCHEDULERS = ("ddim", "ddpm", "euler-ancestral", "sde-dpmsolver++")
_CALLBACK_TENSOR_INPUTS = ("latents", "prompt_embeds", "negative_prompt_embeds")

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


class DiffusersNoise(GaussianNoise):
    """Noise drawn as diffusers' schedulers draw it: randn_tensor (so a CPU generator serves a GPU run and
    samples match diffusers'), and nothing drawn for a point mass (DDIM with eta = 0 draws no noise)."""

    def randn(self, shape: tuple[int, ...], generator: Any, device: torch.device, dtype: torch.dtype) -> Tensor:
        from diffusers.utils.torch_utils import randn_tensor

        return randn_tensor(shape, generator=generator, device=device, dtype=dtype)

    def draw(self, kernel: GaussianKernel, generator: Any) -> Tensor:
        var = kernel.var
        if (var.dim() == 0 and float(var) == 0.0) or (var.dim() > 0 and not bool((var != 0).any())):
            return kernel.mean
        return super().draw(kernel, generator)


class _RescaledGuidance:
    """Classifier-free guidance followed by diffusers' guidance rescale (Lin et al. 2023), for one denoiser.

    out = rescale_noise_cfg(uncond + scale * (cond - uncond), cond, phi) on the prediction channels (a
    learned-variance half is taken from the conditional pass, as msdda.models.combine_guidance does). Cond
    and uncond run as one UNet call of batch 2B, as the sampler's ClassifierFreeGuidance does.
    """

    def __init__(self, denoiser: Any, scale: float, rescale: float, null_cond: Tensor) -> None:
        self.denoiser = denoiser
        self.name = getattr(denoiser, "name", "model")
        self.scale = float(scale)
        self.rescale = float(rescale)
        self.null_cond = null_cond

    def __call__(self, x_t: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

        b, channels = x_t.shape[0], x_t.shape[1]
        out = self.denoiser(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([cond, self.null_cond]))
        out_c, out_u = out[:b], out[b:]
        guided = combine_guidance(out_c, out_u, self.scale, channels)
        rescaled = rescale_noise_cfg(guided[:, :channels], out_c[:, :channels], guidance_rescale=self.rescale)
        return torch.cat([rescaled, guided[:, channels:]], dim=1) if guided.shape[1] > channels else rescaled

    def batch_evaluator(
        self, members: Sequence[Any], *, required: bool, guidance_scale: float | None, null_cond: Any
    ) -> None:
        """Rescaled guidance runs per objective: never batched (BatchingError when batching is required)."""
        if required:
            raise BatchingError(
                f"cannot evaluate the {len(members)} objectives in one batched UNet call: guidance_rescale="
                f"{self.rescale:g} is applied to each objective's guided output on its own; pass "
                "guidance_rescale=0 to batch, or batch_models=None / False"
            )
        logger.debug("objectives evaluated one by one: guidance_rescale is applied per objective")
        return None


class _LatentReward:
    """Adapts a user reward to CoDe/RGG's `(x0_latents, cond) -> [B]` signature.

    reward_input "image": the Tweedie latents are decoded by `decode` (the pipeline's VAE decode, latents ->
    images in [-1, 1]) to images [B, 3, H, W] in [0, 1] (differentiably, for RGG) and the reward is called as
    `reward(images, prompts)`.
    reward_input "latent": the reward gets the latents [B, 4, h, w] themselves: `reward(latents, prompts)`.
    prompts: the list of B prompt strings (None when the call gave prompt_embeds).
    """

    def __init__(
        self,
        fn: Callable[..., Tensor],
        name: str,
        decode: Callable[[Tensor], Tensor] | None,
        prompts: list[str] | None,
    ):
        self.fn = fn
        self.name = name
        self.decode = decode
        self.prompts = prompts
        self.differentiable = is_differentiable(fn)

    def __call__(self, x0: Tensor, cond: Any = None) -> Tensor:
        if self.decode is None:
            values = self.fn(x0, self.prompts)
        else:
            images = self.decode(x0)
            values = self.fn((images / 2 + 0.5).clamp(0, 1), self.prompts)
        values = validate_reward_output(values, x0.shape[0], self.name, error=RewardModelError)
        return values.to(x0.dtype)


def _check_base(base: Any) -> None:
    name = type(base).__name__
    if getattr(base, "transformer", None) is not None and getattr(base, "text_encoder_3", None) is not None:
        raise PipelineError(
            f"{name} is a Stable Diffusion 3 pipeline (a transformer, three text encoders); MSDDAPipeline supports "
            "StableDiffusionPipeline (SD 1.x / 2.x) only. Use msdda.pipelines.sd3.MSDDASD3Pipeline"
        )
    if "XL" in name or getattr(base, "text_encoder_2", None) is not None:
        raise PipelineError(
            f"{name} is an SDXL pipeline; MSDDAPipeline supports StableDiffusionPipeline (SD 1.x / 2.x) only. "
            "Use msdda.pipelines.sdxl.MSDDAXLPipeline (MSDDAXLPipeline(base, objectives) or "
            "MSDDAXLPipeline.from_pipe(base, objectives)), which passes SDXL's pooled embeddings and time ids"
        )
    for attr in ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "encode_prompt", "prepare_latents"):
        if getattr(base, attr, None) is None:
            raise PipelineError(
                f"{name} has no {attr!r}; pass a diffusers StableDiffusionPipeline (SD 1.x / 2.x) as the base"
            )
    if getattr(base.unet.config, "time_cond_proj_dim", None) is not None:
        raise PipelineError("the base UNet has time_cond_proj_dim set (an LCM model); its kernels are not DDPM/DDIM")


def own_scheduler(scheduler: Any, kind: str | None) -> Any:
    """A new scheduler built from `scheduler`'s config: DDIM, DDPM, Euler ancestral or first-order
    SDE-DPM-Solver++ for kind "ddim" / "ddpm" / "euler-ancestral" / "sde-dpmsolver++" (every one a Gaussian
    step, msdda.core.samplers), the same class for None. `scheduler` itself is never changed."""
    diffusers = require("diffusers", "MSDDAPipeline")
    classes = {
        "ddim": (diffusers.DDIMScheduler, {}),
        "ddpm": (diffusers.DDPMScheduler, {}),
        "euler-ancestral": (diffusers.EulerAncestralDiscreteScheduler, {}),
        # first order: a multistep history would make the kernel depend on earlier steps (docs/method.md)
        "sde-dpmsolver++": (
            diffusers.DPMSolverMultistepScheduler,
            {"algorithm_type": "sde-dpmsolver++", "solver_order": 1},
        ),
    }
    if kind is not None and kind not in classes:
        raise PipelineError(f"scheduler={kind!r}; choose one of {SCHEDULERS} (or None to keep the base's)")
    if kind is None:
        return type(scheduler).from_config(scheduler.config)
    cls, overrides = classes[kind]
    return cls.from_config(scheduler.config, **overrides)


def _signature_keys(cls: type) -> set[str]:
    import inspect

    return set(inspect.signature(cls.__init__).parameters) - {"self", "requires_safety_checker"}


@dataclass
class EncodedPrompt:
    """A call's prompt encoding as the sampler takes it (see MSDDAPipeline._encode).

    cond / null_cond: the condition of every row [B, L', D] and the negative one (None without guidance); for
    SDXL the pooled embeddings and time ids are packed into them (msdda.pipelines.conditioning).
    callback_tensors: what callback_on_step_end may ask for besides "latents", laid out as the diffusers
    pipeline hands them to its callback (read-only).
    """

    cond: Tensor
    null_cond: Tensor | None
    callback_tensors: dict[str, Tensor | None]


class MSDDAPipeline:
    """Multi-objective Stable Diffusion: K objectives (LoRA adapters or full UNets) fused at every step.

    base: a diffusers StableDiffusionPipeline (SD 1.x / 2.x). Its UNet is the reference model; LoRA
      objectives are loaded into it as adapters named after the objectives.
    objectives: {name: source}; a source is a LoRA path (diffusers or peft format, `.safetensors` only),
      the name of an adapter already loaded into base.unet, a full-UNet folder, or a UNet module.
    scheduler: "ddim" or "ddpm" to build the pipeline's scheduler from the base's config (SD 1.5 ships
      PNDM, whose kernel is not implemented); None copies the base's (it must then be DDIM or DDPM).

    What is shared with the caller's `base` and what is not:
    * shared, not copied (to save memory): the modules (UNet, VAE, text encoder, tokenizer, safety
      checker), so `pipeline.to(...)` moves the caller's modules too;
    * the pipeline's own: `self.base`, a StableDiffusionPipeline built from those modules with its own
      scheduler; the caller's `base.scheduler` and its config are never touched;
    * LoRA objectives are injected into the shared UNet as peft adapters (as diffusers' load_lora_weights
      does), disabled outside the pipeline's own UNet calls, so the caller's pipeline still computes the
      base model. `release()` (or leaving a `with MSDDAPipeline(...) as pipe:` block) deletes every
      adapter the pipeline added and restores the UNet exactly: the same state_dict keys and tensors,
      adapter states, requires_grad flags and train/eval mode. A failed construction releases itself.
      Adapters the caller had loaded before (named as sources) are kept. After release the pipeline
      cannot be called.
    """

    _diffusers_class = "StableDiffusionPipeline"  # the diffusers pipeline this family wraps (from_pretrained, views)
    _callback_tensor_inputs = _CALLBACK_TENSOR_INPUTS
    _conditions: AddedConditions | None = None  # SDXL: the layout of the conditions packed into `cond`
    _network_name = "unet"  # family hook: the base pipeline's denoising network (SD3: "transformer")

    def __init__(self, base: Any, objectives: Mapping[str, Any], *, scheduler: str | None = None) -> None:
        require("diffusers", type(self).__name__)
        self._check_base(base)
        if not isinstance(objectives, Mapping):
            raise ObjectiveError(
                f"objectives must be a mapping name -> source, got {type(objectives).__name__}; e.g. "
                "{'aesthetic': 'loras/aesthetic', 'alignment': 'loras/alignment'}"
            )
        self._origin = base  # the caller's pipeline: only its offload hooks are reset after a call
        self.base = self._own_pipeline(base, scheduler)
        self.unet: nn.Module = getattr(self.base, self._network_name)  # the denoising network (SD3: the transformer)
        self._restore_point = UNetRestorePoint(self.unet)
        self._added_adapters: list[str] = []
        self._released = False
        self.unet.eval()
        self.objectives: dict[str, Objective] = {}
        self.switch = AdapterSwitch(self.unet)
        try:
            for name, source in objectives.items():
                self.add_objective(name, source)
        except BaseException:
            self.release()
            raise
        self.switch.refresh()
        self.switch.disable()

    # ----- construction -------------------------------------------------------------------------------
    @classmethod
    def _check_base(cls, base: Any) -> None:
        """Family hook: refuse a base pipeline this family cannot wrap (PipelineError naming the fix)."""
        _check_base(base)

    @classmethod
    def _assemble(cls, like: Any, components: Mapping[str, Any]) -> Any:
        """Family hook: a new diffusers pipeline of this family from `components` (modules by name, shared, not
        copied), with the non-module settings of pipeline `like`."""
        diffusers = require("diffusers", cls.__name__)
        keys = _signature_keys(diffusers.StableDiffusionPipeline)
        kwargs = {k: components.get(k) for k in keys}
        # without a checker, False: the caller's pipeline already warned about it once
        requires = kwargs["safety_checker"] is not None and bool(like.config.get("requires_safety_checker", 1))
        return diffusers.StableDiffusionPipeline(**kwargs, requires_safety_checker=requires)

    @classmethod
    def _own_pipeline(cls, base: Any, scheduler: str | None) -> Any:
        """A pipeline of this family holding the caller's modules (shared, not copied) and a scheduler of its own."""
        components = {**base.components, "scheduler": own_scheduler(base.scheduler, scheduler)}
        try:
            pipe = cls._assemble(base, components)
        except ImportError as exc:  # a package diffusers found installed but cannot import (e.g. a broken peft)
            require(exc.name or "diffusers", cls.__name__)
            raise
        pipe.set_progress_bar_config(**dict(getattr(base, "_progress_bar_config", {})))
        return pipe

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
        (MSDDAXLPipeline: a StableDiffusionXLPipeline folder, loaded by its from_pretrained.)
        """
        diffusers = require("diffusers", cls.__name__)
        path = Path(base).expanduser()
        index = path / "model_index.json"
        if not index.is_file():
            raise PipelineError(
                f"{path} is not a diffusers pipeline folder (no model_index.json); save one with "
                "pipe.save_pretrained(folder) or download it first"
            )
        cls_name = json.loads(index.read_text()).get("_class_name", "")
        if cls_name != cls._diffusers_class:
            hint = {
                "StableDiffusionPipeline": "; use MSDDAPipeline.from_pretrained for it",
                "StableDiffusionXLPipeline": "; use msdda.pipelines.sdxl.MSDDAXLPipeline.from_pretrained for it",
                "StableDiffusion3Pipeline": "; use msdda.pipelines.sd3.MSDDASD3Pipeline.from_pretrained for it",
            }.get(cls_name, "")
            raise PipelineError(
                f"{path} holds a {cls_name or 'unknown'} pipeline; {cls.__name__} supports {cls._diffusers_class} "
                f"folders only{hint}"
            )
        kwargs: dict[str, Any] = {"use_safetensors": True, "local_files_only": True, **dtype_kwargs(diffusers, dtype)}
        kwargs.update(base_kwargs)
        pipe = getattr(diffusers, cls._diffusers_class).from_pretrained(str(path), **kwargs)
        if device is not None:
            pipe = pipe.to(device)
        return cls(pipe, objectives, scheduler=scheduler)

    @classmethod
    def from_pipe(
        cls, pipe: Any, objectives: Mapping[str, Any], *, scheduler: Any = None, **components: Any
    ) -> MSDDAPipeline:
        """An MSDDAPipeline on the modules of an already loaded pipeline (no reload, no copy), as diffusers'
        `from_pipe`.

        pipe: a diffusers pipeline with Stable Diffusion components (StableDiffusionPipeline, its img2img
          or inpaint siblings, ...) or another MSDDAPipeline (its modules; its objectives are not taken over).
        scheduler: "ddim" / "ddpm" / None as in the constructor, or a scheduler object (its config is used).
        components: replacement modules by name (e.g. safety_checker=None, unet=my_unet), as diffusers'
          from_pipe takes them. `pipe` itself is not changed (see the class docstring for what is shared).
        """
        origin = pipe
        if isinstance(pipe, MSDDAPipeline):
            pipe._check_alive()
            origin, pipe = pipe._origin, pipe.base
        cls._check_base(pipe)
        if scheduler is not None and not isinstance(scheduler, str):
            components["scheduler"], scheduler = scheduler, None
        if not components:
            out = cls(pipe, objectives, scheduler=scheduler)
        else:
            known = set(pipe.components)
            unknown = sorted(set(components) - known)
            if unknown:
                raise PipelineError(
                    f"from_pipe got {unknown}, which are not components of {type(pipe).__name__} (it has "
                    f"{sorted(known)}); pass modules by component name, e.g. safety_checker=None"
                )
            view = cls._assemble(pipe, {**pipe.components, **components})
            view.set_progress_bar_config(**dict(getattr(pipe, "_progress_bar_config", {})))
            out = cls(view, objectives, scheduler=scheduler)
        out._origin = origin
        return out

    def add_objective(self, name: str, source: Any) -> Objective:
        """Add one objective (see the class docstring for sources); its adapter is left disabled."""
        self._check_alive()
        if name in self.objectives:
            raise ObjectiveError(f"objective {name!r} already exists; choose another name")
        before = set(getattr(self.unet, "peft_config", None) or {})
        try:
            obj = self._resolve_objective(name, source)
        finally:
            self._added_adapters += [a for a in (getattr(self.unet, "peft_config", None) or {}) if a not in before]
            self.switch.refresh()
            self.switch.disable()
        self.objectives[name] = obj
        logger.info("objective %r: %s from %s", name, obj.kind, obj.source)
        return obj

    def _resolve_objective(self, name: str, source: Any) -> Objective:
        """Family hook: one objective source as an Objective, LoRA sources loaded into the base network."""
        return resolve_objective(self.unet, name, source)

    def release(self) -> None:
        """Delete every adapter this pipeline added to the shared UNet and restore the UNet exactly as it was
        (see the class docstring). Idempotent; the pipeline cannot be called afterwards."""
        if self._released:
            return
        self._released = True
        for adapter in reversed(self._added_adapters):
            self.switch.delete(adapter)
        self.switch.delete(SOUP_ADAPTER)  # only present when a call was killed mid-way
        self._added_adapters = []
        self.objectives = {}
        self._restore_point.restore(self.unet)
        self.switch.layers = []  # nothing of this pipeline touches the UNet again

    def __enter__(self) -> MSDDAPipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _check_alive(self) -> None:
        if self._released:
            name = type(self).__name__
            raise PipelineError(
                f"this {name} was released (its adapters were removed from the UNet); build a new one, e.g. "
                f"{name}.from_pipe(base, objectives)"
            )

    def set_progress_bar_config(self, **kwargs: Any) -> None:
        """diffusers' progress-bar settings (e.g. disable=True) for this pipeline's denoising loop."""
        self.base.set_progress_bar_config(**kwargs)

    def to(self, *args: Any, **kwargs: Any) -> MSDDAPipeline:
        """Move the modules (shared with the caller's pipeline) and every full-UNet objective (nn.Module.to's
        arguments)."""
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
            return self._unet_denoiser(self.unet, name=REFERENCE, adapter=None, switch=self.switch)
        obj = self._objective(name)
        if obj.kind == "lora":
            head = obj.variance_head
            if head is not None:
                head = head.to(next(self.unet.parameters()).device)
            return self._unet_denoiser(
                self.unet, name=name, adapter=obj.adapter, switch=self.switch, variance_head=head
            )
        return self._unet_denoiser(obj.unet, name=name)

    def _unet_denoiser(self, unet: nn.Module, **kwargs: Any) -> UNetDenoiser:
        """A UNetDenoiser that unpacks this family's condition (SDXL: pooled embeddings and time ids)."""
        return UNetDenoiser(unet, conditions=self._conditions, **kwargs)

    # What the shared objective store (`_ObjectiveStore`: soups, rewards) asks a pipeline; PixArt's answers
    # with its transformer.
    _full_kind = "unet"  # Objective.kind of a full-model objective

    @property
    def _base_model(self) -> nn.Module:
        return self.unet

    @property
    def _adapter_host(self) -> Any:
        """The module LoRA adapters are injected into (a temporary soup adapter too)."""
        return self.unet

    @staticmethod
    def _full_model(obj: Any) -> nn.Module:
        return obj.unet

    def _model_denoiser(self, model: nn.Module, **kwargs: Any) -> Any:
        return self._unet_denoiser(model, **kwargs)

    def _objective(self, name: str) -> Objective:
        if name not in self.objectives:
            raise ObjectiveError(
                f"unknown objective {name!r}; this pipeline has {sorted(self.objectives)} (and {REFERENCE!r} for the "
                "base model)"
            )
        return self.objectives[name]

    # ----- the call -----------------------------------------------------------------------------------
    def _check_scheduler(self, eta: float) -> str:
        """The base scheduler's kind; an eta it cannot take raises the sampler's own ScheduleError."""
        probe = copy.deepcopy(self.base.scheduler)  # sigma-table schedulers mirror only with their timesteps set
        probe.set_timesteps(2)
        try:
            kind = as_kernel_scheduler(probe).config.kind
        except UnsupportedSchedulerError as exc:
            raise UnsupportedSchedulerError(
                f"{exc}; or build the pipeline with one of scheduler={SCHEDULERS} (MSDDAPipeline(base, objectives, "
                "scheduler='ddim'))"
            ) from None
        as_kernel_scheduler(probe, eta=None if kind != "ddim" and eta == 0.0 else eta)
        return kind

    def _check_call(self, output_type: str, num_inference_steps: Any, callback_inputs: Sequence[str]) -> None:
        if output_type not in OUTPUT_TYPES:
            raise PipelineError(f"output_type={output_type!r}; choose one of {OUTPUT_TYPES}")
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise PipelineError(f"num_inference_steps={num_inference_steps!r}; it must be an integer >= 1")
        bad_inputs = [k for k in callback_inputs if k not in self._callback_tensor_inputs]
        if bad_inputs:
            raise PipelineError(
                f"callback_on_step_end_tensor_inputs {bad_inputs} are not supported; the callback can see "
                f"{list(self._callback_tensor_inputs)}"
            )

    def _check_batch(
        self,
        prompt: Any,
        prompt_embeds: Any,
        num_images: Any,
        latents: Any,
        height: int | None,
        width: int | None,
        generator: Any,
    ) -> None:
        """num_images_per_prompt, latents and a generator list must fit the batch diffusers would build, B =
        prompts x num_images_per_prompt (else it fails deep inside, or a list silently seeds the wrong images)."""
        if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
            raise PipelineError(f"num_images_per_prompt={num_images!r}; it must be an integer >= 1")
        prompts = 1 if isinstance(prompt, str) else len(prompt) if prompt is not None else None
        if prompts is None and not isinstance(prompt_embeds, Tensor):
            return  # base.check_inputs names the missing prompt
        batch = (prompts if prompts is not None else int(prompt_embeds.shape[0])) * num_images
        if isinstance(generator, list | tuple) and len(generator) != batch:
            raise PipelineError(
                f"generator is a list of {len(generator)} generators but this call makes {batch} image(s) "
                f"({batch // num_images} prompt(s) x num_images_per_prompt={num_images}); pass one generator per "
                "image, in the order prompt 0's images, then prompt 1's, ..."
            )
        if latents is None:
            return
        if not isinstance(latents, Tensor):
            raise PipelineError(f"latents is a {type(latents).__name__}; pass a tensor [B, 4, H/8, W/8] or None")
        cfg, scale = self.unet.config, self.base.vae_scale_factor
        h = (height or cfg.sample_size * scale) // scale
        w = (width or cfg.sample_size * scale) // scale
        if tuple(latents.shape) != (batch, cfg.in_channels, h, w):
            raise PipelineError(
                f"latents have shape {tuple(latents.shape)}; this call needs {(batch, cfg.in_channels, h, w)} "
                f"(prompts x num_images_per_prompt, the UNet's channels, height/{scale}, width/{scale})"
            )

    def _step_callback(
        self, callback: Callable[..., Any] | None, inputs: Sequence[str], embeds: dict[str, Tensor | None]
    ) -> Callable[[StepContext, Tensor], Tensor] | None:
        """diffusers' callback_on_step_end(pipeline, i, t, callback_kwargs) -> dict as a sampler step callback.

        callback_kwargs holds the requested `inputs`: "latents" x [B, 4, h, w] after the step, and as in
        diffusers' SD pipeline "prompt_embeds" ([negative; positive], [2B, L, D], with guidance, else [B, L, D])
        and "negative_prompt_embeds" [B, L, D] (None without guidance); MSDDAXLPipeline adds SDXL's
        "add_text_embeds" and "add_time_ids" (`embeds`: EncodedPrompt.callback_tensors). A returned "latents"
        replaces x; the embeddings are read-only (returning them unchanged is fine). `pipeline.interrupt = True`
        (set by the callback) ends the run after the current step.
        """
        if callback is None:
            return None

        def on_step(ctx: StepContext, x: Tensor) -> Tensor:
            given = {k: (x if k == "latents" else embeds[k]) for k in inputs}
            out = callback(self, ctx.index, torch.tensor(ctx.timestep), dict(given)) or {}
            new = out.get("latents", x)
            if not isinstance(new, Tensor) or new.shape != x.shape:
                raise PipelineError(f"callback_on_step_end returned latents of shape {getattr(new, 'shape', new)}")
            for key in embeds:
                if key in out and out[key] is not embeds[key]:
                    same = isinstance(out[key], Tensor) and isinstance(embeds[key], Tensor)
                    if not (same and out[key].shape == embeds[key].shape and torch.equal(out[key], embeds[key])):
                        raise PipelineError(
                            f"callback_on_step_end returned a new {key!r}; MSDDAPipeline conditions every objective "
                            "on one prompt encoding fixed for the run, so only 'latents' may be replaced (return "
                            f"the {key} unchanged or leave it out)"
                        )
            if self.interrupt:
                ctx.stop = True
            return new

        return on_step

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        weights: Mapping[str, float] | None = None,
        *,
        method: str = MSDDA.name,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: Tensor | None = None,
        negative_prompt_embeds: Tensor | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        eta: float = 0.0,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        seed: int | None = None,
        latents: Tensor | None = None,
        output_type: str = "pil",
        betas: Mapping[str, float] | None = None,
        beta: float | None = None,
        rewards: Mapping[str, Callable[..., Tensor]] | None = None,
        reward_input: str = "image",
        method_options: Mapping[str, Any] | None = None,
        callback_on_step_end: Callable[..., dict[str, Tensor]] | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        cross_attention_kwargs: Mapping[str, Any] | None = None,
        guidance_rescale: float = 0.0,
        clip_skip: int | None = None,
        final_noise: bool = True,
        progress: bool | None = None,
        return_dict: bool = True,
        batch_models: bool | None = None,
        **family_kwargs: Any,
    ) -> MSDDAPipelineOutput | tuple[Any, list[bool] | None]:
        """Generate images for `prompt` (or `prompt_embeds`) under preference `weights`.

        weights: {objective name: w}; objectives with weight 0 are never evaluated. "reference" may carry an
          explicit weight (then all must sum to 1); otherwise weights summing to s != 1 give the base UNet
          (adapters disabled) 1 - s (KL-strength control; s > 1 extrapolates while valid). For "code"/"rgg"
          the keys are the names of `rewards`. Ignored by "base" and "single:<name>".
        method: any name of `msdda.sampling.method_names()`: "msdda" (exact kernel fusion, default),
          "db-mpa", "db-mpa-ls", "rewarded-soup" (one model with dW = sum_k w_k B_k A_k, exact), "code" /
          "rgg" (reward-guided, on the base model or on method_options["model"]), "single:<name>", "base".
        betas, beta: KL strengths for MSDDA exponents a_k = w_k beta_k / beta (betas default 1 each; beta
          defaults to sum_k w_k beta_k / sum_k w_k, the same default as `msdda sweep`).
        rewards, reward_input: for "code"/"rgg": {name: reward(images [B, 3, H, W] in [0, 1], prompts)
          -> [B]} ("image": Tweedie latents are decoded by the VAE) or reward(latents, prompts) ("latent").
        method_options: CoDe's num_candidates / block_size, RGG's scale / tempering, and "model".
        guidance_scale: classifier-free guidance applied per objective (cond and uncond batched); <= 1
          disables it, as in diffusers. eta: DDIM only. generator or seed: the only randomness (neither:
          seed 0). generator may be a list of B = prompts x num_images_per_prompt generators, one per image
          (as in diffusers): image b's initial latents and every step's noise come from generator b, so it
          equals a single-image call with that generator; CoDe draws image b's candidates from generator b;
          DB-MPA-LS draws its per-step model choice (shared by the batch) from the first generator.
          latents: initial noise [B, 4, H/8, W/8] (scaled by init_noise_sigma like diffusers).
        guidance_rescale: diffusers' rescale_noise_cfg (Lin et al. 2023, e.g. 0.7) applied to each objective's
          guided prediction, as diffusers does (0: off; needs guidance_scale > 1).
        cross_attention_kwargs: passed to every UNet call as in diffusers, e.g. {"scale": 0.5} scales the
          active LoRA adapter (each LoRA objective, the soup); its "scale" also goes to encode_prompt.
        callback_on_step_end(pipeline, i, t, callback_kwargs) -> dict, with callback_kwargs holding the names
          in callback_on_step_end_tensor_inputs ("latents", "prompt_embeds", "negative_prompt_embeds", laid
          out as diffusers' SD pipeline does): may return replacement "latents" (the embeddings are
          read-only); setting `pipeline.interrupt = True` stops after that step.
        final_noise: the last step draws from its kernel as diffusers' step() does (True, for parity with
          diffusers: DDIM with eta > 0 adds noise there); False returns the kernel mean as msdda.sample.
        batch_models: evaluate the objectives of a step (and the reference when the method uses it) in one
          UNet call: LoRA objectives as one forward of batch (K + 1) x B (x 2 with guidance) through peft's
          mixed-adapter batches, full-UNet objectives as one torch.func.vmap call (objectives.UNetBatch).
          None (default): on accelerators where it saves calls, one by one on CPU (as fast there); True:
          always, BatchingError naming the reason where it cannot (merged or DoRA adapters, guidance_rescale,
          LoRA and full-UNet objectives together, ...); False: never. Images agree to float rounding;
          costs are counted the same.
        family_kwargs: the keywords of a model family's own conditioning (MSDDAXLPipeline: prompt_2, pooled
          embeddings, size conditioning); MSDDAPipeline takes none (TypeError).
        Returns MSDDAPipelineOutput, or with return_dict=False the tuple (images, nsfw_content_detected) as
        diffusers does. Raises before any denoising on bad names, weights, scheduler, shapes.
        """
        self._check_alive()
        self._check_family_kwargs(family_kwargs)
        base = self.base
        # 1. check inputs
        tensor_inputs = list(getattr(callback_on_step_end, "tensor_inputs", callback_on_step_end_tensor_inputs))
        self._check_call(output_type, num_inference_steps, tensor_inputs)
        self._check_batch(prompt, prompt_embeds, num_images_per_prompt, latents, height, width, generator)
        if (
            isinstance(guidance_scale, bool)
            or not isinstance(guidance_scale, int | float)
            or not math.isfinite(guidance_scale)
        ):  # nan > 1 is False: a nan scale would silently turn guidance off
            raise PipelineError(f"guidance_scale={guidance_scale!r}; pass a finite number (<= 1 turns guidance off)")
        if (
            isinstance(guidance_rescale, bool)
            or not isinstance(guidance_rescale, int | float)
            or not 0.0 <= guidance_rescale <= 1.0
        ):
            raise PipelineError(
                f"guidance_rescale={guidance_rescale!r}; pass a number in [0, 1] (0: off; Lin et al. 2023 use 0.7)"
            )
        if cross_attention_kwargs is not None and not isinstance(cross_attention_kwargs, Mapping):
            raise PipelineError(
                f"cross_attention_kwargs is a {type(cross_attention_kwargs).__name__}; pass a dict such as "
                "{'scale': 0.5} or None"
            )
        attn_kwargs = dict(cross_attention_kwargs) if cross_attention_kwargs else None
        kind = self._check_scheduler(float(eta))
        sampler_eta = float(eta) if kind in ("ddim", "flow_sde") else None  # flow matching: the SDE's noise level
        try:
            generator = make_generator(generator, seed, "cpu")
        except MSDDAError as exc:
            raise PipelineError(str(exc)) from None
        height = height or self.unet.config.sample_size * base.vae_scale_factor
        width = width or self.unet.config.sample_size * base.vae_scale_factor
        try:
            self._check_prompt(
                prompt, height, width, negative_prompt, prompt_embeds, negative_prompt_embeds, family_kwargs
            )
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
        self.interrupt = False
        # 2. plan the method (before any model runs, so bad names and weights fail first)
        store = _ObjectiveStore(self, rewards or {}, reward_input, prompts)
        try:
            plan = plan_method(
                method, store, weights, beta=beta, betas=betas, options=method_options, skip_zero_weights=True
            )
            self._check_plan(plan, kind, float(eta))
            # 3. encode the prompt
            encoded = self._encode(
                prompt,
                device,
                num_images_per_prompt,
                do_cfg,
                negative_prompt,
                prompt_embeds=prompt_embeds,
                negative_prompt_embeds=negative_prompt_embeds,
                lora_scale=attn_kwargs.get("scale") if attn_kwargs else None,
                clip_skip=clip_skip,
                height=height,
                width=width,
                family_kwargs=family_kwargs,
            )
            cond, null_cond, dtype = encoded.cond, encoded.null_cond, encoded.cond.dtype
            # 4. prepare the latents exactly as diffusers does
            batch = cond.shape[0]
            channels = self.unet.config.in_channels
            x_T = base.prepare_latents(batch, channels, height, width, dtype, device, generator, latents)
            # The kernels' space may differ from step()'s (Euler ancestral: x / sqrt(1 + sigma^2), what the UNet
            # is fed), and Euler's init_noise_sigma depends on the schedule: the same draw z, at the std of x_T
            # in the kernels' space (a copy of the scheduler is set; the pipeline's own is left as it is).
            timed = copy.deepcopy(base.scheduler)
            timed.set_timesteps(num_inference_steps)
            ks_sigma = float(getattr(as_kernel_scheduler(timed, eta=sampler_eta), "init_noise_sigma", 1.0))
            step_sigma = float(getattr(base.scheduler, "init_noise_sigma", 1.0))  # flow matching has none: 1
            if ks_sigma != step_sigma:
                x_T = x_T * (ks_sigma / step_sigma)
            # 5. denoise: every objective evaluated at the same latents, the planned rule at every step
            if progress is None:
                progress = not getattr(base, "_progress_bar_config", {}).get("disable", False)
            models, reference = list(plan.models), plan.reference
            for den in [*models, reference]:
                if isinstance(den, UNetDenoiser):
                    den.cross_attention_kwargs = attn_kwargs
            rescale = do_cfg and guidance_rescale > 0.0
            if rescale:  # guidance (and the rescale) applied here: the sampler runs the guided denoisers as given
                models = [_RescaledGuidance(m, guidance_scale, guidance_rescale, null_cond) for m in models]
                if reference is not None:
                    reference = _RescaledGuidance(reference, guidance_scale, guidance_rescale, null_cond)
            start = time.perf_counter()
            out = sample(
                models,
                base.scheduler,
                plan.rule,
                x_T=x_T,
                cond=cond,
                reference=reference,
                guidance_scale=guidance_scale if do_cfg and not rescale else None,
                null_cond=null_cond,
                num_inference_steps=num_inference_steps,
                eta=sampler_eta,
                generator=generator,
                device=device,
                dtype=x_T.dtype,
                progress=progress,
                callback=self._step_callback(callback_on_step_end, tensor_inputs, encoded.callback_tensors),
                noise=DiffusersNoise(),
                final_step="sample" if final_noise else "mean",
                batch_models=batch_models,
            )
            if rescale:
                out.cost.model_evals *= 2  # every evaluation above was a cond + uncond pair
        finally:
            store.release()
            self.switch.disable()
        # 6. decode
        images, nsfw = self._decode(out.samples, output_type, device, dtype, generator)
        free_hooks = getattr(self._origin, "maybe_free_model_hooks", None)
        if callable(free_hooks):
            free_hooks()  # the caller's offload hooks, as its own call would
        config = {
            **plan.record,
            "weights": dict(weights) if weights is not None else None,
            "models": [m.name for m in plan.models],
            "reward_input": reward_input,
            "objectives": {k: {"kind": o.kind, "source": o.source} for k, o in self.objectives.items()},
            "num_inference_steps": num_inference_steps,
            "steps_run": out.steps_run,
            "interrupted": out.interrupted,
            "guidance_scale": guidance_scale,
            "guidance_rescale": guidance_rescale,
            "cross_attention_kwargs": attn_kwargs,
            "eta": float(eta),
            "scheduler": type(base.scheduler).__name__,
            "height": height,
            "width": width,
            "num_images": batch,
            "seed": seed,
            "batch_models": batch_models,
            **{k: v for k, v in family_kwargs.items() if not isinstance(v, Tensor)},  # e.g. SDXL's sizes
            "seconds_total": time.perf_counter() - start,
        }
        logger.info("generated %d image(s) with %s in %.2fs (%s)", batch, method, out.seconds, out.cost)
        if not return_dict:
            return images, nsfw
        return MSDDAPipelineOutput(images=images, nsfw_content_detected=nsfw, cost=out.cost, config=config)

    @property
    def interrupt(self) -> bool:
        """Set to True (e.g. from callback_on_step_end) to stop denoising after the current step."""
        return getattr(self, "_interrupt", False)

    @interrupt.setter
    def interrupt(self, value: bool) -> None:
        self._interrupt = bool(value)

    # ----- family hooks of the call (MSDDAXLPipeline overrides them) --------------------------------------
    def _check_family_kwargs(self, family_kwargs: Mapping[str, Any]) -> None:
        """Family hook: refuse keywords this family does not take (SD takes none)."""
        if family_kwargs:
            raise TypeError(
                f"{type(self).__name__}.__call__() got unexpected keyword argument(s) {sorted(family_kwargs)}"
                + ("; SDXL's keywords need msdda.pipelines.sdxl.MSDDAXLPipeline" if "prompt_2" in family_kwargs else "")
            )

    def _check_prompt(
        self,
        prompt: Any,
        height: int,
        width: int,
        negative_prompt: Any,
        prompt_embeds: Tensor | None,
        negative_prompt_embeds: Tensor | None,
        family_kwargs: Mapping[str, Any],
    ) -> None:
        """Family hook: diffusers' own check of the prompt inputs (its ValueError becomes a PipelineError)."""
        self.base.check_inputs(prompt, height, width, None, negative_prompt, prompt_embeds, negative_prompt_embeds)

    def _encode(
        self,
        prompt: Any,
        device: Any,
        num_images_per_prompt: int,
        do_cfg: bool,
        negative_prompt: Any,
        *,
        prompt_embeds: Tensor | None,
        negative_prompt_embeds: Tensor | None,
        lora_scale: float | None,
        clip_skip: int | None,
        height: int,
        width: int,
        family_kwargs: Mapping[str, Any],
    ) -> EncodedPrompt:
        """Family hook: the prompt encoded by diffusers' encode_prompt, as the sampler's cond / null_cond."""
        embeds, negative = self.base.encode_prompt(
            prompt,
            device,
            num_images_per_prompt,
            do_cfg,
            negative_prompt,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            lora_scale=lora_scale,
            clip_skip=clip_skip,
        )
        callback = {
            "prompt_embeds": torch.cat([negative, embeds]) if do_cfg else embeds,
            "negative_prompt_embeds": negative,
        }
        return EncodedPrompt(embeds, negative, callback)

    def _decode_latents(self, latents: Tensor) -> Tensor:
        """Family hook: latents [B, 4, h, w] -> images [B, 3, H, W] in [-1, 1] by the VAE (differentiable; the
        rewards of CoDe / RGG see these)."""
        vae = self.base.vae
        return vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]

    def _check_plan(self, plan: MethodPlan, kind: str, eta: float) -> None:
        for den in [*plan.models, *([plan.reference] if plan.uses_reference else [])]:
            p = next(den.unet.parameters())
            if p.device != self.unet.device or p.dtype != self.unet.dtype:
                raise PipelineError(
                    f"objective {den.name!r} is on {p.device}/{p.dtype} but the base UNet on "
                    f"{self.unet.device}/{self.unet.dtype}; call pipeline.to(...) to move both"
                )
        if isinstance(plan.rule, CoDe) and kind == "ddim" and eta == 0.0:
            raise PipelineError("CoDe with DDIM and eta=0 draws identical candidates; pass eta>0 or use DDPM")

    def _decode(self, final: Tensor, output_type: str, device: Any, dtype: torch.dtype, generator: Any) -> tuple:
        """Family hook: the final latents as (images, nsfw flags) (diffusers' VAE decode, safety checker and
        postprocessing)."""
        base = self.base
        if output_type == "latent":
            return final, None
        image = base.vae.decode(final / base.vae.config.scaling_factor, return_dict=False, generator=generator)[0]
        image, nsfw = base.run_safety_checker(image, device, dtype)
        denorm = [True] * image.shape[0] if nsfw is None else [not x for x in nsfw]
        return base.image_processor.postprocess(image, output_type=output_type, do_denormalize=denorm), nsfw


class _ObjectiveStore:
    """The pipeline's objectives as an `msdda.sampling.ObjectiveSet` for one call: denoisers over latents,
    the call's rewards (on decoded images or latents) and a Rewarded-Soups builder whose temporary adapter
    `release()` removes again."""

    rgg_scale = 1.0

    def __init__(
        self,
        pipe: MSDDAPipeline,
        rewards: Mapping[str, Callable[..., Tensor]],
        reward_input: str,
        prompts: list[str] | None,
    ) -> None:
        if not isinstance(rewards, Mapping):
            raise PipelineError(f"rewards must be a mapping name -> callable, got {type(rewards).__name__}")
        if reward_input not in ("image", "latent"):
            raise PipelineError(f"reward_input={reward_input!r}; choose 'image' or 'latent'")
        self.pipe = pipe
        self.objectives = list(pipe.objectives)
        self.aligned = {name: pipe.denoiser(name) for name in self.objectives}
        decode = pipe._decode_latents if reward_input == "image" else None
        self.rewards = {k: _LatentReward(fn, k, decode, prompts) for k, fn in rewards.items()}
        self._soup_built = False

    @property
    def reference(self) -> UNetDenoiser:
        return self.pipe.denoiser(None)

    def beta_of(self, objective: str) -> float:
        return 1.0

    def soup(self, weights: Mapping[str, float], average: str = "delta") -> Any:
        """The Rewarded-Soups model for {objective: w}. LoRA objectives: a temporary adapter with
        average="delta" dW = sum_k w_k B_k A_k (exact) or "factors" (sum_k w_k B_k)(sum_k w_k A_k)
        (see build_lora_soup); full-model objectives: theta_base + sum_k w_k (theta_k - theta_base)."""
        pipe = self.pipe
        kinds = {pipe.objectives[k].kind for k in weights}
        full = pipe._full_kind  # "unet" (SD, SDXL) or "transformer" (PixArt)
        if average == "factors" and kinds != {"lora"}:
            raise PipelineError(
                f"{REWARDED_SOUP} average='factors' averages LoRA factors; objectives {sorted(weights)} include "
                f"full {full}s; use average='delta' (the parameter interpolation)"
            )
        if kinds == {"lora"}:
            adapters = {pipe.objectives[k].adapter: v for k, v in weights.items()}
            build_lora_soup(pipe._adapter_host, adapters, SOUP_ADAPTER, average=average)
            self._soup_built = True
            pipe.switch.refresh()
            pipe.switch.disable()
            return pipe._model_denoiser(pipe._base_model, name=REWARDED_SOUP, adapter=SOUP_ADAPTER, switch=pipe.switch)
        if kinds == {full}:
            mods = {k: pipe._full_model(pipe.objectives[k]) for k in weights}
            return pipe._model_denoiser(build_unet_soup(pipe._base_model, mods, dict(weights)), name=REWARDED_SOUP)
        raise PipelineError(
            f"{REWARDED_SOUP} mixes LoRA and full-{full} objectives ({sorted(weights)}); interpolate objectives of one "
            f"kind, or use method={MSDDA.name!r}"
        )

    def release(self) -> None:
        """Remove the temporary soup adapter, if this call built one."""
        if self._soup_built:
            self.pipe.switch.delete(SOUP_ADAPTER)
            self._soup_built = False
