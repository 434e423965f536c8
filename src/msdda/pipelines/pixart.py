"""`MSDDAPixArtPipeline`: PixArt-alpha / PixArt-Sigma through diffusers, with K objectives fused at every step.

PixArt's transformers are *learned-variance* models: out_channels = 2 x latent channels, the second half
a per-element variance value v in [-1, 1] (improved-DDPM "learned_range": the log-variance is
((v + 1) / 2) log beta_t + (1 - (v + 1) / 2) log beta_tilde_t). diffusers' PixArt pipelines throw that
half away (`noise_pred.chunk(2, dim=1)[0]`) and sample with DPM-Solver; with a DDPMScheduler whose
variance_type is "learned_range" their step() even fails (it gets no variance and computes None + 1).
This pipeline keeps it: every objective's kernel is the DDPM kernel with its own predicted variance
(msdda's KernelScheduler, tested against diffusers' DDPMScheduler.step on the full [B, 2C] output), so
MSDDA's precision-weighted fusion differs from DB-MPA's average of noise predictions here, while on SD 1.5
(fixed variance) the two are the same sampler.

This module also holds what every transformer family shares (FLUX imports it): `TransformerObjective`,
`TransformerPipelineMixin` (release guard, device moves, denoisers, callbacks, the shared store's hooks),
`resolve_transformer_source` and `load_full_transformer`.

The base pipeline (a diffusers PixArtAlphaPipeline or PixArtSigmaPipeline) supplies the T5 text encoder,
tokenizer, VAE, scheduler config and the base transformer. Each objective is a LoRA adapter injected into
that transformer with peft (switched per forward pass: memory is one transformer plus the adapters) or a
full transformer. A call encodes the prompt, draws the latents and decodes exactly as diffusers does; in
between it runs `msdda.sampling.sample` with the planned step rule over denoisers that carry the T5
embeddings, their attention mask and PixArt-alpha's micro-conditions (`TextCondition`).

DiT (class-conditional, also learned-variance) has its own face on the same mixin: msdda.pipelines.dit.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import re
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from msdda.core.errors import UnsupportedSchedulerError
from msdda.core.schedule import LEARNED_VARIANCE_TYPES, KernelScheduler, as_kernel_scheduler
from msdda.errors import MSDDAError
from msdda.models.denoiser import combine_guidance
from msdda.pipelines._deps import dtype_kwargs, require
from msdda.pipelines.errors import AdapterError, ObjectiveError, PipelineError
from msdda.pipelines.objectives import (
    AdapterSwitch,
    UNetRestorePoint,
    _refuse_pickle,
    check_lora_shapes,
    check_objective_name,
)
from msdda.pipelines.sd import DiffusersNoise, _ObjectiveStore
from msdda.sampling import MSDDA, CoDe, Cost, StepContext, make_generator, sample
from msdda.sampling.methods import REFERENCE, MethodPlan, method_names, plan_method

logger = logging.getLogger(__name__)

METHODS = tuple(method_names())
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
SCHEDULERS = ("ddpm", "ddim")
PIXART_PIPELINES = ("PixArtAlphaPipeline", "PixArtSigmaPipeline")
SOUP_ADAPTER = "msdda_rewarded_soup"
_CALLBACK_TENSOR_INPUTS = ("latents",)
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_PEFT_CONFIG_FILE = "adapter_config.json"
_PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
_DIFFUSERS_LORA_FILE = "pytorch_lora_weights.safetensors"
# keys of a transformer config that must agree for an objective to be a fine-tune of the base
_ARCH_KEYS = (
    "in_channels",
    "out_channels",
    "sample_size",
    "patch_size",
    "cross_attention_dim",
    "caption_channels",
    "num_layers",
    "num_attention_heads",
    "attention_head_dim",
    "use_additional_conditions",
)


@dataclass
class MSDDAPixArtPipelineOutput:
    """What a call returns.

    images: per `output_type`: "pil" list of PIL images, "np" float array [B, H, W, 3] in [0, 1], "pt"
      tensor [B, 3, H, W] in [0, 1], "latent" the final latents [B, C, H/8, W/8].
    cost: model evaluations (CFG pairs count 2), reward calls, seconds and peak memory of the denoising.
    config: the resolved settings of the call (method, weights, exponents, steps, scheduler, ...).
    """

    images: Any
    cost: Cost
    config: dict[str, Any] = field(default_factory=dict)


# ----- the condition and the denoiser ------------------------------------------------------------------


@dataclass
class TextCondition:
    """What a PixArt transformer is conditioned on, for a batch of B images.

    embeds: T5 hidden states [B, L, D]; mask: their attention mask [B, L] (1 = token, 0 = padding);
    resolution [B, 2] (height, width in pixels) and aspect_ratio [B, 1]: PixArt-alpha's micro-conditions,
    None when the transformer takes none (PixArt-Sigma, and alpha below 1024 px).
    """

    embeds: Tensor
    mask: Tensor
    resolution: Tensor | None = None
    aspect_ratio: Tensor | None = None

    def repeat(self, n: int) -> TextCondition:
        """Every field's rows repeated n times (a one-row condition broadcast over a batch)."""

        def rows(a: Tensor | None) -> Tensor | None:
            return None if a is None else a.repeat(n, *([1] * (a.dim() - 1)))

        return TextCondition(rows(self.embeds), rows(self.mask), rows(self.resolution), rows(self.aspect_ratio))

    def cat(self, other: TextCondition) -> TextCondition:
        """[self; other] along the batch, as diffusers batches [negative; positive] for guidance."""

        def join(a: Tensor | None, b: Tensor | None) -> Tensor | None:
            return None if a is None or b is None else torch.cat([a, b])

        return TextCondition(
            torch.cat([self.embeds, other.embeds]),
            torch.cat([self.mask, other.mask]),
            join(self.resolution, other.resolution),
            join(self.aspect_ratio, other.aspect_ratio),
        )


