"""Step-level training of a LoRA objective on a diffusers family (`msdda align --task sd|sdxl|pixart`).

A `LoRAFamily` says what differs between families (pipeline classes, model, adapter injection, per-prompt
conditioning, the model call, the training kernels, the LoRA file); SD is described below, SDXL and PixArt
in their family classes.

    result = align_sd("sd15", "imagereward=models/ImageReward", prompts, "loras/ir",
                      sd_train_config("step-rl", "imagereward", steps=500), options=SDAlignOptions(dtype="float16"))

The step-level trainers of `msdda.alignment` (step-RL, step-level DPO) run unchanged on an SD UNet:

* the policy is the base UNet with one LoRA adapter injected by diffusers' `add_adapter` (peft); the reference
  is the very same UNet with its adapters disabled, so no second copy of the UNet is held;
* conditions are prompt indices: each prompt is encoded once by the text encoder and looked up per row (the
  empty prompt, last, is the null condition of classifier-free guidance), so the trainers' condition
  handling (select, repeat, concatenate) is the one they use for class labels;
* a reward sees images: the step reward of a candidate x_{t-1} is the reward of the reference's Tweedie
  estimate x0_hat(x_{t-1}) (MSDDA.md §3), decoded by the VAE to [B, 3, H, W] in [0, 1], with the prompt texts
  of its rows. Differentiable rewards (ImageReward, PickScore, HPS, aesthetic, CLIP, brightness) pass their
  gradient through the decoder to the policy's kernel (the step-RL reparameterised estimator); JPEG sizes are
  black-box (leave-one-out);
* training kernels must be stochastic: DDIM with eta > 0 (default 1, the setting of the peer's scripts) or
  DDPM. At eta = 0 every kernel is a point mass, so there is no step-level problem to solve.

The result folder holds `pytorch_lora_weights.safetensors` (diffusers' LoRA file: `pipe.load_lora_weights(out)`
and `msdda sample --objective name=out` both read it), `align_config.json` (every option, the trainer config,
timing and the final held-out figures), `train_log.jsonl` and `checkpoints/` (LoRA weights, optimiser and every
generator: a killed run resumes where its last checkpoint left off). Under torchrun / accelerate launch every
process runs this function; rank 0 alone writes.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from msdda.alignment.errors import AlignmentError
from msdda.alignment.trainer import StepTrainer, StepTrainerConfig, TrainResult
from msdda.atomic import write_json_atomic
from msdda.config import JSONConfig
from msdda.core.rewards import is_differentiable, validate_reward_output
from msdda.distributed import get_context, local_device
from msdda.models.variance_head import TimestepVarianceHead, save_variance_head, with_variance_offsets
from msdda.pipelines.errors import PipelineError, RewardModelError

ADAPTER = "msdda-objective"
LORA_FILE = "pytorch_lora_weights.safetensors"
CONFIG_FILE = "align_config.json"
SD_TRAINERS: tuple[str, ...] = ("step-rl", "bt", "listwise", "hard")
DTYPES: tuple[str, ...] = ("float32", "float16", "bfloat16")
SCHEDULERS: tuple[str, ...] = ("ddim", "ddpm", "flow")  # flow: flow matching's SDE at noise level eta (SD3)
DEFAULT_LORA_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")

# The trainer defaults on SD: LoRA on the attention projections, few trajectories per step (each is a full
# guided sampling run of the UNet), a small held-out batch, and SD's usual CFG and step count.
SD_TRAIN_DEFAULTS: dict[str, Any] = {
    "steps": 200,
    "lr": 1e-4,
    "trajectories": 2,
    "states_per_trajectory": 2,
    "guidance_scale": 7.5,
    "num_inference_steps": 50,
    "eval_samples": 2,
    "checkpoint_every": 25,
    "log_every": 10,
    "lora": True,
    "lora_rank": 8,
    "lora_alpha": 8.0,
    "lora_targets": list(DEFAULT_LORA_TARGETS),
}


class SDAlignError(AlignmentError, PipelineError):
    """Bad options of SD training (named, with the fix), raised before any model loads where possible."""


@dataclass
class SDAlignOptions(JSONConfig):
    """How the SD parts are run; recorded in align_config.json.

    dtype: the frozen weights' dtype (UNet, VAE, text encoder); the LoRA weights train in float32, as diffusers'
    training scripts do. device: "cpu", "cuda", "cuda:1", "mps". gradient_checkpointing: recompute the UNet's
    activations (diffusers' `enable_gradient_checkpointing`) and the reward pass of each chunk in backward, for
    memory. scheduler / eta: the training kernels (DDIM with eta in (0, 1], or DDPM; None: the family's, DDIM for
    SD, DDPM with the learned variance for PixArt). height / width: training
    resolution in pixels (default: the UNet's sample size). reward_batch: candidates decoded and scored per
    chunk (bounds VAE / reward-model memory). allow_pickle: let a reward model load a pickle (trusted files only).
    variance_head: train a `TimestepVarianceHead` with the LoRA (a zero-initialised log-variance offset per
    timestep bucket and latent channel, `variance_head_buckets` buckets), so this objective's kernel variance
    differs from the scheduler's and MSDDA's fusion is more than DB-MPA's average (docs/stable_diffusion.md).
    """

    config_error = SDAlignError

    dtype: str = "float32"
    device: str = "cpu"
    gradient_checkpointing: bool = False
    scheduler: str | None = None
    eta: float = 1.0
    height: int | None = None
    width: int | None = None
    reward_batch: int = 8
    allow_pickle: bool = False
    variance_head: bool = False
    variance_head_buckets: int = 50

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.dtype not in DTYPES:
            raise SDAlignError(f"dtype={self.dtype!r}; choose one of {', '.join(DTYPES)}")
        if self.scheduler is not None and self.scheduler not in SCHEDULERS:
            raise SDAlignError(f"scheduler={self.scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
        eta = self.eta
        if isinstance(eta, bool) or not isinstance(eta, int | float) or not math.isfinite(eta):
            raise SDAlignError(f"eta={eta!r} must be a number in (0, 1]")
        if self.scheduler in ("ddim", "flow") and not 0.0 < float(eta) <= 1.0:
            what = "DDIM" if self.scheduler == "ddim" else "flow-matching (the SDE's noise level)"
            raise SDAlignError(
                f"eta={eta!r}: {what} training needs eta in (0, 1] (at eta 0 every kernel is a point mass and there "
                "is no step-level problem to solve); pass --eta 1"
                + (", or --scheduler ddpm" if self.scheduler == "ddim" else "")
            )
        for name in ("height", "width"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0 or v % 8):
                raise SDAlignError(f"{name}={v!r} must be a positive multiple of 8 (pixels)")
        if isinstance(self.reward_batch, bool) or int(self.reward_batch) < 1:
            raise SDAlignError(f"reward_batch={self.reward_batch!r} must be >= 1")
        b = self.variance_head_buckets
        if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= 1000:
            raise SDAlignError(f"variance_head_buckets={b!r} must be an integer in [1, 1000]")


def sd_train_config(trainer: str = "step-rl", reward: str = "reward", *, beta: float | None = None, **overrides: Any):
    """The config of `trainer` on SD: a StepRLConfig ("step-rl") or a DPOConfig with labels=trainer ("bt",
    "listwise", "hard"), with `SD_TRAIN_DEFAULTS` and beta 0.05 unless given; `overrides` replace any field."""
    from msdda.alignment.dpo import DPOConfig
    from msdda.alignment.step_rl import StepRLConfig

    if trainer not in SD_TRAINERS:
        raise SDAlignError(f"trainer={trainer!r}; choose one of {', '.join(SD_TRAINERS)}")
    fields = {**SD_TRAIN_DEFAULTS, "reward": reward, **({"beta": beta} if beta is not None else {}), **overrides}
    if not fields.get("lora", True):
        raise SDAlignError("SD training trains LoRA adapters only (lora=True); a full UNet copy is not offered")
    if trainer == "step-rl":
        return StepRLConfig(**fields)
    return DPOConfig(**{**fields, "labels": trainer})


def check_prompts(prompts: Any) -> list[str]:
    """The training prompts: a non-empty list of non-empty strings (SDAlignError naming the bad one)."""
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not prompts:
        raise SDAlignError(f"prompts must be a non-empty list of texts (--prompt-file FILE), got {prompts!r:.80}")
    out = []
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            raise SDAlignError(f"prompt {i} is {p!r:.60}; every prompt must be a non-empty text")
        out.append(p.strip())
    return out


def check_reward_weights(specs: Sequence[str], weights: Sequence[float] | None) -> list[float] | None:
    """None for one reward; for several, one finite weight >= 0 each, not all zero (SDAlignError otherwise)."""
    if weights is None:
        if len(specs) > 1:
            raise SDAlignError(f"{len(specs)} rewards need --reward-weights, one each (e.g. 0.5,0.5)")
        return None
    w = [float(v) for v in weights]
    if len(w) != len(specs):
        raise SDAlignError(f"--reward-weights {w} gives {len(w)} weights for {len(specs)} rewards; give one each")
    if not all(math.isfinite(v) and v >= 0 for v in w) or not any(v > 0 for v in w):
        raise SDAlignError(f"--reward-weights {w} must be finite, >= 0 and not all zero")
    return w


def check_base_folder(base: Any, family: LoRAFamily | None = None) -> Path:
    """A local pipeline folder of the family (SD: model_index.json of class StableDiffusionPipeline)."""
    family = family or SD_FAMILY
    path = Path(str(base)).expanduser()
    index = path / "model_index.json"
    if not index.is_file():
        raise SDAlignError(
            f"--base {path} is not a diffusers pipeline folder (no model_index.json); save one with "
            "pipe.save_pretrained(folder) or download it first"
        )
    try:
        cls_name = json.loads(index.read_text()).get("_class_name", "")
    except (OSError, ValueError) as exc:
        raise SDAlignError(f"--base {path}: cannot read model_index.json ({exc})") from None
    if cls_name not in family.pipeline_classes:
        hint = {
            "sd": "SD 1.x / 2.x (StableDiffusionPipeline)",
            "sdxl": "SDXL (StableDiffusionXLPipeline)",
            "sd3": "SD3 / SD3.5 (StableDiffusion3Pipeline)",
            "flux": "FLUX.1 (FluxPipeline)",
            "pixart": "PixArt-alpha / Sigma",
            "dit": "DiT (DiTPipeline)",
        }[family.task]
        other = [f.task for f in FAMILIES.values() if cls_name in f.pipeline_classes]
        fix = f"; use --task {other[0]}" if other else ""
        raise SDAlignError(
            f"--base {path} holds a {cls_name or 'unknown'} pipeline; --task {family.task} needs {hint}{fix}"
        )
    return path


def resolve_reward(spec: str, device: Any = "cpu", *, allow_pickle: bool = False) -> tuple[str, Callable[..., Tensor]]:
    """(name, reward(images [B, 3, H, W] in [0, 1], prompts) -> [B]) of a reward spec: a built-in name
    (jpeg-compressibility, jpeg-incompressibility, brightness), KIND=PATH of `load_reward_model`, or
    'package.module:function' (a function of (images, prompts); see `msdda.tasks.rewards.get_reward`)."""
    from msdda.pipelines.reward_models import load_reward_model
    from msdda.pipelines.sd_task import SDTaskError, _builtin_reward, _check_reward_spec

    if isinstance(spec, str) and "=" not in spec and ":" in spec:
        from msdda.errors import MSDDAError
        from msdda.tasks.rewards import get_reward

        try:
            fn = get_reward(spec.strip()).inner  # unchecked: its cond is the prompt texts, a list
        except MSDDAError as exc:
            raise SDAlignError(f"--reward {spec!r}: {exc}") from None
        return spec.strip().rpartition(":")[2], fn
    try:
        kind, path = _check_reward_spec("--reward", spec)
    except SDTaskError as exc:
        raise SDAlignError(str(exc)) from None
    if path is None:
        return kind, _builtin_reward(kind)
    kwargs = {"allow_pickle": True} if allow_pickle else {}
    return kind, load_reward_model(kind, path, device=device, **kwargs)


# ----- model families: what differs between SD's UNet and PixArt's transformer -----------------------------


class LoRAFamily:
    """How one diffusers family is trained with a LoRA: which pipelines it loads, where the denoiser lives,
    how adapters are injected, how prompts become per-row conditioning, how the model is called, which
    kernels it trains on, and how the LoRA file is written. `SD_FAMILY` and `PIXART_FAMILY` are the two."""

    task = "sd"
    pipeline_classes: tuple[str, ...] = ("StableDiffusionPipeline",)
    default_scheduler = "ddim"
    schedulers: tuple[str, ...] = ("ddim", "ddpm")  # the training kernels this family takes

    uses_cfg = True  # classifier-free guidance with the empty prompt (FLUX.1: a guidance embedding instead)

    def model(self, pipe: Any) -> nn.Module:
        return pipe.unet

    def inject(self, model: nn.Module, lora_config: Any) -> None:
        model.add_adapter(lora_config, adapter_name=ADAPTER)  # diffusers' PeftAdapterMixin

    def default_size(self, pipe: Any) -> int:
        """The training resolution's default (pixels, square): the model's sample size."""
        return int(self.model(pipe).config.sample_size * pipe.vae_scale_factor)

    def sample_shape(self, pipe: Any, height: int, width: int) -> tuple[int, ...]:
        f = pipe.vae_scale_factor
        return (int(self.model(pipe).config.in_channels), height // f, width // f)

    def unpack(self, pipe: Any, height: int, width: int) -> Callable[[Tensor], Tensor] | None:
        """Samples -> the VAE's latent layout before decoding (None: they are in it already)."""
        return None

    def encode(self, pipe: Any, texts: list[str], height: int, width: int, guidance: float) -> dict[str, Tensor]:
        """{name: [P + 1, ...]}: row p the prompt texts[p]'s conditioning, row P the empty prompt's."""
        cond, null = pipe.encode_prompt(texts, pipe.device, 1, True, None)
        return {"embeds": torch.cat([cond, null[:1]]).to(self.model(pipe).dtype)}

    def call(self, model: nn.Module, x_t: Tensor, t: Tensor, rows: dict[str, Tensor]) -> Tensor:
        return model(x_t, t, encoder_hidden_states=rows["embeds"], return_dict=False)[0]

    def scheduler(self, pipe: Any, options: SDAlignOptions, steps: int, shape: tuple[int, ...]) -> Any:
        from msdda.core.schedule import KernelScheduler
        from msdda.pipelines.sd import own_scheduler

        kind = options.scheduler or self.default_scheduler
        return KernelScheduler.from_diffusers(
            own_scheduler(pipe.scheduler, kind), eta=options.eta if kind == "ddim" else None
        )

    def save_lora(self, folder: Path, state: dict[str, Tensor], lora_config: Any) -> None:
        from diffusers import StableDiffusionPipeline

        StableDiffusionPipeline.save_lora_weights(
            folder, unet_lora_layers=state, unet_lora_adapter_metadata=lora_config.to_dict(), safe_serialization=True
        )


class PixArtFamily(LoRAFamily):
    """PixArt-alpha / Sigma: a transformer that predicts its own variance (learned_range), T5 conditioning with
    an attention mask, alpha's resolution / aspect-ratio micro-conditions. Trained on DDPM kernels with the
    learned variance by default, so the variance half adapts with the LoRA."""

    task = "pixart"
    pipeline_classes = ("PixArtAlphaPipeline", "PixArtSigmaPipeline")
    default_scheduler = "ddpm"

    def model(self, pipe: Any) -> nn.Module:
        return pipe.transformer

    def inject(self, model: nn.Module, lora_config: Any) -> None:
        from msdda.pipelines.pixart import PeftHost

        PeftHost(model).add_adapter(lora_config, ADAPTER)  # the transformer has no PeftAdapterMixin

    def encode(self, pipe: Any, texts: list[str], height: int, width: int, guidance: float) -> dict[str, Tensor]:
        sigma = type(pipe).__name__ == "PixArtSigmaPipeline"
        embeds, mask, neg, neg_mask = pipe.encode_prompt(
            texts, True, negative_prompt="", device=pipe.device, clean_caption=False,
            max_sequence_length=300 if sigma else 120,
        )  # fmt: skip
        dtype = self.model(pipe).dtype
        table = {"embeds": torch.cat([embeds, neg[:1]]).to(dtype), "mask": torch.cat([mask, neg_mask[:1]])}
        if getattr(self.model(pipe), "use_additional_conditions", False):  # alpha's micro-conditions, per row
            n = len(texts) + 1
            table["resolution"] = torch.tensor([height, width], dtype=dtype, device=pipe.device).repeat(n, 1)
            table["aspect_ratio"] = torch.tensor([height / width], dtype=dtype, device=pipe.device).repeat(n, 1)
        return table

    def call(self, model: nn.Module, x_t: Tensor, t: Tensor, rows: dict[str, Tensor]) -> Tensor:
        added = {"resolution": rows.get("resolution"), "aspect_ratio": rows.get("aspect_ratio")}
        return model(
            x_t, encoder_hidden_states=rows["embeds"], encoder_attention_mask=rows["mask"], timestep=t,
            added_cond_kwargs=added, return_dict=False,
        )[0]  # fmt: skip

    def scheduler(self, pipe: Any, options: SDAlignOptions, steps: int, shape: tuple[int, ...]) -> Any:
        from msdda.core.schedule import KernelScheduler
        from msdda.pipelines.pixart import pixart_scheduler

        kind = options.scheduler or self.default_scheduler
        own = pixart_scheduler(pipe.scheduler, self.model(pipe), kind)
        return KernelScheduler.from_diffusers(own, eta=options.eta if kind == "ddim" else None)

    def save_lora(self, folder: Path, state: dict[str, Tensor], lora_config: Any) -> None:
        """diffusers' layout for a transformer LoRA ("transformer."-prefixed peft keys, the config in the
        metadata), which `MSDDAPixArtPipeline` (and diffusers' loaders of transformer LoRAs) read."""
        from safetensors.torch import save_file

        config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in lora_config.to_dict().items()}
        save_file({f"transformer.{k}": v for k, v in state.items()}, str(folder / LORA_FILE),
                  metadata={"lora_adapter_metadata": json.dumps(config, default=str), "format": "pt"})  # fmt: skip


class SDXLFamily(LoRAFamily):
    """SDXL: SD's UNet family with two text encoders, whose UNet also takes the pooled embedding and six size /
    crop time ids. They travel packed as trailing tokens of the prompt embeddings (msdda.pipelines.conditioning,
    as MSDDAXLPipeline carries them), so a row lookup gives the UNet all three."""

    task = "sdxl"
    pipeline_classes = ("StableDiffusionXLPipeline",)

    @staticmethod
    def conditions(unet: nn.Module) -> Any:
        from msdda.pipelines.conditioning import AddedConditions

        cfg = unet.config
        time_ids = 6
        pooled = int(cfg.projection_class_embeddings_input_dim) - time_ids * int(cfg.addition_time_embed_dim)
        return AddedConditions(text_embeds_dim=pooled, time_ids_dim=time_ids)

    def encode(self, pipe: Any, texts: list[str], height: int, width: int, guidance: float) -> dict[str, Tensor]:
        from msdda.pipelines.sdxl import _xl_conditions

        packing = _xl_conditions(pipe)  # refuses a UNet that is not an SDXL text-to-image one
        embeds, neg, pooled, neg_pooled = pipe.encode_prompt(texts, device=pipe.device, num_images_per_prompt=1,
                                                             do_classifier_free_guidance=True)  # fmt: skip
        ids = pipe._get_add_time_ids(
            (height, width), (0, 0), (height, width), dtype=embeds.dtype,
            text_encoder_projection_dim=int(pipe.text_encoder_2.config.projection_dim),
        ).to(pipe.device)  # fmt: skip
        rows = packing.pack(embeds, pooled, ids.repeat(len(texts), 1))
        null = packing.pack(neg[:1], neg_pooled[:1], ids)
        return {"embeds": torch.cat([rows, null]).to(self.model(pipe).dtype)}

    def call(self, model: nn.Module, x_t: Tensor, t: Tensor, rows: dict[str, Tensor]) -> Tensor:
        return model(x_t, t, return_dict=False, **self.conditions(model).unet_inputs(rows["embeds"]))[0]

    def save_lora(self, folder: Path, state: dict[str, Tensor], lora_config: Any) -> None:
        from diffusers import StableDiffusionXLPipeline

        StableDiffusionXLPipeline.save_lora_weights(
            folder, unet_lora_layers=state, unet_lora_adapter_metadata=lora_config.to_dict(), safe_serialization=True
        )


class SD3Family(LoRAFamily):
    """SD3 / SD3.5: a joint-attention transformer (diffusers' adapter mixin) conditioned on the three text
    encoders' prompt embeddings and the pooled projections, trained on flow matching's SDE kernels at noise
    level eta (> 0: the ODE's kernels are point masses) from the folder's FlowMatchEulerDiscreteScheduler."""

    task = "sd3"
    pipeline_classes = ("StableDiffusion3Pipeline",)
    default_scheduler = "flow"
    schedulers = ("flow",)

    def model(self, pipe: Any) -> nn.Module:
        return pipe.transformer

    def encode(self, pipe: Any, texts: list[str], height: int, width: int, guidance: float) -> dict[str, Tensor]:
        embeds, neg, pooled, neg_pooled = pipe.encode_prompt(texts, None, None, device=pipe.device,
                                                             do_classifier_free_guidance=True)  # fmt: skip
        dtype = self.model(pipe).dtype
        return {
            "embeds": torch.cat([embeds, neg[:1]]).to(dtype),
            "pooled": torch.cat([pooled, neg_pooled[:1]]).to(dtype),
        }

    def call(self, model: nn.Module, x_t: Tensor, t: Tensor, rows: dict[str, Tensor]) -> Tensor:
        return model(hidden_states=x_t, timestep=t, encoder_hidden_states=rows["embeds"],
                     pooled_projections=rows["pooled"], return_dict=False)[0]  # fmt: skip

    def scheduler(self, pipe: Any, options: SDAlignOptions, steps: int, shape: tuple[int, ...]) -> Any:
        from msdda.core.schedule import as_kernel_scheduler

        own = copy.deepcopy(pipe.scheduler)  # the folder's flow schedule (its shift), with the training steps
        own.set_timesteps(steps)
        return as_kernel_scheduler(own, eta=float(options.eta))

    def save_lora(self, folder: Path, state: dict[str, Tensor], lora_config: Any) -> None:
        from diffusers import StableDiffusion3Pipeline

        StableDiffusion3Pipeline.save_lora_weights(folder, transformer_lora_layers=state,
                                                   transformer_lora_adapter_metadata=lora_config.to_dict())  # fmt: skip


class FluxFamily(LoRAFamily):
    """FLUX.1 dev / schnell: a transformer on packed latents [B, S, 4C] with T5 and pooled CLIP conditioning,
    rotary ids of the text and image tokens and (dev) a guidance embedding instead of classifier-free guidance
    (the trainer's --guidance-scale is that embedded value). Trained on flow matching's SDE kernels at noise
    level eta, on the folder's schedule with diffusers' dynamic shift for the training resolution."""

    task = "flux"
    pipeline_classes = ("FluxPipeline",)
    default_scheduler = "flow"
    schedulers = ("flow",)
    uses_cfg = False

    def model(self, pipe: Any) -> nn.Module:
        return pipe.transformer

    def default_size(self, pipe: Any) -> int:
        return int(pipe.default_sample_size * pipe.vae_scale_factor)

    def sample_shape(self, pipe: Any, height: int, width: int) -> tuple[int, ...]:
        f = 2 * pipe.vae_scale_factor  # diffusers packs 2 x 2 latent patches into one token
        return ((height // f) * (width // f), int(self.model(pipe).config.in_channels))

    def unpack(self, pipe: Any, height: int, width: int) -> Callable[[Tensor], Tensor] | None:
        return lambda latents: pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)

    def encode(self, pipe: Any, texts: list[str], height: int, width: int, guidance: float) -> dict[str, Tensor]:
        embeds, pooled, text_ids = pipe.encode_prompt(texts, None, device=pipe.device, num_images_per_prompt=1)
        f = 2 * pipe.vae_scale_factor
        image_ids = pipe._prepare_latent_image_ids(1, height // f, width // f, pipe.device, embeds.dtype)
        n, dtype = len(texts), self.model(pipe).dtype
        table = {  # the ids are shared by every row; kept per row so a row lookup carries them
            "embeds": embeds.to(dtype), "pooled": pooled.to(dtype),
            "text_ids": text_ids.expand(n, *text_ids.shape), "image_ids": image_ids.expand(n, *image_ids.shape),
        }  # fmt: skip
        if self.model(pipe).config.guidance_embeds:
            table["guidance"] = torch.full((n,), float(guidance), device=pipe.device)
        return table

    def call(self, model: nn.Module, x_t: Tensor, t: Tensor, rows: dict[str, Tensor]) -> Tensor:
        return model(
            hidden_states=x_t, timestep=t.to(x_t.dtype) / 1000, guidance=rows.get("guidance"),
            pooled_projections=rows["pooled"], encoder_hidden_states=rows["embeds"], txt_ids=rows["text_ids"][0],
            img_ids=rows["image_ids"][0], return_dict=False,
        )[0]  # fmt: skip

    def scheduler(self, pipe: Any, options: SDAlignOptions, steps: int, shape: tuple[int, ...]) -> Any:
        from msdda.core.schedule import as_kernel_scheduler
        from msdda.pipelines.flux import flux_timesteps

        own, _ = flux_timesteps(pipe.scheduler, steps, image_seq_len=int(shape[0]))  # diffusers' dynamic shift
        return as_kernel_scheduler(own, eta=float(options.eta))

    def save_lora(self, folder: Path, state: dict[str, Tensor], lora_config: Any) -> None:
        from diffusers import FluxPipeline

        FluxPipeline.save_lora_weights(folder, transformer_lora_layers=state,
                                       transformer_lora_adapter_metadata=lora_config.to_dict())  # fmt: skip


class DiTFamily(PixArtFamily):
    """DiT: PixArt's learned-variance transformer family conditioned on a class label instead of text. The
    prompt file holds class names (the folder's id2label, as diffusers' DiTPipeline.get_label_ids reads them);
    the null class (num_embeds_ada_norm) is the unconditional one of classifier-free guidance."""

    task = "dit"
    pipeline_classes = ("DiTPipeline",)

    def default_size(self, pipe: Any) -> int:
        return int(self.model(pipe).config.sample_size * _vae_factor(pipe))

    def sample_shape(self, pipe: Any, height: int, width: int) -> tuple[int, ...]:
        f = _vae_factor(pipe)
        return (int(self.model(pipe).config.in_channels), height // f, width // f)

    def encode(self, pipe: Any, texts: list[str], height: int, width: int, guidance: float) -> dict[str, Tensor]:
        null = int(self.model(pipe).config.num_embeds_ada_norm)

        def class_id(text: str) -> int | None:  # a name of the folder's id2label, or an integer id
            if text in pipe.labels:
                return int(pipe.labels[text])
            return int(text) if text.isdigit() and int(text) < null else None

        unknown = [t for t in texts if class_id(t) is None]
        if unknown:
            raise SDAlignError(
                f"class names {unknown[:3]} are not in the folder's id2label ({len(pipe.labels)} names, e.g. "
                f"{sorted(pipe.labels)[:3]}) nor class ids below {null}; the prompt file of --task dit holds class "
                "names or ids"
            )
        return {"labels": torch.tensor([class_id(t) for t in texts] + [null], device=pipe.device)}

    def call(self, model: nn.Module, x_t: Tensor, t: Tensor, rows: dict[str, Tensor]) -> Tensor:
        return model(x_t, timestep=t, class_labels=rows["labels"], return_dict=False)[0]


def _vae_factor(pipe: Any) -> int:
    from msdda.pipelines.sd_task import vae_factor

    return vae_factor(pipe)


SD_FAMILY = LoRAFamily()
SDXL_FAMILY = SDXLFamily()
SD3_FAMILY = SD3Family()
FLUX_FAMILY = FluxFamily()
PIXART_FAMILY = PixArtFamily()
DIT_FAMILY = DiTFamily()
FAMILIES: dict[str, LoRAFamily] = {
    f.task: f for f in (SD_FAMILY, SDXL_FAMILY, SD3_FAMILY, FLUX_FAMILY, PIXART_FAMILY, DIT_FAMILY)
}


# ----- the denoisers and the reward the trainers see ---------------------------------------------------------


class PromptIndexDenoiser(nn.Module):
    """`(x_t [B, C, h, w], t [B], cond = prompt indices [B]) -> output` through a UNet or transformer, each row's
    prompt conditioning looked up in `table` ({name: [P + 1, ...]}, row P: the empty prompt) and passed to the
    model by `family.call`.

    adapters: True for the policy (the model is a submodule: its LoRA weights are what trains); False for the
    reference, which runs the same model with its adapters disabled and does not register it, so freezing the
    reference (`requires_grad_(False)`) leaves the policy's adapters trainable. variance_head: the policy's
    `TimestepVarianceHead`; the output is then [B, 3C] (eps and kernel offsets, `with_variance_offsets`).
    """

    def __init__(
        self,
        model: nn.Module,
        table: dict[str, Tensor] | Tensor,
        *,
        adapters: bool,
        variance_head: nn.Module | None = None,
        family: LoRAFamily | None = None,
    ) -> None:
        super().__init__()
        if adapters:
            self.unet = model
        else:
            object.__setattr__(self, "_shared_unet", model)
        self.adapters = bool(adapters)
        self.variance_head = variance_head
        self.family = family or SD_FAMILY
        table = {"embeds": table} if isinstance(table, Tensor) else dict(table)
        self.names = sorted(table)
        for name in self.names:
            self.register_buffer(f"cond_{name}", table[name], persistent=False)

    @property
    def model(self) -> nn.Module:
        return self.unet if self.adapters else self._shared_unet

    def rows(self, cond: Tensor) -> dict[str, Tensor]:
        first = getattr(self, f"cond_{self.names[0]}")
        return {n: getattr(self, f"cond_{n}")[cond.to(first.device)] for n in self.names}

    def forward(self, x_t: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        if not isinstance(cond, Tensor):
            raise SDAlignError(f"cond must be prompt indices [B], got {type(cond).__name__}")
        model, rows = self.model, self.rows(cond)
        t = t.to(x_t.device)
        if self.adapters:
            out = self.family.call(model, x_t, t, rows)
            if self.variance_head is None:
                return out
            return with_variance_offsets(out, self.variance_head(t))
        # The model's own gradient checkpointing would recompute these blocks in backward, when the adapters are
        # enabled again (a different function); the reward chunk around this call is recomputed as a whole instead.
        blocks = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
        with adapters_disabled(model):
            for m in blocks:
                m.gradient_checkpointing = False
            try:
                return self.family.call(model, x_t, t, rows)
            finally:
                for m in blocks:
                    m.gradient_checkpointing = True


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """The model's peft LoRA layers off within the block (the base weights), on again after, also on error."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield
    finally:
        for m in layers:
            m.enable_adapters(True)


class DecodedImageReward:
    """The trainers' `(x0 latents [B, 4, h, w], prompt indices [B]) -> [B]`: latents decoded by the VAE to
    images in [0, 1] (as diffusers' decode and postprocess), scored by `fn(images, prompt_texts)`.

    fn may be a list of rewards with `weights`: then sum_k w_k fn_k (multi-objective step-level RL, the
    "step-rl" baseline), every reward scoring the same decoded images (one decode for all of them).
    """

    def __init__(
        self,
        fn: Callable[..., Tensor] | Sequence[Callable[..., Tensor]],
        name: str,
        vae: nn.Module,
        prompts: Sequence[str],
        weights: Sequence[float] | None = None,
        *,
        unpack: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        self.unpack = unpack  # FLUX: packed latents -> the VAE's layout
        self.fns = [fn] if callable(fn) else list(fn)
        self.weights = [1.0] if weights is None and callable(fn) else [float(w) for w in (weights or [])]
        if len(self.weights) != len(self.fns):
            raise SDAlignError(f"{len(self.fns)} rewards need as many weights, got {list(weights or [])}")
        self.name = name
        self.vae = vae
        self.prompts = list(prompts)
        self.differentiable = all(is_differentiable(f) for f in self.fns)

    def decode(self, latents: Tensor) -> Tensor:
        vae = self.vae
        if self.unpack is not None:
            latents = self.unpack(latents)
        shift = getattr(vae.config, "shift_factor", None) or 0.0  # SD3 / FLUX latents are shifted, SD's are not
        images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor + shift, return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def __call__(self, x0: Tensor, cond: Any = None) -> Tensor:
        texts = [self.prompts[int(i)] for i in cond] if cond is not None else None
        images = self.decode(x0)
        total = None
        for f, w in zip(self.fns, self.weights, strict=True):
            name = self.name if len(self.fns) == 1 else reward_label(f)
            values = validate_reward_output(f(images, texts), x0.shape[0], name, error=RewardModelError)
            total = w * values if total is None else total + w * values
        assert total is not None
        return total.to(x0.dtype)


def reward_label(fn: Any) -> str:
    """A printable name of a reward callable."""
    from msdda.core.rewards import reward_name

    return reward_name(fn)


class _TrainableParameters(nn.Module):
    """The trainable parameters of a module, shared (not copied), as a module of their own: a checkpoint
    of it holds the LoRA weights only, not the frozen UNet."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        for name, p in module.named_parameters():
            if p.requires_grad:
                self.register_parameter(name.replace(".", "__"), p)


class SDLoRAMixin:
    """What SD training changes in a step trainer: adapters injected by diffusers, checkpoints of the LoRA
    weights alone, chunked (and optionally recomputed) step rewards, and no merged copy at the end."""

    def __init__(self, *args: Any, reward_batch: int = 8, recompute_rewards: bool = False, **kwargs: Any) -> None:
        self.reward_batch = int(reward_batch)
        self.recompute_rewards = bool(recompute_rewards)
        super().__init__(*args, **kwargs)  # type: ignore[call-arg]

    def wrap_policy(self, policy: nn.Module) -> nn.Module:
        return policy  # the adapter was injected (and only it left trainable) before the trainer was built

    def checkpoint_modules(self) -> dict[str, nn.Module]:
        return {"lora": _TrainableParameters(self.module)}  # type: ignore[attr-defined]

    def final_model(self) -> nn.Module:
        return self.module.model  # type: ignore[attr-defined]  # the UNet with its adapter (saved as a LoRA file)

    def progress_description(self) -> str:
        return f"align sd {self.config.reward}"  # type: ignore[attr-defined]

    def step_reward(self, x_prev: Tensor, prev_t: Tensor, cond: Any) -> Tensor:
        base = super().step_reward  # type: ignore[misc]
        n, size = x_prev.shape[0], int(self.reward_batch)
        if n <= size:
            return self._chunk(base, x_prev, prev_t, cond)
        parts = []
        for lo in range(0, n, size):
            rows = torch.arange(lo, min(lo + size, n))
            c = cond[rows.to(cond.device)] if isinstance(cond, Tensor) else cond
            parts.append(self._chunk(base, x_prev[lo : lo + size], prev_t[lo : lo + size], c))
        return torch.cat(parts)

    def _chunk(self, fn: Callable[..., Tensor], x_prev: Tensor, prev_t: Tensor, cond: Any) -> Tensor:
        if self.recompute_rewards and torch.is_grad_enabled() and x_prev.requires_grad:
            from torch.utils.checkpoint import checkpoint

            return checkpoint(fn, x_prev, prev_t, cond, use_reentrant=False)
        return fn(x_prev, prev_t, cond)


def _sd_trainer_class(config: StepTrainerConfig) -> type[StepTrainer]:
    from msdda.alignment.dpo import DPOTrainer
    from msdda.alignment.step_rl import StepRLConfig, StepRLTrainer

    base = StepRLTrainer if isinstance(config, StepRLConfig) else DPOTrainer
    return type(f"SD{base.__name__}", (SDLoRAMixin, base), {})


@dataclass
class SDAlignResult:
    """out: the result folder; lora_file: its diffusers LoRA file; train: the trainer's result (model: the UNet
    with the trained adapter)."""

    out: Path
    lora_file: Path
    train: TrainResult
    variance_head: TimestepVarianceHead | None = None


def _load_base(path: Path, options: SDAlignOptions, family: LoRAFamily) -> Any:
    from msdda.pipelines._deps import dtype_kwargs, require

    diffusers = require("diffusers", f"msdda align --task {family.task}")
    require("peft", f"msdda align --task {family.task}")
    cls_name = json.loads((path / "model_index.json").read_text())["_class_name"]
    kwargs: dict[str, Any] = {"use_safetensors": True, "local_files_only": True}
    if family is SD_FAMILY:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    kwargs.update(dtype_kwargs(diffusers, getattr(torch, options.dtype)))
    pipe = getattr(diffusers, cls_name).from_pretrained(str(path), **kwargs)
    try:
        pipe = pipe.to(local_device(options.device))  # "cuda" under torchrun: this process's own GPU
    except (RuntimeError, AssertionError) as exc:
        raise SDAlignError(f"device={options.device!r} is not usable here ({exc}); pass --device cpu") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe


def align_sd(
    base: str | Path,
    reward: str | Sequence[str],
    prompts: Sequence[str],
    out: str | Path,
    config: StepTrainerConfig,
    *,
    reward_weights: Sequence[float] | None = None,
    options: SDAlignOptions | None = None,
    resume: bool = True,
    progress: bool = True,
    throttle: float = 0.0,
) -> SDAlignResult:
    """Train one LoRA objective of the SD pipeline folder `base` towards `reward` (a spec, see
    `resolve_reward`) on `prompts`, with the step trainer `config` (`sd_train_config`); write it to `out`.
    reward may be a list of specs with `reward_weights` (one each): the LoRA then learns the step optimum of
    sum_k w_k r_k, the multi-objective step-level RL policy at those weights (the sweep's "step-rl" method).
    See the module docstring for what the folder holds and how training works."""
    return _align_lora(SD_FAMILY, base, reward, prompts, out, config, reward_weights=reward_weights, options=options,
                       resume=resume, progress=progress, throttle=throttle)  # fmt: skip


def _align_lora(
    family: LoRAFamily,
    base: str | Path,
    reward: str | Sequence[str],
    prompts: Sequence[str],
    out: str | Path,
    config: StepTrainerConfig,
    *,
    reward_weights: Sequence[float] | None,
    options: SDAlignOptions | None,
    resume: bool,
    progress: bool,
    throttle: float,
) -> SDAlignResult:
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    options = options or SDAlignOptions()
    if options.scheduler is None:  # the family's kernels (validated with eta: DDIM needs eta > 0)
        options = dataclasses.replace(options, scheduler=family.default_scheduler)
    options.validate()
    config.validate()
    if options.scheduler not in family.schedulers:
        raise SDAlignError(
            f"scheduler={options.scheduler!r}: --task {family.task} trains on {' or '.join(family.schedulers)} kernels "
            f"(--scheduler {family.schedulers[0]})"
        )
    if options.variance_head and family not in (SD_FAMILY, SDXL_FAMILY, SD3_FAMILY):
        why = (
            "predicts its own variance already"
            if family in (PIXART_FAMILY, DIT_FAMILY)
            else "packs its latents into tokens (a per-channel head does not apply)"
        )
        raise SDAlignError(f"--variance-head is for the fixed-variance families (sd, sdxl, sd3); {family.task} {why}")
    if not config.lora:
        raise SDAlignError("SD training trains LoRA adapters only: pass a config with lora=True (sd_train_config)")
    texts = check_prompts(prompts)
    specs = [reward] if isinstance(reward, str) else list(reward)
    if not specs or not all(isinstance(r, str) and r.strip() for r in specs):
        raise SDAlignError(f"reward must be a spec or a non-empty list of specs, got {reward!r:.80}")
    weights = check_reward_weights(specs, reward_weights)
    base_path = check_base_folder(base, family)
    out = Path(out)
    ctx = get_context()
    pipe = _load_base(base_path, options, family)
    resolved = [resolve_reward(r, pipe.device, allow_pickle=options.allow_pickle) for r in specs]
    unet = family.model(pipe)  # the UNet or the transformer
    unet.requires_grad_(False)
    lora_config = LoraConfig(
        r=int(config.lora_rank),
        lora_alpha=float(config.lora_alpha),
        target_modules=list(config.lora_targets),
        init_lora_weights="gaussian",
        lora_dropout=0.0,
    )
    torch.manual_seed(int(config.seed))  # the adapter's initialisation (lora_B is zero: the policy starts at the base)
    try:
        family.inject(unet, lora_config)
    except ValueError as exc:
        raise SDAlignError(f"cannot add LoRA adapters to targets {list(config.lora_targets)}: {exc}") from None
    for p in unet.parameters():  # the adapter trains in float32 whatever the frozen weights' dtype
        if p.requires_grad:
            p.data = p.data.float()
    if options.gradient_checkpointing:
        unet.enable_gradient_checkpointing()

    height = options.height or family.default_size(pipe)
    width = options.width or family.default_size(pipe)
    sample_shape = family.sample_shape(pipe, height, width)
    with torch.no_grad():
        table = family.encode(pipe, texts, height, width, float(config.guidance_scale))
    head = None
    if options.variance_head:
        torch.manual_seed(int(config.seed))
        head = TimestepVarianceHead(
            int(pipe.scheduler.config.num_train_timesteps), int(unet.config.in_channels), options.variance_head_buckets
        ).to(pipe.device)
    policy = PromptIndexDenoiser(unet, table, adapters=True, variance_head=head, family=family)
    reference = PromptIndexDenoiser(unet, table, adapters=False, family=family)
    scheduler = family.scheduler(pipe, options, int(config.num_inference_steps), sample_shape)
    label = (
        resolved[0][0]
        if weights is None
        else "+".join(f"{w:g}*{n}" for (n, _), w in zip(resolved, weights, strict=True))
    )
    fns = resolved[0][1] if weights is None else [f for _, f in resolved]
    image_reward = DecodedImageReward(fns, label, pipe.vae, texts, weights, unpack=family.unpack(pipe, height, width))
    n_prompts = len(texts)

    def cond_sampler(n: int, generator: torch.Generator | None) -> Tensor:
        return torch.randint(0, n_prompts, (n,), generator=generator)

    trainer = _sd_trainer_class(config)(
        policy,
        reference,
        scheduler,
        image_reward,
        config,
        out=out,
        sample_shape=sample_shape,
        cond_sampler=cond_sampler,
        null_cond=torch.tensor([n_prompts]) if family.uses_cfg else None,
        context=ctx,
        clip_samples=False,  # latents are not bounded; the reward decodes them
        reward_batch=options.reward_batch,
        recompute_rewards=options.gradient_checkpointing,
    )
    started = time.time()
    result = trainer.train(resume=resume, progress=progress, throttle=throttle)
    lora_file = out / LORA_FILE
    if not ctx.is_main:
        ctx.barrier()  # return once rank 0 has written the LoRA
        return SDAlignResult(out=out, lora_file=lora_file, train=result, variance_head=head)
    state = {
        k: v.detach().to("cpu", torch.float32).contiguous()
        for k, v in get_peft_model_state_dict(unet, adapter_name=ADAPTER).items()
    }
    tmp = out / ".lora.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    family.save_lora(tmp, state, lora_config)
    (tmp / LORA_FILE).replace(lora_file)  # the file appears whole or not at all
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(lora_file, 0o666 & ~umask)  # safetensors writes 0600; the file is the user's to share
    tmp.rmdir()
    if head is not None:
        save_variance_head(head, out)
    write_json_atomic(
        out / CONFIG_FILE,
        {
            "task": family.task,
            "base": str(base_path),
            "reward": specs[0] if weights is None else specs,
            "reward_weights": weights,
            "prompts": texts,
            "trainer": "step-rl" if config.__class__.__name__ == "StepRLConfig" else getattr(config, "labels", "bt"),
            "train_config": config.to_dict(),
            "options": options.to_dict(),
            "lora": {
                k: (sorted(v) if isinstance(v, set) else v)
                for k, v in lora_config.to_dict().items()
                if k in ("r", "lora_alpha", "target_modules", "init_lora_weights")
            },
            "sample_shape": list(sample_shape),
            "variance_head": head.config() if head is not None else None,
            "train_seconds": round(result.seconds, 1),
            "wall_seconds": round(time.time() - started, 1),
            "final_eval": result.final_eval,
        },
    )
    ctx.barrier()
    return SDAlignResult(out=out, lora_file=lora_file, train=result, variance_head=head)


__all__ = [
    "ADAPTER",
    "CONFIG_FILE",
    "DEFAULT_LORA_TARGETS",
    "LORA_FILE",
    "SD_TRAINERS",
    "SD_TRAIN_DEFAULTS",
    "DecodedImageReward",
    "PromptIndexDenoiser",
    "SDAlignError",
    "SDAlignOptions",
    "SDAlignResult",
    "FAMILIES",
    "LoRAFamily",
    "ALIGNERS",
    "align_dit",
    "align_flux",
    "align_pixart",
    "align_sd",
    "align_sd3",
    "align_sdxl",
    "check_prompts",
    "check_reward_weights",
    "resolve_reward",
    "sd_train_config",
]


def _aligner(family: LoRAFamily, doc: str) -> Callable[..., SDAlignResult]:
    """`align_sd`'s signature and behaviour for another family (its name and docstring set)."""

    def align(
        base: str | Path,
        reward: str | Sequence[str],
        prompts: Sequence[str],
        out: str | Path,
        config: StepTrainerConfig,
        *,
        reward_weights: Sequence[float] | None = None,
        options: SDAlignOptions | None = None,
        resume: bool = True,
        progress: bool = True,
        throttle: float = 0.0,
    ) -> SDAlignResult:
        return _align_lora(family, base, reward, prompts, out, config, reward_weights=reward_weights,
                           options=options, resume=resume, progress=progress, throttle=throttle)  # fmt: skip

    align.__name__ = align.__qualname__ = f"align_{family.task}"
    align.__doc__ = doc
    return align


align_sdxl = _aligner(
    SDXL_FAMILY,
    """`align_sd` for an SDXL folder: the UNet also gets the pooled embeddings and size / crop time ids of the
    training resolution (original = target = (height, width), crop (0, 0)); the file is diffusers' SDXL LoRA
    layout, loadable by `StableDiffusionXLPipeline.load_lora_weights` and `MSDDAXLPipeline`.""",
)
align_sd3 = _aligner(
    SD3_FAMILY,
    """`align_sd` for an SD3 / SD3.5 folder: a LoRA on the transformer, trained on flow matching's SDE kernels
    at noise level `options.eta` (> 0); the file is diffusers' SD3 LoRA layout (`load_lora_weights`,
    `MSDDASD3Pipeline`).""",
)
align_flux = _aligner(
    FLUX_FAMILY,
    """`align_sd` for a FLUX.1 folder: a LoRA on the transformer, trained on flow matching's SDE kernels at
    noise level `options.eta` (> 0) on packed latents; `config.guidance_scale` is FLUX.1-dev's embedded guidance
    (no classifier-free guidance); the file is diffusers' FLUX LoRA layout (`load_lora_weights`,
    `MSDDAFluxPipeline`).""",
)
align_pixart = _aligner(
    PIXART_FAMILY,
    """`align_sd` for a PixArt-alpha / Sigma folder: a LoRA on its transformer, trained on DDPM kernels with the
    transformer's own learned variance (learned_range), so the policy's variance adapts with its mean; the
    file loads in `MSDDAPixArtPipeline` (docs/learned_variance.md).""",
)
align_dit = _aligner(
    DIT_FAMILY,
    """`align_pixart` for a DiT folder: `prompts` are class names (the folder's id2label); the LoRA trains on
    DDPM kernels with the transformer's learned variance and loads in `MSDDADiTPipeline`.""",
)

ALIGNERS: dict[str, Callable[..., SDAlignResult]] = {
    "sd": align_sd,
    "sdxl": align_sdxl,
    "sd3": align_sd3,
    "flux": align_flux,
    "pixart": align_pixart,
    "dit": align_dit,
}
