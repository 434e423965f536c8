"""MSDDAXLPipeline on tiny SDXL components built from config (no downloads), 3 steps on CPU.

The tiny parts follow diffusers' own SDXL fast-test components (two CLIP text encoders, the second with a
projection; a UNet with addition_embed_type "text_time"), shrunk further. Exact comparisons against
diffusers' StableDiffusionXLPipeline with the same scheduler and seed: the base model (DDIM with eta 0 and
eta > 0, DDPM), one LoRA at weight 1, a full-UNet objective, size / crop / negative conditioning, prompt
embeddings, the decoded images; rewarded-soup of LoRAs against diffusers' set_adapters weights; MSDDA ==
DB-MPA for fixed variances; batched == one-by-one; generator lists == single runs. The caller's pipeline
is unchanged after release and bad input fails before any denoising.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("transformers")

from diffusers import (  # noqa: E402
    DDIMScheduler,
    DDPMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from peft import LoraConfig, get_peft_model_state_dict  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection  # noqa: E402

from msdda.models.batched import BatchingError  # noqa: E402
from msdda.pipelines import AdapterError, MSDDAPipeline, PipelineError  # noqa: E402
from msdda.pipelines.conditioning import AddedConditions  # noqa: E402
from msdda.pipelines.sdxl import MSDDAXLPipeline  # noqa: E402
from test_sd_pipeline import _randomise_lora, gen, make_tokenizer, make_vae, sd_scheduler  # noqa: E402
from test_sd_pipeline import make_unet as make_sd_unet  # noqa: E402

PROMPT = "a red cube"
STEPS = 3
ATOL = 3e-5  # to diffusers: measured <= 1.5e-5 on latents of magnitude ~10 (float32 rounding, ~2e-6 relative)
BATCH_ATOL = 5e-5  # batched vs one by one: float32 rounding of a K-times larger batch


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add OpenMP spinning on a shared 2-core machine
    yield
    torch.set_num_threads(old)


# ----- tiny SDXL components --------------------------------------------------------------------------------

POOLED = 16  # text_encoder_2's projection_dim: the pooled embedding width P
TIME_EMBED = 4  # addition_time_embed_dim: the UNet's add_embedding takes 6 * 4 + 16 = 40 inputs


def make_xl_unet(seed: int = 0) -> UNet2DConditionModel:
    """diffusers' SDXL fast-test UNet, smaller: cross_attention_dim 32 = the two encoders' hidden sizes."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED,
        transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=6 * TIME_EMBED + POOLED,
        cross_attention_dim=32,
        norm_num_groups=8,
    ).eval()


def make_text_encoder(cls: type, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=514,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=16,
        bos_token_id=512,
        eos_token_id=513,
        pad_token_id=513,
        projection_dim=POOLED,
        hidden_act="gelu",
    )
    return cls(config).eval()


