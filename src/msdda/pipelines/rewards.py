"""Reward models for Stable Diffusion users (optional extras; need `transformers`).

* `AestheticScorer`: LAION-aesthetic style. CLIP image embedding, L2-normalised, through an MLP head ->
  one score per image. The head is read from a safetensors file with keys `layers.<i>.weight/bias`
  (the layout of LAION's improved-aesthetic-predictor MLP, whose Linear layers sit at indices 0, 2, 4,
  6, 7 with dropout in between and no activations; any such stack of Linear layers loads).
* `CLIPSimilarityScorer`: PickScore / CLIPScore style. scale * cos(text embedding, image embedding);
  scale = the model's learned `logit_scale.exp()` (PickScore's definition; a PickScore checkpoint is a
  CLIPModel) or a number you give (CLIPScore uses 100 with w = 2.5 and clips at 0; we do not clip).
  ImageReward (a BLIP backbone), PickScore, HPSv2 and one entry point for all five kinds are in
  msdda.pipelines.reward_models (`load_reward_model`).

Both are callables `scorer(images, prompts) -> Tensor [B]` on images [B, 3, H, W] in [0, 1] (the Reward
protocol of msdda.core.rewards, with the prompts as cond; errors are RewardModelError, a RewardError), fully
differentiable (the CLIP preprocessing is done in torch: bicubic resize of the short side, centre crop,
normalisation), so they serve MSDDAPipeline's "code" and "rgg" methods with reward_input="image".
Weights load only from local folders and safetensors files; pickled checkpoints are refused. To convert
LAION's `sac+logos+ava1-l14-linearMSE.pth` once (your decision to unpickle it):
`safetensors.torch.save_file(torch.load(path, weights_only=True), "aesthetic_head.safetensors")`.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from msdda.pipelines._deps import dtype_kwargs, require
from msdda.pipelines.errors import RewardModelError

logger = logging.getLogger(__name__)

# OpenAI CLIP's preprocessing constants (used when the model folder has no preprocessor_config.json).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_HEAD_FILE = "aesthetic_head.safetensors"
_HEAD_KEY = re.compile(r"^layers\.(\d+)\.(weight|bias)$")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def clip_preprocess(images: Tensor, size: int, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Differentiable CLIP preprocessing: images [B, 3, H, W] in [0, 1] -> pixel values [B, 3, size, size].

    The short side is resized to `size` (bicubic, antialiased; skipped when it already is), the centre
    crop taken, then (x - mean) / std per channel.
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise RewardModelError(f"images must be [B, 3, H, W] in [0, 1], got shape {list(images.shape)}")
    h, w = images.shape[-2:]
    if min(h, w) != size:
        scale = size / min(h, w)
        new_hw = (max(size, round(h * scale)), max(size, round(w * scale)))
        images = F.interpolate(images, size=new_hw, mode="bicubic", align_corners=False, antialias=True)
        h, w = new_hw
    top, left = (h - size) // 2, (w - size) // 2
    images = images[..., top : top + size, left : left + size]
    m = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images - m) / s


def _check_model_dir(model_dir: str | Path, what: str) -> Path:
    path = Path(model_dir).expanduser()
    if not path.is_dir():
        raise RewardModelError(f"{what}: {path} is not a folder; pass a local CLIP folder saved with save_pretrained")
    if not (path / "config.json").is_file():
        raise RewardModelError(f"{what}: {path} has no config.json; pass a CLIP folder saved with save_pretrained")
    if not any(path.glob("*.safetensors")):
        pickled = sorted(p.name for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        if pickled:
            raise RewardModelError(
                f"{what}: {path} holds only pickled weights {pickled}; msdda never unpickles files (it can run "
                "arbitrary code); re-save the model with save_pretrained(..., safe_serialization=True)"
            )
        raise RewardModelError(f"{what}: {path} has no *.safetensors weights (expected model.safetensors)")
    return path


def load_clip(model_dir: str | Path, *, device: str | torch.device | None = None, dtype: torch.dtype | None = None):
    """A transformers CLIPModel from a local folder (safetensors only), in eval mode, gradients off."""
    transformers = require("transformers", "CLIP-based rewards")
    path = _check_model_dir(model_dir, "CLIP model")
    kwargs: dict[str, Any] = {"use_safetensors": True, "local_files_only": True, **dtype_kwargs(transformers, dtype)}
    try:
        model = transformers.CLIPModel.from_pretrained(str(path), **kwargs)
    except Exception as exc:
        raise RewardModelError(f"CLIP model: could not load {path} as a CLIPModel: {exc}") from exc
    if device is not None:
        model = model.to(device)
    model.eval().requires_grad_(False)
    return model


def _preprocess_settings(model_dir: Path, model: Any) -> tuple[int, tuple[float, ...], tuple[float, ...]]:
    size = int(model.config.vision_config.image_size)
    mean, std = CLIP_MEAN, CLIP_STD
    cfg_file = model_dir / "preprocessor_config.json"
    if cfg_file.is_file():
        cfg = json.loads(cfg_file.read_text())
        crop = cfg.get("crop_size", size)
        size = int(crop["height"] if isinstance(crop, dict) else crop)
        mean = tuple(float(x) for x in cfg.get("image_mean", mean))
        std = tuple(float(x) for x in cfg.get("image_std", std))
    return size, mean, std


def image_embeddings(model: Any, pixel_values: Tensor) -> Tensor:
    """CLIP's projected image embedding [B, projection_dim] (not normalised), for transformers 4.x and 5.x."""
    pooled = model.vision_model(pixel_values=pixel_values.to(model.dtype)).pooler_output
    return model.visual_projection(pooled)


