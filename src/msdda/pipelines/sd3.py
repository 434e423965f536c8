"""`MSDDASD3Pipeline`: Stable Diffusion 3 / 3.5 through diffusers, with K objectives fused at every step.

It is `MSDDAPipeline` (msdda.pipelines.sd) with SD3's family hooks, as `MSDDAXLPipeline` is for SDXL: the
base is a diffusers `StableDiffusion3Pipeline` (an `SD3Transformer2DModel` with joint attention; CLIP-L,
CLIP-G and T5 text encoders; pooled projections; `FlowMatchEulerDiscreteScheduler` with its shift). The
prompt is encoded, the latents drawn and the images decoded exactly as diffusers does; objectives (LoRA
adapters in the transformer, through the PeftAdapterMixin it shares with the UNet, or full transformers),
every method of the planner, generator lists, callbacks, batching and release are MSDDAPipeline's code.

What differs from SD 1.x:
* the denoising network is `base.transformer`, called through `SD3TransformerCall`, which gives it the UNet's
  calling convention (`(x, t, encoder_hidden_states=..., added_cond_kwargs=...)`), so the UNet denoiser and
  the batched K-objective call (peft mixed-adapter batches) serve it unchanged;
* the pooled projections ride as trailing tokens of the one condition tensor (msdda.pipelines.conditioning,
  as SDXL's pooled embeddings do) and are unpacked right before each transformer call;
* sampling follows the flow kernels of msdda.core.samplers: noise level `eta` = a. a = 0 is
  FlowMatchEulerDiscreteScheduler's own ODE step (a point mass: what diffusers' pipeline computes); a > 0 is
  Flow-GRPO's SDE step, a Gaussian whose variance depends on the schedule and a only. So MSDDA and DB-MPA
  sample the same images here unless the objectives' variances differ (docs/sd3.md).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from msdda.core.errors import UnsupportedSchedulerError
from msdda.core.schedule import as_kernel_scheduler
from msdda.pipelines._deps import require
from msdda.pipelines.conditioning import AddedConditions
from msdda.pipelines.errors import AdapterError, ObjectiveError, PipelineError
from msdda.pipelines.objectives import Objective, UNetDenoiser, check_objective_name, resolve_objective
from msdda.pipelines.sd import (
    _CALLBACK_TENSOR_INPUTS,
    EncodedPrompt,
    MSDDAPipeline,
    MSDDAPipelineOutput,
    _signature_keys,
)
from msdda.sampling import RGG, CoDe
from msdda.sampling.methods import MethodPlan

SCHEDULERS = ("flow-match",)
_SD3_KWARGS = (
    "prompt_2",
    "prompt_3",
    "negative_prompt_2",
    "negative_prompt_3",
    "pooled_prompt_embeds",
    "negative_pooled_prompt_embeds",
    "max_sequence_length",
)
# keys of a transformer config that must agree for a full-transformer objective to be a fine-tune of the base
_ARCH_KEYS = (
    "sample_size",
    "patch_size",
    "in_channels",
    "out_channels",
    "num_layers",
    "attention_head_dim",
    "num_attention_heads",
    "joint_attention_dim",
    "caption_projection_dim",
    "pooled_projection_dim",
    "pos_embed_max_size",
    "dual_attention_layers",
    "qk_norm",
)


class SD3TransformerCall(nn.Module):
    """An SD3Transformer2DModel behind the UNet's calling convention, so UNetDenoiser and UNetBatch (one forward
    for K LoRA objectives through peft's mixed-adapter rows; vmap over full transformers) call it unchanged.

    forward(sample [B, C, h, w], timestep [B] (float, 1000 sigma), encoder_hidden_states [B, L, D],
    added_cond_kwargs={"text_embeds": pooled projections [B, P], ...}, cross_attention_kwargs) -> (v,):
    diffusers' transformer(hidden_states, timestep, encoder_hidden_states, pooled_projections,
    joint_attention_kwargs) as StableDiffusion3Pipeline calls it ({"scale": s} scales the active LoRA).
    """

    def __init__(self, transformer: nn.Module) -> None:
        super().__init__()
        self.transformer = transformer
        self.training = transformer.training  # the transformer's mode (batching reads it), without recursing

    @property
    def config(self) -> Any:
        return self.transformer.config

    def forward(
        self,
        sample: Tensor,
        timestep: Tensor,
        *,
        encoder_hidden_states: Tensor,
        added_cond_kwargs: Mapping[str, Tensor],
        cross_attention_kwargs: Mapping[str, Any] | None = None,
        return_dict: bool = False,
    ) -> tuple[Tensor]:
        return self.transformer(
            hidden_states=sample,
            timestep=timestep,
            encoder_hidden_states=encoder_hidden_states,
            pooled_projections=added_cond_kwargs["text_embeds"],
            joint_attention_kwargs=dict(cross_attention_kwargs) if cross_attention_kwargs else None,
            return_dict=False,
        )


def sd3_conditions(transformer: nn.Module) -> AddedConditions:
    """The packed-condition layout of an SD3 transformer: its pooled projections (no time ids)."""
    return AddedConditions(text_embeds_dim=int(transformer.config.pooled_projection_dim), time_ids_dim=0)


def _check_sd3_base(base: Any) -> None:
    name = type(base).__name__
    transformer = getattr(base, "transformer", None)
    if transformer is None or getattr(base, "unet", None) is not None:
        hint = (
            "; use msdda.pipelines.MSDDAPipeline (SD 1.x / 2.x) or msdda.pipelines.sdxl.MSDDAXLPipeline (SDXL)"
            if getattr(base, "unet", None) is not None
            else ""
        )
        raise PipelineError(f"{name} has no SD3 transformer; MSDDASD3Pipeline supports StableDiffusion3Pipeline{hint}")
    for attr in ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler", "encode_prompt"):
        if getattr(base, attr, None) is None:
            raise PipelineError(f"{name} has no {attr!r}; pass a diffusers StableDiffusion3Pipeline as the base")
    cfg = transformer.config
    if type(transformer).__name__ != "SD3Transformer2DModel" or cfg.get("pooled_projection_dim") is None:
        raise PipelineError(
            f"{name}'s transformer is a {type(transformer).__name__}, not an SD3Transformer2DModel (pooled "
            "projections, joint attention); pass a StableDiffusion3Pipeline (SD3 / SD3.5)"
        )
    if getattr(base, "image_encoder", None) is not None:
        raise PipelineError(
            f"{name} has an IP-Adapter image encoder; MSDDASD3Pipeline conditions on text only (pass "
            "image_encoder=None, feature_extractor=None to from_pipe)"
        )


def _full_transformer_folder(path: Path) -> Path | None:
    """The transformer folder of a source path: a transformer folder (config.json of a *Transformer* class) or a
    pipeline folder's transformer/; None for anything else (a LoRA)."""
    if not path.is_dir():
        return None
    if (path / "model_index.json").is_file() and (path / "transformer").is_dir():
        return path / "transformer"
    config = path / "config.json"
    if config.is_file() and not (path / "adapter_config.json").is_file():
        try:
            cls = json.loads(config.read_text()).get("_class_name", "")
        except (OSError, json.JSONDecodeError):
            cls = ""
        return path if "Transformer" in cls else None
    return None


