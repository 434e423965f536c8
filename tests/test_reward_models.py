"""ImageReward, PickScore, HPSv2 and load_reward_model on tiny random models saved the way the released
checkpoints are laid out (ImageReward's BLIP keys, open_clip's keys, a CLIPModel folder).

Each score is checked against a forward assembled by hand from the same tensors, in the original code's
terms (BLIP's timm ViT and med.py BERT; open_clip's VisionTransformer and text tower), so the key mappings
and the transformers modules are both under test.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from safetensors.torch import save_file  # noqa: E402
from transformers import BertTokenizer, CLIPConfig, CLIPModel, CLIPTokenizer  # noqa: E402

from msdda.pipelines import RewardModelError  # noqa: E402
from msdda.pipelines.reward_models import (  # noqa: E402
    IMAGEREWARD_MEAN,
    IMAGEREWARD_STD,
    REWARD_MODELS,
    ImageRewardScorer,
    convert_to_safetensors,
    hpsv2,
    load_reward_model,
    map_open_clip_state_dict,
    pickscore,
)
from msdda.pipelines.rewards import CLIP_MEAN, CLIP_STD, AestheticScorer, CLIPSimilarityScorer  # noqa: E402

PROMPTS = ["a red cube", "a blue ball on a red cube"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: torch on one thread for this module


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def normalise(images: torch.Tensor, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    return (images - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def ln(x: torch.Tensor, sd: dict, prefix: str, eps: float) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], sd[prefix + ".weight"], sd[prefix + ".bias"], eps)


def lin(x: torch.Tensor, sd: dict, prefix: str) -> torch.Tensor:
    return F.linear(x, sd[prefix + ".weight"], sd.get(prefix + ".bias"))


def heads_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, bias=None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + bias) v over `heads` heads; q [B, L, D], k, v [B, S, D]."""
    b, lq, d = q.shape
    q, k, v = (t.reshape(b, t.shape[1], heads, d // heads).transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) * (d // heads) ** -0.5
    if bias is not None:
        scores = scores + bias
    return (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, lq, d)


# ----- ImageReward ---------------------------------------------------------------------------------------

VW, VH, PATCH, SIZE, VLAYERS = 24, 2, 16, 32, 2  # BLIP ViT: width, heads, patch, image size, depth
TW, TH, TLAYERS, TPOS = 32, 2, 1, 40  # BLIP BERT: width, heads, depth, positions
WORDS = ["a", "red", "blue", "cube", "ball", "on", "the", "cat"]


def make_bert_tokenizer(folder: Path) -> BertTokenizer:
    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, "[DEC]", "[ENC]"]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizer(str(folder / "vocab.txt"))
    tok.save_pretrained(folder)
    return tok


def imagereward_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A random ImageReward state dict in the released layout (blip.visual_encoder.*, blip.text_encoder.*,
    blip.vision_proj/text_proj, mlp.layers.{0,2,4,6,7})."""
    g = gen(seed)

    def r(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    def norm(prefix, d):
        return {prefix + ".weight": 1 + r(d, scale=0.1), prefix + ".bias": r(d, scale=0.1)}

    sd: dict[str, torch.Tensor] = {}
    v = "blip.visual_encoder."
    n = (SIZE // PATCH) ** 2
    sd |= {v + "cls_token": r(1, 1, VW), v + "pos_embed": r(1, n + 1, VW)}
    sd |= {v + "patch_embed.proj.weight": r(VW, 3, PATCH, PATCH, scale=0.05), v + "patch_embed.proj.bias": r(VW)}
    for i in range(VLAYERS):
        b = f"{v}blocks.{i}."
        sd |= norm(b + "norm1", VW) | norm(b + "norm2", VW)
        sd |= {b + "attn.qkv.weight": r(3 * VW, VW), b + "attn.qkv.bias": r(3 * VW)}
        sd |= {b + "attn.proj.weight": r(VW, VW), b + "attn.proj.bias": r(VW)}
        sd |= {b + "mlp.fc1.weight": r(4 * VW, VW), b + "mlp.fc1.bias": r(4 * VW)}
        sd |= {b + "mlp.fc2.weight": r(VW, 4 * VW), b + "mlp.fc2.bias": r(VW)}
    sd |= norm(v + "norm", VW)
    t = "blip.text_encoder."
    vocab = len(WORDS) + 7
    sd |= {t + "embeddings.word_embeddings.weight": r(vocab, TW), t + "embeddings.position_embeddings.weight": r(TPOS, TW)}
    sd |= norm(t + "embeddings.LayerNorm", TW)
    sd[t + "embeddings.position_ids"] = torch.arange(TPOS).expand(1, -1)  # a persistent buffer in med.py
    for i in range(TLAYERS):
        b = f"{t}encoder.layer.{i}."
        for att, kv_width in (("attention", TW), ("crossattention", VW)):
            sd |= {b + f"{att}.self.query.weight": r(TW, TW), b + f"{att}.self.query.bias": r(TW)}
            for kv in ("key", "value"):
                sd |= {b + f"{att}.self.{kv}.weight": r(TW, kv_width), b + f"{att}.self.{kv}.bias": r(TW)}
            sd |= {b + f"{att}.output.dense.weight": r(TW, TW), b + f"{att}.output.dense.bias": r(TW)}
            sd |= norm(b + f"{att}.output.LayerNorm", TW)
        sd |= {b + "intermediate.dense.weight": r(2 * TW, TW), b + "intermediate.dense.bias": r(2 * TW)}
        sd |= {b + "output.dense.weight": r(TW, 2 * TW), b + "output.dense.bias": r(TW)}
        sd |= norm(b + "output.LayerNorm", TW)
    sd |= {"blip.vision_proj.weight": r(8, VW), "blip.vision_proj.bias": r(8)}
    sd |= {"blip.text_proj.weight": r(8, TW), "blip.text_proj.bias": r(8)}
    dims = {0: (16, TW), 2: (8, 16), 4: (8, 8), 6: (4, 8), 7: (1, 4)}  # 768-1024-128-64-16-1, scaled down
    for i, (o, inp) in dims.items():
        sd |= {f"mlp.layers.{i}.weight": r(o, inp, scale=0.5), f"mlp.layers.{i}.bias": r(o)}
    return sd


def imagereward_by_hand(sd: dict, images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """ImageReward.score_gard in BLIP's own terms: timm ViT (eps 1e-6), med.py BERT (multimodal mode)."""
    v = {k[len("blip.visual_encoder.") :]: x for k, x in sd.items() if k.startswith("blip.visual_encoder.")}
    x = F.conv2d(normalise(images), v["patch_embed.proj.weight"], v["patch_embed.proj.bias"], stride=PATCH)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([v["cls_token"].expand(x.shape[0], -1, -1), x], 1) + v["pos_embed"]
    for i in range(VLAYERS):
        b = f"blocks.{i}."
        h = ln(x, v, b + "norm1", 1e-6)
        q, k, vv = lin(h, v, b + "attn.qkv").chunk(3, -1)
        x = x + lin(heads_attn(q, k, vv, VH), v, b + "attn.proj")
        x = x + lin(F.gelu(lin(ln(x, v, b + "norm2", 1e-6), v, b + "mlp.fc1")), v, b + "mlp.fc2")
    image_embeds = ln(x, v, "norm", 1e-6)
    t = {k[len("blip.text_encoder.") :]: x for k, x in sd.items() if k.startswith("blip.text_encoder.")}
    h = t["embeddings.word_embeddings.weight"][ids] + t["embeddings.position_embeddings.weight"][: ids.shape[1]]
    h = ln(h, t, "embeddings.LayerNorm", 1e-12)
    bias = (1.0 - mask[:, None, None, :].float()) * -10000.0  # med.py's extended attention mask
    for i in range(TLAYERS):
        b = f"encoder.layer.{i}."
        a = heads_attn(*(lin(h, t, b + f"attention.self.{n}") for n in ("query", "key", "value")), TH, bias)
        h = ln(lin(a, t, b + "attention.output.dense") + h, t, b + "attention.output.LayerNorm", 1e-12)
        q = lin(h, t, b + "crossattention.self.query")
        kk, vv = (lin(image_embeds, t, b + f"crossattention.self.{n}") for n in ("key", "value"))
        a = heads_attn(q, kk, vv, TH)
        h = ln(lin(a, t, b + "crossattention.output.dense") + h, t, b + "crossattention.output.LayerNorm", 1e-12)
        f = lin(F.gelu(lin(h, t, b + "intermediate.dense")), t, b + "output.dense")
        h = ln(f + h, t, b + "output.LayerNorm", 1e-12)
    r = h[:, 0]
    for i in (0, 2, 4, 6, 7):  # Linear, Dropout, Linear, Dropout, Linear, Dropout, Linear, Linear
        r = lin(r, sd, f"mlp.layers.{i}")
    return ((r - IMAGEREWARD_MEAN) / IMAGEREWARD_STD).squeeze(-1)


@pytest.fixture(scope="module")
def imagereward_dirs(tmp_path_factory) -> tuple[Path, Path, dict]:
    """(a folder with ImageReward.safetensors, one with the pickled ImageReward.pt), both with med_config.json
    (head count) and a BERT tokenizer; and the state dict."""
    sd = imagereward_state()
    safe, pickled = tmp_path_factory.mktemp("ir_safe"), tmp_path_factory.mktemp("ir_pickle")
    save_file({k: v.contiguous() for k, v in sd.items()}, safe / "ImageReward.safetensors")
    torch.save(sd, pickled / "ImageReward.pt")
    for folder in (safe, pickled):
        (folder / "med_config.json").write_text(json.dumps({"num_attention_heads": TH, "layer_norm_eps": 1e-12}))
        make_bert_tokenizer(folder)
    return safe, pickled, sd


def test_imagereward_matches_hand_assembled_forward(imagereward_dirs):
    safe, _, sd = imagereward_dirs
    scorer = ImageRewardScorer.from_pretrained(safe, vision_heads=VH)
    assert scorer.size == SIZE and scorer.max_length == 35
    images = torch.rand(2, 3, SIZE, SIZE, generator=gen(1))
    scores = scorer(images, PROMPTS)
    tok = BertTokenizer.from_pretrained(safe)
    tokens = tok(PROMPTS, padding="max_length", max_length=35, truncation=True, return_tensors="pt")
    assert tokens["attention_mask"][0].sum() < tokens["attention_mask"][1].sum()  # padding is exercised
    expected = imagereward_by_hand(sd, images, tokens["input_ids"], tokens["attention_mask"])
    assert scores.shape == (2,) and scores.dtype == torch.float32
    assert torch.allclose(scores, expected, atol=1e-5), (scores, expected)
    assert not torch.allclose(scores[0], scores[1])
    # The prompt matters (cross-attention runs on it).
    assert not torch.allclose(scorer(images, PROMPTS[::-1]), scores)


def test_imagereward_gradients_reach_the_images(imagereward_dirs):
    scorer = ImageRewardScorer.from_pretrained(imagereward_dirs[0], vision_heads=VH)
    big = torch.rand(2, 3, 40, 48, generator=gen(2), requires_grad=True)  # resized to 32 in torch
    scorer(big, PROMPTS).sum().backward()
    assert big.grad is not None and big.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in scorer.parameters())