def text_embeddings(model: Any, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
    """CLIP's projected text embedding [B, projection_dim] (not normalised)."""
    pooled = model.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output
    return model.text_projection(pooled)


class AestheticHead(nn.Module):
    """A stack of Linear layers at indices `layers.<i>` (identity in the gaps, where LAION has dropout).

    Input: L2-normalised CLIP image embeddings [B, D]; output [B, 1]. `activation` ("relu", "gelu" or
    None, LAION's choice) is applied between Linear layers.
    """

    def __init__(self, linears: dict[int, nn.Linear], activation: str | None = None) -> None:
        super().__init__()
        if activation not in (None, "relu", "gelu"):
            raise RewardModelError(f"activation={activation!r}; choose None, 'relu' or 'gelu'")
        top = max(linears)
        modules: list[nn.Module] = [linears.get(i, nn.Identity()) for i in range(top + 1)]
        self.layers = nn.Sequential(*modules)
        self.activation = activation
        self._linear_at = sorted(linears)

    @property
    def in_features(self) -> int:
        return self.layers[self._linear_at[0]].in_features

    @classmethod
    def from_safetensors(cls, path: str | Path, activation: str | None = None) -> AestheticHead:
        """Build the head from a safetensors file with keys `layers.<i>.weight` [out, in] and `.bias` [out]."""
        from safetensors.torch import load_file

        file = Path(path).expanduser()
        if file.suffix in _PICKLE_SUFFIXES:
            raise RewardModelError(
                f"aesthetic head: {file} is pickled; msdda never unpickles files. Convert it once: "
                f"safetensors.torch.save_file(torch.load('{file.name}', weights_only=True), '{DEFAULT_HEAD_FILE}')"
            )
        if not file.is_file():
            raise RewardModelError(
                f"aesthetic head: weight file {file} not found; pass head_path= (a safetensors MLP head with keys "
                "layers.<i>.weight/bias)"
            )
        return cls.from_state_dict(load_file(str(file)), source=str(file), activation=activation)

    @classmethod
    def from_state_dict(
        cls, state: dict[str, Tensor], *, source: str = "state dict", activation: str | None = None
    ) -> AestheticHead:
        """Build the head from tensors `layers.<i>.weight` [out, in] and `layers.<i>.bias` [out] (eval, no grad).

        `source` names the file in error messages. ImageReward's head (`mlp.layers.*` of its checkpoint,
        prefix stripped) has this layout too.
        """
        file = source
        linears: dict[int, nn.Linear] = {}
        for key, value in state.items():
            m = _HEAD_KEY.match(key)
            if m is None:
                raise RewardModelError(
                    f"aesthetic head {file}: unexpected key {key!r}; expected layers.<i>.weight/bias"
                )
            if m[2] == "weight":
                if value.dim() != 2:
                    raise RewardModelError(f"aesthetic head {file}: {key} has shape {list(value.shape)}, expected 2-D")
                linears[int(m[1])] = nn.Linear(value.shape[1], value.shape[0], bias=f"layers.{m[1]}.bias" in state)
        if not linears:
            raise RewardModelError(f"aesthetic head {file}: no layers.<i>.weight keys found")
        order = sorted(linears)
        for a, b in zip(order, order[1:], strict=False):
            if linears[a].out_features != linears[b].in_features:
                raise RewardModelError(
                    f"aesthetic head {file}: layer {a} outputs {linears[a].out_features} features but layer {b} "
                    f"takes {linears[b].in_features}"
                )
        if linears[order[-1]].out_features != 1:
            last = linears[order[-1]].out_features
            raise RewardModelError(f"aesthetic head {file}: the last layer must output 1 score, not {last}")
        head = cls(linears, activation)
        head.load_state_dict(state)
        return head.eval().requires_grad_(False)

    def forward(self, embeddings: Tensor) -> Tensor:
        x = embeddings
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if self.activation is not None and isinstance(layer, nn.Linear) and i != self._linear_at[-1]:
                x = F.relu(x) if self.activation == "relu" else F.gelu(x)
        return x


class AestheticScorer(nn.Module):
    """LAION-aesthetic style score: head(normalise(CLIP image embedding)) -> [B] (higher is better).

    __call__(images [B, 3, H, W] in [0, 1], prompts=None) -> Tensor [B] (float32). Prompts are ignored.
    """

    name = "aesthetic"
    differentiable = True

    def __init__(self, clip: Any, head: AestheticHead, size: int, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        dim = int(clip.config.projection_dim)
        if head.in_features != dim:
            raise RewardModelError(
                f"aesthetic head takes {head.in_features}-dim embeddings but the CLIP model projects to {dim}; use "
                "the CLIP model the head was trained on (LAION's v2 head: CLIP ViT-L/14, 768)"
            )
        self.clip = clip
        self.head = head.to(device=next(clip.parameters()).device)
        self.size, self.mean, self.std = size, tuple(mean), tuple(std)

    @classmethod
    def from_pretrained(
        cls,
        clip_dir: str | Path,
        head_path: str | Path | None = None,
        *,
        activation: str | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> AestheticScorer:
        """CLIP from `clip_dir` (local, safetensors) and the MLP head from `head_path`
        (default: `clip_dir/aesthetic_head.safetensors`)."""
        clip = load_clip(clip_dir, device=device, dtype=dtype)
        path = Path(clip_dir).expanduser()
        head = AestheticHead.from_safetensors(head_path or path / DEFAULT_HEAD_FILE, activation=activation)
        size, mean, std = _preprocess_settings(path, clip)
        return cls(clip, head, size, mean, std)

    def forward(self, images: Tensor, prompts: Sequence[str] | None = None) -> Tensor:
        pixels = clip_preprocess(images.float(), self.size, self.mean, self.std)
        emb = image_embeddings(self.clip, pixels).float()
        emb = emb / emb.norm(dim=-1, keepdim=True)
        return self.head.to(emb.dtype)(emb).squeeze(-1)


class CLIPSimilarityScorer(nn.Module):
    """PickScore / CLIPScore style: scale * cos(text embedding, image embedding) -> [B].

    __call__(images [B, 3, H, W] in [0, 1], prompts: B strings) -> Tensor [B] (float32).
    scale: None uses the model's logit_scale.exp() (PickScore), or a fixed number.
    """

    name = "clip_similarity"
    differentiable = True

    def __init__(
        self,
        clip: Any,
        tokenizer: Any,
        size: int,
        mean: Sequence[float],
        std: Sequence[float],
        scale: float | None = None,
    ) -> None:
        super().__init__()
        self.clip = clip
        self.tokenizer = tokenizer
        self.size, self.mean, self.std = size, tuple(mean), tuple(std)
        self.scale = scale
        self.max_length = min(
            int(getattr(tokenizer, "model_max_length", 77) or 77), int(clip.config.text_config.max_position_embeddings)
        )

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        *,
        tokenizer_dir: str | Path | None = None,
        scale: float | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> CLIPSimilarityScorer:
        """CLIPModel from `model_dir`, tokenizer from `tokenizer_dir` (default: the same folder)."""
        transformers = require("transformers", "CLIP-based rewards")
        clip = load_clip(model_dir, device=device, dtype=dtype)
        tok_dir = Path(tokenizer_dir or model_dir).expanduser()
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
        except Exception as exc:
            raise RewardModelError(
                f"CLIP similarity: no usable tokenizer in {tok_dir} ({exc}); pass tokenizer_dir= (a folder written "
                "by CLIPTokenizer.save_pretrained, with tokenizer.json or vocab.json + merges.txt)"
            ) from exc
        size, mean, std = _preprocess_settings(Path(model_dir).expanduser(), clip)
        return cls(clip, tokenizer, size, mean, std, scale=scale)

    def forward(self, images: Tensor, prompts: Sequence[str] | None) -> Tensor:
        if prompts is None or isinstance(prompts, str) or len(prompts) != images.shape[0]:
            got = None if prompts is None else (1 if isinstance(prompts, str) else len(prompts))
            raise RewardModelError(
                f"CLIP similarity needs one prompt per image ({images.shape[0]}), got {got}; pass prompt= (text), "
                "not prompt_embeds, to the pipeline"
            )
        device = next(self.clip.parameters()).device
        tokens = self.tokenizer(
            list(prompts), padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        )
        text = text_embeddings(self.clip, tokens["input_ids"].to(device), tokens.get("attention_mask").to(device))
        pixels = clip_preprocess(images.float(), self.size, self.mean, self.std)
        img = image_embeddings(self.clip, pixels).float()
        text = text.float()
        cos = (img / img.norm(dim=-1, keepdim=True) * (text / text.norm(dim=-1, keepdim=True))).sum(-1)
        scale = self.clip.logit_scale.exp().float() if self.scale is None else float(self.scale)
        return scale * cos


class JPEGSize:
    """DDPO's weight-free rewards: each image's JPEG file size in kB (quality 95, PIL), negated for
    compressibility (smaller files score higher) or kept for incompressibility.

    `scorer(images [B, 3, H, W] in [0, 1], prompts=None) -> Tensor [B]` (float32, on the images' device).
    The size of an encoded file has no gradient: `differentiable = False`, so RGG refuses it and the step
    trainers use their score-function estimator. Images are rounded to uint8 as a saved PNG would be.
    """

    differentiable = False

    def __init__(self, sign: float, name: str, quality: int = 95) -> None:
        if not (isinstance(quality, int) and 1 <= quality <= 100):
            raise RewardModelError(f"JPEG quality={quality!r}; pass an integer in 1..100 (DDPO uses 95)")
        self.sign = float(sign)
        self.name = name
        self.quality = quality

    def __call__(self, images: Tensor, prompts: Any = None) -> Tensor:
        import io

        from PIL import Image

        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise RewardModelError(
                f"{self.name}: images must be [B, 3, H, W] (or [B, 1, H, W]) in [0, 1], got {list(images.shape)}"
            )
        if not torch.isfinite(images).all():
            raise RewardModelError(f"{self.name}: images contain NaN or infinite values")
        pixels = (images.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        sizes = []
        for array in pixels:
            buf = io.BytesIO()
            image = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
            image.save(buf, format="JPEG", quality=self.quality)
            sizes.append(buf.tell() / 1000.0)
        return self.sign * torch.tensor(sizes, dtype=torch.float32, device=images.device)

    def __repr__(self) -> str:
        return f"JPEGSize({self.name!r}, quality={self.quality})"


def jpeg_compressibility(quality: int = 95) -> JPEGSize:
    """Minus the JPEG size in kB (DDPO's compressibility reward): flat, simple images score higher."""
    return JPEGSize(-1.0, "jpeg-compressibility", quality)


def jpeg_incompressibility(quality: int = 95) -> JPEGSize:
    """The JPEG size in kB (DDPO's incompressibility reward): detailed, textured images score higher."""
    return JPEGSize(1.0, "jpeg-incompressibility", quality)


def brightness(images: Tensor, prompts: Any = None) -> Tensor:
    """Mean pixel value of each image [B, 3, H, W] in [0, 1] -> [B] in [0, 1]: a weight-free, differentiable
    reward (RGG's gradient flows through it), for smoke tests and demos of the reward-guided methods."""
    if images.dim() != 4:
        raise RewardModelError(f"brightness: images must be [B, 3, H, W] in [0, 1], got {list(images.shape)}")
    return images.mean(dim=(1, 2, 3))
