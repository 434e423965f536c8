"""The reward models people use for text-to-image alignment, loaded from local files (need `transformers`).

Five kinds, one entry point, `load_reward_model(kind, path, **opts)`:

* "imagereward" - ImageReward (Xu et al. 2023): BLIP ViT image tokens, BLIP's BERT run on the prompt with
  cross-attention to them, the first token's feature through an MLP 768-1024-128-64-16-1 (no activations),
  then (r - 0.16717362830052426) / 1.0333394966054072. Built on transformers' BlipVisionModel and
  BlipTextModel; the released checkpoint (`ImageReward.pt`) is renamed key by key (IMAGEREWARD_KEY_MAP).
* "pickscore" - PickScore (Kirstain et al. 2023): a transformers CLIPModel, logit_scale.exp() * cos.
* "hpsv2" - HPSv2 / HPSv2.1 (Wu et al. 2023): an open_clip ViT-H-14, 100 * cos (the scale of the HPSv2
  benchmark tables; hpsv2.score() itself returns the plain cos). The open_clip state dict is mapped onto a
  transformers CLIPModel (OPEN_CLIP_KEY_MAP), which computes the same function, so open_clip is not needed.
* "aesthetic" - LAION's aesthetic head on CLIP image embeddings (msdda.pipelines.rewards.AestheticScorer).
* "clip-score" - CLIPScore: 100 * cos of a CLIP model (CLIPSimilarityScorer with scale=100; not clipped at 0).

Every scorer is a callable `scorer(images [B, 3, H, W] in [0, 1], prompts: B strings) -> Tensor [B]`
(float32), differentiable with respect to the images (preprocessing in torch: bicubic resize of the short
side, centre crop, normalisation), with its weights frozen; misuse raises RewardModelError.
Weights load from safetensors. A pickled checkpoint (.pt/.pth/.bin/.ckpt) loads only with
`allow_pickle=True`, because unpickling can run arbitrary code; `convert_to_safetensors` converts one once.
See docs/reward_models.md.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from msdda.pipelines._deps import REWARDS_EXTRA, require
from msdda.pipelines.errors import RewardModelError
from msdda.pipelines.rewards import (
    _PICKLE_SUFFIXES,
    CLIP_MEAN,
    CLIP_STD,
    AestheticHead,
    AestheticScorer,
    CLIPSimilarityScorer,
    _preprocess_settings,
    clip_preprocess,
)

logger = logging.getLogger(__name__)

IMAGEREWARD_MEAN = 0.16717362830052426
IMAGEREWARD_STD = 1.0333394966054072
IMAGEREWARD_MAX_LENGTH = 35  # the published scorer pads/truncates prompts to 35 BERT tokens
IMAGEREWARD_FILES = ("ImageReward.safetensors", "ImageReward.pt")
HPS_FILES = (
    "HPS_v2.1_compressed.safetensors",
    "HPS_v2_compressed.safetensors",
    "HPS_v2.1_compressed.pt",
    "HPS_v2_compressed.pt",
)
HPS_SCALE = 100.0

# BLIP's ViT (blip.visual_encoder.*, timm naming) -> transformers' BlipVisionModel. Text keys need no
# renaming: transformers' BlipTextModel keeps the names of BLIP's med.py BertModel (blip.text_encoder.*).
IMAGEREWARD_KEY_MAP: tuple[tuple[str, str], ...] = (
    (r"^blip\.visual_encoder\.cls_token$", r"vision.embeddings.class_embedding"),
    (r"^blip\.visual_encoder\.pos_embed$", r"vision.embeddings.position_embedding"),
    (r"^blip\.visual_encoder\.patch_embed\.proj\.(weight|bias)$", r"vision.embeddings.patch_embedding.\1"),
    (r"^blip\.visual_encoder\.blocks\.(\d+)\.norm1\.", r"vision.encoder.layers.\1.layer_norm1."),
    (r"^blip\.visual_encoder\.blocks\.(\d+)\.norm2\.", r"vision.encoder.layers.\1.layer_norm2."),
    (r"^blip\.visual_encoder\.blocks\.(\d+)\.attn\.qkv\.", r"vision.encoder.layers.\1.self_attn.qkv."),
    (r"^blip\.visual_encoder\.blocks\.(\d+)\.attn\.proj\.", r"vision.encoder.layers.\1.self_attn.projection."),
    (r"^blip\.visual_encoder\.blocks\.(\d+)\.mlp\.(fc1|fc2)\.", r"vision.encoder.layers.\1.mlp.\2."),
    (r"^blip\.visual_encoder\.norm\.", r"vision.post_layernorm."),
    (r"^blip\.text_encoder\.embeddings\.position_ids$", r""),  # a buffer (arange), rebuilt by transformers
    (r"^blip\.text_encoder\.", r"text."),
    (r"^mlp\.layers\.", r"head.layers."),
    # BLIP's contrastive projections: in the checkpoint, not used by the ImageReward score.
    (r"^blip\.(vision_proj|text_proj)\..*$", r""),
)

# open_clip's CLIP (visual.*, transformer.*, ...) -> transformers' CLIPModel. Tensors marked "split" are the
# fused attention input projection [3D, D] (or [3D]), cut into q, k, v; "T" are projections stored [in, out].
OPEN_CLIP_KEY_MAP: tuple[tuple[str, str], ...] = (
    (r"^visual\.class_embedding$", r"vision_model.embeddings.class_embedding"),
    (r"^visual\.positional_embedding$", r"vision_model.embeddings.position_embedding.weight"),
    (r"^visual\.conv1\.weight$", r"vision_model.embeddings.patch_embedding.weight"),
    (r"^visual\.ln_pre\.", r"vision_model.pre_layrnorm."),  # sic: transformers' spelling
    (r"^visual\.ln_post\.", r"vision_model.post_layernorm."),
    (r"^visual\.proj$", r"visual_projection.weight|T"),
    (r"^visual\.transformer\.resblocks\.(\d+)\.", r"vision_model.encoder.layers.\1.|block"),
    (r"^token_embedding\.weight$", r"text_model.embeddings.token_embedding.weight"),
    (r"^positional_embedding$", r"text_model.embeddings.position_embedding.weight"),
    (r"^transformer\.resblocks\.(\d+)\.", r"text_model.encoder.layers.\1.|block"),
    (r"^ln_final\.", r"text_model.final_layer_norm."),
    (r"^text_projection$", r"text_projection.weight|T"),
    (r"^logit_scale$", r"logit_scale"),
    (r"^attn_mask$", r""),  # the causal mask buffer of older open_clip versions
)
# Inside one residual block (the part after resblocks.<i>.).
OPEN_CLIP_BLOCK_MAP: tuple[tuple[str, str], ...] = (
    (r"^ln_1\.", r"layer_norm1."),
    (r"^ln_2\.", r"layer_norm2."),
    (r"^attn\.in_proj_(weight|bias)$", r"self_attn.{q,k,v}_proj.\1|split"),
    (r"^attn\.out_proj\.", r"self_attn.out_proj."),
    (r"^mlp\.c_fc\.", r"mlp.fc1."),
    (r"^mlp\.c_proj\.", r"mlp.fc2."),
)

# Published head counts (not recoverable from tensor shapes). BLIP: ViT-B 12, ViT-L 16; BERT-base 12.
_BLIP_VISION_HEADS = {768: 12, 1024: 16}
_OPEN_CLIP_ARCHS = {
    "ViT-H-14": {"vision_heads": 16, "text_heads": 16},  # HPSv2 and HPSv2.1
    "ViT-L-14": {"vision_heads": 16, "text_heads": 12},
}


# ----- files -------------------------------------------------------------------------------------------------


def conversion_command(src: str | Path, dst: str | Path) -> str:
    """The one-line shell command that converts the pickled checkpoint `src` to safetensors `dst` once."""
    return (
        "python -c \"from msdda.pipelines.reward_models import convert_to_safetensors; "
        f"convert_to_safetensors('{src}', '{dst}')\""
    )


def _pickle_refusal(what: str, file: Path) -> RewardModelError:
    dst = file.with_suffix(".safetensors")
    return RewardModelError(
        f"{what}: {file} is a pickle; unpickling a file can run arbitrary code, so msdda loads it only when you "
        f"pass allow_pickle=True (do that only for a file you trust). Or convert it once and load the "
        f"safetensors file without the flag: {conversion_command(file, dst.name)}"
    )


def load_state_dict(path: str | Path, *, allow_pickle: bool = False, what: str = "checkpoint") -> dict[str, Tensor]:
    """Tensors of a checkpoint: safetensors always; a pickle only with allow_pickle=True.

    A pickle is read with torch.load(weights_only=True) (tensors and plain containers only). A
    `{"state_dict": ...}` wrapper (HPSv2's layout) is unwrapped and a DataParallel `module.` prefix stripped.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise RewardModelError(f"{what}: weight file {file} not found")
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        state: Any = load_file(str(file))
    elif file.suffix in _PICKLE_SUFFIXES:
        if not allow_pickle:
            raise _pickle_refusal(what, file)
        try:
            state = torch.load(str(file), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise RewardModelError(
                f"{what}: {file} holds more than tensors and plain containers, so even the restricted unpickler "
                f"refuses it ({exc}); convert it in an environment you trust with torch.load(weights_only=False)"
            ) from exc
    else:
        raise RewardModelError(f"{what}: {file} is neither .safetensors nor a torch pickle {_PICKLE_SUFFIXES}")
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise RewardModelError(f"{what}: {file} is not a state dict (name -> tensor)")
    tensors = {k: v for k, v in state.items() if isinstance(v, Tensor)}
    if tensors and all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module.") :]: v for k, v in tensors.items()}
    if not tensors:
        raise RewardModelError(f"{what}: {file} holds no tensors")
    return tensors


def convert_to_safetensors(src: str | Path, dst: str | Path) -> Path:
    """Convert a pickled checkpoint (bare or `{"state_dict": ...}`) to a safetensors file, once.

    Calling this is the decision to unpickle `src` (with torch.load(weights_only=True)). Written to a
    temporary file beside `dst`, then renamed. Returns `dst`.
    """
    from safetensors.torch import save_file

    state = load_state_dict(src, allow_pickle=True, what="convert_to_safetensors")
    out = Path(dst).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        save_file({k: v.contiguous().clone() for k, v in state.items()}, tmp)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _find_weights(path: str | Path, names: Sequence[str], what: str) -> Path:
    """`path` itself if a file, else the first of `names` in the folder, else any one *.safetensors there."""
    p = Path(path).expanduser()
    if p.is_file():
        return p
    if not p.is_dir():
        raise RewardModelError(f"{what}: {p} is neither a weight file nor a folder")
    for name in names:
        if (p / name).is_file():
            return p / name
    found = sorted(p.glob("*.safetensors"))
    if len(found) == 1:
        return found[0]
    raise RewardModelError(
        f"{what}: no weights in {p}; expected one of {list(names)} (or pass the file itself)"
        + (f"; found several safetensors files {[f.name for f in found]}" if found else "")
    )


def _tokenizer(folder: Path, what: str, kind: str) -> Any:
    transformers = require("transformers", what, REWARDS_EXTRA)
    try:
        return transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:
        raise RewardModelError(
            f"{what}: no usable tokenizer in {folder} ({exc}); pass tokenizer_dir= (a folder written by "
            f"{kind}.save_pretrained)"
        ) from exc


def _rename(key: str, table: Sequence[tuple[str, str]]) -> str | None:
    for pattern, repl in table:
        if re.match(pattern, key):
            return re.sub(pattern, repl, key)
    return None


def _materialise(cls: Callable[..., nn.Module], state: dict[str, Tensor], what: str, **kwargs: Any) -> nn.Module:
    """Build `cls(**kwargs)` without random initialisation and load `state` into it (all keys, exact shapes)."""
    with torch.device("meta"):
        model = cls(**kwargs)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise RewardModelError(
            f"{what}: the checkpoint does not fit the architecture read from it; missing {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}"
        )
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise RewardModelError(f"{what}: the checkpoint's shapes do not fit: {exc}") from exc
    for name, buf in list(model.named_buffers()):
        if buf.is_meta:  # non-persistent buffers: transformers' position_ids only
            if not name.endswith("position_ids"):
                raise RewardModelError(f"{what}: buffer {name} is not in the checkpoint")
            owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            owner.register_buffer("position_ids", torch.arange(buf.shape[-1]).expand(buf.shape), persistent=False)
    return model.eval().requires_grad_(False)


def _count(prefix: str, keys: Sequence[str]) -> int:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m[1]) for k in keys if (m := pat.match(k))}
    return max(found) + 1 if found else 0