class TinyXL:
    """The shared tiny SDXL components and the objectives written to disk."""

    def __init__(self, root) -> None:
        self.root = root
        self.unet = make_xl_unet()
        self.vae = make_vae()
        self.text_encoder = make_text_encoder(CLIPTextModel, 1)
        self.text_encoder_2 = make_text_encoder(CLIPTextModelWithProjection, 3)
        self.tokenizer = make_tokenizer(root / "tokenizer")
        # diffusers' SDXL LoRA format (unet.-prefixed keys): attention projections; and a second one that also
        # adapts the feed-forward and a ResNet conv (Linear and Conv2d LoRA layers).
        self.aes = self._lora(
            "aes", 11, LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
        )
        self.align = self._lora(
            "align", 12, LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "ff.net.2", "conv1"])
        )
        # a LoRA of an SD 1.x UNet (cross_attention_dim 16, another block layout): trained for another base
        sd_unet = make_sd_unet(cross_attention_dim=16, seed=5)
        self.foreign = self._lora(
            "foreign", 13, LoraConfig(r=4, lora_alpha=4, target_modules=["to_k", "to_v"]), sd_unet
        )
        # a LoRA that also adapts text_encoder_2
        self.with_text = self._lora("with_text", 14, LoraConfig(r=2, lora_alpha=2, target_modules=["to_q"]), text=True)
        full = copy.deepcopy(self.unet)
        g = torch.Generator().manual_seed(15)
        with torch.no_grad():
            for p in full.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
        self.full_dir = root / "full_unet"
        full.save_pretrained(self.full_dir)
        self.full = full

    def _lora(self, name: str, seed: int, cfg: LoraConfig, unet: nn.Module | None = None, text: bool = False):
        u = copy.deepcopy(self.unet if unet is None else unet)
        u.add_adapter(cfg, adapter_name=name)
        _randomise_lora(u, seed)
        extra = {}
        if text:  # peft-keyed LoRA factors of one text_encoder_2 projection, written by hand
            g = torch.Generator().manual_seed(seed + 100)
            q = "text_model.encoder.layers.0.self_attn.q_proj"
            te = {
                f"{q}.lora_A.weight": torch.randn(2, 16, generator=g),
                f"{q}.lora_B.weight": torch.randn(16, 2, generator=g),
            }
            extra = {"text_encoder_2_lora_layers": te}
        folder = self.root / name
        StableDiffusionXLPipeline.save_lora_weights(
            folder,
            unet_lora_layers=get_peft_model_state_dict(u, adapter_name=name),
            unet_lora_adapter_metadata=cfg.to_dict(),
            **extra,
        )
        return folder

    def base(self, scheduler: str = "ddim", unet: nn.Module | None = None) -> StableDiffusionXLPipeline:
        """A fresh diffusers SDXL pipeline with its own copy of the base UNet (or `unet`), SD's DDIM/DDPM."""
        pipe = StableDiffusionXLPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            text_encoder_2=self.text_encoder_2,
            tokenizer=self.tokenizer,
            tokenizer_2=self.tokenizer,
            unet=copy.deepcopy(self.unet) if unet is None else unet,
            scheduler=sd_scheduler(scheduler),
            add_watermarker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def pipeline(self, scheduler: str = "ddim", **objectives) -> MSDDAXLPipeline:
        return MSDDAXLPipeline(self.base(scheduler), objectives or {"aes": self.aes, "align": self.align})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> TinyXL:
    return TinyXL(tmp_path_factory.mktemp("tiny_sdxl"))


def run(pipe, weights=None, **kw):
    kw.setdefault("num_inference_steps", STEPS)
    kw.setdefault("output_type", "latent")
    kw.setdefault("guidance_scale", 4.0)
    kw.setdefault("progress", False)
    kw.setdefault("generator", gen())
    return pipe(kw.pop("prompt", PROMPT), weights, **kw)


def diffusers_latents(pipe: StableDiffusionXLPipeline, **kw) -> torch.Tensor:
    kw.setdefault("num_inference_steps", STEPS)
    kw.setdefault("output_type", "latent")
    kw.setdefault("guidance_scale", 4.0)
    kw.setdefault("generator", gen())
    return pipe(kw.pop("prompt", PROMPT), **kw).images


def count_unet_calls(pipe) -> list[int]:
    calls = [0]
    pipe.unet.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def _snapshot(unet: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in unet.state_dict().items()}


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return float((a - b).abs().max())


# ----- the packed condition -------------------------------------------------------------------------------


def test_added_conditions_pack_and_unpack():
    g = torch.Generator().manual_seed(0)
    embeds, pooled = torch.randn(2, 5, 32, generator=g), torch.randn(2, 16, generator=g)
    ids = torch.tensor([[64.0, 64, 0, 0, 64, 64], [32, 48, 2, 4, 64, 64]])
    layout = AddedConditions(text_embeds_dim=16, time_ids_dim=6)
    packed = layout.pack(embeds, pooled, ids)
    assert packed.shape == (2, 6, 32) and layout.tokens(32) == 1  # one token: 16 + 6 values, zero-padded to 32
    e, p, t = layout.unpack(packed)
    assert torch.equal(e, embeds) and torch.equal(p, pooled) and torch.equal(t, ids)
    # cat / repeat along dim 0 (CFG, batched objectives) keep the rows' three parts together
    both = torch.cat([packed, packed.flip(0)]).repeat(2, 1, 1)
    assert torch.equal(layout.unpack(both)[2], torch.cat([ids, ids.flip(0)]).repeat(2, 1))
    # narrower embeddings than P + T (e.g. the refiner's 1280-wide ones with a 1280 pooled) take several tokens
    narrow = layout.pack(embeds[..., :8], pooled, ids)
    assert narrow.shape == (2, 5 + 3, 8)
    assert all(torch.equal(a, b) for a, b in zip(layout.unpack(narrow), (embeds[..., :8], pooled, ids), strict=True))
    with pytest.raises(PipelineError, match=r"pooled text embeddings have shape \(2, 12\); this UNet needs \(2, 16\)"):
        layout.pack(embeds, pooled[:, :12], ids)
    with pytest.raises(PipelineError, match="was not packed"):
        layout.unpack(torch.zeros(2, 1, 32))