def test_imagereward_pickle_needs_the_opt_in(imagereward_dirs, tmp_path):
    safe, pickled, _ = imagereward_dirs
    with pytest.raises(RewardModelError, match="arbitrary code") as info:
        ImageRewardScorer.from_pretrained(pickled, vision_heads=VH)
    assert "allow_pickle=True" in str(info.value) and "convert_to_safetensors" in str(info.value)
    images = torch.rand(2, 3, SIZE, SIZE, generator=gen(3))
    ref = ImageRewardScorer.from_pretrained(safe, vision_heads=VH)(images, PROMPTS)
    opted = ImageRewardScorer.from_pretrained(pickled, vision_heads=VH, allow_pickle=True)
    assert torch.allclose(opted(images, PROMPTS), ref, atol=1e-6)
    # The one-time conversion gives a file that loads without the flag.
    out = convert_to_safetensors(pickled / "ImageReward.pt", tmp_path / "ImageReward.safetensors")
    converted = ImageRewardScorer.from_pretrained(out, vision_heads=VH, text_heads=TH, tokenizer_dir=safe)
    assert torch.allclose(converted(images, PROMPTS), ref, atol=1e-6)
    assert not list(tmp_path.glob("*.tmp"))


def test_imagereward_errors(imagereward_dirs, tmp_path):
    safe, _, sd = imagereward_dirs
    scorer = ImageRewardScorer.from_pretrained(safe, vision_heads=VH)
    with pytest.raises(RewardModelError, match="one prompt per image"):
        scorer(torch.rand(2, 3, SIZE, SIZE), ["only one"])
    with pytest.raises(RewardModelError, match="no published head count; pass vision_heads="):
        ImageRewardScorer.from_pretrained(safe)
    with pytest.raises(RewardModelError, match="neither a weight file nor a folder"):
        ImageRewardScorer.from_pretrained(tmp_path / "nowhere")
    broken = tmp_path / "broken"
    broken.mkdir()
    save_file({k: v.contiguous() for k, v in sd.items() if ".blocks.1." not in k or "norm1" not in k},
              broken / "ImageReward.safetensors")
    with pytest.raises(RewardModelError, match="missing .*layers.1.layer_norm1"):
        ImageRewardScorer.from_pretrained(broken, vision_heads=VH, tokenizer_dir=safe)


