"""`MSDDAXLPipeline`: Stable Diffusion XL through diffusers, with K objectives fused at every step.

It is `MSDDAPipeline` (msdda.pipelines.sd) with SDXL's family hooks: the base is a diffusers
`StableDiffusionXLPipeline` (two text encoders, pooled embeddings, size/crop time ids, no safety checker,
an optional watermarker), and the prompt is encoded by its `encode_prompt` and `_get_add_time_ids` exactly
as diffusers does. Everything else (objectives as LoRA adapters or full UNets, every method through the
planner, DDIM/DDPM kernels, generator lists, callbacks, release) is MSDDAPipeline's own code.

SDXL's UNet takes `added_cond_kwargs = {"text_embeds": pooled [B, P], "time_ids": [B, 6]}` beside the prompt
embeddings. The sampler, classifier-free guidance and the batched K-objective call move one condition
tensor per row, so the pooled embeddings and time ids are packed as trailing tokens of that tensor and
unpacked by the UNet denoiser right before its UNet call (msdda.pipelines.conditioning.AddedConditions):
every row operation upstream then applies to all three inputs alike, and no sampler code knows about SDXL.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from msdda.pipelines._deps import require
from msdda.pipelines.conditioning import AddedConditions
from msdda.pipelines.errors import PipelineError
from msdda.pipelines.sd import (
    _CALLBACK_TENSOR_INPUTS,
    EncodedPrompt,
    MSDDAPipeline,
    MSDDAPipelineOutput,
    _signature_keys,
)

TIME_IDS = 6  # original size (h, w), crop top-left (y, x), target size (h, w)
_SIZE_KWARGS = ("original_size", "target_size", "negative_original_size", "negative_target_size")
_CROP_KWARGS = ("crops_coords_top_left", "negative_crops_coords_top_left")
_XL_KWARGS = (
    "prompt_2",
    "negative_prompt_2",
    "pooled_prompt_embeds",
    "negative_pooled_prompt_embeds",
    *_SIZE_KWARGS,
    *_CROP_KWARGS,
)


def _xl_conditions(base: Any) -> AddedConditions:
    """The added-condition layout the base UNet expects (refusing UNets that are not SDXL text-to-image ones)."""
    cfg = base.unet.config
    name = type(base).__name__
    if cfg.get("addition_embed_type") != "text_time":
        raise PipelineError(
            f"{name}'s UNet has addition_embed_type={cfg.get('addition_embed_type')!r}, not 'text_time': it takes "
            "no pooled embeddings and time ids, so it is no SDXL UNet; use MSDDAPipeline for SD 1.x / 2.x"
        )
    width = int(cfg.get("projection_class_embeddings_input_dim") or 0)
    pooled = width - TIME_IDS * int(cfg.addition_time_embed_dim)
    encoder = getattr(base, "text_encoder_2", None)
    projection = getattr(getattr(encoder, "config", None), "projection_dim", pooled)
    if pooled <= 0 or projection != pooled:
        raise PipelineError(
            f"{name}'s UNet takes added embeddings of width {width} = {TIME_IDS} time ids x "
            f"addition_time_embed_dim {cfg.addition_time_embed_dim} + pooled width {pooled}, but text_encoder_2 "
            f"projects to {projection}; pass an SDXL base whose UNet and text_encoder_2 belong together (the SDXL "
            "refiner, conditioned on an aesthetic score, is not supported)"
        )
    return AddedConditions(text_embeds_dim=pooled, time_ids_dim=TIME_IDS)


def _check_xl_base(base: Any) -> None:
    name = type(base).__name__
    if getattr(base, "text_encoder_2", None) is None and getattr(base, "tokenizer_2", None) is None:
        raise PipelineError(
            f"{name} is not an SDXL pipeline (it has no text_encoder_2 / tokenizer_2); MSDDAXLPipeline supports "
            "StableDiffusionXLPipeline; use msdda.pipelines.MSDDAPipeline for SD 1.x / 2.x"
        )
    needed = ("unet", "vae", "text_encoder_2", "tokenizer_2", "scheduler", "encode_prompt", "prepare_latents")
    for attr in (*needed, "_get_add_time_ids"):
        if getattr(base, attr, None) is None:
            raise PipelineError(f"{name} has no {attr!r}; pass a diffusers StableDiffusionXLPipeline as the base")
    if base.config.get("requires_aesthetics_score"):
        raise PipelineError(
            f"{name} has requires_aesthetics_score=True (the SDXL refiner's conditioning: an aesthetic score "
            "instead of the target size); MSDDAXLPipeline supports SDXL text-to-image bases"
        )
    if base.unet.config.get("time_cond_proj_dim") is not None:
        raise PipelineError("the base UNet has time_cond_proj_dim set (an LCM model); its kernels are not DDPM/DDIM")
    _xl_conditions(base)


def _check_pair(key: str, value: Any, *, minimum: int) -> None:
    ok = (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in value)
    )
    if not ok:
        what = "(height, width) of positive integers, e.g. (1024, 1024)" if minimum else "(top, left) >= 0, e.g. (0, 0)"
        raise PipelineError(f"{key}={value!r}; pass a pair {what}")


class MSDDAXLPipeline(MSDDAPipeline):
    """Multi-objective Stable Diffusion XL: K objectives (LoRA adapters or full UNets) fused at every step.

    base: a diffusers StableDiffusionXLPipeline. Its UNet is the reference model; LoRA objectives (diffusers'
      SDXL format, `unet.`-prefixed keys as StableDiffusionXLPipeline.save_lora_weights writes them, or peft
      folders) are loaded into it as adapters named after the objectives; LoRAs that also adapt a text
      encoder are refused (all objectives share one prompt encoding). Full-UNet objectives are SDXL UNets of
      the base's architecture (added-embedding sizes included).
    objectives, scheduler: as MSDDAPipeline (scheduler "ddim" / "ddpm" builds the pipeline's own scheduler from
      the base's config; SDXL ships EulerDiscrete, whose kernel is not implemented).

    Sharing and release are as in MSDDAPipeline: the modules are the caller's (shared, not copied), the
    scheduler is the pipeline's own, adapters are off outside the pipeline's UNet calls and `release()`
    restores the UNet exactly. Calls follow diffusers' StableDiffusionXLPipeline (prompt_2, negative prompts,
    pooled embeddings, original_size / crops_coords_top_left / target_size and their negative_* twins), plus
    MSDDAPipeline's weights, method and the rest (see `__call__`). nsfw_content_detected is always None (SDXL
    has no safety checker); the watermarker runs when the base has one.
    """

    _diffusers_class = "StableDiffusionXLPipeline"
    _callback_tensor_inputs = (*_CALLBACK_TENSOR_INPUTS, "add_text_embeds", "add_time_ids")

    def __init__(self, base: Any, objectives: Mapping[str, Any], *, scheduler: str | None = None) -> None:
        super().__init__(base, objectives, scheduler=scheduler)  # checks the base first (_check_base)
        self._conditions = _xl_conditions(self.base)  # the layout every UNet denoiser of this pipeline unpacks

    @classmethod
    def _check_base(cls, base: Any) -> None:
        _check_xl_base(base)

    @classmethod
    def _assemble(cls, like: Any, components: Mapping[str, Any]) -> Any:
        diffusers = require("diffusers", cls.__name__)
        settings = ("force_zeros_for_empty_prompt", "add_watermarker")
        keys = _signature_keys(diffusers.StableDiffusionXLPipeline) - set(settings)
        return diffusers.StableDiffusionXLPipeline(
            **{k: components.get(k) for k in keys},
            # the caller's settings: an empty negative prompt as zeros (SDXL's default), its watermarker or none
            force_zeros_for_empty_prompt=bool(like.config.get("force_zeros_for_empty_prompt", True)),
            add_watermarker=getattr(like, "watermark", None) is not None,
        )

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        weights: Mapping[str, float] | None = None,
        *,
        prompt_2: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        pooled_prompt_embeds: Tensor | None = None,
        negative_pooled_prompt_embeds: Tensor | None = None,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] = (0, 0),
        negative_target_size: tuple[int, int] | None = None,
        guidance_scale: float = 5.0,
        **kwargs: Any,
    ) -> MSDDAPipelineOutput | tuple[Any, None]:
        """Generate SDXL images for `prompt` (or `prompt_embeds` + `pooled_prompt_embeds`) under `weights`.

        The SDXL keywords are diffusers' StableDiffusionXLPipeline's: prompt_2 / negative_prompt_2 go to the
        second tokenizer and text encoder (default: prompt / negative_prompt); pooled_prompt_embeds [B, P] is
        needed with prompt_embeds [B, L, D] (and negative_pooled_prompt_embeds with negative_prompt_embeds);
        original_size and target_size (default (height, width)) and crops_coords_top_left make the time ids,
        the negative_* twins those of the unconditional pass (both sizes given, else the positive ids).
        guidance_scale defaults to 5.0 as in diffusers' SDXL pipeline.
        Every other keyword is MSDDAPipeline.__call__'s (weights, method, negative_prompt, prompt_embeds,
        height, width, num_inference_steps, eta, generator / seed, latents, output_type, betas, rewards,
        callback_on_step_end, cross_attention_kwargs, guidance_rescale, clip_skip, batch_models, ...), with
        the same meaning. callback_on_step_end may also ask for "add_text_embeds" ([negative; positive]
        pooled embeddings, [2B, P] with guidance) and "add_time_ids" ([2B, 6], the same row order; diffusers
        interleaves the rows of a batch, which differs only when the negative sizes differ), read-only.
        Returns MSDDAPipelineOutput (nsfw_content_detected None), or (images, None) with return_dict=False.
        """
        return super().__call__(
            prompt,
            weights,
            guidance_scale=guidance_scale,
            prompt_2=prompt_2,
            negative_prompt_2=negative_prompt_2,
            pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            original_size=original_size,
            crops_coords_top_left=crops_coords_top_left,
            target_size=target_size,
            negative_original_size=negative_original_size,
            negative_crops_coords_top_left=negative_crops_coords_top_left,
            negative_target_size=negative_target_size,
            **kwargs,
        )

    # ----- family hooks ---------------------------------------------------------------------------------
    def _check_family_kwargs(self, family_kwargs: Mapping[str, Any]) -> None:
        unknown = sorted(set(family_kwargs) - set(_XL_KWARGS))
        if unknown:
            raise TypeError(f"MSDDAXLPipeline.__call__() got unexpected keyword argument(s) {unknown}")
        for key in _SIZE_KWARGS:
            if family_kwargs.get(key) is not None:
                _check_pair(key, family_kwargs[key], minimum=1)
        for key in _CROP_KWARGS:
            _check_pair(key, family_kwargs.get(key, (0, 0)), minimum=0)
        for key in ("pooled_prompt_embeds", "negative_pooled_prompt_embeds"):
            value = family_kwargs.get(key)
            if value is not None and (not isinstance(value, Tensor) or value.dim() != 2):
                shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise PipelineError(
                    f"{key} is {shape}; pass the pooled embeddings [B, {self._conditions.text_embeds_dim}] that "
                    "encode_prompt returns beside the prompt embeddings"
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
        self.base.check_inputs(
            prompt,
            family_kwargs.get("prompt_2"),
            height,
            width,
            None,
            negative_prompt,
            family_kwargs.get("negative_prompt_2"),
            prompt_embeds,
            negative_prompt_embeds,
            family_kwargs.get("pooled_prompt_embeds"),
            family_kwargs.get("negative_pooled_prompt_embeds"),
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
        """diffusers' SDXL encode_prompt and time ids, packed as the sampler's cond / null_cond."""
        base, kw = self.base, family_kwargs
        embeds, negative, pooled, negative_pooled = base.encode_prompt(
            prompt=prompt,
            prompt_2=kw.get("prompt_2"),
            device=device,
            num_images_per_prompt=num_images_per_prompt,
            do_classifier_free_guidance=do_cfg,
            negative_prompt=negative_prompt,
            negative_prompt_2=kw.get("negative_prompt_2"),
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=kw.get("pooled_prompt_embeds"),
            negative_pooled_prompt_embeds=kw.get("negative_pooled_prompt_embeds"),
            lora_scale=lora_scale,
            clip_skip=clip_skip,
        )
        size = (height, width)
        crop = kw.get("crops_coords_top_left", (0, 0))
        ids = self._time_ids(kw.get("original_size") or size, crop, kw.get("target_size") or size, embeds, pooled)
        if kw.get("negative_original_size") is not None and kw.get("negative_target_size") is not None:
            negative_ids = self._time_ids(
                kw["negative_original_size"],
                kw.get("negative_crops_coords_top_left", (0, 0)),
                kw["negative_target_size"],
                embeds,
                pooled,
            )
        else:
            negative_ids = ids  # as diffusers: the unconditional pass sees the positive size conditioning
        b = embeds.shape[0]
        ids, negative_ids = ids.to(device).repeat(b, 1), negative_ids.to(device).repeat(b, 1)
        layout = self._conditions
        cond = layout.pack(embeds, pooled.to(device), ids)
        null = layout.pack(negative, negative_pooled.to(device), negative_ids) if do_cfg else None
        callback = {
            "prompt_embeds": torch.cat([negative, embeds]) if do_cfg else embeds,
            "negative_prompt_embeds": negative,
            "add_text_embeds": torch.cat([negative_pooled, pooled]).to(device) if do_cfg else pooled.to(device),
            "add_time_ids": torch.cat([negative_ids, ids]) if do_cfg else ids,
        }
        return EncodedPrompt(cond, null, callback)

    def _time_ids(self, original: Any, crop: Any, target: Any, embeds: Tensor, pooled: Tensor) -> Tensor:
        """diffusers' _get_add_time_ids [1, 6] (its ValueError on a UNet / text encoder mismatch as PipelineError)."""
        encoder = self.base.text_encoder_2
        projection = int(pooled.shape[-1]) if encoder is None else encoder.config.projection_dim
        try:
            return self.base._get_add_time_ids(
                tuple(original), tuple(crop), tuple(target), dtype=embeds.dtype, text_encoder_projection_dim=projection
            )
        except ValueError as exc:
            raise PipelineError(f"SDXL time ids: {exc}") from exc

    def _unscale(self, latents: Tensor) -> Tensor:
        """Latents as the VAE takes them: de-normalised by latents_mean / latents_std when the VAE config has
        them, else divided by scaling_factor (diffusers' SDXL decode)."""
        cfg = self.base.vae.config
        mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        if mean is not None and std is not None:
            c = latents.shape[1]
            mean_t = torch.tensor(mean).view(1, c, 1, 1).to(latents.device, latents.dtype)
            std_t = torch.tensor(std).view(1, c, 1, 1).to(latents.device, latents.dtype)
            return latents * std_t / cfg.scaling_factor + mean_t
        return latents / cfg.scaling_factor

    def _decode_latents(self, latents: Tensor) -> Tensor:
        # For CoDe / RGG rewards: decoded in the VAE's dtype (no upcasting: RGG differentiates through it);
        # an fp16 SDXL VAE can overflow there, so use the fp16-fix VAE or vae.to(torch.float32) for them.
        vae = self.base.vae
        return vae.decode(self._unscale(latents).to(vae.dtype), return_dict=False)[0]

    def _decode(self, final: Tensor, output_type: str, device: Any, dtype: torch.dtype, generator: Any) -> tuple:
        """The final latents as (images, None): diffusers' SDXL decode (the fp16 VAE upcast to float32 while it
        decodes when its config says force_upcast), the watermarker if any, and postprocessing."""
        base = self.base
        if output_type == "latent":
            return final, None
        vae = base.vae
        upcast = vae.dtype == torch.float16 and bool(vae.config.get("force_upcast", False))
        if upcast:
            vae.to(dtype=torch.float32)
        try:
            latents = self._unscale(final.to(next(iter(vae.post_quant_conv.parameters())).dtype))
            image = vae.decode(latents, return_dict=False)[0]
        finally:
            if upcast:
                vae.to(dtype=torch.float16)  # the caller's VAE is shared: back to its dtype, also after an error
        if base.watermark is not None:
            image = base.watermark.apply_watermark(image)
        return base.image_processor.postprocess(image, output_type=output_type), None