# ----- K = 1 equals diffusers -------------------------------------------------------------------------------


@pytest.mark.parametrize(("scheduler", "eta"), [("ddim", 0.0), ("ddim", 0.7), ("ddpm", 0.0)])
def test_base_matches_diffusers(tiny, scheduler, eta):
    pipe = tiny.pipeline(scheduler)
    ours = run(pipe, method="base", eta=eta).images
    extra = {"eta": eta} if scheduler == "ddim" else {}
    theirs = diffusers_latents(tiny.base(scheduler), **extra)
    assert _max_diff(ours, theirs) < ATOL
    assert torch.equal(run(pipe, {"reference": 1.0}, eta=eta).images, ours)


@pytest.mark.parametrize(("scheduler", "eta"), [("ddim", 0.0), ("ddim", 0.7)])
def test_one_adapter_matches_diffusers(tiny, scheduler, eta):
    pipe = tiny.pipeline(scheduler)
    ours = run(pipe, {"aes": 1.0}, eta=eta).images
    ref = tiny.base(scheduler)
    ref.load_lora_weights(tiny.aes, adapter_name="aes")
    assert _max_diff(ours, diffusers_latents(ref, eta=eta)) < ATOL
    assert _max_diff(ours, run(pipe, method="base", eta=eta).images) > 1e-2  # the adapter matters


def test_full_unet_objective_matches_diffusers(tiny):
    pipe = MSDDAXLPipeline(tiny.base("ddpm"), {"full": tiny.full_dir, "aes": tiny.aes})
    assert pipe.objectives["full"].kind == "unet"
    ours = run(pipe, method="single:full").images
    assert _max_diff(ours, diffusers_latents(tiny.base("ddpm", unet=copy.deepcopy(tiny.full)))) < ATOL
    assert torch.isfinite(run(pipe, {"full": 0.5, "aes": 0.5}).images).all()


def test_size_crop_and_negative_conditioning_match_diffusers(tiny):
    pipe = tiny.pipeline("ddim")
    kw = {
        "negative_prompt": "blurry",
        "prompt_2": "a cube, red",
        "original_size": (32, 24),
        "crops_coords_top_left": (2, 4),
        "target_size": (16, 16),
        "negative_original_size": (8, 8),
        "negative_target_size": (16, 8),
        "eta": 0.5,
    }
    ours = run(pipe, method="base", **kw)
    theirs = diffusers_latents(tiny.base("ddim"), **kw)
    assert _max_diff(ours.images, theirs) < ATOL
    plain = run(pipe, method="base", eta=0.5).images
    assert _max_diff(ours.images, plain) > 1e-3  # the conditioning matters
    assert ours.config["original_size"] == (32, 24) and ours.config["crops_coords_top_left"] == (2, 4)
    with_lora = run(pipe, {"aes": 1.0}, **kw).images
    ref = tiny.base("ddim")
    ref.load_lora_weights(tiny.aes, adapter_name="aes")
    assert _max_diff(with_lora, diffusers_latents(ref, **kw)) < ATOL


def test_prompt_embeds_and_images_match(tiny):
    pipe = tiny.pipeline("ddim")
    embeds, negative, pooled, negative_pooled = pipe.base.encode_prompt(PROMPT, device="cpu")
    a = run(pipe, {"aes": 0.4, "align": 0.6})
    b = run(
        pipe,
        {"aes": 0.4, "align": 0.6},
        prompt=None,
        prompt_embeds=embeds,
        negative_prompt_embeds=negative,
        pooled_prompt_embeds=pooled,
        negative_pooled_prompt_embeds=negative_pooled,
    )
    assert torch.equal(a.images, b.images)
    # decoded images as diffusers decodes them (np and pt), and the tuple of return_dict=False
    ours = run(pipe, method="base", output_type="np").images
    theirs = diffusers_latents(tiny.base("ddim"), output_type="np")
    assert ours.shape == theirs.shape == (1, 16, 16, 3) and abs(ours - theirs).max() < ATOL
    images, nsfw = run(pipe, method="base", output_type="pt", return_dict=False)
    assert images.shape == (1, 3, 16, 16) and nsfw is None
    assert run(pipe, method="base", output_type="pil").images[0].size == (16, 16)