class TransformerDenoiser:
    """A Denoiser over latents: `(x_t [B, C, h, w], t LongTensor [B], cond=TextCondition) -> [B, 2C, h, w]`.

    transformer: the PixArtTransformer2DModel to call. adapter: the LoRA adapter to activate for the pass
    (None with a `switch`: the base weights, adapters disabled). The output has the transformer's
    out_channels: the noise prediction, then (learned sigma) the variance value.
    """

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
        self.forwards = 0  # transformer forwards, counted in samples (a CFG pass of batch 2B counts 2B)

    def __call__(self, x_t: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        if not isinstance(cond, TextCondition):
            raise AdapterError(
                f"objective {self.name!r}: cond must be a TextCondition (T5 embeddings, mask, micro-conditions), "
                f"got {type(cond).__name__}"
            )
        self.forwards += x_t.shape[0]
        if cond.embeds.shape[0] == 1 and x_t.shape[0] > 1:  # one condition for the batch (a sweep's null prompt)
            cond = cond.repeat(x_t.shape[0])
        kwargs = {
            "encoder_hidden_states": cond.embeds,
            "encoder_attention_mask": cond.mask,
            "timestep": t,
            "added_cond_kwargs": {"resolution": cond.resolution, "aspect_ratio": cond.aspect_ratio},
            "return_dict": False,
        }
        if self.switch is None:
            return self.transformer(x_t, **kwargs)[0]
        with self.switch.active(self.adapter):
            return self.transformer(x_t, **kwargs)[0]


class _TextGuidance:
    """Classifier-free guidance for one denoiser, batched as diffusers' PixArt pipeline batches it.

    One transformer call on [x; x] with the condition [negative; positive]; the noise prediction is guided
    uncond + scale * (cond - uncond). The variance half is the conditional pass's (improved-DDPM / GLIDE /
    DiT, msdda.models.combine_guidance); diffusers' pipeline guides all channels, then drops the variance.
    """

    def __init__(self, denoiser: TransformerDenoiser, scale: float, null: TextCondition) -> None:
        self.denoiser = denoiser
        self.name = denoiser.name
        self.unet = denoiser.unet
        self.scale = float(scale)
        self.null = null

    def __call__(self, x_t: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        b = x_t.shape[0]
        both = self.null.cat(cond)
        out = self.denoiser(torch.cat([x_t, x_t]), torch.cat([t, t]), both)
        return combine_guidance(out[b:], out[:b], self.scale, x_t.shape[1])


# ----- adapters on a transformer without diffusers' PeftAdapterMixin -----------------------------------


class PeftHost:
    """peft LoRA adapters on a transformer, managed with peft directly.

    diffusers' PixArtTransformer2DModel has no PeftAdapterMixin (no add_adapter / load_lora_adapter), so
    adapters are injected with `peft.inject_adapter_in_model` (which records them in the module's
    `peft_config`) and deleted layer by layer. Everything else is the module's own (attribute access is
    forwarded), so msdda's AdapterSwitch, check_lora_shapes and build_lora_soup work on it unchanged.
    """

    def __init__(self, module: nn.Module) -> None:
        self.__dict__["module"] = module

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["module"], name)

    @property
    def peft_config(self) -> dict[str, Any]:
        return vars(self.module).get("peft_config", {})

    def named_modules(self, *args: Any, **kwargs: Any) -> Iterator[tuple[str, nn.Module]]:
        return self.module.named_modules(*args, **kwargs)

    def modules(self) -> Iterator[nn.Module]:
        return self.module.modules()

    def add_adapter(self, config: Any, adapter_name: str) -> None:
        peft = require("peft", "LoRA objectives")
        if adapter_name in self.peft_config:
            raise AdapterError(f"the transformer already has an adapter named {adapter_name!r}; choose another name")
        with warnings.catch_warnings():  # peft warns when a second adapter is injected: expected here
            warnings.simplefilter("ignore")
            peft.inject_adapter_in_model(config, self.module, adapter_name=adapter_name)

    def delete_adapters(self, names: str | Sequence[str]) -> None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        for name in [names] if isinstance(names, str) else list(names):
            with warnings.catch_warnings():  # deleting the active adapter is intended: the switch sets it per call
                warnings.filterwarnings("ignore", message=".*was active which is now deleted.*")
                for layer in self.module.modules():
                    if isinstance(layer, BaseTunerLayer) and name in getattr(layer, "lora_A", {}):
                        layer.delete_adapter(name)
            self.peft_config.pop(name, None)


def _adapter_names(module: nn.Module) -> set[str]:
    """Adapters present in the module's peft LoRA layers (however they were injected)."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return set()
    return {a for m in module.modules() if isinstance(m, BaseTunerLayer) for a in getattr(m, "lora_A", {})}


@dataclass(frozen=True)
class TransformerObjective:
    """One single-objective model: kind "lora" (an adapter inside the base transformer) or "transformer" (a
    separate full transformer); source: where it came from, for records."""

    name: str
    kind: str
    source: str
    adapter: str | None = None
    transformer: nn.Module | None = None


def _classify(path: Path, family: str = "a PixArt transformer folder, a PixArt pipeline folder") -> str:
    """'peft', 'transformer', 'pipeline' or 'diffusers-lora' for a source path (any transformer family; `family`
    names what to pass instead in the error)."""
    if path.is_dir():
        if (path / _PEFT_CONFIG_FILE).is_file():
            return "peft"
        if (path / "model_index.json").is_file() and (path / "transformer").is_dir():
            return "pipeline"
        config = path / "config.json"
        if config.is_file():
            try:
                cls = json.loads(config.read_text()).get("_class_name", "")
            except (OSError, json.JSONDecodeError):
                cls = ""
            if "Transformer" in cls:
                return "transformer"
            if cls:
                raise AdapterError(f"{path} holds a {cls} (config.json), not a transformer; pass {family} or a LoRA")
    return "diffusers-lora"


def _lora_file(path: Path, objective: str) -> Path:
    if path.is_file():
        if path.suffix in _PICKLE_SUFFIXES:
            _refuse_pickle(path, objective)
        if path.suffix != ".safetensors":
            raise AdapterError(f"objective {objective!r}: {path} is not a .safetensors file; pass a LoRA saved so")
        return path
    if (path / _DIFFUSERS_LORA_FILE).is_file():
        return path / _DIFFUSERS_LORA_FILE
    files = sorted(path.glob("*.safetensors"))
    if len(files) == 1:
        return files[0]
    pickled = sorted(p for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if not files and pickled:
        _refuse_pickle(pickled[0], objective)
    raise AdapterError(
        f"objective {objective!r}: {path} holds {len(files)} .safetensors files; expected {_DIFFUSERS_LORA_FILE} "
        f"(diffusers), {_PEFT_CONFIG_FILE} + {_PEFT_WEIGHTS_FILE} (peft) or a transformer folder with config.json"
    )


def _diffusers_lora(file: Path, objective: str) -> tuple[dict[str, Tensor], Any]:
    """A diffusers-format LoRA file as (peft-keyed state dict, LoraConfig).

    Keys may carry a "transformer." prefix (or "unet.", as SD's save_lora_weights writes a transformer LoRA),
    and be peft-style (lora_A / lora_B) or old diffusers-style (lora.down / lora.up, with .alpha). The config
    comes from the file's "lora_adapter_metadata" when diffusers wrote one, else from the shapes (alpha = r
    unless the file has alphas).
    """
    peft = require("peft", "LoRA objectives")
    diffusers = require("diffusers", "LoRA objectives")
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        raw = load_file(str(file))
        with safe_open(str(file), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as exc:
        raise AdapterError(f"objective {objective!r}: could not read LoRA weights from {file}: {exc}") from exc
    text_keys = [k for k in raw if k.startswith(("text_encoder", "lora_te"))]
    if text_keys:
        raise AdapterError(
            f"objective {objective!r} ({file}): the LoRA also adapts the text encoder ({len(text_keys)} keys, e.g. "
            f"{text_keys[0]!r}); objectives share one prompt encoding, so only transformer LoRAs are supported"
        )
    state = {
        k.removeprefix("transformer.").removeprefix("unet.").removeprefix("base_model.model."): v
        for k, v in raw.items()
    }
    if not any(".lora_A." in k for k in state):
        state = diffusers.utils.convert_unet_state_dict_to_peft(state)  # a key renaming, not UNet-specific
    alphas = {k.removesuffix(".alpha"): float(v) for k, v in state.items() if k.endswith(".alpha")}
    state = {k: v for k, v in state.items() if not k.endswith(".alpha")}
    meta = metadata.get("lora_adapter_metadata")
    if meta:
        config = peft.LoraConfig(**json.loads(meta))
    else:
        ranks = {
            k.removesuffix(".lora_A.weight"): int(v.shape[0]) for k, v in state.items() if k.endswith(".lora_A.weight")
        }
        if not ranks:
            raise AdapterError(
                f"objective {objective!r} ({file}): no LoRA weights (keys ending in lora_A.weight / lora_B.weight) "
                f"among {len(state)} keys, e.g. {list(state)[:3]}; pass a LoRA saved by diffusers or peft"
            )
        top = max(ranks.values())
        config = peft.LoraConfig(
            r=top,
            lora_alpha=top,
            target_modules=sorted(ranks),
            rank_pattern={re.escape(m): r for m, r in ranks.items()},
            alpha_pattern={re.escape(m): alphas.get(m, float(r)) for m, r in ranks.items()},
        )
    return state, config


def _peft_lora(path: Path, objective: str) -> tuple[dict[str, Tensor], Any]:
    """A peft-format LoRA folder (adapter_config.json + adapter_model.safetensors) as (state dict, config)."""
    peft = require("peft", "LoRA objectives")
    from safetensors.torch import load_file

    weights = path / _PEFT_WEIGHTS_FILE
    if not weights.is_file():
        if (path / "adapter_model.bin").is_file():
            _refuse_pickle(path / "adapter_model.bin", objective)
        raise AdapterError(f"objective {objective!r}: {path} has {_PEFT_CONFIG_FILE} but no {_PEFT_WEIGHTS_FILE}")
    try:
        config = peft.LoraConfig.from_pretrained(str(path))
    except Exception as exc:
        raise AdapterError(
            f"objective {objective!r}: {path / _PEFT_CONFIG_FILE} is not a LoRA config ({exc}); only LoRA adapters "
            "are supported"
        ) from exc
    state = {k.removeprefix("base_model.model."): v for k, v in load_file(str(weights)).items()}
    return state, config


def load_transformer_lora(host: PeftHost, path: Path, adapter: str, objective: str) -> None:
    """Inject the LoRA at `path` (peft folder or diffusers-format safetensors) into the host's transformer as
    `adapter`. Shapes are checked against the transformer first, so an adapter trained for another base
    leaves it untouched; unexpected or missing LoRA weights remove the half-loaded adapter again."""
    peft = require("peft", "LoRA objectives")
    state, config = (
        _peft_lora(path, objective)
        if _classify(path) == "peft"
        else _diffusers_lora(_lora_file(path, objective), objective)
    )
    try:
        check_lora_shapes(host.module, state, objective, str(path))
    except AdapterError as exc:  # the shared check's hint names SD 1.5; say what fits here
        raise AdapterError(
            str(exc).replace("an SD 1.5 LoRA with an SD 1.5 checkpoint", "a LoRA of this PixArt transformer")
        ) from None
    config.inference_mode = True
    config.init_lora_weights = True  # layers the file has no weights for stay exact no-ops (lora_B = 0)
    try:
        host.add_adapter(config, adapter)
        result = peft.set_peft_model_state_dict(host.module, state, adapter_name=adapter)
    except AdapterError:
        raise
    except Exception as exc:
        host.delete_adapters(adapter)
        raise AdapterError(f"objective {objective!r}: loading the LoRA from {path} failed: {exc}") from exc
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if unexpected:
        host.delete_adapters(adapter)
        raise AdapterError(
            f"objective {objective!r}: {len(unexpected)} LoRA weights in {path} matched no layer (e.g. "
            f"{unexpected[0]!r}); the adapter does not fit this transformer"
        )


def _check_compatible(base: nn.Module, other: nn.Module, objective: str, source: str) -> None:
    if not hasattr(other, "config"):
        raise AdapterError(f"objective {objective!r} ({source}): a {type(other).__name__} has no diffusers config")
    for key in _ARCH_KEYS:
        mine, theirs = base.config.get(key), other.config.get(key)
        if mine != theirs:
            raise AdapterError(
                f"objective {objective!r} ({source}): the transformer has {key}={theirs!r} but the base has "
                f"{mine!r}, so it was trained for another base model; pass a fine-tune of this base"
            )


def load_full_transformer(base: nn.Module, path: Path, objective: str) -> nn.Module:
    """A full-transformer objective from a transformer folder (config.json + safetensors) or a pipeline
    folder's transformer/, loaded in the base's class, dtype and device."""
    diffusers = require("diffusers", "full-transformer objectives")
    folder = path / "transformer" if _classify(path) == "pipeline" else path
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


def resolve_transformer_source(
    base: nn.Module,
    name: str,
    source: Any,
    *,
    loaded: set[str] | Mapping[str, Any],
    load_lora: Callable[[Path, str], None],
    classify: Callable[[Path], str],
    check_compatible: Callable[[nn.Module, nn.Module, str, str], None],
    model_class: str,
) -> TransformerObjective:
    """One objective source as a TransformerObjective, for any transformer family: an nn.Module (a full
    transformer, checked against `base`), the name of an adapter in `loaded`, or a path (a transformer or
    pipeline folder: loaded in the base's dtype and checked; otherwise a LoRA: `load_lora(path, name)`)."""
    check_objective_name(name)
    if isinstance(source, nn.Module):
        if source is base:
            raise ObjectiveError(
                f"objective {name!r} is the base transformer itself; use method='base' or weight 'reference'"
            )
        check_compatible(base, source, name, "module")
        return TransformerObjective(name, "transformer", "module", transformer=source.eval())
    if isinstance(source, str) and source in loaded:
        return TransformerObjective(name, "lora", f"adapter:{source}", adapter=source)
    if not isinstance(source, str | Path):
        raise ObjectiveError(
            f"objective {name!r}: source {type(source).__name__} is not supported; pass a path, the name of an "
            f"adapter of the base transformer, or a {model_class}"
        )
    path = Path(source).expanduser()
    if not path.exists():
        raise ObjectiveError(
            f"objective {name!r}: {source!r} is neither an existing path nor an adapter of the base transformer "
            f"(adapters: {sorted(loaded)}); check the path"
        )
    if classify(path) in ("transformer", "pipeline"):
        model = load_full_transformer(base, path, name)
        check_compatible(base, model, name, str(path))
        return TransformerObjective(name, "transformer", str(path), transformer=model)
    if name in loaded:
        raise ObjectiveError(
            f"objective {name!r}: the base transformer already has an adapter named {name!r}; pass that name as the "
            "source to use it, or choose another objective name"
        )
    load_lora(path, name)
    return TransformerObjective(name, "lora", str(path), adapter=name)


def resolve_transformer_objective(host: PeftHost, name: str, source: Any) -> TransformerObjective:
    """A PixArt objective source (see `resolve_transformer_source`); LoRAs are injected through the host."""
    return resolve_transformer_source(
        host.module, name, source, loaded=_adapter_names(host.module),
        load_lora=lambda path, n: load_transformer_lora(host, path, n, n), classify=_classify,
        check_compatible=_check_compatible, model_class="PixArtTransformer2DModel",
    )  # fmt: skip


# ----- the pipeline ------------------------------------------------------------------------------------


def _check_base(base: Any) -> None:
    name = type(base).__name__
    if name not in PIXART_PIPELINES:
        hint = " (use msdda.pipelines.MSDDAPipeline for Stable Diffusion)" if "StableDiffusion" in name else ""
        raise PipelineError(
            f"{name} is not a PixArt pipeline; MSDDAPixArtPipeline takes a diffusers {' or '.join(PIXART_PIPELINES)}"
            + hint
        )
    for attr in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
        if getattr(base, attr, None) is None:
            raise PipelineError(f"{name} has no {attr!r}; pass a complete {name} as the base")


def learns_variance(transformer: nn.Module) -> bool:
    """Whether the transformer predicts a variance half (out_channels = 2 x in_channels)."""
    cfg = transformer.config
    return int(cfg.get("out_channels") or cfg.in_channels) == 2 * int(cfg.in_channels)


def pixart_scheduler(scheduler: Any, transformer: nn.Module, kind: str | Any | None) -> Any:
    """The pipeline's own scheduler, never the caller's object.

    kind "ddpm": a DDPMScheduler with the base scheduler's betas and timestep spacing, variance_type
      "learned_range" when the transformer predicts a variance (else "fixed_small") and clip_sample False
      (latents are not in [-1, 1]; PixArt was trained without clipping). "ddim": a DDIMScheduler (fixed
      variance), clip_sample False. None: a copy of the base's scheduler as it is (DDPM or DDIM). A scheduler
      object: a copy of it (its config as given).
    """
    diffusers = require("diffusers", "MSDDAPixArtPipeline")
    if kind is None:
        return type(scheduler).from_config(scheduler.config)
    if not isinstance(kind, str):
        return type(kind).from_config(kind.config)
    if kind == "ddpm":
        variance = "learned_range" if learns_variance(transformer) else "fixed_small"
        return diffusers.DDPMScheduler.from_config(scheduler.config, variance_type=variance, clip_sample=False)
    if kind == "ddim":
        return diffusers.DDIMScheduler.from_config(scheduler.config, clip_sample=False)
    raise PipelineError(f"scheduler={kind!r}; choose one of {SCHEDULERS}, a DDPM/DDIM scheduler object, or None")


def _aspect_bins(cls_name: str, sample_size: int) -> dict[str, list[float]] | None:
    from diffusers.pipelines.pixart_alpha import pipeline_pixart_alpha as alpha

    bins = {128: alpha.ASPECT_RATIO_1024_BIN, 64: alpha.ASPECT_RATIO_512_BIN, 32: alpha.ASPECT_RATIO_256_BIN}
    if cls_name == "PixArtSigmaPipeline":
        from diffusers.pipelines.pixart_alpha import pipeline_pixart_sigma as sigma

        bins[256] = sigma.ASPECT_RATIO_2048_BIN
    return bins.get(int(sample_size))


class TransformerPipelineMixin:
    """What the transformer pipelines (PixArt, FLUX) share: the context-manager and release guard, device moves,
    objective denoisers, the diffusers-style step callback and interrupt, and the hooks of the shared objective
    store (`msdda.pipelines.sd._ObjectiveStore`). A subclass sets `_denoiser_class` and has `base`,
    `transformer`, `switch`, `objectives` and `_released`."""

    _denoiser_class: type
    _full_kind = "transformer"  # Objective.kind of a full-model objective

    def _load_objectives(self, host: Any, objectives: Mapping[str, Any]) -> None:
        """Record the transformer's state (release() restores it), then add every objective, adapters left
        disabled; a failure releases what was added and re-raises."""
        self._restore_point = UNetRestorePoint(self.transformer)  # type: ignore[attr-defined]
        self._added_adapters: list[str] = []
        self._released = False
        self.transformer.eval()  # type: ignore[attr-defined]
        self.objectives: dict[str, TransformerObjective] = {}
        self.switch = AdapterSwitch(host)
        try:
            for name, source in objectives.items():
                self.add_objective(name, source)  # type: ignore[attr-defined]
        except BaseException:
            self.release()  # type: ignore[attr-defined]
            raise
        self.switch.refresh()
        self.switch.disable()

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()  # type: ignore[attr-defined]

    def _check_alive(self) -> None:
        if self._released:  # type: ignore[attr-defined]
            name = type(self).__name__
            raise PipelineError(
                f"this {name} was released (its adapters were removed); build a new one, e.g. {name}(base, objectives)"
            )

    def set_progress_bar_config(self, **kwargs: Any) -> None:
        self.base.set_progress_bar_config(**kwargs)  # type: ignore[attr-defined]

    def to(self, *args: Any, **kwargs: Any) -> Any:
        """Move the (shared) modules and every full-transformer objective."""
        self.base = self.base.to(*args, **kwargs)  # type: ignore[attr-defined]
        for obj in self.objectives.values():  # type: ignore[attr-defined]
            if obj.transformer is not None:
                obj.transformer.to(*args, **kwargs)
        return self

    @property
    def device(self) -> torch.device:
        return self.base._execution_device  # type: ignore[attr-defined]

    @property
    def objective_names(self) -> list[str]:
        return list(self.objectives)  # type: ignore[attr-defined]

    def denoiser(self, name: str | None) -> Any:
        """The Denoiser for objective `name` (None or "reference": the base transformer, adapters disabled)."""
        make, transformer, switch = self._denoiser_class, self.transformer, self.switch  # type: ignore[attr-defined]
        if name is None or name == REFERENCE:
            return make(transformer, name=REFERENCE, switch=switch)
        objectives = self.objectives  # type: ignore[attr-defined]
        if name not in objectives:
            raise ObjectiveError(
                f"unknown objective {name!r}; this pipeline has {sorted(objectives)} (and {REFERENCE!r})"
            )
        obj = objectives[name]
        if obj.kind == "lora":
            return make(transformer, name=name, adapter=obj.adapter, switch=switch)
        return make(obj.transformer, name=name)

    def _step_callback(self, callback: Callable[..., Any] | None) -> Callable[[StepContext, Tensor], Tensor] | None:
        """diffusers' callback_on_step_end(pipeline, i, t, {"latents": x}) -> dict as a sampler callback."""
        if callback is None:
            return None

        def on_step(ctx: StepContext, x: Tensor) -> Tensor:
            out = callback(self, ctx.index, torch.tensor(ctx.timestep), {"latents": x}) or {}
            new = out.get("latents", x)
            if not isinstance(new, Tensor) or new.shape != x.shape:
                raise PipelineError(f"callback_on_step_end returned latents of shape {getattr(new, 'shape', new)}")
            if self.interrupt:
                ctx.stop = True
            return new

        return on_step

    @property
    def interrupt(self) -> bool:
        """Set to True (e.g. from callback_on_step_end) to stop denoising after the current step."""
        return getattr(self, "_interrupt", False)

    @interrupt.setter
    def interrupt(self, value: bool) -> None:
        self._interrupt = bool(value)

    @property
    def _base_model(self) -> nn.Module:
        return self.transformer  # type: ignore[attr-defined]

    @staticmethod
    def _full_model(obj: Any) -> nn.Module:
        return obj.transformer

    def _model_denoiser(self, model: nn.Module, **kwargs: Any) -> Any:
        return self._denoiser_class(model, **kwargs)


class MSDDAPixArtPipeline(TransformerPipelineMixin):
    """Multi-objective PixArt-alpha / PixArt-Sigma: K objectives (LoRA adapters or full transformers) fused
    at every step, with each objective's own learned variance.

    base: a diffusers PixArtAlphaPipeline or PixArtSigmaPipeline. Its transformer is the reference model;
      LoRA objectives are injected into it as peft adapters named after the objectives.
    objectives: {name: source}; a source is a LoRA (a peft folder with adapter_config.json +
      adapter_model.safetensors, or a diffusers-format `.safetensors` file / folder), the name of an adapter
      already injected into base.transformer, a full transformer folder (or a pipeline folder's
      transformer/), or a transformer module. Pickled files are refused.
    scheduler: "ddpm" (default: DDPM kernels with each model's learned variance, see `pixart_scheduler`),
      "ddim", None (the base's scheduler as it is, which must be DDPM or DDIM; PixArt ships DPM-Solver,
      whose kernel is not implemented), or a DDPMScheduler / DDIMScheduler object.

    MSDDA differs from DB-MPA only where the objectives' variances differ. With a fixed-variance
    transformer (out_channels == in_channels), or a fixed-variance scheduler (DDIM, DDPM fixed_*), every
    kernel has the schedule's variance, so MSDDA with weights summing to 1 is the same sampler as DB-MPA;
    that is allowed, and the call's config records `learned_variance: False`.

    Sharing: the modules (transformer, VAE, text encoder, tokenizer) are the caller's (`to()` moves them
    too); the scheduler is the pipeline's own, the caller's is never touched. LoRA adapters are injected
    into the shared transformer, disabled outside the pipeline's own calls; `release()` (or leaving a
    `with` block) deletes them and restores the transformer's modules, state_dict keys, adapter states,
    requires_grad flags and train/eval mode exactly. A failed construction releases itself.
    """

    _denoiser_class = TransformerDenoiser

    def __init__(self, base: Any, objectives: Mapping[str, Any], *, scheduler: str | Any | None = "ddpm") -> None:
        require("diffusers", "MSDDAPixArtPipeline")
        require("peft", "MSDDAPixArtPipeline")
        _check_base(base)
        if not isinstance(objectives, Mapping):
            raise ObjectiveError(
                f"objectives must be a mapping name -> source, got {type(objectives).__name__}; e.g. "
                "{'aesthetic': 'loras/aesthetic', 'alignment': 'loras/alignment'}"
            )
        self._origin = base
        self.transformer: nn.Module = base.transformer
        own = pixart_scheduler(base.scheduler, self.transformer, scheduler)
        self.base = type(base)(
            tokenizer=base.tokenizer,
            text_encoder=base.text_encoder,
            vae=base.vae,
            transformer=base.transformer,
            scheduler=own,
        )
        self.base.set_progress_bar_config(**dict(getattr(base, "_progress_bar_config", {})))
        self._check_scheduler(0.0)  # an unusable scheduler fails here, not at the first call
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
    ) -> MSDDAPixArtPipeline:
        """Load the base PixArt pipeline from a local folder (safetensors only), then the objectives."""
        diffusers = require("diffusers", "MSDDAPixArtPipeline")
        path = Path(base).expanduser()
        index = path / "model_index.json"
        if not index.is_file():
            raise PipelineError(
                f"{path} is not a diffusers pipeline folder (no model_index.json); save one with "
                "pipe.save_pretrained(folder) or download it first"
            )
        cls_name = json.loads(index.read_text()).get("_class_name", "")
        if cls_name not in PIXART_PIPELINES:
            raise PipelineError(
                f"{path} holds a {cls_name or 'unknown'} pipeline; MSDDAPixArtPipeline supports {PIXART_PIPELINES}"
            )
        kwargs: dict[str, Any] = {"use_safetensors": True, "local_files_only": True, **dtype_kwargs(diffusers, dtype)}
        kwargs.update(base_kwargs)
        pipe = getattr(diffusers, cls_name).from_pretrained(str(path), **kwargs)
        if device is not None:
            pipe = pipe.to(device)
        return cls(pipe, objectives, scheduler=scheduler)

    def add_objective(self, name: str, source: Any) -> TransformerObjective:
        """Add one objective (see the class docstring for sources); its adapter is left disabled."""
        self._check_alive()
        if name in self.objectives:
            raise ObjectiveError(f"objective {name!r} already exists; choose another name")
        before = _adapter_names(self.transformer)
        try:
            obj = resolve_transformer_objective(self.host, name, source)
        finally:
            self._added_adapters += sorted(_adapter_names(self.transformer) - before)
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
            self.host.delete_adapters(adapter)
        self.host.delete_adapters(SOUP_ADAPTER)
        self._added_adapters = []
        self.objectives = {}
        self._restore_point.restore(self.transformer)
        self.switch.layers = []

    @property
    def learned_variance(self) -> bool:
        """True when the kernels carry each model's own variance (learned-sigma transformer, DDPM learned_*)."""
        cfg = self.base.scheduler.config
        learned = type(self.base.scheduler).__name__ == "DDPMScheduler" and cfg.variance_type in LEARNED_VARIANCE_TYPES
        return learned and learns_variance(self.transformer)

    # ----- checks ------------------------------------------------------------------------------------
    def _check_scheduler(self, eta: float) -> str:
        sch = self.base.scheduler
        try:
            ks = KernelScheduler.from_diffusers(sch)
        except UnsupportedSchedulerError as exc:
            raise UnsupportedSchedulerError(
                f"{exc}; or build the pipeline with scheduler='ddpm' (the default: DDPM with the learned variance)"
            ) from None
        kind = ks.config.kind
        if (
            kind == "ddpm"
            and ks.config.variance_type in LEARNED_VARIANCE_TYPES
            and not learns_variance(self.transformer)
        ):
            cfg = self.transformer.config
            raise PipelineError(
                f"the scheduler has variance_type={ks.config.variance_type!r} but the transformer predicts no variance "
                f"(out_channels={cfg.get('out_channels')}, in_channels={cfg.in_channels}); pass scheduler='ddpm' "
                "(fixed_small for such a transformer) or a fixed-variance scheduler"
            )
        as_kernel_scheduler(sch, eta=None if kind == "ddpm" and eta == 0.0 else eta)
        return kind

    def _check_batch(self, batch: int, generator: Any, latents: Any, height: int, width: int) -> None:
        if isinstance(generator, list | tuple) and len(generator) != batch:
            raise PipelineError(
                f"generator is a list of {len(generator)} generators but this call makes {batch} image(s); pass one "
                "generator per image, in the order prompt 0's images, then prompt 1's, ..."
            )
        if latents is None:
            return
        scale = self.base.vae_scale_factor
        shape = (batch, self.transformer.config.in_channels, height // scale, width // scale)
        if not isinstance(latents, Tensor) or tuple(latents.shape) != shape:
            got = tuple(latents.shape) if isinstance(latents, Tensor) else type(latents).__name__
            raise PipelineError(
                f"latents are {got}; this call needs a tensor of shape {shape} (prompts x num_images_per_prompt, "
                f"the transformer's in_channels, height/{scale}, width/{scale})"
            )

    def _check_plan(self, plan: MethodPlan, kind: str, eta: float) -> None:
        ref = next(self.transformer.parameters())
        for den in [*plan.models, *([plan.reference] if plan.uses_reference else [])]:
            p = next(den.unet.parameters())
            if p.device != ref.device or p.dtype != ref.dtype:
                raise PipelineError(
                    f"objective {den.name!r} is on {p.device}/{p.dtype} but the base transformer on "
                    f"{ref.device}/{ref.dtype}; call pipeline.to(...) to move both"
                )
        if isinstance(plan.rule, CoDe) and kind == "ddim" and eta == 0.0:
            raise PipelineError("CoDe with DDIM and eta=0 draws identical candidates; pass eta>0 or use DDPM")

    # ----- the call ----------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        weights: Mapping[str, float] | None = None,
        *,
        method: str = MSDDA.name,
        negative_prompt: str = "",
        prompt_embeds: Tensor | None = None,
        prompt_attention_mask: Tensor | None = None,
        negative_prompt_embeds: Tensor | None = None,
        negative_prompt_attention_mask: Tensor | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 4.5,
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
        clean_caption: bool = True,
        use_resolution_binning: bool = True,
        max_sequence_length: int | None = None,
        final_noise: bool = True,
        progress: bool | None = None,
        return_dict: bool = True,
    ) -> MSDDAPixArtPipelineOutput | tuple[Any]:
        """Generate images for `prompt` (or `prompt_embeds` + `prompt_attention_mask`) under `weights`.

        weights, method, betas, beta, rewards, reward_input, method_options: as MSDDAPipeline (methods:
          msdda, db-mpa, db-mpa-ls, rewarded-soup (LoRA: dW = sum_k w_k B_k A_k; full transformers: the
          parameter interpolation), code, rgg, single:<name>, base).
        guidance_scale: classifier-free guidance per objective, batched [negative; positive] as diffusers
          does (<= 1: off); the variance half comes from the conditional pass. negative_prompt: "" as
          diffusers' PixArt. clean_caption, use_resolution_binning, max_sequence_length (120 for alpha, 300
          for sigma): as diffusers' PixArt pipelines (binning needs a sample size with an aspect-ratio
          table, i.e. 256 / 512 / 1024 / 2048 px models; pass False otherwise).
        generator or seed: the only randomness (neither: seed 0); a list of B generators seeds image b's
          latents and step noise from generator b. eta: DDIM only. latents: initial noise [B, C, H/8, W/8].
        callback_on_step_end(pipeline, i, t, {"latents": x}) -> dict: may return new "latents"; setting
          `pipeline.interrupt = True` stops after that step.
        final_noise: the last step draws noise where diffusers' step() does (DDIM with eta > 0; DDPM when
          the last timestep is > 0); False returns the kernel mean there.
        Returns MSDDAPixArtPipelineOutput, or with return_dict=False the tuple (images,) as diffusers does.
        Raises before any denoising on bad names, weights, scheduler, shapes and generator lists.
        """
        self._check_alive()
        base = self.base
        cfg = self.transformer.config
        if output_type not in OUTPUT_TYPES:
            raise PipelineError(f"output_type={output_type!r}; choose one of {OUTPUT_TYPES}")
        for what, value in (
            ("num_inference_steps", num_inference_steps),
            ("num_images_per_prompt", num_images_per_prompt),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PipelineError(f"{what}={value!r}; it must be an integer >= 1")
        if (
            isinstance(guidance_scale, bool)
            or not isinstance(guidance_scale, int | float)
            or not math.isfinite(guidance_scale)
        ):
            raise PipelineError(f"guidance_scale={guidance_scale!r}; pass a finite number (<= 1 turns guidance off)")
        inputs = list(getattr(callback_on_step_end, "tensor_inputs", callback_on_step_end_tensor_inputs))
        bad = [k for k in inputs if k not in _CALLBACK_TENSOR_INPUTS]
        if bad:
            raise PipelineError(
                f"callback_on_step_end_tensor_inputs {bad} are not supported; the callback sees "
                f"{_CALLBACK_TENSOR_INPUTS}"
            )
        kind = self._check_scheduler(float(eta))
        try:
            generator = make_generator(generator, seed, "cpu")
        except MSDDAError as exc:
            raise PipelineError(str(exc)) from None
        height = height or cfg.sample_size * base.vae_scale_factor
        width = width or cfg.sample_size * base.vae_scale_factor
        orig_height, orig_width = height, width
        if use_resolution_binning:
            bins = _aspect_bins(type(base).__name__, cfg.sample_size)
            if bins is None:
                raise PipelineError(
                    f"use_resolution_binning needs a transformer of sample_size 32, 64, 128 (or 256 for Sigma); this "
                    f"one has {cfg.sample_size}; pass use_resolution_binning=False"
                )
            height, width = base.image_processor.classify_height_width_bin(height, width, ratios=bins)
        try:
            base.check_inputs(
                prompt,
                height,
                width,
                negative_prompt,
                1,
                prompt_embeds,
                negative_prompt_embeds,
                prompt_attention_mask,
                negative_prompt_attention_mask,
            )
        except ValueError as exc:
            if isinstance(exc, PipelineError):
                raise
            raise PipelineError(str(exc)) from exc
        n_prompts = 1 if isinstance(prompt, str) else len(prompt) if prompt is not None else int(prompt_embeds.shape[0])
        batch = n_prompts * num_images_per_prompt
        self._check_batch(batch, generator, latents, height, width)
        device = base._execution_device
        do_cfg = guidance_scale > 1.0
        prompts = None
        if prompt is not None:
            plist = [prompt] if isinstance(prompt, str) else list(prompt)
            prompts = [p for p in plist for _ in range(num_images_per_prompt)]
        if max_sequence_length is None:
            max_sequence_length = 300 if type(base).__name__ == "PixArtSigmaPipeline" else 120
        self.interrupt = False
        store = _ObjectiveStore(self, rewards or {}, reward_input, prompts)
        try:
            plan = plan_method(
                method, store, weights, beta=beta, betas=betas, options=method_options, skip_zero_weights=True
            )
            self._check_plan(plan, kind, float(eta))
            embeds, mask, neg_embeds, neg_mask = base.encode_prompt(
                prompt,
                do_cfg,
                negative_prompt=negative_prompt,
                num_images_per_prompt=num_images_per_prompt,
                device=device,
                prompt_embeds=prompt_embeds,
                negative_prompt_embeds=negative_prompt_embeds,
                prompt_attention_mask=prompt_attention_mask,
                negative_prompt_attention_mask=negative_prompt_attention_mask,
                clean_caption=clean_caption,
                max_sequence_length=max_sequence_length,
            )
            x_T = base.prepare_latents(batch, cfg.in_channels, height, width, embeds.dtype, device, generator, latents)
            resolution = aspect = None
            if getattr(self.transformer, "use_additional_conditions", False):
                # PixArt-alpha's micro-conditions, as diffusers builds them (it does so for sample_size 128)
                resolution = torch.tensor([height, width]).repeat(batch, 1).to(dtype=embeds.dtype, device=device)
                aspect = torch.tensor([float(height / width)]).repeat(batch, 1).to(dtype=embeds.dtype, device=device)
            cond = TextCondition(embeds, mask, resolution, aspect)
            models, reference = list(plan.models), plan.reference
            if do_cfg:
                null = TextCondition(neg_embeds, neg_mask, resolution, aspect)
                models = [_TextGuidance(m, guidance_scale, null) for m in models]
                reference = _TextGuidance(reference, guidance_scale, null) if reference is not None else None
            if progress is None:
                progress = not getattr(base, "_progress_bar_config", {}).get("disable", False)
            final_step = "mean"
            if final_noise and (kind == "ddim" or self._last_timestep(num_inference_steps) > 0):
                final_step = "sample"  # where diffusers' step() adds noise at the last step
            start = time.perf_counter()
            out = sample(
                models,
                base.scheduler,
                plan.rule,
                x_T=x_T,
                cond=cond,
                reference=reference,
                num_inference_steps=num_inference_steps,
                eta=float(eta) if kind == "ddim" else None,
                generator=generator,
                device=device,
                dtype=x_T.dtype,
                progress=progress,
                callback=self._step_callback(callback_on_step_end),
                noise=DiffusersNoise(),
                final_step=final_step,
            )
            if do_cfg:
                out.cost.model_evals *= 2  # every evaluation was a [negative; positive] pair
        finally:
            store.release()
            self.switch.disable()
        images = self._decode(out.samples, output_type, use_resolution_binning, orig_width, orig_height)
        free_hooks = getattr(self._origin, "maybe_free_model_hooks", None)
        if callable(free_hooks):
            free_hooks()
        config = {
            **plan.record,
            "weights": dict(weights) if weights is not None else None,
            "models": [m.name for m in plan.models],
            "objectives": {k: {"kind": o.kind, "source": o.source} for k, o in self.objectives.items()},
            "learned_variance": self.learned_variance,
            "num_inference_steps": num_inference_steps,
            "steps_run": out.steps_run,
            "interrupted": out.interrupted,
            "guidance_scale": guidance_scale,
            "eta": float(eta),
            "scheduler": type(base.scheduler).__name__,
            "variance_type": base.scheduler.config.get("variance_type") if kind == "ddpm" else None,
            "height": height,
            "width": width,
            "num_images": batch,
            "seed": seed,
            "seconds_total": time.perf_counter() - start,
        }
        logger.info("generated %d image(s) with %s in %.2fs (%s)", batch, method, out.seconds, out.cost)
        if not return_dict:
            return (images,)
        return MSDDAPixArtPipelineOutput(images=images, cost=out.cost, config=config)

    def _last_timestep(self, num_inference_steps: int) -> int:
        sch = copy.deepcopy(self.base.scheduler)
        sch.set_timesteps(num_inference_steps)
        return int(sch.timesteps[-1])

    @property
    def _adapter_host(self) -> Any:
        return self.host

    def _decode_latents(self, latents: Tensor) -> Tensor:
        """latents -> images in [-1, 1] by the VAE (differentiable; the rewards of CoDe / RGG see these)."""
        vae = self.base.vae
        return vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]

    def _decode(self, final: Tensor, output_type: str, binning: bool, width: int, height: int) -> Any:
        """The final latents as images, exactly as diffusers' PixArt pipelines decode them."""
        if output_type == "latent":
            return final
        vae = self.base.vae
        image = vae.decode(final.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
        if binning:
            image = self.base.image_processor.resize_and_crop_tensor(image, width, height)
        return self.base.image_processor.postprocess(image, output_type=output_type)