def _need(state: dict[str, Tensor], key: str, what: str) -> Tensor:
    if key not in state:
        raise RewardModelError(f"{what}: the checkpoint has no {key!r}; is it the right file?")
    return state[key]


def _prompts(prompts: Sequence[str] | None, n: int, what: str) -> list[str]:
    if prompts is None or isinstance(prompts, str) or len(prompts) != n:
        got = None if prompts is None else (1 if isinstance(prompts, str) else len(prompts))
        raise RewardModelError(
            f"{what} needs one prompt per image ({n}), got {got}; pass prompt= (text), not prompt_embeds, to the "
            "pipeline"
        )
    return list(prompts)


# ----- ImageReward -------------------------------------------------------------------------------------------


def map_imagereward_state_dict(state: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """Released ImageReward keys -> {"vision": BlipVisionModel keys, "text": BlipTextModel keys, "head": ...}.

    Keys the score does not use (BLIP's vision_proj/text_proj, position_ids) are dropped; any other unknown
    key is logged and dropped (the published loader uses strict=False too); missing ones fail at loading.
    """
    parts: dict[str, dict[str, Tensor]] = {"vision": {}, "text": {}, "head": {}}
    unknown = []
    for key, value in state.items():
        new = _rename(key, IMAGEREWARD_KEY_MAP)
        if new is None:
            unknown.append(key)
        elif new:
            part, rest = new.split(".", 1)
            parts[part][rest] = value
    if unknown:
        logger.warning("ImageReward: ignoring %d keys the score does not use: %s", len(unknown), unknown[:10])
    return parts


def _blip_configs(
    parts: dict[str, dict[str, Tensor]], med_config: dict[str, Any], vision_heads: int | None, text_heads: int | None
) -> tuple[Any, Any]:
    from transformers.models.blip import BlipTextConfig, BlipVisionConfig

    what = "ImageReward"
    v, t = parts["vision"], parts["text"]
    width = int(_need(v, "embeddings.class_embedding", what).shape[-1])
    patch = int(_need(v, "embeddings.patch_embedding.weight", what).shape[-1])
    n_pos = int(_need(v, "embeddings.position_embedding", what).shape[1]) - 1
    grid = round(n_pos**0.5)
    if grid * grid != n_pos:
        raise RewardModelError(f"{what}: pos_embed has {n_pos} patch positions, not a square grid")
    heads = vision_heads or _BLIP_VISION_HEADS.get(width)
    if heads is None:
        raise RewardModelError(f"{what}: a {width}-wide BLIP ViT has no published head count; pass vision_heads=")
    vision = BlipVisionConfig(
        hidden_size=width,
        intermediate_size=int(_need(v, "encoder.layers.0.mlp.fc1.weight", what).shape[0]),
        num_hidden_layers=_count("encoder.layers.", list(v)),
        num_attention_heads=int(heads),
        image_size=grid * patch,
        patch_size=patch,
        hidden_act="gelu",
        layer_norm_eps=1e-6,  # BLIP's ViT (timm) uses 1e-6
    )
    vocab, hidden = _need(t, "embeddings.word_embeddings.weight", what).shape
    text = BlipTextConfig(
        vocab_size=int(vocab),
        hidden_size=int(hidden),
        encoder_hidden_size=int(_need(t, "encoder.layer.0.crossattention.self.key.weight", what).shape[1]),
        intermediate_size=int(_need(t, "encoder.layer.0.intermediate.dense.weight", what).shape[0]),
        num_hidden_layers=_count("encoder.layer.", list(t)),
        num_attention_heads=int(text_heads or med_config.get("num_attention_heads", 12)),
        max_position_embeddings=int(_need(t, "embeddings.position_embeddings.weight", what).shape[0]),
        hidden_act=med_config.get("hidden_act", "gelu"),
        layer_norm_eps=float(med_config.get("layer_norm_eps", 1e-12)),
        pad_token_id=int(med_config.get("pad_token_id", 0)),
        bos_token_id=None,
        eos_token_id=None,
        sep_token_id=None,
        is_decoder=True,  # builds the cross-attention layers; the forward runs bidirectionally (is_decoder=False)
    )
    return vision, text


class ImageRewardScorer(nn.Module):
    """ImageReward: (MLP(BERT_xattn(prompt, BLIP-ViT(image))[:, 0]) - mean) / std -> [B] (higher is better).

    __call__(images [B, 3, H, W] in [0, 1], prompts: B strings) -> Tensor [B] (float32).
    """

    name = "imagereward"
    differentiable = True

    def __init__(
        self,
        vision: nn.Module,
        text: nn.Module,
        head: AestheticHead,
        tokenizer: Any,
        *,
        size: int,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
        max_length: int = IMAGEREWARD_MAX_LENGTH,
    ) -> None:
        super().__init__()
        if head.in_features != text.config.hidden_size:
            raise RewardModelError(
                f"ImageReward: the head takes {head.in_features} features but the text encoder gives "
                f"{text.config.hidden_size}"
            )
        self.vision, self.text, self.head, self.tokenizer = vision, text, head, tokenizer
        self.size, self.mean, self.std = size, tuple(mean), tuple(std)
        self.max_length = min(max_length, int(text.config.max_position_embeddings))

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        tokenizer_dir: str | Path | None = None,
        allow_pickle: bool = False,
        vision_heads: int | None = None,
        text_heads: int | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> ImageRewardScorer:
        """Load the released checkpoint: `path` is the weight file or a folder with ImageReward.safetensors
        (or ImageReward.pt, with allow_pickle=True), optionally med_config.json (BLIP's BERT config; head
        count) and a BERT tokenizer (bert-base-uncased, saved with save_pretrained; or pass tokenizer_dir=).

        Architecture sizes are read from the tensors; head counts from med_config.json / the published ones
        (ViT-L: 16, BERT: 12) unless vision_heads= / text_heads= are given.
        """
        require("transformers", "ImageReward", REWARDS_EXTRA)
        from transformers.models.blip import BlipTextModel, BlipVisionModel

        file = _find_weights(path, IMAGEREWARD_FILES, "ImageReward")
        folder = file.parent
        med_file = folder / "med_config.json"
        med = json.loads(med_file.read_text()) if med_file.is_file() else {}
        parts = map_imagereward_state_dict(load_state_dict(file, allow_pickle=allow_pickle, what="ImageReward"))
        vision_cfg, text_cfg = _blip_configs(parts, med, vision_heads, text_heads)
        vision = _materialise(BlipVisionModel, parts["vision"], "ImageReward vision encoder", config=vision_cfg)
        text = _materialise(
            BlipTextModel, parts["text"], "ImageReward text encoder", config=text_cfg, add_pooling_layer=False
        )
        if not parts["head"]:
            raise RewardModelError(f"ImageReward: {file} has no mlp.layers.* (the reward head)")
        head = AestheticHead.from_state_dict(parts["head"], source=f"ImageReward head in {file}")
        tokenizer = _tokenizer(Path(tokenizer_dir or folder).expanduser(), "ImageReward", "BertTokenizer")
        scorer = cls(vision, text, head, tokenizer, size=int(vision_cfg.image_size))
        return scorer.to(device=device, dtype=dtype) if (device or dtype) else scorer

    def forward(self, images: Tensor, prompts: Sequence[str] | None) -> Tensor:
        texts = _prompts(prompts, images.shape[0], "ImageReward")
        param = next(self.vision.parameters())
        tokens = self.tokenizer(
            texts, padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        )
        pixels = clip_preprocess(images.float(), self.size, self.mean, self.std).to(param.dtype)
        image_embeds = self.vision(pixel_values=pixels).last_hidden_state
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        out = self.text(
            input_ids=tokens["input_ids"].to(param.device),
            attention_mask=tokens["attention_mask"].to(param.device),
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_atts,
        )
        features = out.last_hidden_state[:, 0, :].float()
        rewards = self.head.float()(features).squeeze(-1)
        return (rewards - IMAGEREWARD_MEAN) / IMAGEREWARD_STD


# ----- PickScore ---------------------------------------------------------------------------------------------


def pickscore(
    model_dir: str | Path,
    *,
    processor_dir: str | Path | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> CLIPSimilarityScorer:
    """PickScore: logit_scale.exp() * cos(text, image) of the CLIPModel in `model_dir` (the released
    yuvalkirstain/PickScore_v1 folder, safetensors weights).

    PickScore uses the processor of laion/CLIP-ViT-H-14-laion2B-s32B-b79K: its tokenizer and
    preprocessor_config.json (crop 224, OpenAI mean/std) are read from `processor_dir` (default: `model_dir`).
    Without a preprocessor_config.json the model's image size and OpenAI CLIP's mean/std are used.
    """
    proc = Path(processor_dir or model_dir).expanduser()
    scorer = CLIPSimilarityScorer.from_pretrained(model_dir, tokenizer_dir=proc, scale=None, device=device, dtype=dtype)
    if (proc / "preprocessor_config.json").is_file():
        scorer.size, scorer.mean, scorer.std = _preprocess_settings(proc, scorer.clip)
    scorer.name = "pickscore"
    return scorer


# ----- HPSv2 -------------------------------------------------------------------------------------------------


def map_open_clip_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """An open_clip CLIP state dict (HPSv2's layout) -> transformers CLIPModel keys (same function).

    Fails on keys outside OPEN_CLIP_KEY_MAP (e.g. LayerScale or attention-pooler variants, which a
    CLIPModel cannot represent).
    """
    out: dict[str, Tensor] = {}
    unknown = []
    for key, value in state.items():
        new = _rename(key, OPEN_CLIP_KEY_MAP)
        if new is None:
            unknown.append(key)
            continue
        if not new:
            continue
        if "|block" in new:  # "<prefix>|block<rest of the key>": rename the rest with the block table
            prefix, rest = new.split("|block", 1)
            inner = _rename(rest, OPEN_CLIP_BLOCK_MAP)
            if inner is None:
                unknown.append(key)
                continue
            new = prefix + inner
        if new.endswith("|split"):
            if value.shape[0] % 3:
                raise RewardModelError(f"HPSv2: {key} has {value.shape[0]} rows, not q, k, v stacked")
            for part, chunk in zip("qkv", value.chunk(3, dim=0), strict=True):
                out[new[: -len("|split")].replace("{q,k,v}", part)] = chunk.contiguous()
        elif new.endswith("|T"):
            out[new[: -len("|T")]] = value.t().contiguous()
        else:
            out[new] = value
    if unknown:
        raise RewardModelError(
            f"HPSv2: keys that a transformers CLIPModel cannot represent: {unknown[:10]}; only plain open_clip "
            "ViT CLIP models (no LayerScale, attention pooler or custom text tower) are supported"
        )
    return out


def open_clip_config(
    state: dict[str, Tensor],
    *,
    arch: str = "ViT-H-14",
    vision_heads: int | None = None,
    text_heads: int | None = None,
    tokenizer: Any = None,
) -> Any:
    """The transformers CLIPConfig of a mapped open_clip state dict: sizes from the tensors, head counts from
    the published `arch` config (ViT-H-14: 16 and 16) unless given; GELU, LayerNorm eps 1e-5 (open_clip)."""
    transformers = require("transformers", "HPSv2", REWARDS_EXTRA)
    what = "HPSv2"
    heads = dict(_OPEN_CLIP_ARCHS.get(arch, {}))
    if vision_heads:
        heads["vision_heads"] = vision_heads
    if text_heads:
        heads["text_heads"] = text_heads
    if "vision_heads" not in heads or "text_heads" not in heads:
        raise RewardModelError(
            f"HPSv2: arch={arch!r} is not one of {sorted(_OPEN_CLIP_ARCHS)}; pass vision_heads= and text_heads="
        )
    patch = _need(state, "vision_model.embeddings.patch_embedding.weight", what)
    n_pos = int(_need(state, "vision_model.embeddings.position_embedding.weight", what).shape[0]) - 1
    grid = round(n_pos**0.5)
    if grid * grid != n_pos:
        raise RewardModelError(f"{what}: visual.positional_embedding has {n_pos} patch positions, not a square grid")
    vocab, width = _need(state, "text_model.embeddings.token_embedding.weight", what).shape
    ids: dict[str, int] = {}
    if tokenizer is not None:
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(tokenizer, name, None)
            if isinstance(value, int) and 0 <= value < vocab:
                ids[name] = value
    keys = list(state)
    return transformers.CLIPConfig(
        text_config=dict(
            vocab_size=int(vocab),
            hidden_size=int(width),
            intermediate_size=int(_need(state, "text_model.encoder.layers.0.mlp.fc1.weight", what).shape[0]),
            num_hidden_layers=_count("text_model.encoder.layers.", keys),
            num_attention_heads=int(heads["text_heads"]),
            max_position_embeddings=int(_need(state, "text_model.embeddings.position_embedding.weight", what).shape[0]),
            hidden_act="gelu",
            layer_norm_eps=1e-5,
            **ids,
        ),
        vision_config=dict(
            hidden_size=int(patch.shape[0]),
            intermediate_size=int(_need(state, "vision_model.encoder.layers.0.mlp.fc1.weight", what).shape[0]),
            num_hidden_layers=_count("vision_model.encoder.layers.", keys),
            num_attention_heads=int(heads["vision_heads"]),
            image_size=grid * int(patch.shape[-1]),
            patch_size=int(patch.shape[-1]),
            hidden_act="gelu",
            layer_norm_eps=1e-5,
        ),
        projection_dim=int(_need(state, "visual_projection.weight", what).shape[0]),
    )


def hpsv2(
    path: str | Path,
    *,
    tokenizer_dir: str | Path | None = None,
    allow_pickle: bool = False,
    arch: str = "ViT-H-14",
    vision_heads: int | None = None,
    text_heads: int | None = None,
    scale: float = HPS_SCALE,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> CLIPSimilarityScorer:
    """HPSv2 / HPSv2.1: scale * cos(text, image) of the fine-tuned open_clip model (scale 100: the HPSv2
    benchmark's numbers; scale=1 gives what hpsv2.score() returns).

    `path`: the checkpoint file, or a folder with HPS_v2.1_compressed.safetensors / HPS_v2_compressed.*
    (`{"state_dict": ...}` or a bare state dict of open_clip keys). The tokenizer is a CLIP BPE tokenizer
    folder (open_clip's ViT-H-14 uses OpenAI's vocabulary: e.g. the tokenizer of
    laion/CLIP-ViT-H-14-laion2B-s32B-b79K), `tokenizer_dir` or the checkpoint's folder. Preprocessing:
    OpenAI CLIP mean/std at the model's image size (224), as open_clip's validation transform.
    """
    transformers = require("transformers", "HPSv2", REWARDS_EXTRA)
    file = _find_weights(path, HPS_FILES, "HPSv2")
    state = map_open_clip_state_dict(load_state_dict(file, allow_pickle=allow_pickle, what="HPSv2"))
    tok_dir = Path(tokenizer_dir or file.parent).expanduser()
    tokenizer = _tokenizer(tok_dir, "HPSv2", "CLIPTokenizer")
    config = open_clip_config(state, arch=arch, vision_heads=vision_heads, text_heads=text_heads, tokenizer=tokenizer)
    clip = _materialise(transformers.CLIPModel, state, "HPSv2", config=config)
    if device is not None or dtype is not None:
        clip = clip.to(device=device, dtype=dtype)
    size = int(config.vision_config.image_size)
    scorer = CLIPSimilarityScorer(clip, tokenizer, size, CLIP_MEAN, CLIP_STD, scale=float(scale))
    scorer.name = "hpsv2"
    return scorer


# ----- one entry point ---------------------------------------------------------------------------------------


def clip_score(
    model_dir: str | Path,
    *,
    tokenizer_dir: str | Path | None = None,
    scale: float = 100.0,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> CLIPSimilarityScorer:
    """CLIPScore without the clip at 0 (which would cut the gradient): scale * cos(text, image), scale 100."""
    scorer = CLIPSimilarityScorer.from_pretrained(
        model_dir, tokenizer_dir=tokenizer_dir, scale=scale, device=device, dtype=dtype
    )
    scorer.name = "clip-score"
    return scorer


REWARD_MODELS: dict[str, Callable[..., nn.Module]] = {
    "imagereward": ImageRewardScorer.from_pretrained,
    "pickscore": pickscore,
    "hpsv2": hpsv2,
    "aesthetic": AestheticScorer.from_pretrained,
    "clip-score": clip_score,
}


def load_reward_model(kind: str, path: str | Path, **opts: Any) -> nn.Module:
    """A reward model `scorer(images [B, 3, H, W] in [0, 1], prompts) -> Tensor [B]` from local files.

    kind: "imagereward" (ImageRewardScorer.from_pretrained), "pickscore" (pickscore), "hpsv2" (hpsv2),
    "aesthetic" (AestheticScorer.from_pretrained: path = the CLIP folder, head_path=), "clip-score"
    (clip_score). `opts` are that loader's keyword options (device=, dtype=, allow_pickle=, ...).
    """
    key = kind.lower().replace("_", "-")
    if key not in REWARD_MODELS:
        raise RewardModelError(f"unknown reward model kind {kind!r}; choose one of {sorted(REWARD_MODELS)}")
    loader = REWARD_MODELS[key]
    try:
        inspect.signature(loader).bind(path, **opts)
    except TypeError as exc:
        params = [n for n in inspect.signature(loader).parameters if n not in ("path", "model_dir", "clip_dir")]
        raise RewardModelError(f"reward model {key!r}: bad options {sorted(opts)} ({exc}); it takes {params}") from exc
    return loader(path, **opts)


__all__ = [
    "HPS_SCALE",
    "IMAGEREWARD_KEY_MAP",
    "IMAGEREWARD_MEAN",
    "IMAGEREWARD_STD",
    "OPEN_CLIP_BLOCK_MAP",
    "OPEN_CLIP_KEY_MAP",
    "REWARD_MODELS",
    "ImageRewardScorer",
    "clip_score",
    "convert_to_safetensors",
    "conversion_command",
    "hpsv2",
    "load_reward_model",
    "load_state_dict",
    "map_imagereward_state_dict",
    "map_open_clip_state_dict",
    "open_clip_config",
    "pickscore",
]