def test_fp16_vae_is_upcast_while_decoding_as_diffusers(tiny):
    half = copy.copy(tiny)
    half.vae = copy.deepcopy(tiny.vae).half()  # config force_upcast=True: decoded in float32, then back
    base = half.base("ddim")
    ours = run(MSDDAXLPipeline(base, {}), method="base", output_type="np").images
    assert base.vae.dtype == torch.float16 and ours.dtype == "float32"
    assert abs(ours - diffusers_latents(half.base("ddim"), output_type="np")).max() < ATOL


def test_callback_sees_the_sdxl_tensors_as_diffusers(tiny):
    pipe = tiny.pipeline("ddim")
    inputs = ["latents", "prompt_embeds", "add_text_embeds", "add_time_ids"]
    seen, theirs = {}, {}
    sizes = {"original_size": (24, 24), "crops_coords_top_left": (1, 2)}
    out = run(
        pipe,
        {"aes": 1.0},
        callback_on_step_end=lambda p, i, t, kw: seen.setdefault(i, dict(kw)) and {},
        callback_on_step_end_tensor_inputs=inputs,
        **sizes,
    )
    ref = tiny.base("ddim")
    ref.load_lora_weights(tiny.aes, adapter_name="aes")
    diffusers_latents(
        ref,
        callback_on_step_end=lambda p, i, t, kw: theirs.setdefault(i, dict(kw)) and kw,
        callback_on_step_end_tensor_inputs=inputs,
        **sizes,
    )
    assert sorted(seen) == list(range(STEPS))
    for key in inputs[1:]:
        assert seen[0][key].shape == theirs[0][key].shape
        assert _max_diff(seen[0][key].float(), theirs[0][key].float()) < ATOL, key
    assert _max_diff(seen[STEPS - 1]["latents"], out.images) == 0.0
    with pytest.raises(PipelineError, match="returned a new 'add_time_ids'"):
        run(
            pipe,
            {"aes": 1.0},
            callback_on_step_end=lambda p, i, t, kw: {"add_time_ids": kw["add_time_ids"] + 1},
            callback_on_step_end_tensor_inputs=["add_time_ids"],
        )


def test_guidance_rescale_and_lora_scale_match_diffusers(tiny):
    pipe = tiny.pipeline("ddim")
    ref = tiny.base("ddim")
    ref.load_lora_weights(tiny.aes, adapter_name="aes")
    kw = {"guidance_rescale": 0.7, "cross_attention_kwargs": {"scale": 0.5}, "eta": 0.5}
    ours = run(pipe, {"aes": 1.0}, **kw).images
    assert _max_diff(ours, diffusers_latents(ref, **kw)) < ATOL
    assert _max_diff(ours, run(pipe, {"aes": 1.0}, eta=0.5).images) > 1e-3  # both settings matter
    fused = run(pipe, {"aes": 0.5, "align": 0.3}, **kw)  # every model and the reference guided and rescaled
    assert torch.isfinite(fused.images).all() and fused.cost.model_evals == STEPS * 2 * 3


# ----- rules against each other -----------------------------------------------------------------------------


@pytest.mark.parametrize(("scheduler", "eta"), [("ddpm", 0.0), ("ddim", 0.5)])
def test_msdda_equals_dbmpa_for_fixed_variances(tiny, scheduler, eta):
    pipe = tiny.pipeline(scheduler)
    for weights in ({"aes": 0.3, "align": 0.7}, {"aes": 0.5, "align": 0.3}):  # the second: reference takes 0.2
        a = run(pipe, weights, eta=eta)
        b = run(pipe, weights, method="db-mpa", eta=eta)
        assert _max_diff(a.images, b.images) < ATOL
        assert a.cost.model_evals == b.cost.model_evals == STEPS * 2 * len(a.config["exponents"])
    assert a.config["exponents"] == pytest.approx({"aes": 0.5, "align": 0.3, "reference": 0.2})
    assert _max_diff(a.images, run(pipe, method="base", eta=eta).images) > 1e-3