# ----- PickScore -----------------------------------------------------------------------------------------


def make_clip_tokenizer(folder: Path, max_length: int = 16) -> CLIPTokenizer:
    """A character-level CLIP BPE tokenizer (no merges): 514 tokens, <|endoftext|> = 513 is the highest id."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = [chr(i) for i in range(33, 33 + 256)]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length)
    tok.save_pretrained(folder)
    return tok


PICK_SIZE = 20
PICK_MEAN, PICK_STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


@pytest.fixture(scope="module")
def pickscore_dirs(tmp_path_factory) -> tuple[Path, Path]:
    """(a CLIPModel folder as released for PickScore: weights and config only; a processor folder with the
    tokenizer and a preprocessor_config.json of crop 20 and its own mean/std)."""
    from transformers import CLIPImageProcessor

    model_dir, proc_dir = tmp_path_factory.mktemp("pickscore"), tmp_path_factory.mktemp("pick_processor")
    torch.manual_seed(5)
    config = CLIPConfig(
        text_config=dict(vocab_size=514, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=512, eos_token_id=513,
                         pad_token_id=513),
        vision_config=dict(image_size=PICK_SIZE, patch_size=10, hidden_size=16, intermediate_size=32,
                           num_hidden_layers=1, num_attention_heads=2),
        projection_dim=8,
        logit_scale_init_value=3.0,
    )
    CLIPModel(config).eval().save_pretrained(model_dir)
    make_clip_tokenizer(proc_dir)
    CLIPImageProcessor(size={"shortest_edge": PICK_SIZE}, crop_size={"height": PICK_SIZE, "width": PICK_SIZE},
                       image_mean=list(PICK_MEAN), image_std=list(PICK_STD)).save_pretrained(proc_dir)
    return model_dir, proc_dir


def test_pickscore_uses_the_processor_and_logit_scale(pickscore_dirs):
    from transformers import AutoImageProcessor

    model_dir, proc_dir = pickscore_dirs
    scorer = pickscore(model_dir, processor_dir=proc_dir)
    assert (scorer.size, scorer.mean, scorer.std, scorer.name) == (PICK_SIZE, PICK_MEAN, PICK_STD, "pickscore")
    # Images on the 8-bit grid at the crop size: the processor's own pixels are then ours.
    u8 = torch.randint(0, 256, (2, PICK_SIZE, PICK_SIZE, 3), generator=gen(6), dtype=torch.uint8)
    images = u8.permute(0, 3, 1, 2).float() / 255
    processor = AutoImageProcessor.from_pretrained(proc_dir)
    pixels = processor(images=list(u8.numpy()), return_tensors="pt")["pixel_values"]
    assert torch.allclose(pixels, normalise(images, PICK_MEAN, PICK_STD), atol=1e-5)
    # PickScore's published formula: logit_scale.exp() * (text_embs @ image_embs.T), both normalised.
    clip = CLIPModel.from_pretrained(model_dir).eval()
    tokens = CLIPTokenizer.from_pretrained(proc_dir)(PROMPTS, padding="max_length", max_length=16,
                                                     truncation=True, return_tensors="pt")
    with torch.no_grad():
        img = clip.get_image_features(pixel_values=pixels)
        txt = clip.get_text_features(**tokens)
    img, txt = (x if isinstance(x, torch.Tensor) else x.pooler_output for x in (img, txt))
    expected = clip.logit_scale.exp() * F.cosine_similarity(img, txt, dim=-1)
    assert torch.allclose(scorer(images, PROMPTS), expected, atol=1e-5)
    big = torch.rand(2, 3, 28, 36, generator=gen(7), requires_grad=True)
    scorer(big, PROMPTS).sum().backward()
    assert big.grad.abs().sum() > 0


# ----- HPSv2 ---------------------------------------------------------------------------------------------

OC = dict(vw=16, vheads=2, patch=8, size=16, vlayers=2, tw=16, theads=2, tlayers=2, ctx=16, vocab=514, embed=8)


def open_clip_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A random open_clip CLIP state dict (visual.*, transformer.*, token_embedding, ...), as in HPS_v2*.pt."""
    g = gen(seed)

    def r(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    def block(prefix, d):
        return {
            prefix + "ln_1.weight": 1 + r(d, scale=0.1), prefix + "ln_1.bias": r(d, scale=0.1),
            prefix + "attn.in_proj_weight": r(3 * d, d), prefix + "attn.in_proj_bias": r(3 * d),
            prefix + "attn.out_proj.weight": r(d, d), prefix + "attn.out_proj.bias": r(d),
            prefix + "ln_2.weight": 1 + r(d, scale=0.1), prefix + "ln_2.bias": r(d, scale=0.1),
            prefix + "mlp.c_fc.weight": r(4 * d, d), prefix + "mlp.c_fc.bias": r(4 * d),
            prefix + "mlp.c_proj.weight": r(d, 4 * d), prefix + "mlp.c_proj.bias": r(d),
        }

    vw, tw, n = OC["vw"], OC["tw"], (OC["size"] // OC["patch"]) ** 2
    sd = {
        "visual.class_embedding": r(vw), "visual.positional_embedding": r(n + 1, vw),
        "visual.conv1.weight": r(vw, 3, OC["patch"], OC["patch"], scale=0.1),
        "visual.ln_pre.weight": 1 + r(vw, scale=0.1), "visual.ln_pre.bias": r(vw, scale=0.1),
        "visual.ln_post.weight": 1 + r(vw, scale=0.1), "visual.ln_post.bias": r(vw, scale=0.1),
        "visual.proj": r(vw, OC["embed"]),
        "token_embedding.weight": r(OC["vocab"], tw), "positional_embedding": r(OC["ctx"], tw),
        "ln_final.weight": 1 + r(tw, scale=0.1), "ln_final.bias": r(tw, scale=0.1),
        "text_projection": r(tw, OC["embed"]), "logit_scale": torch.tensor(4.6052),
    }
    for i in range(OC["vlayers"]):
        sd |= block(f"visual.transformer.resblocks.{i}.", vw)
    for i in range(OC["tlayers"]):
        sd |= block(f"transformer.resblocks.{i}.", tw)
    return sd


def _oc_blocks(x, sd, prefix, layers, heads, causal=False):
    bias = None
    if causal:
        bias = torch.full((x.shape[1], x.shape[1]), float("-inf")).triu(1)
    for i in range(layers):
        b = f"{prefix}{i}."
        h = ln(x, sd, b + "ln_1", 1e-5)
        q, k, v = F.linear(h, sd[b + "attn.in_proj_weight"], sd[b + "attn.in_proj_bias"]).chunk(3, -1)
        x = x + lin(heads_attn(q, k, v, heads, bias), sd, b + "attn.out_proj")
        x = x + lin(F.gelu(lin(ln(x, sd, b + "ln_2", 1e-5), sd, b + "mlp.c_fc")), sd, b + "mlp.c_proj")
    return x


def hps_by_hand(sd: dict, images: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """HPSv2's score in open_clip's terms: 100 * <encode_image(normalize), encode_text(normalize)>."""
    x = F.conv2d(normalise(images), sd["visual.conv1.weight"], stride=OC["patch"]).flatten(2).transpose(1, 2)
    x = torch.cat([sd["visual.class_embedding"].expand(x.shape[0], 1, -1), x], 1) + sd["visual.positional_embedding"]
    x = _oc_blocks(ln(x, sd, "visual.ln_pre", 1e-5), sd, "visual.transformer.resblocks.", OC["vlayers"], OC["vheads"])
    img = ln(x[:, 0], sd, "visual.ln_post", 1e-5) @ sd["visual.proj"]
    t = sd["token_embedding.weight"][ids] + sd["positional_embedding"]
    t = ln(_oc_blocks(t, sd, "transformer.resblocks.", OC["tlayers"], OC["theads"], causal=True), sd, "ln_final", 1e-5)
    txt = t[torch.arange(t.shape[0]), ids.argmax(dim=-1)] @ sd["text_projection"]
    return 100 * (F.normalize(img, dim=-1) * F.normalize(txt, dim=-1)).sum(-1)


@pytest.fixture(scope="module")
def hps_dirs(tmp_path_factory) -> tuple[Path, Path, dict]:
    """(a folder with HPS_v2.1_compressed.pt = {"state_dict": ...}, the released layout; one with the bare
    state dict as HPS_v2_compressed.safetensors), each with a CLIP tokenizer; and the state dict."""
    sd = open_clip_state()
    pickled, safe = tmp_path_factory.mktemp("hps_pickle"), tmp_path_factory.mktemp("hps_safe")
    torch.save({"state_dict": sd}, pickled / "HPS_v2.1_compressed.pt")
    save_file(sd, safe / "HPS_v2_compressed.safetensors")
    for folder in (pickled, safe):
        make_clip_tokenizer(folder, max_length=OC["ctx"])
    return pickled, safe, sd


def test_hpsv2_matches_open_clip_forward(hps_dirs):
    pickled, safe, sd = hps_dirs
    scorer = hpsv2(safe, vision_heads=OC["vheads"], text_heads=OC["theads"])
    assert scorer.size == OC["size"] and scorer.name == "hpsv2"
    images = torch.rand(2, 3, OC["size"], OC["size"], generator=gen(8))
    tokens = CLIPTokenizer.from_pretrained(safe)(PROMPTS, padding="max_length", max_length=OC["ctx"],
                                                truncation=True, return_tensors="pt")
    expected = hps_by_hand(sd, images, tokens["input_ids"])
    scores = scorer(images, PROMPTS)
    assert torch.allclose(scores, expected, atol=1e-4), (scores, expected)
    assert torch.allclose(hpsv2(safe, vision_heads=2, text_heads=2, scale=1.0)(images, PROMPTS), expected / 100,
                          atol=1e-6)
    # The released {"state_dict": ...} pickle: refused without the flag, the same scores with it.
    with pytest.raises(RewardModelError, match="arbitrary code"):
        hpsv2(pickled, vision_heads=2, text_heads=2)
    opted = hpsv2(pickled, vision_heads=2, text_heads=2, allow_pickle=True)
    assert torch.allclose(opted(images, PROMPTS), scores, atol=1e-6)
    big = torch.rand(2, 3, 24, 20, generator=gen(9), requires_grad=True)
    scorer(big, PROMPTS).sum().backward()
    assert big.grad.abs().sum() > 0


def test_hpsv2_refuses_what_clip_cannot_represent(hps_dirs, tmp_path):
    sd = dict(hps_dirs[2])
    sd["visual.transformer.resblocks.0.ls_1.gamma"] = torch.ones(OC["vw"])  # LayerScale
    with pytest.raises(RewardModelError, match="ls_1.gamma"):
        map_open_clip_state_dict(sd)
    with pytest.raises(RewardModelError, match="pass vision_heads= and text_heads="):
        hpsv2(hps_dirs[1], arch="ViT-tiny")


def test_hpsv2_against_open_clip_itself(hps_dirs, tmp_path):
    """Where open_clip is installed: its own tiny model with the same weights gives the same score."""
    open_clip = pytest.importorskip("open_clip")
    _, safe, sd = hps_dirs
    cfg = {
        "embed_dim": OC["embed"],
        "vision_cfg": {"image_size": OC["size"], "layers": OC["vlayers"], "width": OC["vw"],
                       "head_width": OC["vw"] // OC["vheads"], "patch_size": OC["patch"]},
        "text_cfg": {"context_length": OC["ctx"], "vocab_size": OC["vocab"], "width": OC["tw"],
                     "heads": OC["theads"], "layers": OC["tlayers"]},
    }
    (tmp_path / "tiny-hps.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "tiny-hps.json")
    model = open_clip.create_model("tiny-hps", pretrained=None).eval()
    model.load_state_dict(sd, strict=True)  # the same keys: our fixture is open_clip's layout
    images = torch.rand(2, 3, OC["size"], OC["size"], generator=gen(10))
    ids = CLIPTokenizer.from_pretrained(safe)(PROMPTS, padding="max_length", max_length=OC["ctx"],
                                             truncation=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        img = model.encode_image(normalise(images), normalize=True)
        txt = model.encode_text(ids, normalize=True)
    scorer = hpsv2(safe, vision_heads=OC["vheads"], text_heads=OC["theads"])
    assert torch.allclose(scorer(images, PROMPTS), 100 * (img * txt).sum(-1), atol=1e-4)


# ----- one entry point -----------------------------------------------------------------------------------


def test_load_reward_model_reaches_all_five(imagereward_dirs, pickscore_dirs, hps_dirs, tmp_path):
    assert sorted(REWARD_MODELS) == ["aesthetic", "clip-score", "hpsv2", "imagereward", "pickscore"]
    model_dir, proc_dir = pickscore_dirs
    g = gen(11)
    head = tmp_path / "head.safetensors"
    save_file({"layers.0.weight": torch.randn(1, 8, generator=g), "layers.0.bias": torch.zeros(1)}, head)
    scorers = {
        "imagereward": load_reward_model("imagereward", imagereward_dirs[0], vision_heads=VH),
        "pickscore": load_reward_model("pickscore", model_dir, processor_dir=proc_dir),
        "hpsv2": load_reward_model("HPSv2", hps_dirs[1], vision_heads=2, text_heads=2),
        "aesthetic": load_reward_model("aesthetic", model_dir, head_path=head),
        "clip-score": load_reward_model("clip_score", model_dir, tokenizer_dir=proc_dir),
    }
    assert isinstance(scorers["aesthetic"], AestheticScorer)
    assert isinstance(scorers["clip-score"], CLIPSimilarityScorer) and scorers["clip-score"].scale == 100.0
    images = torch.rand(2, 3, 32, 32, generator=gen(12))
    for name, scorer in scorers.items():
        out = scorer(images, PROMPTS)
        assert out.shape == (2,) and torch.isfinite(out).all(), name
    with pytest.raises(RewardModelError, match=r"unknown reward model kind 'blipscore'; choose one of \['aesthetic'"):
        load_reward_model("blipscore", model_dir)
    with pytest.raises(RewardModelError, match="bad options .*'scal'"):
        load_reward_model("clip-score", model_dir, scal=3)


def test_missing_transformers_names_the_extra(monkeypatch, tmp_path):
    from msdda.pipelines import MissingDependencyError

    monkeypatch.setitem(__import__("sys").modules, "transformers", None)  # import transformers -> ImportError
    for loader in (ImageRewardScorer.from_pretrained, hpsv2):
        with pytest.raises(MissingDependencyError, match=r"pip install 'msdda\[rewards\]'"):
            loader(tmp_path)
