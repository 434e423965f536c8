"""`MSDDADiTPipeline`: class-conditional DiT (diffusers' DiTPipeline) with K objectives fused at every step.

DiT's transformer (DiTTransformer2DModel) is a learned-variance model like PixArt's: out_channels =
2 x in_channels, the second half improved-DDPM's "learned_range" variance value. diffusers' DiTPipeline
drops that half before `scheduler.step`; this pipeline keeps it, so every objective's kernel is the DDPM
kernel with its own predicted variance and MSDDA differs from DB-MPA where those variances differ.

The condition is a class-label LongTensor [B]. Classifier-free guidance is msdda's own
(`msdda.sampling.sample(guidance_scale=..., null_cond=...)`): one transformer call on [x; x] with the
labels [cond; null] (null = the transformer's `num_embeds_ada_norm`, 1000 for ImageNet), the noise half
guided uncond + s (cond - uncond), the variance half taken from the conditional pass (improved-DDPM / DiT).

How diffusers' DiTPipeline differs: it steps a doubled batch of latents (both CFG halves, so a DDPM step
draws noise for 2B rows, of which B are thrown away), guides the first `in_channels` channels and writes the
guided eps into both halves, hard-codes the null class 1000, and passes only the noise half to the scheduler
(the scheduler's fixed variance). The reference DiT code (facebookresearch/DiT `forward_with_cfg`) guides
only the first 3 of the 4 latent channels by default; msdda guides all `in_channels` noise channels.
Draws therefore do not match diffusers' DiTPipeline; the tests compare against a hand-written
DDPMScheduler.step loop on the full [B, 2C] output instead.

Objectives are LoRA adapters injected into the base transformer with peft (`PeftHost`; diffusers'
DiTTransformer2DModel has no adapter mixin) or full transformers, as in `msdda.pipelines.pixart`.
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

from msdda.errors import MSDDAError
from msdda.pipelines._deps import dtype_kwargs, require
from msdda.pipelines.errors import AdapterError, ObjectiveError, PipelineError
from msdda.pipelines.objectives import AdapterSwitch, check_objective_name
from msdda.pipelines.pixart import (
    OUTPUT_TYPES,
    MSDDAPixArtPipeline,
    PeftHost,
    TransformerObjective,
    TransformerPipelineMixin,
    _adapter_names,
    _classify,
    load_transformer_lora,
    pixart_scheduler,
    resolve_transformer_source,
)
from msdda.pipelines.sd import DiffusersNoise, _ObjectiveStore
from msdda.sampling import MSDDA, Cost, make_generator, sample
from msdda.sampling.methods import plan_method

logger = logging.getLogger(__name__)

DIT_PIPELINES = ("DiTPipeline",)
_CALLBACK_TENSOR_INPUTS = ("latents",)
# keys of a transformer config that must agree for an objective to be a fine-tune of the base
_ARCH_KEYS = (
    "in_channels",
    "out_channels",
    "sample_size",
    "patch_size",
    "num_layers",
    "num_attention_heads",
    "attention_head_dim",
    "num_embeds_ada_norm",
    "norm_type",
)


@dataclass
class MSDDADiTPipelineOutput:
    """What a call returns: images per `output_type` ("pil", "np" [B, H, W, 3] in [0, 1], "pt" [B, 3, H, W]
    in [0, 1], "latent" the final latents), the cost of the denoising and the resolved settings."""

    images: Any
    cost: Cost
    config: dict[str, Any] = field(default_factory=dict)


class DiTDenoiser:
    """A Denoiser over latents: `(x_t [B, C, h, w], t LongTensor [B], cond=class ids LongTensor [B]) ->
    [B, out_channels, h, w]` (learned sigma: the noise prediction, then the variance value)."""

    def __init__(
        self,
        transformer: nn.Module,
        *,
        name: str,
        adapter: str | None = None,
        switch: AdapterSwitch | None = None,
    ) -> None:
        self.transformer = transformer
        self.unet = transformer  # the name the shared objective helpers read
        self.name = name
        self.adapter = adapter
        self.switch = switch
        self.forwards = 0  # transformer forwards, counted in samples

    def __call__(self, x_t: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        if not isinstance(cond, Tensor) or cond.dtype != torch.long or cond.dim() != 1:
            raise AdapterError(
                f"objective {self.name!r}: cond must be a LongTensor [B] of class ids, got "
                f"{type(cond).__name__}{'' if not isinstance(cond, Tensor) else f' {cond.dtype} {tuple(cond.shape)}'}"
            )
        self.forwards += x_t.shape[0]
        if cond.shape[0] == 1 and x_t.shape[0] > 1:
            cond = cond.expand(x_t.shape[0])
        kwargs = {"timestep": t, "class_labels": cond.to(x_t.device), "return_dict": False}
        if self.switch is None:
            return self.transformer(x_t, **kwargs)[0]
        with self.switch.active(self.adapter):
            return self.transformer(x_t, **kwargs)[0]


def _check_compatible(base: nn.Module, other: nn.Module, objective: str, source: str) -> None:
    if not hasattr(other, "config"):
        raise AdapterError(f"objective {objective!r} ({source}): a {type(other).__name__} has no diffusers config")
    for key in _ARCH_KEYS:
        mine, theirs = base.config.get(key), other.config.get(key)
        if mine != theirs:
            raise AdapterError(
                f"objective {objective!r} ({source}): the transformer has {key}={theirs!r} but the base has "
                f"{mine!r}, so it was trained for another base model; pass a fine-tune of this DiT"
            )


def _check_base(base: Any) -> None:
    name = type(base).__name__
    if name not in DIT_PIPELINES:
        raise PipelineError(
            f"{name} is not a DiT pipeline; MSDDADiTPipeline takes a diffusers DiTPipeline (class-conditional). "
            "Use MSDDAPixArtPipeline / MSDDAPipeline for text-to-image pipelines"
        )
    for attr in ("transformer", "vae", "scheduler"):
        if getattr(base, attr, None) is None:
            raise PipelineError(f"{name} has no {attr!r}; pass a complete DiTPipeline as the base")
    if base.transformer.config.get("num_embeds_ada_norm") is None:
        raise PipelineError(
            f"{name}'s transformer ({type(base.transformer).__name__}) has no num_embeds_ada_norm (class count); "
            "pass a class-conditional DiT transformer"
        )


class MSDDADiTPipeline(TransformerPipelineMixin):
    """Multi-objective class-conditional DiT: K objectives (LoRA adapters or full transformers) fused at every
    step, with each objective's own learned variance.

    base: a diffusers DiTPipeline. Its transformer is the reference model; LoRA objectives are injected into
      it as peft adapters named after the objectives. objectives: {name: source} as MSDDAPixArtPipeline
      (a peft folder or diffusers-format LoRA, an adapter name, a transformer folder or module).
    scheduler: "ddpm" (default: DDPM with "learned_range" variance for a learned-sigma transformer, else
      "fixed_small"; clip_sample False), "ddim", None (the base's scheduler as it is) or a scheduler object.

    With a fixed-variance transformer or scheduler MSDDA (weights summing to 1) is the same sampler as
    DB-MPA; that is allowed and recorded as `learned_variance: False`. `release()` (or leaving a `with`
    block) removes the adapters and restores the transformer exactly.
    """

    _denoiser_class = DiTDenoiser

    # the family-independent parts of the PixArt pipeline, shared as they are
    release = MSDDAPixArtPipeline.release
    learned_variance = MSDDAPixArtPipeline.learned_variance
    _check_scheduler = MSDDAPixArtPipeline._check_scheduler
    _check_plan = MSDDAPixArtPipeline._check_plan
    _last_timestep = MSDDAPixArtPipeline._last_timestep
    _adapter_host = MSDDAPixArtPipeline._adapter_host

    def __init__(self, base: Any, objectives: Mapping[str, Any], *, scheduler: str | Any | None = "ddpm") -> None:
        require("diffusers", "MSDDADiTPipeline")
        require("peft", "MSDDADiTPipeline")
        _check_base(base)
        if not isinstance(objectives, Mapping):
            raise ObjectiveError(
                f"objectives must be a mapping name -> source, got {type(objectives).__name__}; e.g. "
                "{'aesthetic': 'loras/aesthetic', 'compressibility': 'loras/compressibility'}"
            )
        self._origin = base
        self.transformer: nn.Module = base.transformer
        own = pixart_scheduler(base.scheduler, self.transformer, scheduler)
        self.base = type(base)(transformer=base.transformer, vae=base.vae, scheduler=own)
        self.base.labels = dict(getattr(base, "labels", {}) or {})
        self.base.set_progress_bar_config(**dict(getattr(base, "_progress_bar_config", {})))
        self._check_scheduler(0.0)
        self.host = PeftHost(self.transformer)
        self._load_objectives(self.host, objectives)

    @classmethod
    def from_pretrained(
        cls,
        base: str | Path,
        objectives: Mapping[str, Any],
        *,
        scheduler: str | Any | None = "ddpm",
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        **base_kwargs: Any,
    ) -> MSDDADiTPipeline:
        """Load the base DiTPipeline from a local folder (safetensors only), then the objectives."""
        diffusers = require("diffusers", "MSDDADiTPipeline")
        path = Path(base).expanduser()
        index = path / "model_index.json"
        if not index.is_file():
            raise PipelineError(f"{path} is not a diffusers pipeline folder (no model_index.json); save one first")
        cls_name = json.loads(index.read_text()).get("_class_name", "")
        if cls_name not in DIT_PIPELINES:
            raise PipelineError(
                f"{path} holds a {cls_name or 'unknown'} pipeline; MSDDADiTPipeline takes a DiTPipeline folder"
            )
        kwargs: dict[str, Any] = {"use_safetensors": True, "local_files_only": True, **dtype_kwargs(diffusers, dtype)}
        kwargs.update(base_kwargs)
        pipe = diffusers.DiTPipeline.from_pretrained(str(path), **kwargs)
        if device is not None:
            pipe = pipe.to(device)
        return cls(pipe, objectives, scheduler=scheduler)

    def add_objective(self, name: str, source: Any) -> TransformerObjective:
        """Add one objective (see the class docstring for sources); its adapter is left disabled."""
        self._check_alive()
        check_objective_name(name)
        if name in self.objectives:
            raise ObjectiveError(f"objective {name!r} already exists; choose another name")
        before = _adapter_names(self.transformer)
        try:
            obj = resolve_transformer_source(
                self.host.module, name, source, loaded=before,
                load_lora=lambda path, n: load_transformer_lora(self.host, path, n, n), classify=_classify,
                check_compatible=_check_compatible, model_class="DiTTransformer2DModel",
            )  # fmt: skip
        finally:
            self._added_adapters += sorted(_adapter_names(self.transformer) - before)
            self.switch.refresh()
            self.switch.disable()
        self.objectives[name] = obj
        logger.info("objective %r: %s from %s", name, obj.kind, obj.source)
        return obj

    # ----- class labels ------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        """The transformer's class count (`num_embeds_ada_norm`); the null class id for guidance."""
        return int(self.transformer.config.num_embeds_ada_norm)

    @property
    def labels(self) -> dict[str, int]:
        """Label name -> class id, as diffusers' DiTPipeline builds it from id2label."""
        return self.base.labels

    def class_name(self, class_id: int) -> str:
        """The first (alphabetical) label name of a class id, or "class <id>" without id2label."""
        names = [k for k, v in self.labels.items() if v == class_id]
        return names[0] if names else f"class {class_id}"

    def class_ids(self, class_labels: Any) -> list[int]:
        """Class ids from ints, label names (id2label, as diffusers' get_label_ids) or a LongTensor [B]."""
        if isinstance(class_labels, Tensor):
            if class_labels.dtype not in (torch.long, torch.int32, torch.int16, torch.int8, torch.uint8):
                raise PipelineError(f"class_labels is a {class_labels.dtype} tensor; pass integer class ids")
            items: list[Any] = [int(v) for v in class_labels.reshape(-1)]
        elif isinstance(class_labels, str | int):
            items = [class_labels]
        elif isinstance(class_labels, Sequence) and len(class_labels) > 0:
            items = list(class_labels)
        else:
            raise PipelineError(
                f"class_labels={class_labels!r}; pass a class id, a label name, or a non-empty list of them"
            )
        ids = []
        for item in items:
            if isinstance(item, str):
                if item not in self.labels:
                    near = sorted(self.labels)[:5]
                    raise PipelineError(
                        f"class label {item!r} is not a label name of this pipeline ({len(self.labels)} names from "
                        f"id2label, e.g. {near}); pass a name from pipeline.labels or an integer id"
                    )
                ids.append(self.labels[item])
            elif isinstance(item, int) and not isinstance(item, bool):
                if not 0 <= item < self.num_classes:
                    raise PipelineError(
                        f"class label {item} is out of range; this DiT has {self.num_classes} classes (ids 0.."
                        f"{self.num_classes - 1}; {self.num_classes} is the null class used for guidance)"
                    )
                ids.append(item)
            else:
                raise PipelineError(f"class label {item!r} ({type(item).__name__}); pass an int id or a label name")
        return ids

    # ----- the call ----------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | str | Sequence[int | str] | Tensor,
        weights: Mapping[str, float] | None = None,
        *,
        method: str = MSDDA.name,
        num_inference_steps: int = 50,
        guidance_scale: float = 4.0,
        eta: float = 0.0,
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
        final_noise: bool = True,
        progress: bool | None = None,
        return_dict: bool = True,
    ) -> MSDDADiTPipelineOutput | tuple[Any]:
        """Generate one image per class label under `weights`.

        class_labels: class ids, label names (pipeline.labels, from the base's id2label) or a LongTensor [B].
        weights, method, betas, beta, rewards, reward_input, method_options: as MSDDAPixArtPipeline. Rewards
          get images [B, 3, H, W] in [0, 1] and the class names as the "prompts".
        guidance_scale: CFG per objective with the null class `num_classes` (<= 1: off); the variance half is
          the conditional pass's. generator or seed (neither: seed 0); a list of B generators seeds image b.
        eta: DDIM only. latents: initial noise [B, C, s, s]. callback_on_step_end, final_noise, return_dict:
          as MSDDAPixArtPipeline.
        Raises before any denoising on bad labels, names, weights, scheduler, shapes and generator lists.
        """
        self._check_alive()
        cfg = self.transformer.config
        if output_type not in OUTPUT_TYPES:
            raise PipelineError(f"output_type={output_type!r}; choose one of {OUTPUT_TYPES}")
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise PipelineError(f"num_inference_steps={num_inference_steps!r}; it must be an integer >= 1")
        if (
            isinstance(guidance_scale, bool)
            or not isinstance(guidance_scale, int | float)
            or not math.isfinite(guidance_scale)
        ):
            raise PipelineError(f"guidance_scale={guidance_scale!r}; pass a finite number (<= 1 turns guidance off)")
        ids = self.class_ids(class_labels)
        batch = len(ids)
        kind = self._check_scheduler(float(eta))
        try:
            generator = make_generator(generator, seed, "cpu")
        except MSDDAError as exc:
            raise PipelineError(str(exc)) from None
        if isinstance(generator, list | tuple) and len(generator) != batch:
            raise PipelineError(
                f"generator is a list of {len(generator)} generators but this call makes {batch} image(s) (one per "
                "class label); pass one generator per label"
            )
        size, channels = int(cfg.sample_size), int(cfg.in_channels)
        shape = (batch, channels, size, size)
        if latents is not None and (not isinstance(latents, Tensor) or tuple(latents.shape) != shape):
            got = tuple(latents.shape) if isinstance(latents, Tensor) else type(latents).__name__
            raise PipelineError(f"latents are {got}; this call needs a tensor of shape {shape}")
        device = self.base._execution_device
        do_cfg = guidance_scale > 1.0
        names = [self.class_name(i) for i in ids]
        self.interrupt = False
        store = _ObjectiveStore(self, rewards or {}, reward_input, names)
        try:
            plan = plan_method(
                method, store, weights, beta=beta, betas=betas, options=method_options, skip_zero_weights=True
            )
            self._check_plan(plan, kind, float(eta))
            from diffusers.utils.torch_utils import randn_tensor

            dtype = self.transformer.dtype
            if latents is None:
                latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
            x_T = latents.to(device=device, dtype=dtype) * self.base.scheduler.init_noise_sigma
            cond = torch.tensor(ids, dtype=torch.long, device=device)
            null = torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
            if progress is None:
                progress = not getattr(self.base, "_progress_bar_config", {}).get("disable", False)
            final_step = "mean"
            if final_noise and (kind == "ddim" or self._last_timestep(num_inference_steps) > 0):
                final_step = "sample"
            start = time.perf_counter()
            out = sample(
                list(plan.models),
                self.base.scheduler,
                plan.rule,
                x_T=x_T,
                cond=cond,
                reference=plan.reference,
                num_inference_steps=num_inference_steps,
                guidance_scale=float(guidance_scale) if do_cfg else None,
                null_cond=null if do_cfg else None,
                eta=float(eta) if kind == "ddim" else None,
                generator=generator,
                device=device,
                dtype=x_T.dtype,
                progress=progress,
                callback=self._step_callback(callback_on_step_end),
                noise=DiffusersNoise(),
                final_step=final_step,
            )
        finally:
            store.release()
            self.switch.disable()
        images = self._decode(out.samples, output_type)
        free_hooks = getattr(self._origin, "maybe_free_model_hooks", None)
        if callable(free_hooks):
            free_hooks()
        config = {
            **plan.record,
            "weights": dict(weights) if weights is not None else None,
            "models": [m.name for m in plan.models],
            "objectives": {k: {"kind": o.kind, "source": o.source} for k, o in self.objectives.items()},
            "learned_variance": self.learned_variance,
            "class_labels": ids,
            "class_names": names,
            "num_inference_steps": num_inference_steps,
            "steps_run": out.steps_run,
            "interrupted": out.interrupted,
            "guidance_scale": guidance_scale,
            "null_class": self.num_classes,
            "eta": float(eta),
            "scheduler": type(self.base.scheduler).__name__,
            "variance_type": self.base.scheduler.config.get("variance_type") if kind == "ddpm" else None,
            "num_images": batch,
            "seed": seed,
            "seconds_total": time.perf_counter() - start,
        }
        logger.info("generated %d image(s) with %s in %.2fs (%s)", batch, method, out.seconds, out.cost)
        if not return_dict:
            return (images,)
        return MSDDADiTPipelineOutput(images=images, cost=out.cost, config=config)

    def _decode_latents(self, latents: Tensor) -> Tensor:
        """latents -> images in [-1, 1] by the VAE (differentiable; the rewards of CoDe / RGG see these)."""
        vae = self.base.vae
        return vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]

    def _decode(self, final: Tensor, output_type: str) -> Any:
        """The final latents as images, exactly as diffusers' DiTPipeline decodes them."""
        if output_type == "latent":
            return final
        samples = (self._decode_latents(final) / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            return samples
        samples = samples.cpu().permute(0, 2, 3, 1).float().numpy()
        return self.base.numpy_to_pil(samples) if output_type == "pil" else samples