def test_rewarded_soup_equals_diffusers_set_adapters(tiny):
    """The exact LoRA soup (dW = sum_k w_k B_k A_k) is what diffusers computes with both adapters active at
    set_adapters weights."""
    pipe = tiny.pipeline("ddim")
    weights = {"aes": 0.3, "align": 0.7}
    soup = run(pipe, weights, method="rewarded-soup", eta=0.5)
    ref = tiny.base("ddim")
    ref.load_lora_weights(tiny.aes, adapter_name="aes")
    ref.load_lora_weights(tiny.align, adapter_name="align")
    ref.set_adapters(["aes", "align"], adapter_weights=[0.3, 0.7])
    assert _max_diff(soup.images, diffusers_latents(ref, eta=0.5)) < ATOL
    assert soup.cost.model_evals == STEPS * 2
    assert set(pipe.unet.peft_config) == {"aes", "align"}  # the soup adapter is gone again


@pytest.mark.parametrize(
    ("method", "extra"),
    [
        ("msdda", {}),
        ("db-mpa", {}),
        ("db-mpa-ls", {}),
        ("rewarded-soup", {}),
        ("single:align", {}),
        ("code", {"method_options": {"num_candidates": 2, "block_size": 1}}),
        ("rgg", {"method_options": {"scale": 2.0}}),
    ],
)
def test_every_method_runs(tiny, method, extra):
    pipe = tiny.pipeline("ddpm")

    def bright(images, prompts):
        assert images.shape[1:] == (3, 16, 16) and prompts == [PROMPT]
        return images.flatten(1).mean(1)

    weights = {"bright": 1.0} if method in ("code", "rgg") else {"aes": 0.5, "align": 0.5}
    rewards = {"bright": bright} if method in ("code", "rgg") else None
    out = run(pipe, weights, method=method, rewards=rewards, **extra)
    assert out.images.shape == (1, 4, 8, 8) and torch.isfinite(out.images).all()
    assert not pipe.switch.any_enabled()


# ----- batched objectives -----------------------------------------------------------------------------------


def test_batched_equals_one_by_one(tiny):
    pipe = tiny.pipeline("ddim")
    calls = count_unet_calls(pipe)
    weights = {"aes": 0.5, "align": 0.3}  # the reference takes 0.2 and joins the one UNet call
    seq = run(pipe, weights, eta=1.0, batch_models=False, num_images_per_prompt=2)
    assert calls[0] == STEPS * 3
    bat = run(pipe, weights, eta=1.0, batch_models=True, num_images_per_prompt=2)
    assert calls[0] == STEPS * 3 + STEPS  # K adapters + reference, cond + uncond: one forward per step
    assert _max_diff(bat.images, seq.images) < BATCH_ATOL
    assert bat.cost.model_evals == seq.cost.model_evals
    soup_seq = run(pipe, weights, method="db-mpa", eta=1.0, batch_models=False).images
    soup_bat = run(pipe, weights, method="db-mpa", eta=1.0, batch_models=True).images
    assert _max_diff(soup_bat, soup_seq) < BATCH_ATOL
    # full-UNet objectives: vmapped together
    fulls = MSDDAXLPipeline(tiny.base("ddim"), {"full": tiny.full_dir, "full2": copy.deepcopy(tiny.full)})
    fw = {"full": 0.6, "full2": 0.4}
    assert _max_diff(run(fulls, fw, batch_models=True).images, run(fulls, fw, batch_models=False).images) < BATCH_ATOL
    # mixed LoRA and full-UNet objectives cannot share a call: forced batching names the reason
    mixed = MSDDAXLPipeline(tiny.base("ddim"), {"full": tiny.full_dir, "aes": tiny.aes})
    with pytest.raises(BatchingError, match="run on different UNets"):
        run(mixed, {"full": 0.5, "aes": 0.5}, batch_models=True)


# ----- diffusers conventions --------------------------------------------------------------------------------