def _check_compatible(base: nn.Module, other: nn.Module, objective: str, source: str) -> None:
    if type(other).__name__ != type(base).__name__ or not hasattr(other, "config"):
        raise AdapterError(
            f"objective {objective!r} ({source}): a {type(other).__name__} is no {type(base).__name__}; pass a "
            "fine-tune of the base transformer"
        )
    for key in _ARCH_KEYS:
        mine, theirs = base.config.get(key), other.config.get(key)
        if (list(mine) if isinstance(mine, tuple) else mine) != (list(theirs) if isinstance(theirs, tuple) else theirs):
            raise AdapterError(
                f"objective {objective!r} ({source}): the transformer has {key}={theirs!r} but the base has {mine!r}, "
                "so it was trained for another base model (e.g. SD3.5 Large vs Medium); pass a fine-tune of this base"
            )


def load_full_transformer(base: nn.Module, folder: Path, objective: str) -> nn.Module:
    """A full-transformer objective from a folder (config.json + safetensors), in the base's class, dtype and
    device (pickled weights are refused)."""
    diffusers = require("diffusers", "full-transformer objectives")
    from msdda.pipelines._deps import dtype_kwargs
    from msdda.pipelines.objectives import _PICKLE_SUFFIXES, _refuse_pickle

    if not any(folder.glob("*.safetensors")):
        pickled = sorted(p for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        if pickled:
            _refuse_pickle(pickled[0], objective)
        raise AdapterError(f"objective {objective!r}: {folder} has a transformer config but no .safetensors weights")
    try:
        model = type(base).from_pretrained(
            str(folder), use_safetensors=True, local_files_only=True, **dtype_kwargs(diffusers, base.dtype)
        )
    except Exception as exc:
        raise AdapterError(f"objective {objective!r}: could not load the transformer from {folder}: {exc}") from exc
    _check_compatible(base, model, objective, str(folder))
    return model.to(base.device).eval()


class MSDDASD3Pipeline(MSDDAPipeline):
    """Multi-objective Stable Diffusion 3 / 3.5: K objectives (LoRA adapters or full transformers) fused per step.

    base: a diffusers StableDiffusion3Pipeline. Its transformer is the reference model; LoRA objectives
      (diffusers' SD3 format, `transformer.`-prefixed keys as StableDiffusion3Pipeline.save_lora_weights
      writes them, or peft folders) are loaded into it as adapters named after the objectives with its
      `load_lora_adapter`; LoRAs that also adapt a text encoder are refused (all objectives share one prompt
      encoding). Full-transformer objectives are SD3 transformers of the base's architecture (a folder, a
      pipeline folder's transformer/, or a module).
    scheduler: None (a copy of the base's FlowMatchEulerDiscreteScheduler, shift included) or "flow-match"
      (built from the base's scheduler config). Its sampling kernels are msdda.core.samplers' flow kernels.

    Sharing and release are MSDDAPipeline's: the modules are the caller's (shared, not copied), the scheduler
    is the pipeline's own, adapters are off outside the pipeline's transformer calls and `release()` restores
    the transformer exactly. nsfw_content_detected is always None (SD3 has no safety checker).
    """

    _diffusers_class = "StableDiffusion3Pipeline"
    _network_name = "transformer"
    _full_kind = "transformer"
    _callback_tensor_inputs = (*_CALLBACK_TENSOR_INPUTS, "pooled_prompt_embeds", "negative_pooled_prompt_embeds")

    def __init__(self, base: Any, objectives: Mapping[str, Any], *, scheduler: str | None = None) -> None:
        super().__init__(base, objectives, scheduler=scheduler)  # checks the base first (_check_base)
        self._conditions = sd3_conditions(self.unet)
        self._base_call = SD3TransformerCall(self.unet)  # one module for every objective on the base transformer

    # ----- construction hooks ---------------------------------------------------------------------------
    @classmethod
    def _check_base(cls, base: Any) -> None:
        _check_sd3_base(base)

    @classmethod
    def _assemble(cls, like: Any, components: Mapping[str, Any]) -> Any:
        diffusers = require("diffusers", cls.__name__)
        keys = _signature_keys(diffusers.StableDiffusion3Pipeline)
        return diffusers.StableDiffusion3Pipeline(**{k: components.get(k) for k in keys})

    @classmethod
    def _own_pipeline(cls, base: Any, scheduler: str | None) -> Any:
        if scheduler not in (None, *SCHEDULERS):
            raise PipelineError(
                f"scheduler={scheduler!r}; MSDDASD3Pipeline samples with FlowMatchEulerDiscreteScheduler: pass None "
                "(a copy of the base's) or 'flow-match' (built from its config); eta sets the SDE's noise level"
            )
        if scheduler is None:
            return super()._own_pipeline(base, None)  # a copy of the base's scheduler (checked at call time)
        diffusers = require("diffusers", cls.__name__)
        own = diffusers.FlowMatchEulerDiscreteScheduler.from_config(base.scheduler.config)
        pipe = cls._assemble(base, {**base.components, "scheduler": own})
        pipe.set_progress_bar_config(**dict(getattr(base, "_progress_bar_config", {})))
        return pipe

    @classmethod
    def from_pretrained(
        cls,
        base: str | Path,
        objectives: Mapping[str, Any],
        *,
        scheduler: str | None = None,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        **base_kwargs: Any,
    ) -> MSDDASD3Pipeline:
        """Load a StableDiffusion3Pipeline from a local folder (safetensors only), then the objectives (see
        MSDDAPipeline.from_pretrained; scheduler defaults to the folder's own FlowMatchEulerDiscreteScheduler).
        base_kwargs go to StableDiffusion3Pipeline.from_pretrained (e.g. text_encoder_3=None, tokenizer_3=None
        to drop T5 as diffusers allows)."""
        return super().from_pretrained(base, objectives, scheduler=scheduler, dtype=dtype, device=device, **base_kwargs)  # type: ignore[return-value]

    def _resolve_objective(self, name: str, source: Any) -> Objective:
        check_objective_name(name)
        base = self.unet
        if isinstance(source, nn.Module):
            if source is base:
                raise ObjectiveError(
                    f"objective {name!r} is the base transformer itself; use method='base' or weight 'reference'"
                )
            _check_compatible(base, source, name, "module")
            return Objective(name=name, kind="transformer", source="module", unet=source.eval())
        if isinstance(source, str | Path):
            folder = _full_transformer_folder(Path(source).expanduser())
            if folder is not None:
                model = load_full_transformer(base, folder, name)
                return Objective(name=name, kind="transformer", source=str(source), unet=model)
        try:
            return resolve_objective(base, name, source, lora_prefix="transformer")
        except AdapterError as exc:  # the shared loader's hint names SD 1.5; say what fits here
            raise AdapterError(
                str(exc).replace("an SD 1.5 LoRA with an SD 1.5 checkpoint", "a LoRA of this SD3 transformer")
            ) from None

    def _unet_denoiser(self, unet: nn.Module, **kwargs: Any) -> UNetDenoiser:
        # every denoiser on the base transformer shares one call module: UNetBatch batches members by module
        call = self._base_call if unet is self.unet else SD3TransformerCall(unet)
        return UNetDenoiser(call, conditions=self._conditions, **kwargs)

    # ----- the call -------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        weights: Mapping[str, float] | None = None,
        *,
        prompt_2: str | list[str] | None = None,
        prompt_3: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        negative_prompt_3: str | list[str] | None = None,
        pooled_prompt_embeds: Tensor | None = None,
        negative_pooled_prompt_embeds: Tensor | None = None,
        max_sequence_length: int = 256,
        num_inference_steps: int = 28,
        guidance_scale: float = 7.0,
        eta: float = 0.0,
        joint_attention_kwargs: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> MSDDAPipelineOutput | tuple[Any, None]:
        """Generate SD3 images for `prompt` (or `prompt_embeds` + `pooled_prompt_embeds`) under `weights`.

        The SD3 keywords are diffusers' StableDiffusion3Pipeline's: prompt_2 / prompt_3 (and the negative
        twins) go to CLIP-G and T5 (default: prompt / negative_prompt); pooled_prompt_embeds [B, P] is needed
        with prompt_embeds; max_sequence_length is T5's; joint_attention_kwargs (e.g. {"scale": 0.5}) goes to
        every transformer call, its "scale" to encode_prompt. num_inference_steps 28 and guidance_scale 7.0 are
        diffusers' defaults.
        eta: the flow kernels' noise level a. 0 (default): FlowMatchEulerDiscreteScheduler's ODE step, the
          images diffusers' own pipeline makes; a > 0: Flow-GRPO's SDE step (a = 0.7 in Flow-GRPO), stochastic,
          which CoDe and RGG need (refused at eta 0: identical candidates, zero-variance guidance).
        Every other keyword is MSDDAPipeline.__call__'s (weights, method, negative_prompt, prompt_embeds,
        height, width, generator / seed, latents, output_type, betas, rewards, callback_on_step_end,
        guidance_rescale, clip_skip, final_noise, batch_models, return_dict, ...), with the same meaning.
        callback_on_step_end may also ask for "pooled_prompt_embeds" ([negative; positive] with guidance, as
        diffusers hands them) and "negative_pooled_prompt_embeds", read-only.
        Returns MSDDAPipelineOutput (nsfw_content_detected None), or (images, None) with return_dict=False.
        """
        if "cross_attention_kwargs" in kwargs:
            raise PipelineError(
                "SD3's transformer takes joint_attention_kwargs (as diffusers' StableDiffusion3Pipeline); pass "
                "joint_attention_kwargs={'scale': ...} instead of cross_attention_kwargs"
            )
        return super().__call__(
            prompt,
            weights,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            eta=eta,
            cross_attention_kwargs=joint_attention_kwargs,
            prompt_2=prompt_2,
            prompt_3=prompt_3,
            negative_prompt_2=negative_prompt_2,
            negative_prompt_3=negative_prompt_3,
            pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            max_sequence_length=max_sequence_length,
            **kwargs,
        )

    # ----- family hooks of the call ---------------------------------------------------------------------
    def _check_scheduler(self, eta: float) -> str:
        """'flow_sde' for the pipeline's FlowMatchEulerDiscreteScheduler; anything else, dynamic shifting (its
        timesteps need the image size, which the sampler's set_timesteps does not pass) and a bad eta refused."""
        scheduler = self.base.scheduler
        name = type(scheduler).__name__
        if name != "FlowMatchEulerDiscreteScheduler":
            raise UnsupportedSchedulerError(
                f"MSDDASD3Pipeline samples with FlowMatchEulerDiscreteScheduler (the ODE at eta=0, Flow-GRPO's SDE at "
                f"eta > 0), not {name}; build it with scheduler='flow-match' or from_pipe(base, objectives, "
                "scheduler=FlowMatchEulerDiscreteScheduler.from_config(...))"
            )
        if scheduler.config.get("use_dynamic_shifting"):
            raise PipelineError(
                "the scheduler has use_dynamic_shifting=True (timesteps shifted by the image size, mu); msdda's "
                "sampler sets timesteps without it. Pass a fixed shift (SD3 / SD3.5 ship shift=3.0), e.g. "
                "FlowMatchEulerDiscreteScheduler.from_config(config, use_dynamic_shifting=False, shift=3.0)"
            )
        probe = copy.deepcopy(scheduler)
        probe.set_timesteps(2)
        as_kernel_scheduler(probe, eta=eta)  # the sampler's own ScheduleError for a bad noise level
        return "flow_sde"

    def _check_plan(self, plan: MethodPlan, kind: str, eta: float) -> None:
        super()._check_plan(plan, kind, eta)
        if isinstance(plan.rule, CoDe | RGG) and eta == 0.0:
            what = "draws identical candidates" if isinstance(plan.rule, CoDe) else "adds var x grad = 0 to the mean"
            raise PipelineError(
                f"{plan.rule.name} with eta=0 (the flow ODE, a point mass) {what}; pass eta > 0 (e.g. eta=0.7: "
                "Flow-GRPO's SDE step)"
            )

    def _check_family_kwargs(self, family_kwargs: Mapping[str, Any]) -> None:
        unknown = sorted(set(family_kwargs) - set(_SD3_KWARGS))
        if unknown:
            raise TypeError(f"MSDDASD3Pipeline.__call__() got unexpected keyword argument(s) {unknown}")
        width = self._conditions.text_embeds_dim
        for key in ("pooled_prompt_embeds", "negative_pooled_prompt_embeds"):
            value = family_kwargs.get(key)
            if value is not None and (not isinstance(value, Tensor) or value.dim() != 2 or value.shape[1] != width):
                shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise PipelineError(
                    f"{key} is {shape}; pass the pooled projections [B, {width}] that encode_prompt returns beside "
                    "the prompt embeddings"
                )
        length = family_kwargs.get("max_sequence_length", 256)
        if isinstance(length, bool) or not isinstance(length, int) or not 1 <= length <= 512:
            raise PipelineError(f"max_sequence_length={length!r}; pass an integer in [1, 512] (T5's tokens)")

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
        kw = family_kwargs
        self.base.check_inputs(
            prompt,
            kw.get("prompt_2"),
            kw.get("prompt_3"),
            height,
            width,
            negative_prompt,
            kw.get("negative_prompt_2"),
            kw.get("negative_prompt_3"),
            prompt_embeds,
            negative_prompt_embeds,
            kw.get("pooled_prompt_embeds"),
            kw.get("negative_pooled_prompt_embeds"),
            None,
            kw.get("max_sequence_length", 256),
        )

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
        """diffusers' SD3 encode_prompt, the pooled projections packed into the sampler's cond / null_cond."""
        kw = family_kwargs
        embeds, negative, pooled, negative_pooled = self.base.encode_prompt(
            prompt=prompt,
            prompt_2=kw.get("prompt_2"),
            prompt_3=kw.get("prompt_3"),
            device=device,
            num_images_per_prompt=num_images_per_prompt,
            do_classifier_free_guidance=do_cfg,
            negative_prompt=negative_prompt,
            negative_prompt_2=kw.get("negative_prompt_2"),
            negative_prompt_3=kw.get("negative_prompt_3"),
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=kw.get("pooled_prompt_embeds"),
            negative_pooled_prompt_embeds=kw.get("negative_pooled_prompt_embeds"),
            clip_skip=clip_skip,
            max_sequence_length=kw.get("max_sequence_length", 256),
            lora_scale=lora_scale,
        )
        layout = self._conditions
        no_ids = embeds.new_zeros(embeds.shape[0], 0)
        cond = layout.pack(embeds, pooled.to(device), no_ids)
        null = layout.pack(negative, negative_pooled.to(device), no_ids) if do_cfg else None
        callback = {
            "prompt_embeds": torch.cat([negative, embeds]) if do_cfg else embeds,
            "negative_prompt_embeds": negative,
            "pooled_prompt_embeds": torch.cat([negative_pooled, pooled]) if do_cfg else pooled,
            "negative_pooled_prompt_embeds": negative_pooled,
        }
        return EncodedPrompt(cond, null, callback)

    def _unscale(self, latents: Tensor) -> Tensor:
        cfg = self.base.vae.config
        return latents / cfg.scaling_factor + (cfg.shift_factor or 0.0)

    def _decode_latents(self, latents: Tensor) -> Tensor:
        vae = self.base.vae
        return vae.decode(self._unscale(latents).to(vae.dtype), return_dict=False)[0]

    def _decode(self, final: Tensor, output_type: str, device: Any, dtype: torch.dtype, generator: Any) -> tuple:
        """The final latents as (images, None): diffusers' SD3 decode (scaling and shift factor) and postprocess."""
        if output_type == "latent":
            return final, None
        image = self.base.vae.decode(self._unscale(final), return_dict=False)[0]
        return self.base.image_processor.postprocess(image, output_type=output_type), None


__all__ = ["MSDDASD3Pipeline", "SD3TransformerCall"]
