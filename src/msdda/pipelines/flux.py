"""`MSDDAFluxPipeline`: FLUX.1 (dev, schnell) through diffusers, with K objectives fused at every step.

FLUX is a flow-matching model: x_sigma = (1 - sigma) x0 + sigma noise, the transformer predicts the velocity
v = noise - x0 on *packed* latents [B, (H/16)(W/16), 64] (2x2 patches of the 16-channel VAE latents), with
rotary position ids for the image tokens (latent_image_ids) and the T5 tokens (txt_ids), the CLIP pooled
embedding, and (FLUX.1-dev) a guidance embedding instead of classifier-free guidance. diffusers samples it with
FlowMatchEulerDiscreteScheduler's ODE step on a schedule shifted by `mu`, computed from the image sequence
length (`calculate_shift`).

Every step here is one of msdda's flow kernels (msdda.core.samplers, kind "flow_sde"): noise level `eta` = 0
is the ODE step itself (a point mass; at K = 1 the call equals diffusers' FluxPipeline), eta = a > 0 Flow-GRPO's
SDE step (sde_type "sde") or Flow-CPS ("cps"). The kernels are elementwise, so the packed latents are the sample
as they are. Their variance depends on the schedule and a only, never on the model, so with normalised weights
MSDDA's fusion is DB-MPA's average of the velocities (docs/flux.md).

The condition is a small dataclass (`FluxCondition`) rather than conditioning.py's packing into one tensor:
the ids are per-token positions shared by the batch ([L, 3], [S, 3], not per sample), the guidance value is a
[B] float and the pooled width differs from T5's, so packing would need padding and a layout for no gain.
diffusers runs true CFG (true_cfg_scale > 1 with a negative prompt) as two transformer calls, and so does
`_TrueCFG` (the same numbers, and no 2B batch of a 12B transformer's activations), so nothing concatenates
conditions and the dataclass needs no `.cat`.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from msdda.core.samplers import SamplerKernelScheduler
from msdda.errors import MSDDAError
from msdda.pipelines._deps import dtype_kwargs, require
from msdda.pipelines.errors import AdapterError, ObjectiveError, PipelineError
from msdda.pipelines.objectives import (
    AdapterSwitch,
    _cleanup_adapter,
    _find_lora_file,
    _load_peft_lora,
    check_lora_shapes,
)
from msdda.pipelines.pixart import TransformerObjective, TransformerPipelineMixin, resolve_transformer_source
from msdda.pipelines.pixart import _classify as _pixart_classify
from msdda.pipelines.sd import SOUP_ADAPTER, DiffusersNoise, _ObjectiveStore
from msdda.sampling import MSDDA, RGG, CoDe, Cost, make_generator, sample
from msdda.sampling.methods import MethodPlan, plan_method

logger = logging.getLogger(__name__)

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
SDE_TYPES = ("sde", "cps")
FLUX_PIPELINES = ("FluxPipeline",)
_CALLBACK_TENSOR_INPUTS = ("latents",)
# keys of a FluxTransformer2DModel config that must agree for an objective to be a fine-tune of the base
_ARCH_KEYS = (
    "patch_size",
    "in_channels",
    "out_channels",
    "num_layers",
    "num_single_layers",
    "attention_head_dim",
    "num_attention_heads",
    "joint_attention_dim",
    "pooled_projection_dim",
    "guidance_embeds",
    "axes_dims_rope",
)
_SD_HINT = "use an adapter trained for this base model (e.g. an SD 1.5 LoRA with an SD 1.5 checkpoint)"
_LORA_HINT = "use a LoRA trained for this FLUX transformer (FLUX.1-dev and schnell LoRAs share the layout)"


@dataclass
class MSDDAFluxPipelineOutput:
    """What a call returns.

    images: per `output_type`: "pil" list of PIL images, "np" float array [B, H, W, 3] in [0, 1], "pt" tensor
      [B, 3, H, W] in [0, 1], "latent" the final *packed* latents [B, (H/16)(W/16), 64] (as diffusers returns).
    cost: transformer evaluations (true-CFG pairs count 2), reward calls, seconds and peak memory of the denoising.
    config: the resolved settings of the call (method, weights, steps, eta, mu, ...).
    """

    images: Any
    cost: Cost
    config: dict[str, Any] = field(default_factory=dict)


# ----- the condition and the denoiser ------------------------------------------------------------------


@dataclass
class FluxCondition:
    """What a FLUX transformer is conditioned on, for a batch of B images.

    embeds: T5 hidden states [B, L, D]; pooled: CLIP's pooled embedding [B, P]; text_ids [L, 3] and image_ids
    [S, 3]: the rotary position ids of the text and image tokens (shared by the batch); guidance: the guidance
    embedding's value [B] (float32; FLUX.1-dev) or None (schnell: guidance_embeds False).
    """

    embeds: Tensor
    pooled: Tensor
    text_ids: Tensor
    image_ids: Tensor
    guidance: Tensor | None = None


class FluxDenoiser:
    """A Denoiser over packed latents: `(x_t [B, S, 64], t [B] = 1000 sigma, cond=FluxCondition) -> v [B, S, 64]`.

    transformer: the FluxTransformer2DModel to call (with timestep t / 1000, as FluxPipeline does). adapter: the
    LoRA adapter to activate for the pass (None with a `switch`: the base weights, adapters disabled).
    """

    def __init__(
        self, transformer: nn.Module, *, name: str, adapter: str | None = None, switch: AdapterSwitch | None = None
    ) -> None:
        self.transformer = transformer
        self.unet = transformer  # the name the shared objective helpers read
        self.name = name
        self.adapter = adapter
        self.switch = switch
        self.forwards = 0  # transformer forwards, counted in samples

    def __call__(self, x_t: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        if not isinstance(cond, FluxCondition):
            raise AdapterError(
                f"objective {self.name!r}: cond must be a FluxCondition (T5 and pooled embeddings, ids, guidance), "
                f"got {type(cond).__name__}"
            )
        self.forwards += x_t.shape[0]
        kwargs = {
            "hidden_states": x_t,
            "timestep": t.to(x_t.dtype) / 1000,  # FluxPipeline: t.expand(B).to(latents.dtype) / 1000
            "guidance": cond.guidance,
            "pooled_projections": cond.pooled,
            "encoder_hidden_states": cond.embeds,
            "txt_ids": cond.text_ids,
            "img_ids": cond.image_ids,
            "return_dict": False,
        }
        if self.switch is None:
            return self.transformer(**kwargs)[0]
        with self.switch.active(self.adapter):
            return self.transformer(**kwargs)[0]


class _TrueCFG:
    """diffusers' true classifier-free guidance for one denoiser: neg + scale (pos - neg), as two transformer
    calls (positive, then negative), exactly as FluxPipeline computes it."""

    def __init__(self, denoiser: FluxDenoiser, scale: float, null: FluxCondition) -> None:
        self.denoiser = denoiser
        self.name = denoiser.name
        self.unet = denoiser.unet
        self.scale = float(scale)
        self.null = null

    def __call__(self, x_t: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        pos = self.denoiser(x_t, t, cond)
        neg = self.denoiser(x_t, t, self.null)
        return neg + self.scale * (pos - neg)


# ----- objectives ---------------------------------------------------------------------------------------


def _classify(path: Path) -> str:
    """PixArt's source classifier (msdda.pipelines.pixart._classify), with FLUX's names in its error."""
    return _pixart_classify(path, "a FluxTransformer2DModel folder, a FluxPipeline folder")


def _with_flux_hint(exc: AdapterError) -> AdapterError:
    # the shared shape check's hint names SD 1.5; say what fits here
    text = str(exc).replace(_SD_HINT, _LORA_HINT).replace("base UNet", "base transformer")
    return AdapterError(text)


def load_flux_lora(transformer: nn.Module, path: Path, adapter: str, objective: str) -> None:
    """Load a FLUX LoRA into `transformer` (a FluxTransformer2DModel: diffusers' PeftAdapterMixin) as `adapter`.

    Sources: a peft folder (adapter_config.json + adapter_model.safetensors), or a diffusers-format file /
    folder (what FluxPipeline.save_lora_weights writes: `transformer.`-prefixed peft keys; FluxPipeline's
    lora_state_dict also converts kohya / xlabs layouts). Shapes are checked before anything is injected; a
    LoRA of the text encoders is refused (the objectives share one prompt encoding).
    """
    diffusers = require("diffusers", "FLUX LoRA objectives")
    if adapter in (getattr(transformer, "peft_config", None) or {}):
        raise ObjectiveError(
            f"objective {objective!r}: the base transformer already has an adapter named {adapter!r}; pass that "
            "name as the objective's source to use it, or choose another objective name"
        )
    try:
        if _classify(path) == "peft":
            _load_peft_lora(transformer, path, adapter, objective)
            return
        file = _find_lora_file(path, objective)
    except AdapterError as exc:
        raise _with_flux_hint(exc) from None
    try:
        state, alphas, metadata = diffusers.FluxPipeline.lora_state_dict(
            str(file.parent),
            weight_name=file.name,
            return_alphas=True,
            return_lora_metadata=True,
            use_safetensors=True,
            local_files_only=True,
        )
    except Exception as exc:
        raise AdapterError(f"objective {objective!r}: could not read LoRA weights from {file}: {exc}") from exc
    text_keys = [k for k in state if k.startswith(("text_encoder", "lora_te"))]
    if text_keys:
        raise AdapterError(
            f"objective {objective!r} ({file}): the LoRA also adapts a text encoder ({len(text_keys)} keys, e.g. "
            f"{text_keys[0]!r}); objectives share one prompt encoding, so only transformer LoRAs are supported"
        )
    prefix = "transformer" if any(k.startswith("transformer.") for k in state) else None
    keys = {k.removeprefix("transformer."): v for k, v in state.items()}
    if not any(".lora_A." in k for k in keys):
        keys = diffusers.utils.convert_unet_state_dict_to_peft(keys)  # a key renaming, not UNet-specific
    try:
        check_lora_shapes(transformer, keys, objective, str(file))
    except AdapterError as exc:
        raise _with_flux_hint(exc) from None
    try:
        with warnings.catch_warnings():  # peft warns whenever a second adapter is injected: expected here
            warnings.filterwarnings("ignore", message=".*Already found a `peft_config`.*")
            transformer.load_lora_adapter(
                state, prefix=prefix, network_alphas=alphas or None, metadata=metadata, adapter_name=adapter
            )
    except Exception as exc:
        _cleanup_adapter(transformer, adapter)
        raise AdapterError(f"objective {objective!r}: loading the LoRA from {file} failed: {exc}") from exc


def _check_compatible(base: nn.Module, other: nn.Module, objective: str, source: str) -> None:
    if not hasattr(other, "config"):
        raise AdapterError(f"objective {objective!r} ({source}): a {type(other).__name__} has no diffusers config")
    for key in _ARCH_KEYS:
        mine, theirs = base.config.get(key), other.config.get(key)
        if (list(mine) if isinstance(mine, tuple | list) else mine) != (
            list(theirs) if isinstance(theirs, tuple | list) else theirs
        ):
            raise AdapterError(
                f"objective {objective!r} ({source}): the transformer has {key}={theirs!r} but the base has "
                f"{mine!r}, so it was trained for another base model; pass a fine-tune of this base"
            )


def resolve_flux_objective(transformer: nn.Module, name: str, source: Any) -> TransformerObjective:
    """A FLUX objective source (see msdda.pipelines.pixart.resolve_transformer_source); LoRAs are loaded into
    `transformer` (diffusers' own adapter mixin) under the objective's name, left disabled."""
    return resolve_transformer_source(
        transformer, name, source, loaded=getattr(transformer, "peft_config", None) or {},
        load_lora=lambda path, n: load_flux_lora(transformer, path, n, n), classify=_classify,
        check_compatible=_check_compatible, model_class="FluxTransformer2DModel",
    )  # fmt: skip


# ----- the schedule -------------------------------------------------------------------------------------


def flux_timesteps(
    scheduler: Any, num_inference_steps: int, image_seq_len: int, sigmas: Any = None
) -> tuple[Any, float]:
    """A copy of `scheduler` with its timesteps set exactly as FluxPipeline sets them, and the shift mu.

    sigmas default to linspace(1, 1/n, n) (none with use_flow_sigmas); mu = diffusers' calculate_shift of the
    image sequence length with the scheduler's base/max_image_seq_len and base/max_shift; then diffusers'
    retrieve_timesteps(scheduler, n, sigmas=sigmas, mu=mu). The caller's scheduler is not touched.
    """
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

    sch = copy.deepcopy(scheduler)
    cfg = sch.config
    if sigmas is None:
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
    if cfg.get("use_flow_sigmas"):
        sigmas = None
    mu = calculate_shift(
        image_seq_len,
        cfg.get("base_image_seq_len", 256),
        cfg.get("max_image_seq_len", 4096),
        cfg.get("base_shift", 0.5),
        cfg.get("max_shift", 1.15),
    )
    retrieve_timesteps(sch, num_inference_steps, "cpu", sigmas=sigmas, mu=mu)
    return sch, float(mu)


# ----- the pipeline --------------------------------------------------------------------------------------


def _check_base(base: Any) -> None:
    name = type(base).__name__
    if name not in FLUX_PIPELINES:
        hint = " (use msdda.pipelines.MSDDAPipeline for Stable Diffusion)" if "StableDiffusion" in name else ""
        raise PipelineError(
            f"{name} is not a FLUX text-to-image pipeline; MSDDAFluxPipeline takes a diffusers FluxPipeline" + hint
        )
    for attr in ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler"):
        if getattr(base, attr, None) is None:
            raise PipelineError(f"{name} has no {attr!r}; pass a complete FluxPipeline as the base")


class MSDDAFluxPipeline(TransformerPipelineMixin):
    """Multi-objective FLUX.1: K objectives (LoRA adapters or full transformers) fused at every step.

    base: a diffusers FluxPipeline (FLUX.1-dev, with guidance embeds, or schnell, without). Its transformer is
      the reference model; LoRA objectives are loaded into it as peft adapters named after the objectives.
    objectives: {name: source}; a source is a LoRA (diffusers format: a `.safetensors` file or a folder with
      pytorch_lora_weights.safetensors, as FluxPipeline.save_lora_weights writes; or a peft folder), the name
      of an adapter already loaded into base.transformer, a FluxTransformer2DModel folder (or a FluxPipeline
      folder's transformer/), or a transformer module. Pickled files are refused.

    The scheduler must be a FlowMatchEulerDiscreteScheduler (what FLUX ships); each call copies it and sets its
    timesteps as FluxPipeline does (the dynamic shift mu from the image sequence length).

    Sharing: the modules (transformer, VAE, text encoders, tokenizers) are the caller's (`to()` moves them too);
    the scheduler is the pipeline's own copy, the caller's is never touched. LoRA adapters are injected into the
    shared transformer, disabled outside the pipeline's own calls; `release()` (or leaving a `with` block)
    deletes them and restores the transformer's modules, state_dict keys, adapter states, requires_grad flags
    and train/eval mode exactly. A failed construction releases itself.
    """

    _denoiser_class = FluxDenoiser

    def __init__(self, base: Any, objectives: Mapping[str, Any]) -> None:
        require("diffusers", "MSDDAFluxPipeline")
        require("peft", "MSDDAFluxPipeline")
        _check_base(base)
        if not isinstance(objectives, Mapping):
            raise ObjectiveError(
                f"objectives must be a mapping name -> source, got {type(objectives).__name__}; e.g. "
                "{'aesthetic': 'loras/aesthetic', 'alignment': 'loras/alignment'}"
            )
        self._origin = base
        self.transformer: nn.Module = base.transformer
        own = type(base.scheduler).from_config(base.scheduler.config)
        self.base = type(base)(**{**base.components, "scheduler": own})
        self.base.set_progress_bar_config(**dict(getattr(base, "_progress_bar_config", {})))
        self._check_scheduler(0.0, "sde")  # an unusable scheduler fails here, not at the first call
        self._latent_hw: tuple[int, int] | None = None  # (height, width) of the current call, for decoding
        self._load_objectives(self.transformer, objectives)

    @classmethod
    def from_pretrained(
        cls,
        base: str | Path,
        objectives: Mapping[str, Any],
        *,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        **base_kwargs: Any,
    ) -> MSDDAFluxPipeline:
        """Load the base FluxPipeline from a local folder (safetensors only), then the objectives (e.g.
        dtype=torch.bfloat16 on GPUs, as FLUX is released)."""
        diffusers = require("diffusers", "MSDDAFluxPipeline")
        path = Path(base).expanduser()
        index = path / "model_index.json"
        if not index.is_file():
            raise PipelineError(
                f"{path} is not a diffusers pipeline folder (no model_index.json); save one with "
                "pipe.save_pretrained(folder) or download it first"
            )
        cls_name = json.loads(index.read_text()).get("_class_name", "")
        if cls_name not in FLUX_PIPELINES:
            raise PipelineError(
                f"{path} holds a {cls_name or 'unknown'} pipeline; MSDDAFluxPipeline supports {FLUX_PIPELINES}"
            )
        kwargs: dict[str, Any] = {"use_safetensors": True, "local_files_only": True, **dtype_kwargs(diffusers, dtype)}
        kwargs.update(base_kwargs)
        pipe = diffusers.FluxPipeline.from_pretrained(str(path), **kwargs)
        if device is not None:
            pipe = pipe.to(device)
        return cls(pipe, objectives)

    def add_objective(self, name: str, source: Any) -> TransformerObjective:
        """Add one objective (see the class docstring for sources); its adapter is left disabled."""
        self._check_alive()
        if name in self.objectives:
            raise ObjectiveError(f"objective {name!r} already exists; choose another name")
        before = set(getattr(self.transformer, "peft_config", None) or {})
        try:
            obj = resolve_flux_objective(self.transformer, name, source)
        finally:
            self._added_adapters += [
                a for a in (getattr(self.transformer, "peft_config", None) or {}) if a not in before
            ]
            self.switch.refresh()
            self.switch.disable()
        self.objectives[name] = obj
        logger.info("objective %r: %s from %s", name, obj.kind, obj.source)
        return obj

    def release(self) -> None:
        """Delete every adapter this pipeline added and restore the transformer exactly (idempotent)."""
        if self._released:
            return
        self._released = True
        for adapter in reversed(self._added_adapters):
            self.switch.delete(adapter)
        self.switch.delete(SOUP_ADAPTER)  # only present when a call was killed mid-way
        self._added_adapters = []
        self.objectives = {}
        self._restore_point.restore(self.transformer)
        self.switch.layers = []

    @property
    def _adapter_host(self) -> Any:
        return self.transformer  # FluxTransformer2DModel has diffusers' PeftAdapterMixin: no PeftHost needed

    # ----- checks ------------------------------------------------------------------------------------
    def _check_scheduler(self, eta: float, sde_type: str) -> None:
        sch = self.base.scheduler
        name = type(sch).__name__
        if name != "FlowMatchEulerDiscreteScheduler":
            raise PipelineError(
                f"the base pipeline's scheduler is a {name}; MSDDAFluxPipeline samples with the flow kernels of "
                "FlowMatchEulerDiscreteScheduler (what FLUX ships): set base.scheduler = "
                "FlowMatchEulerDiscreteScheduler.from_config(base.scheduler.config)"
            )
        if sch.config.get("stochastic_sampling"):
            raise PipelineError(
                "the scheduler has stochastic_sampling=True (diffusers' Flow-CPS step at noise level 1); build it "
                "with stochastic_sampling=False and pass eta=1, sde_type='cps' for that kernel"
            )
        if isinstance(eta, bool) or not isinstance(eta, int | float) or not math.isfinite(eta) or eta < 0:
            raise PipelineError(f"eta={eta!r}; pass a finite noise level >= 0 (0: the ODE, 0.7: Flow-GRPO's SDE)")
        if sde_type not in SDE_TYPES:
            raise PipelineError(f"sde_type={sde_type!r}; choose one of {SDE_TYPES}")
        if sde_type == "cps" and eta > 1:
            raise PipelineError(
                f"sde_type='cps' takes a noise level in [0, 1] (std = sigma sin(a pi / 2)); got eta={eta}"
            )
        sch2, _ = flux_timesteps(sch, 2, 256)
        SamplerKernelScheduler.from_diffusers(sch2, eta=float(eta), sde_type=sde_type)  # unsupported options raise

    def _check_batch(self, batch: int, generator: Any, latents: Any, height: int, width: int) -> None:
        if isinstance(generator, list | tuple) and len(generator) != batch:
            raise PipelineError(
                f"generator is a list of {len(generator)} generators but this call makes {batch} image(s); pass one "
                "generator per image, in the order prompt 0's images, then prompt 1's, ..."
            )
        if latents is None:
            return
        scale = self.base.vae_scale_factor * 2
        shape = (batch, (height // scale) * (width // scale), self.transformer.config.in_channels)
        if not isinstance(latents, Tensor) or tuple(latents.shape) != shape:
            got = tuple(latents.shape) if isinstance(latents, Tensor) else type(latents).__name__
            raise PipelineError(
                f"latents are {got}; this call needs packed latents of shape {shape} (prompts x "
                f"num_images_per_prompt, (height/{scale}) x (width/{scale}) tokens, the transformer's in_channels), "
                "as FluxPipeline.prepare_latents returns them"
            )

    def _check_plan(self, plan: MethodPlan, eta: float) -> None:
        ref = next(self.transformer.parameters())
        for den in [*plan.models, *([plan.reference] if plan.uses_reference else [])]:
            p = next(den.unet.parameters())
            if p.device != ref.device or p.dtype != ref.dtype:
                raise PipelineError(
                    f"objective {den.name!r} is on {p.device}/{p.dtype} but the base transformer on "
                    f"{ref.device}/{ref.dtype}; call pipeline.to(...) to move both"
                )
        if isinstance(plan.rule, CoDe) and eta == 0.0:
            raise PipelineError(
                "CoDe with eta=0 (the flow ODE, a point mass) draws identical candidates; pass eta>0 (e.g. 0.7)"
            )
        if isinstance(plan.rule, RGG):
            if eta == 0.0:  # RGG moves the mean by lambda * var * grad: nothing at all on the ODE's var = 0
                raise PipelineError(
                    "RGG with eta=0 (the flow ODE, variance 0) applies no guidance; pass eta>0 (e.g. 0.7)"
                )
            if plan.rule.tempering != "constant":
                raise PipelineError(
                    f"RGG tempering={plan.rule.tempering!r} reads alpha-bar, which a flow-matching schedule does not "
                    "have; pass method_options={'tempering': 'constant'}"
                )

    # ----- the call ----------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        weights: Mapping[str, float] | None = None,
        *,
        method: str = MSDDA.name,
        prompt_2: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        true_cfg_scale: float = 1.0,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 28,
        sigmas: Sequence[float] | None = None,
        guidance_scale: float = 3.5,
        eta: float = 0.0,
        sde_type: str = "sde",
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        seed: int | None = None,
        latents: Tensor | None = None,
        prompt_embeds: Tensor | None = None,
        pooled_prompt_embeds: Tensor | None = None,
        negative_prompt_embeds: Tensor | None = None,
        negative_pooled_prompt_embeds: Tensor | None = None,
        output_type: str = "pil",
        betas: Mapping[str, float] | None = None,
        beta: float | None = None,
        rewards: Mapping[str, Callable[..., Tensor]] | None = None,
        reward_input: str = "image",
        method_options: Mapping[str, Any] | None = None,
        callback_on_step_end: Callable[..., dict[str, Tensor]] | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        max_sequence_length: int = 512,
        final_noise: bool = True,
        progress: bool | None = None,
        return_dict: bool = True,
    ) -> MSDDAFluxPipelineOutput | tuple[Any]:
        """Generate images for `prompt` (or `prompt_embeds` + `pooled_prompt_embeds`) under `weights`.

        weights, method, betas, beta, rewards, reward_input, method_options: as MSDDAPipeline (methods: msdda,
          db-mpa, db-mpa-ls, rewarded-soup (LoRA: dW = sum_k w_k B_k A_k; full transformers: the parameter
          interpolation), code, rgg, single:<name>, base). reward_input "latent" hands rewards the packed latents.
        eta: the flow kernel's noise level a: 0 (default) the ODE step, FluxPipeline's own sampler; a > 0
          Flow-GRPO's SDE (sde_type "sde") or Flow-CPS ("cps", a <= 1). CoDe needs eta > 0.
        guidance_scale: FLUX.1-dev's guidance embedding (ignored by transformers without guidance embeds, e.g.
          schnell), as diffusers. true_cfg_scale > 1 with a negative prompt (or negative embeddings): diffusers'
          true CFG per objective, neg + scale (pos - neg).
        prompt_2 (T5), height, width, num_inference_steps, sigmas, max_sequence_length, latents (packed
          [B, S, 64]), prompt_embeds / pooled_prompt_embeds, callback_on_step_end(pipeline, i, t,
          {"latents": x}) -> dict: as diffusers' FluxPipeline (setting `pipeline.interrupt = True` stops
          after that step).
        generator or seed: the only randomness (neither: seed 0); a list of B generators seeds image b's latents
          and step noise from generator b.
        final_noise: with eta > 0 the last step draws from its kernel, as Flow-GRPO's sampler does (False: its
          mean). Returns MSDDAFluxPipelineOutput, or with return_dict=False the tuple (images,) as diffusers.
        Raises before any denoising on bad names, weights, settings, shapes and generator lists.
        """
        self._check_alive()
        base = self.base
        if output_type not in OUTPUT_TYPES:
            raise PipelineError(f"output_type={output_type!r}; choose one of {OUTPUT_TYPES}")
        for what, value in (
            ("num_inference_steps", num_inference_steps),
            ("num_images_per_prompt", num_images_per_prompt),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PipelineError(f"{what}={value!r}; it must be an integer >= 1")
        for what, value in (("guidance_scale", guidance_scale), ("true_cfg_scale", true_cfg_scale)):
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise PipelineError(f"{what}={value!r}; pass a finite number")
        inputs = list(getattr(callback_on_step_end, "tensor_inputs", callback_on_step_end_tensor_inputs))
        bad = [k for k in inputs if k not in _CALLBACK_TENSOR_INPUTS]
        if bad:
            raise PipelineError(
                f"callback_on_step_end_tensor_inputs {bad} are not supported; the callback sees "
                f"{_CALLBACK_TENSOR_INPUTS}"
            )
        self._check_scheduler(eta, sde_type)
        eta = float(eta)
        try:
            generator = make_generator(generator, seed, "cpu")
        except MSDDAError as exc:
            raise PipelineError(str(exc)) from None
        height = height or base.default_sample_size * base.vae_scale_factor
        width = width or base.default_sample_size * base.vae_scale_factor
        try:
            base.check_inputs(
                prompt,
                prompt_2,
                height,
                width,
                negative_prompt=negative_prompt,
                negative_prompt_2=negative_prompt_2,
                prompt_embeds=prompt_embeds,
                negative_prompt_embeds=negative_prompt_embeds,
                pooled_prompt_embeds=pooled_prompt_embeds,
                negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
                max_sequence_length=max_sequence_length,
            )
        except ValueError as exc:
            if isinstance(exc, PipelineError):
                raise
            raise PipelineError(str(exc)) from exc
        has_neg = negative_prompt is not None or (
            negative_prompt_embeds is not None and negative_pooled_prompt_embeds is not None
        )
        do_true_cfg = true_cfg_scale > 1 and has_neg
        given = do_true_cfg and prompt_embeds is not None and negative_prompt_embeds is not None
        if given and prompt_embeds.shape != negative_prompt_embeds.shape:
            raise PipelineError(
                f"prompt_embeds {tuple(prompt_embeds.shape)} and negative_prompt_embeds "
                f"{tuple(negative_prompt_embeds.shape)} must have the same shape for true CFG"
            )
        n_prompts = 1 if isinstance(prompt, str) else len(prompt) if prompt is not None else int(prompt_embeds.shape[0])
        batch = n_prompts * num_images_per_prompt
        self._check_batch(batch, generator, latents, height, width)
        device = base._execution_device
        prompts = None
        if prompt is not None:
            plist = [prompt] if isinstance(prompt, str) else list(prompt)
            prompts = [p for p in plist for _ in range(num_images_per_prompt)]
        self.interrupt = False
        store = _ObjectiveStore(self, rewards or {}, reward_input, prompts)
        try:
            plan = plan_method(
                method, store, weights, beta=beta, betas=betas, options=method_options, skip_zero_weights=True
            )
            self._check_plan(plan, eta)
            encode = {"device": device, "num_images_per_prompt": num_images_per_prompt}
            encode["max_sequence_length"] = max_sequence_length
            embeds, pooled, text_ids = base.encode_prompt(
                prompt, prompt_2, prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds, **encode
            )
            x_T, image_ids = base.prepare_latents(
                batch, self.transformer.config.in_channels // 4, height, width, embeds.dtype, device, generator, latents
            )
            guidance = None
            if self.transformer.config.guidance_embeds:
                guidance = torch.full([1], guidance_scale, device=device, dtype=torch.float32).expand(batch)
            cond = FluxCondition(embeds, pooled, text_ids, image_ids, guidance)
            models, reference = list(plan.models), plan.reference
            if do_true_cfg:
                neg_embeds, neg_pooled, neg_ids = base.encode_prompt(
                    negative_prompt,
                    negative_prompt_2,
                    prompt_embeds=negative_prompt_embeds,
                    pooled_prompt_embeds=negative_pooled_prompt_embeds,
                    **encode,
                )
                null = FluxCondition(neg_embeds, neg_pooled, neg_ids, image_ids, guidance)
                models = [_TrueCFG(m, true_cfg_scale, null) for m in models]
                reference = _TrueCFG(reference, true_cfg_scale, null) if reference is not None else None
            schedule, mu = flux_timesteps(base.scheduler, num_inference_steps, int(x_T.shape[1]), sigmas)
            kernels = SamplerKernelScheduler.from_diffusers(schedule, eta=eta, sde_type=sde_type)
            if progress is None:
                progress = not getattr(base, "_progress_bar_config", {}).get("disable", False)
            self._latent_hw = (height, width)
            start = time.perf_counter()
            out = sample(
                models,
                kernels,
                plan.rule,
                x_T=x_T,
                cond=cond,
                reference=reference,
                num_inference_steps=None,  # the tables FluxPipeline's schedule set (mu-shifted) are kept
                generator=generator,
                device=device,
                dtype=x_T.dtype,
                progress=progress,
                callback=self._step_callback(callback_on_step_end),
                noise=DiffusersNoise(),
                final_step="sample" if final_noise and eta > 0 else "mean",
            )
            if do_true_cfg:
                out.cost.model_evals *= 2  # every evaluation was a (positive, negative) pair
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
            "num_inference_steps": num_inference_steps,
            "steps_run": out.steps_run,
            "interrupted": out.interrupted,
            "guidance_scale": guidance_scale if guidance is not None else None,
            "true_cfg_scale": true_cfg_scale if do_true_cfg else None,
            "eta": eta,
            "sde_type": sde_type if eta > 0 else None,
            "mu": mu,
            "scheduler": type(base.scheduler).__name__,
            "height": height,
            "width": width,
            "num_images": batch,
            "seed": seed,
            "seconds_total": time.perf_counter() - start,
        }
        logger.info("generated %d image(s) with %s in %.2fs (%s)", batch, method, out.seconds, out.cost)
        if not return_dict:
            return (images,)
        return MSDDAFluxPipelineOutput(images=images, cost=out.cost, config=config)

    def _unpacked(self, latents: Tensor) -> Tensor:
        """Packed latents -> the VAE's latent space, exactly as FluxPipeline decodes them."""
        height, width = self._latent_hw
        vae = self.base.vae
        x = self.base._unpack_latents(latents, height, width, self.base.vae_scale_factor)
        return (x / vae.config.scaling_factor + vae.config.shift_factor).to(vae.dtype)

    def _decode_latents(self, latents: Tensor) -> Tensor:
        """Packed latents -> images in [-1, 1] by the VAE (differentiable; the rewards of CoDe / RGG see these)."""
        return self.base.vae.decode(self._unpacked(latents), return_dict=False)[0]

    def _decode(self, final: Tensor, output_type: str) -> Any:
        if output_type == "latent":
            return final
        image = self.base.vae.decode(self._unpacked(final), return_dict=False)[0]
        return self.base.image_processor.postprocess(image, output_type=output_type)