def test_generator_list_reproduces_single_images(tiny):
    pipe = tiny.pipeline("ddim")
    seeds = [5, 9, 2]
    for kw in ({"method": "base"}, {"weights": {"aes": 0.6, "align": 0.4}}):
        weights = kw.pop("weights", None)
        batched = run(pipe, weights, eta=1.0, num_images_per_prompt=3, generator=[gen(s) for s in seeds], **kw)
        assert batched.images.shape == (3, 4, 8, 8)
        for i, s in enumerate(seeds):
            single = run(pipe, weights, eta=1.0, generator=gen(s), **kw).images
            assert _max_diff(batched.images[i : i + 1], single) < BATCH_ATOL  # batch-size float rounding
        assert _max_diff(batched.images[0], batched.images[1]) > 1e-2
    theirs = diffusers_latents(tiny.base("ddim"), eta=1.0, num_images_per_prompt=3, generator=[gen(s) for s in seeds])
    ours = run(pipe, method="base", eta=1.0, num_images_per_prompt=3, generator=[gen(s) for s in seeds]).images
    assert _max_diff(ours, theirs) < ATOL
    with pytest.raises(PipelineError, match=r"list of 2 generators but this call makes 3 image\(s\)"):
        run(pipe, method="base", num_images_per_prompt=3, generator=[gen(1), gen(2)])


def test_callers_pipeline_unchanged_after_release(tiny):
    from peft.tuners.tuners_utils import BaseTunerLayer

    base = tiny.base("ddpm")
    scheduler, config = base.scheduler, dict(base.scheduler.config)
    before = _snapshot(base.unet)
    pointers = {k: v.data_ptr() for k, v in base.unet.state_dict().items()}
    expected = diffusers_latents(base)
    pipe = MSDDAXLPipeline(base, {"aes": tiny.aes, "align": tiny.align, "full": tiny.full_dir}, scheduler="ddim")
    assert pipe.unet is base.unet and pipe.base is not base and pipe.base.text_encoder_2 is base.text_encoder_2
    assert isinstance(pipe.base.scheduler, DDIMScheduler) and base.scheduler is scheduler
    for kw in (
        {"weights": {"aes": 0.5, "align": 0.5}},
        {"weights": {"aes": 0.5, "align": 0.5}, "method": "rewarded-soup"},
    ):
        run(pipe, **kw)
    assert dict(base.scheduler.config) == config
    assert _max_diff(diffusers_latents(base), expected) < ATOL  # adapters are off outside the pipeline's calls
    pipe.release()
    after = base.unet.state_dict()
    assert list(after) == list(before) and all(torch.equal(before[k], after[k]) for k in before)
    assert {k: v.data_ptr() for k, v in after.items()} == pointers
    assert not any(isinstance(m, BaseTunerLayer) for m in base.unet.modules())
    assert not hasattr(base.unet, "peft_config")
    assert torch.equal(diffusers_latents(base), expected)
    with pytest.raises(PipelineError, match=r"this MSDDAXLPipeline was released.*MSDDAXLPipeline\.from_pipe"):
        run(pipe, {"aes": 1.0})


def test_from_pipe_and_from_pretrained(tiny, tmp_path):
    base = tiny.base("ddim")
    expected = run(tiny.pipeline("ddim"), {"aes": 0.5, "align": 0.5}).images
    with MSDDAXLPipeline.from_pipe(base, {"aes": tiny.aes, "align": tiny.align}) as pipe:
        assert pipe.unet is base.unet and torch.equal(run(pipe, {"aes": 0.5, "align": 0.5}).images, expected)
        with MSDDAXLPipeline.from_pipe(pipe, {"own": "aes"}, scheduler="ddpm") as other:
            assert isinstance(other.base.scheduler, DDPMScheduler) and other.objective_names == ["own"]
        # an MSDDAPipeline from an SDXL MSDDAXLPipeline is refused, naming the right class
        with pytest.raises(PipelineError, match="Use msdda.pipelines.sdxl.MSDDAXLPipeline"):
            MSDDAPipeline.from_pipe(pipe, {})
    with MSDDAXLPipeline.from_pipe(base, {}, scheduler=DDPMScheduler.from_config(base.scheduler.config)) as pipe:
        assert _max_diff(run(pipe, method="base").images, diffusers_latents(tiny.base("ddpm"))) < ATOL
    folder = tmp_path / "sdxl"
    tiny.base("ddim").save_pretrained(folder)
    with MSDDAXLPipeline.from_pretrained(folder, {"aes": tiny.aes}) as pipe:
        assert type(pipe.base.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
        pipe.set_progress_bar_config(disable=True)
        assert _max_diff(run(pipe, {"aes": 0.5}).images, run(tiny.pipeline("ddim"), {"aes": 0.5}).images) < ATOL
    with pytest.raises(PipelineError, match=r"holds a StableDiffusionXLPipeline pipeline.*MSDDAXLPipeline"):
        MSDDAPipeline.from_pretrained(folder, {})
    sd_folder = tmp_path / "sd"
    sd_folder.mkdir()
    (sd_folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(PipelineError, match=r"supports StableDiffusionXLPipeline folders only; use MSDDAPipeline"):
        MSDDAXLPipeline.from_pretrained(sd_folder, {})


# ----- errors before any denoising --------------------------------------------------------------------------


def test_sd_and_sdxl_pipelines_refuse_each_other(tiny):
    with pytest.raises(PipelineError, match=r"StableDiffusionXLPipeline is an SDXL pipeline.*MSDDAXLPipeline"):
        MSDDAPipeline(tiny.base("ddim"), {})
    sd = StableDiffusionPipeline(
        vae=tiny.vae,
        text_encoder=tiny.text_encoder,
        tokenizer=tiny.tokenizer,
        unet=make_sd_unet(),
        scheduler=sd_scheduler("ddim"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    with pytest.raises(PipelineError, match="is not an SDXL pipeline.*use msdda.pipelines.MSDDAPipeline"):
        MSDDAXLPipeline(sd, {})
    # the refiner (an aesthetic score instead of the target size) and LCM UNets are refused too
    from diffusers import StableDiffusionXLImg2ImgPipeline

    refiner = StableDiffusionXLImg2ImgPipeline(**tiny.base("ddim").components, requires_aesthetics_score=True)
    with pytest.raises(PipelineError, match="requires_aesthetics_score=True"):
        MSDDAXLPipeline(refiner, {})
    lcm = tiny.base("ddim")
    lcm.unet.register_to_config(time_cond_proj_dim=8)
    with pytest.raises(PipelineError, match="time_cond_proj_dim"):
        MSDDAXLPipeline(lcm, {})
    # SDXL-only keywords given to MSDDAPipeline: a TypeError that points to MSDDAXLPipeline
    with pytest.raises(TypeError, match=r"\['prompt_2'\]; SDXL's keywords need msdda.pipelines.sdxl.MSDDAXLPipeline"):
        MSDDAPipeline(sd, {})(PROMPT, method="base", prompt_2="x", num_inference_steps=1)


def test_bad_loras_are_refused_and_the_unet_left_as_it_was(tiny):
    base = tiny.base("ddim")
    before = _snapshot(base.unet)
    with pytest.raises(AdapterError, match=r"also adapts the text encoder .*'text_encoder_2\."):
        MSDDAXLPipeline(base, {"aes": tiny.aes, "with_text": tiny.with_text})
    with pytest.raises(AdapterError, match="trained for another base|does not fit this base model"):
        MSDDAXLPipeline(base, {"aes": tiny.aes, "foreign": tiny.foreign})
    assert not getattr(base.unet, "peft_config", None)
    after = _snapshot(base.unet)
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    # a full UNet of another architecture (here: SD's, without the added embeddings) is refused as well
    other = tiny.root / "sd_unet"
    make_sd_unet(cross_attention_dim=32).save_pretrained(other)
    with pytest.raises(AdapterError, match="addition_embed_type=None but the base has 'text_time'"):
        MSDDAXLPipeline(base, {"sd": other})


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"prompt": None, "prompt_embeds": torch.zeros(1, 16, 32)}, PipelineError, "pooled_prompt_embeds"),
        ({"original_size": (16,)}, PipelineError, r"original_size=\(16,\); pass a pair \(height, width\)"),
        ({"crops_coords_top_left": (-1, 0)}, PipelineError, r"crops_coords_top_left=\(-1, 0\)"),
        (
            {"pooled_prompt_embeds": "x"},
            PipelineError,
            r"pooled_prompt_embeds is str; pass the pooled embeddings \[B, 16\]",
        ),
        ({"prompt_3": "x"}, TypeError, r"unexpected keyword argument\(s\) \['prompt_3'\]"),
        ({"output_type": "jpg"}, PipelineError, "output_type"),
    ],
)
def test_bad_calls_fail_before_denoising(tiny, kwargs, error, match):
    pipe = tiny.pipeline("ddim")
    calls = count_unet_calls(pipe)
    with pytest.raises(error, match=match):
        run(pipe, {"aes": 1.0}, **kwargs)
    assert calls[0] == 0 and not pipe.switch.any_enabled()
