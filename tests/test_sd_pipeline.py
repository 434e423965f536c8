"""MSDDAPipeline on tiny Stable Diffusion components built from config (no downloads), 2-3 steps on CPU.

Exact comparisons: K = 1 against diffusers' own StableDiffusionPipeline (DDIM with and without eta, DDPM),
MSDDA = DB-MPA for equal variances, one-hot weights = the single-adapter pipeline, rewarded-soup = a UNet
with the summed low-rank updates merged by hand; the base weights are unchanged after every call and no
adapter stays active; bad input fails before any denoising. Plus the SD reward models and the CLI.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from diffusers import (  # noqa: E402
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict  # noqa: E402
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: E402

from msdda.core.errors import ScheduleError, UnsupportedSchedulerError  # noqa: E402
from msdda.pipelines import (  # noqa: E402
    AdapterError,
    MissingDependencyError,
    MSDDAPipeline,
    ObjectiveError,
    PipelineError,
    RewardModelError,
    build_lora_soup,
)
from msdda.pipelines.rewards import AestheticScorer, CLIPSimilarityScorer, clip_preprocess  # noqa: E402
from msdda.sampling.methods import PlanError  # noqa: E402

PROMPT = "a red cube"
STEPS = 3
ATOL = 1e-4  # measured differences to diffusers are ~4e-6 (float32 rounding; kernels are computed in float64)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny models gain nothing from threads, and on a shared 2-core machine OpenMP spinning costs 10-100x.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# ----- tiny components ------------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte-level alphabet (printable stand-ins for the 256 byte values)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def make_tokenizer(folder: Path) -> CLIPTokenizer:
    """A character-level CLIP BPE tokenizer (no merges): 514 tokens, written to `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16)


def make_unet(cross_attention_dim: int = 16, seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        norm_num_groups=8,
        attention_head_dim=4,
    ).eval()


def make_text_encoder() -> CLIPTextModel:
    torch.manual_seed(1)
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
        projection_dim=16,
    )
    return CLIPTextModel(config).eval()


def make_vae() -> AutoencoderKL:
    torch.manual_seed(2)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
        sample_size=16,
    ).eval()


def sd_scheduler(kind: str):
    """SD 1.5's scheduler settings, as DDIM or DDPM."""
    cfg = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, steps_offset=1)
    if kind == "ddim":
        return DDIMScheduler(set_alpha_to_one=False, **cfg)
    return DDPMScheduler(**cfg)


def _randomise_lora(module: nn.Module, seed: int, scale: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


class Tiny:
    """The shared tiny components and the adapters written to disk."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.unet = make_unet()
        self.vae = make_vae()
        self.text_encoder = make_text_encoder()
        self.tokenizer = make_tokenizer(root / "tokenizer")
        # "aes": diffusers format, attention projections, rank 4, alpha 8 (stored in the file's metadata).
        self.aes = self._diffusers_lora(
            "aes", 11, LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
        )
        # "align": peft format (PeftModel.save_pretrained), rank 2, also a 1x1 Conv2d (proj_in).
        self.align = self._peft_lora(
            "align", 12, LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_v", "proj_in"])
        )
        # An adapter trained for another base: cross_attention_dim 32, so attn2.to_k/to_v take 32 inputs.
        other = make_unet(cross_attention_dim=32, seed=5)
        self.foreign = self._diffusers_lora(
            "foreign", 13, LoraConfig(r=4, lora_alpha=4, target_modules=["to_k", "to_v"]), unet=other
        )
        # A full-UNet objective: the base with perturbed weights, saved with save_pretrained.
        full = copy.deepcopy(self.unet)
        g = torch.Generator().manual_seed(14)
        with torch.no_grad():
            for p in full.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
        self.full_dir = root / "full_unet"
        full.save_pretrained(self.full_dir)
        self.full = full

    def _diffusers_lora(self, name: str, seed: int, cfg: LoraConfig, unet: nn.Module | None = None) -> Path:
        u = copy.deepcopy(self.unet if unet is None else unet)
        u.add_adapter(cfg, adapter_name=name)
        _randomise_lora(u, seed)
        folder = self.root / name
        StableDiffusionPipeline.save_lora_weights(
            folder,
            unet_lora_layers=get_peft_model_state_dict(u, adapter_name=name),
            unet_lora_adapter_metadata=cfg.to_dict(),
        )
        return folder

    def _peft_lora(self, name: str, seed: int, cfg: LoraConfig) -> Path:
        model = get_peft_model(copy.deepcopy(self.unet), cfg)
        _randomise_lora(model, seed)
        folder = self.root / name
        model.save_pretrained(folder)
        return folder

    def base(self, scheduler: str = "ddim", unet: nn.Module | None = None) -> StableDiffusionPipeline:
        """A fresh diffusers pipeline with its own copy of the base UNet (or `unet`)."""
        pipe = StableDiffusionPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=copy.deepcopy(self.unet) if unet is None else unet,
            scheduler=sd_scheduler(scheduler),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def pipeline(self, scheduler: str = "ddim", **objectives) -> MSDDAPipeline:
        objs = objectives or {"aes": self.aes, "align": self.align}
        return MSDDAPipeline(self.base(scheduler), objs)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Tiny:
    return Tiny(tmp_path_factory.mktemp("tiny_sd"))


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def run(pipe, weights=None, **kw):
    kw.setdefault("num_inference_steps", STEPS)
    kw.setdefault("output_type", "latent")
    kw.setdefault("guidance_scale", 4.0)
    kw.setdefault("progress", False)
    kw.setdefault("generator", gen())
    return pipe(PROMPT, weights, **kw)


def diffusers_latents(pipe: StableDiffusionPipeline, **kw) -> torch.Tensor:
    kw.setdefault("num_inference_steps", STEPS)
    kw.setdefault("output_type", "latent")
    kw.setdefault("guidance_scale", 4.0)
    return pipe(PROMPT, generator=gen(), **kw).images


def count_unet_calls(pipe: MSDDAPipeline) -> list[int]:
    calls = [0]
    pipe.unet.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


# ----- K = 1 equals diffusers -------------------------------------------------------------------------------


@pytest.mark.parametrize(("scheduler", "eta"), [("ddim", 0.0), ("ddim", 0.7), ("ddpm", 0.0)])
def test_base_matches_diffusers(tiny, scheduler, eta):
    pipe = tiny.pipeline(scheduler)
    ours = run(pipe, method="base", eta=eta).images
    extra = {"eta": eta} if scheduler == "ddim" else {}
    theirs = diffusers_latents(tiny.base(scheduler), **extra)
    assert (ours - theirs).abs().max() < ATOL
    # All weight on the reference is the same model: explicitly, or as 1 - sum of zero objective weights.
    assert torch.equal(run(pipe, {"reference": 1.0}, eta=eta).images, ours)
    assert torch.equal(run(pipe, {"aes": 0.0}, eta=eta).images, ours)


@pytest.mark.parametrize("scheduler", ["ddim", "ddpm"])
def test_one_adapter_matches_diffusers(tiny, scheduler):
    pipe = tiny.pipeline(scheduler)
    ours = run(pipe, {"aes": 1.0}, output_type="np").images
    ref = tiny.base(scheduler)
    ref.load_lora_weights(tiny.aes, adapter_name="aes")
    theirs = ref(PROMPT, generator=gen(), num_inference_steps=STEPS, guidance_scale=4.0, output_type="np").images
    assert ours.shape == theirs.shape == (1, 16, 16, 3)
    assert abs(ours - theirs).max() < ATOL
    base_image = run(pipe, method="base", output_type="np").images
    assert abs(ours - base_image).max() > 1e-2  # the adapter matters


def test_full_unet_objective_matches_diffusers(tiny):
    pipe = MSDDAPipeline(tiny.base("ddpm"), {"full": tiny.full_dir, "aes": tiny.aes})
    assert pipe.objectives["full"].kind == "unet"
    ours = run(pipe, method="single:full").images
    theirs = diffusers_latents(tiny.base("ddpm", unet=copy.deepcopy(tiny.full)))
    assert (ours - theirs).abs().max() < ATOL
    mixed = run(pipe, {"full": 0.5, "aes": 0.5}).images
    assert torch.isfinite(mixed).all()


# ----- rules against each other -----------------------------------------------------------------------------


@pytest.mark.parametrize(("scheduler", "eta"), [("ddpm", 0.0), ("ddim", 0.5)])
def test_msdda_equals_dbmpa_for_equal_variances(tiny, scheduler, eta):
    pipe = tiny.pipeline(scheduler)
    for weights in ({"aes": 0.3, "align": 0.7}, {"aes": 0.5, "align": 0.3}):  # the second: reference takes 0.2
        a = run(pipe, weights, eta=eta)
        b = run(pipe, weights, method="db-mpa", eta=eta)
        assert (a.images - b.images).abs().max() < 1e-5
        assert a.cost.model_evals == b.cost.model_evals == STEPS * 2 * len(a.config["exponents"])
    assert a.config["exponents"] == pytest.approx({"aes": 0.5, "align": 0.3, "reference": 0.2})


def test_one_hot_weights_equal_single_adapter(tiny):
    pipe = tiny.pipeline("ddpm")
    one_hot = run(pipe, {"aes": 1.0, "align": 0.0})
    single = run(pipe, method="single:aes")
    assert torch.equal(one_hot.images, single.images)
    assert one_hot.cost.model_evals == STEPS * 2  # the zero-weight objective is never evaluated
    other = run(pipe, {"aes": 0.0, "align": 1.0})
    assert torch.equal(other.images, run(pipe, method="single:align").images)
    assert not torch.equal(other.images, one_hot.images)


def test_adapter_switch_public_api_path_agrees(tiny):
    pipe = tiny.pipeline("ddpm")
    assert pipe.switch.fast  # this peft keeps the switch state where the probe looked
    fast = run(pipe, {"aes": 0.6, "align": 0.4})
    pipe.switch.fast = False  # peft's public set_adapter / enable_adapters
    slow = run(pipe, {"aes": 0.6, "align": 0.4})
    assert torch.equal(fast.images, slow.images)
    assert all(layer.disable_adapters for layer in pipe.switch.layers)
    assert not any(p.requires_grad for n, p in pipe.unet.named_parameters() if "lora_" in n)


def test_kl_control_and_betas(tiny):
    pipe = tiny.pipeline("ddpm")
    half = run(pipe, {"aes": 0.5})  # reference takes 0.5
    assert half.config["exponents"] == {"aes": 0.5, "reference": 0.5}
    # a_k = w_k beta_k / beta: beta_aes = 0.5 with weight 1 and an explicit beta = 1 gives the same exponents
    same = run(pipe, {"aes": 1.0}, betas={"aes": 0.5}, beta=1.0)
    assert torch.equal(half.images, same.images)
    # the default target beta (sum_k w_k beta_k for weights summing to 1, as in `msdda sweep`) keeps sum a_k = 1
    default = run(pipe, {"aes": 1.0}, betas={"aes": 0.5})
    assert default.config["exponents"] == {"aes": 1.0} and default.config["beta"] == 0.5


def test_prompt_embeds_equal_prompt(tiny):
    pipe = tiny.pipeline("ddim")
    embeds, negative = pipe.base.encode_prompt(PROMPT, "cpu", 1, True)
    a = run(pipe, {"aes": 0.4, "align": 0.6})
    b = pipe(
        prompt_embeds=embeds,
        negative_prompt_embeds=negative,
        weights={"aes": 0.4, "align": 0.6},
        num_inference_steps=STEPS,
        guidance_scale=4.0,
        output_type="latent",
        generator=gen(),
        progress=False,
    )
    assert torch.equal(a.images, b.images)


def test_db_mpa_ls_and_output_types(tiny):
    pipe = tiny.pipeline("ddpm")
    a = run(pipe, {"aes": 0.5, "align": 0.5}, method="db-mpa-ls")
    calls = count_unet_calls(pipe)
    b = run(pipe, {"aes": 0.5, "align": 0.5}, method="db-mpa-ls")
    assert torch.equal(a.images, b.images)  # the generator drives the model choice too
    # only the drawn objective runs at each step: one UNet call (cond + uncond batched, counted 2) per step
    assert a.cost.model_evals == STEPS * 2 and calls[0] == STEPS
    pt = run(pipe, {"aes": 0.5, "align": 0.5}, output_type="pt").images
    assert pt.shape == (1, 3, 16, 16) and float(pt.min()) >= 0 and float(pt.max()) <= 1
    pil = run(pipe, {"aes": 0.5, "align": 0.5}, output_type="pil").images
    assert pil[0].size == (16, 16)


def test_callback_on_step_end(tiny):
    pipe = tiny.pipeline("ddpm")
    seen = []

    def callback(p, i, t, kwargs):
        seen.append((i, int(t)))
        assert p is pipe
        return {"latents": kwargs["latents"] * 0.0} if i == STEPS - 1 else {}

    out = run(pipe, {"aes": 0.5, "align": 0.5}, callback_on_step_end=callback)
    assert [i for i, _ in seen] == list(range(STEPS))
    expected = copy.deepcopy(pipe.base.scheduler)
    expected.set_timesteps(STEPS)
    assert [t for _, t in seen] == [int(t) for t in expected.timesteps]
    assert len(pipe.base.scheduler.timesteps) != STEPS  # the run set the timesteps of its own scheduler copy
    assert torch.equal(out.images, torch.zeros_like(out.images))
    with pytest.raises(PipelineError, match=r"\['noise_pred'\] are not supported.*'negative_prompt_embeds'"):
        run(pipe, {"aes": 1.0}, callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["noise_pred"])


def test_reward_guided_methods(tiny):
    pipe = tiny.pipeline("ddpm")
    calls = {"latent": 0, "image": 0}

    def latent_reward(latents, prompts):
        calls["latent"] += 1
        assert latents.shape[1:] == (4, 8, 8) and prompts == [PROMPT]
        return -latents.pow(2).flatten(1).mean(1)

    def image_reward(images, prompts):
        calls["image"] += 1
        assert (
            images.shape[1:] == (3, 16, 16) and float(images.detach().min()) >= 0 and float(images.detach().max()) <= 1
        )
        return images.flatten(1).mean(1)

    code = run(
        pipe,
        {"small": 1.0},
        method="code",
        rewards={"small": latent_reward},
        reward_input="latent",
        method_options={"num_candidates": 3, "block_size": 1},
    )
    assert calls["latent"] == 3 * (STEPS - 1) and code.cost.reward_evals == 3 * (STEPS - 1)
    rgg = run(pipe, {"bright": 1.0}, method="rgg", rewards={"bright": image_reward}, method_options={"scale": 5.0})
    assert calls["image"] == STEPS and rgg.cost.reward_grads == STEPS
    plain = run(pipe, method="base")
    assert not torch.equal(rgg.images, plain.images)
    assert not pipe.switch.any_enabled()


# ----- state after a call --------------------------------------------------------------------------------


def _snapshot(unet: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in unet.state_dict().items()}


def test_base_weights_unchanged_and_no_adapter_active(tiny):
    pipe = tiny.pipeline("ddpm")
    before = _snapshot(pipe.unet)
    adapters = set(pipe.unet.peft_config)
    for kw in (
        {"weights": {"aes": 0.5, "align": 0.5}},
        {"weights": {"aes": 0.7, "align": 0.6}},  # reference exponent -0.3 (extrapolation)
        {"weights": {"aes": 0.5, "align": 0.5}, "method": "rewarded-soup"},
        {"weights": {"aes": 0.5, "align": 0.5}, "method": "db-mpa-ls"},
        {"method": "single:align"},
    ):
        run(pipe, **kw)
        after = _snapshot(pipe.unet)
        assert after.keys() == before.keys()
        assert all(torch.equal(before[k], after[k]) for k in before)
        assert set(pipe.unet.peft_config) == adapters  # the soup adapter is gone again
        assert not pipe.switch.any_enabled()
        assert all(layer.disable_adapters for layer in pipe.switch.layers)

    def boom(*_):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        run(pipe, {"aes": 0.5, "align": 0.5}, callback_on_step_end=boom)
    assert not pipe.switch.any_enabled()
    # After the calls the diffusers pipeline itself computes the base model again.
    assert (diffusers_latents(pipe.base) - diffusers_latents(tiny.base("ddpm"))).abs().max() < ATOL


# ----- rewarded soups --------------------------------------------------------------------------------------


def _manual_delta(layer, adapter: str) -> torch.Tensor:
    """scaling * B @ A, written out by hand (Linear, or Conv2d with a 1x1 B)."""
    a = layer.lora_A[adapter].weight.double()
    b = layer.lora_B[adapter].weight.double()
    delta = b.flatten(1) @ a.flatten(1)
    return layer.scaling[adapter] * delta.reshape(b.shape[0], *a.shape[1:])


def test_rewarded_soup_is_exact(tiny):
    from peft.tuners.lora import LoraLayer

    pipe = tiny.pipeline("ddpm")
    weights = {"aes": 0.3, "align": 0.9}
    build_lora_soup(pipe.unet, weights, "soup")
    merged = copy.deepcopy(tiny.unet)
    n_layers = 0
    try:
        for name, layer in pipe.unet.named_modules():
            if not isinstance(layer, LoraLayer):
                continue
            expected = sum(w * _manual_delta(layer, a) for a, w in weights.items() if a in layer.lora_A)
            assert (_manual_delta(layer, "soup") - expected).abs().max() < 1e-6
            target = merged.get_submodule(name)
            with torch.no_grad():
                target.weight.add_(expected.to(target.weight.dtype))
            n_layers += 1
    finally:
        pipe.switch.refresh()
        pipe.switch.delete("soup")
    assert n_layers > 0
    soup = run(pipe, weights, method="rewarded-soup")
    theirs = diffusers_latents(tiny.base("ddpm", unet=merged))
    assert (soup.images - theirs).abs().max() < ATOL
    assert soup.config["soup"] == weights and soup.cost.model_evals == STEPS * 2


# The factor average: two adapters of one configuration (rank 4, alpha 8, the attention projections).
_FACTOR_CFG = dict(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"])


def _lora_state(tiny, seed: int, cfg: dict) -> dict[str, torch.Tensor]:
    u = copy.deepcopy(tiny.unet)
    u.add_adapter(LoraConfig(**cfg), adapter_name="x")
    _randomise_lora(u, seed)
    return get_peft_model_state_dict(u, adapter_name="x")


def _save_lora(tiny, name: str, state: dict[str, torch.Tensor], cfg: dict) -> Path:
    folder = tiny.root / name
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=state, unet_lora_adapter_metadata=LoraConfig(**cfg).to_dict()
    )
    return folder


def test_factor_soup_equals_hand_averaged_lora_factors(tiny):
    """average='factors': the adapters' A and B averaged separately (their state dicts averaged by hand,
    loaded into diffusers' own pipeline); the default 'delta' soup is unchanged and differs from it."""
    states = {"f1": _lora_state(tiny, 21, _FACTOR_CFG), "f2": _lora_state(tiny, 22, _FACTOR_CFG)}
    folders = {k: _save_lora(tiny, k, s, _FACTOR_CFG) for k, s in states.items()}
    weights = {"f1": 0.3, "f2": 0.7}
    averaged = {key: 0.3 * states["f1"][key] + 0.7 * states["f2"][key] for key in states["f1"]}
    hand = _save_lora(tiny, "f-hand-averaged", averaged, _FACTOR_CFG)
    pipe = MSDDAPipeline(tiny.base("ddpm"), folders)
    factors = run(pipe, weights, method="rewarded-soup", method_options={"average": "factors"})
    ref = tiny.base("ddpm")
    ref.load_lora_weights(hand, adapter_name="hand")
    theirs = diffusers_latents(ref)
    assert (factors.images - theirs).abs().max() < ATOL
    assert factors.config["soup_average"] == "factors" and factors.cost.model_evals == STEPS * 2
    assert set(pipe.unet.peft_config) == {pipe.objectives[k].adapter for k in folders}  # the soup is gone
    delta = run(pipe, weights, method="rewarded-soup")
    assert torch.equal(run(pipe, weights, method="rewarded-soup", method_options={"average": "delta"}).images,
                       delta.images)
    assert (delta.images - factors.images).abs().max() > 1e-3  # the two averages are different models


def test_factor_soup_needs_one_rank_scaling_and_target_set(tiny):
    pipe = tiny.pipeline("ddpm")  # aes: rank 4 on to_q/k/v/out; align: rank 2 on to_q/to_v/proj_in
    with pytest.raises(AdapterError, match=r"average='factors': adapter\(s\) \['.*'\] have no LoRA at"):
        run(pipe, {"aes": 0.5, "align": 0.5}, method="rewarded-soup", method_options={"average": "factors"})
    assert set(pipe.unet.peft_config) == {pipe.objectives[k].adapter for k in ("aes", "align")}
    f1 = _save_lora(tiny, "g1", _lora_state(tiny, 31, _FACTOR_CFG), _FACTOR_CFG)
    for cfg, pattern in [
        ({**_FACTOR_CFG, "r": 2, "lora_alpha": 4}, "have ranks"),
        ({**_FACTOR_CFG, "lora_alpha": 4}, r"scalings \(alpha / r\)"),
    ]:
        other = _save_lora(tiny, f"g-{cfg['r']}-{cfg['lora_alpha']}", _lora_state(tiny, 32, cfg), cfg)
        p = MSDDAPipeline(tiny.base("ddpm"), {"g1": f1, "g2": other})
        with pytest.raises(AdapterError, match=pattern):
            run(p, {"g1": 0.5, "g2": 0.5}, method="rewarded-soup", method_options={"average": "factors"})
        assert torch.isfinite(run(p, {"g1": 0.5, "g2": 0.5}, method="rewarded-soup").images).all()  # delta works
    full = MSDDAPipeline(tiny.base("ddim"), {"full": tiny.full_dir})
    with pytest.raises(PipelineError, match="average='factors' averages LoRA factors"):
        run(full, {"full": 1.0}, method="rewarded-soup", method_options={"average": "factors"})
    with pytest.raises(PlanError, match="choose one of"):
        run(pipe, {"aes": 1.0}, method="rewarded-soup", method_options={"average": "both"})

def test_rewarded_soup_of_full_unets(tiny):
    pipe = MSDDAPipeline(tiny.base("ddim"), {"full": tiny.full_dir})
    out = run(pipe, {"full": 0.25}, method="rewarded-soup")  # theta = base + 0.25 (theta_full - base)
    blended = copy.deepcopy(tiny.unet)
    with torch.no_grad():
        for p, q in zip(blended.parameters(), tiny.full.parameters(), strict=True):
            p.add_(0.25 * (q - p))
    theirs = diffusers_latents(tiny.base("ddim", unet=blended))
    assert (out.images - theirs).abs().max() < ATOL


# ----- errors before any denoising --------------------------------------------------------------------------


def test_adapter_for_another_base_is_refused(tiny):
    base = tiny.base("ddim")
    before = _snapshot(base.unet)
    with pytest.raises(AdapterError, match=r"does not fit this base model: module '.*attn2\.to_k' is Linear\(in=16"):
        MSDDAPipeline(base, {"aes": tiny.aes, "foreign": tiny.foreign})
    # Nothing half-done: the adapter loaded before the foreign one is removed again, the UNet is as it was.
    assert not getattr(base.unet, "peft_config", None)
    after = _snapshot(base.unet)
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        # the method planner's checks raise the same PlanError as in `msdda sweep`
        ({"weights": {"aes": 0.5, "aesthetic": 0.5}}, PlanError, r"unknown objective\(s\) \['aesthetic'\]"),
        ({"weights": {"aes": 0.5, "reference": 0.2}}, PlanError, "must sum to 1"),
        ({"weights": {"aes": 0.5}, "method": "soup"}, PlanError, "unknown method 'soup'"),
        ({"method": "single:nope"}, PlanError, "unknown objective 'nope'"),
        ({"weights": None}, PlanError, "needs weights"),
        ({"weights": {"aes": 0.5, "align": 0.8}, "method": "db-mpa-ls"}, PlanError, "negative probability"),
        # the sampler's own check: the same ScheduleError as msdda.sample(..., eta=0.5) on a DDPM scheduler
        ({"weights": {"aes": 1.0}, "eta": 0.5}, ScheduleError, r"eta applies to DDIM only \(got eta=0.5\)"),
        ({"weights": {"x": 1.0}, "method": "code"}, PlanError, "needs rewards"),
        ({"weights": {"aes": 1.0}, "output_type": "jpg"}, PipelineError, "output_type"),
    ],
)
def test_bad_calls_fail_before_denoising(tiny, kwargs, error, match):
    pipe = tiny.pipeline("ddpm")
    calls = count_unet_calls(pipe)
    weights = kwargs.pop("weights", None)
    with pytest.raises(error, match=match):
        run(pipe, weights, **kwargs)
    assert calls[0] == 0
    assert not pipe.switch.any_enabled()


def test_unsupported_scheduler_fails_before_denoising(tiny):
    base = tiny.base("ddim")
    base.scheduler = EulerDiscreteScheduler.from_config(base.scheduler.config)
    pipe = MSDDAPipeline(base, {"aes": tiny.aes})
    calls = count_unet_calls(pipe)
    with pytest.raises(UnsupportedSchedulerError, match="EulerDiscreteScheduler.*scheduler='ddim'"):
        run(pipe, {"aes": 1.0})
    assert calls[0] == 0
    # The fix the message names works: rebuild as DDIM from the same config.
    pipe2 = MSDDAPipeline(tiny.base("ddim"), {"aes": tiny.aes}, scheduler="ddim")
    assert type(pipe2.base.scheduler).__name__ == "DDIMScheduler"


def test_missing_optional_package(tiny, monkeypatch):
    base = tiny.base("ddim")
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(MissingDependencyError, match="'peft'.*pip install"):
        MSDDAPipeline(base, {"aes": tiny.aes})
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(MissingDependencyError, match="'transformers'"):
        AestheticScorer.from_pretrained(tiny.root / "nowhere")
    err = MissingDependencyError("x")
    assert isinstance(err, ImportError) and isinstance(err, ValueError)


def test_bad_objective_sources(tiny, tmp_path):
    from safetensors.torch import save_file

    te = tmp_path / "te_lora.safetensors"
    save_file(
        {
            "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 16),
            "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(16, 2),
        },
        te,
    )
    pickled = tmp_path / "lora.bin"
    torch.save({"a": torch.zeros(1)}, pickled)
    cases = [
        ({"aes": te}, AdapterError, "also adapts the text encoder"),
        ({"aes": pickled}, AdapterError, "never unpickles"),
        ({"aes": tmp_path / "missing"}, ObjectiveError, "neither an existing path"),
        ({"reference": tiny.aes}, ObjectiveError, "reserved"),
        ({"a.b": tiny.aes}, ObjectiveError, "not valid"),
        ({"x": 3}, ObjectiveError, "not supported"),
    ]
    for objectives, error, match in cases:
        base = tiny.base("ddim")
        with pytest.raises(error, match=match):
            MSDDAPipeline(base, objectives)
        assert not getattr(base.unet, "peft_config", {})
    # An adapter already loaded into the base UNet can be named as the source.
    base = tiny.base("ddim")
    base.load_lora_weights(tiny.aes, adapter_name="mine")
    pipe = MSDDAPipeline(base, {"aes": "mine"})
    assert pipe.objectives["aes"].adapter == "mine" and not pipe.switch.any_enabled()


# ----- reward models --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory, tiny) -> Path:
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("tiny_clip")
    torch.manual_seed(3)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=514,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=16,
            bos_token_id=512,
            eos_token_id=513,
            pad_token_id=513,
        ),
        vision_config=dict(
            image_size=16,
            patch_size=8,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
        ),
        projection_dim=8,
    )
    CLIPModel(config).eval().save_pretrained(folder)
    tiny.tokenizer.save_pretrained(folder)
    g = torch.Generator().manual_seed(4)
    head = {
        "layers.0.weight": torch.randn(4, 8, generator=g),
        "layers.0.bias": torch.randn(4, generator=g),
        "layers.2.weight": torch.randn(1, 4, generator=g),
        "layers.2.bias": torch.randn(1, generator=g),
    }
    save_file(head, folder / "aesthetic_head.safetensors")
    return folder


def _features(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def test_aesthetic_scorer(tiny_clip):
    from safetensors.torch import load_file

    scorer = AestheticScorer.from_pretrained(tiny_clip)
    images = torch.rand(3, 3, 16, 16, generator=gen(5))
    scores = scorer(images)
    assert scores.shape == (3,)
    clip = CLIPModel.from_pretrained(tiny_clip).eval()
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    with torch.no_grad():
        emb = _features(clip.get_image_features(pixel_values=(images - mean) / std))
    emb = emb / emb.norm(dim=-1, keepdim=True)
    h = load_file(tiny_clip / "aesthetic_head.safetensors")
    expected = (emb @ h["layers.0.weight"].T + h["layers.0.bias"]) @ h["layers.2.weight"].T + h["layers.2.bias"]
    assert torch.allclose(scores, expected.squeeze(-1), atol=1e-5)
    # Differentiable through the preprocessing (a resize here): what RGG needs.
    big = torch.rand(2, 3, 24, 32, generator=gen(6), requires_grad=True)
    scorer(big).sum().backward()
    assert big.grad is not None and big.grad.abs().sum() > 0
    assert clip_preprocess(big.detach(), 16, (0.5,) * 3, (0.5,) * 3).shape == (2, 3, 16, 16)


def test_clip_similarity_scorer(tiny_clip, tiny):
    scorer = CLIPSimilarityScorer.from_pretrained(tiny_clip)
    images = torch.rand(2, 3, 16, 16, generator=gen(7))
    prompts = ["a red cube", "a blue ball"]
    scores = scorer(images, prompts)
    clip = CLIPModel.from_pretrained(tiny_clip).eval()
    tokens = tiny.tokenizer(prompts, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    with torch.no_grad():
        img = _features(clip.get_image_features(pixel_values=(images - mean) / std))
        txt = _features(clip.get_text_features(**tokens))
    cos = torch.nn.functional.cosine_similarity(img, txt, dim=-1)
    assert torch.allclose(scores, clip.logit_scale.exp() * cos, atol=1e-5)
    assert torch.allclose(
        CLIPSimilarityScorer.from_pretrained(tiny_clip, scale=2.5)(images, prompts), 2.5 * cos, atol=1e-5
    )
    with pytest.raises(RewardModelError, match="one prompt per image"):
        scorer(images, None)


def test_reward_model_errors(tiny_clip, tmp_path):
    with pytest.raises(RewardModelError, match="not a folder"):
        AestheticScorer.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(RewardModelError, match="weight file .* not found"):
        AestheticScorer.from_pretrained(tiny_clip, head_path=tmp_path / "head.safetensors")
    from safetensors.torch import save_file

    save_file({"layers.0.weight": torch.zeros(1, 5)}, tmp_path / "head5.safetensors")
    with pytest.raises(RewardModelError, match="takes 5-dim embeddings but the CLIP model projects to 8"):
        AestheticScorer.from_pretrained(tiny_clip, head_path=tmp_path / "head5.safetensors")
    empty = tmp_path / "clip"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    torch.save({}, empty / "pytorch_model.bin")
    with pytest.raises(RewardModelError, match="never unpickles"):
        AestheticScorer.from_pretrained(empty)


def test_clip_rewards_drive_code(tiny, tiny_clip):
    pipe = tiny.pipeline("ddpm")
    rewards = {
        "aesthetic": AestheticScorer.from_pretrained(tiny_clip),
        "alignment": CLIPSimilarityScorer.from_pretrained(tiny_clip),
    }
    out = run(
        pipe,
        {"aesthetic": 0.5, "alignment": 0.5},
        method="code",
        rewards=rewards,
        method_options={"num_candidates": 2, "block_size": 2},
    )
    assert out.cost.reward_evals == 2 * 2 and out.config["reward_input"] == "image"


# ----- CLI ----------------------------------------------------------------------------------------------------


def test_cli_sample(tiny, tmp_path):
    import typer
    from typer.testing import CliRunner

    from msdda.pipelines.cli import register

    base_dir = tmp_path / "base"
    tiny.base("ddim").save_pretrained(base_dir)
    app = typer.Typer()

    @app.callback()
    def main() -> None:
        """test app"""

    register(app)
    out = tmp_path / "out"
    args = [
        "sample",
        "--base",
        str(base_dir),
        "--objective",
        f"aes={tiny.aes}",
        "--objective",
        f"align={tiny.align}",
        "--weights",
        "aes=0.6",
        "--weights",
        "align=0.4",
        "--prompt",
        PROMPT,
        "--out",
        str(out),
        "--steps",
        "2",
        "--guidance-scale",
        "3",
        "--seed",
        "7",
        "--num-images",
        "2",
        "--quiet",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["images"] == ["image_000.png", "image_001.png"]
    assert all((out / name).is_file() for name in config["images"])
    assert config["method"] == "msdda" and config["weights"] == {"aes": 0.6, "align": 0.4}
    assert config["seed"] == 7 and config["scheduler"] == "DDIMScheduler" and config["num_inference_steps"] == 2
    assert config["objectives"]["align"]["kind"] == "lora" and config["cost"]["model_evals"] == 2 * 2 * 2
    assert not list(out.glob(".*tmp"))  # no temporary files left behind
    # Same seed, same images (via the Python API with the same settings).
    pipe = MSDDAPipeline.from_pretrained(base_dir, {"aes": tiny.aes, "align": tiny.align})
    again = pipe(
        PROMPT,
        {"aes": 0.6, "align": 0.4},
        num_inference_steps=2,
        guidance_scale=3,
        seed=7,
        num_images_per_prompt=2,
        output_type="pil",
        progress=False,
    ).images
    import numpy as np
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(out / "image_001.png")), np.asarray(again[1]))

    bad = CliRunner().invoke(
        app, [*args[:9], "--weights", "aesthetic=1", "--prompt", "x", "--out", str(tmp_path / "o2")]
    )
    assert bad.exit_code == 2 and "unknown objective(s) ['aesthetic']" in bad.output
    assert not (tmp_path / "o2").exists()


def test_batch_mistakes_fail_before_denoising(tiny):
    pipe = tiny.pipeline("ddim")
    calls = count_unet_calls(pipe)
    for kwargs, match in (
        ({"num_images_per_prompt": 0}, "num_images_per_prompt=0"),
        ({"latents": torch.zeros(1, 4, 3, 3)}, r"latents have shape \(1, 4, 3, 3\); this call needs \(1, 4, 8, 8\)"),
        ({"latents": torch.zeros(2, 4, 2, 2)}, "latents have shape"),
        ({"latents": [0.0]}, "latents is a list"),
        ({"guidance_scale": float("nan")}, "guidance_scale=nan"),
    ):
        with pytest.raises(PipelineError, match=match):
            run(pipe, {"aes": 1.0}, **kwargs)
    assert calls[0] == 0


# ----- diffusers conventions --------------------------------------------------------------------------------


def test_generator_list_reproduces_single_images(tiny):
    """DDIM eta=1 draws noise at every step: image i of a batched call with generators [g(s_i)] equals the
    single-image call with seed s_i, for the base model (also diffusers' own batched call) and for MSDDA."""
    pipe = tiny.pipeline("ddim")
    seeds = [5, 9, 2]
    for kw in ({"method": "base"}, {"weights": {"aes": 0.6, "align": 0.4}}):
        batched = run(pipe, eta=1.0, num_images_per_prompt=3, generator=[gen(s) for s in seeds], **kw).images
        assert batched.shape == (3, 4, 8, 8)
        for i, s in enumerate(seeds):
            single = run(pipe, eta=1.0, generator=gen(s), **kw).images
            assert torch.allclose(batched[i : i + 1], single, rtol=1e-5, atol=1e-5)  # batch-size float rounding
        assert (batched[0] - batched[1]).abs().max() > 1e-2
    theirs = tiny.base("ddim")(
        PROMPT,
        generator=[gen(s) for s in seeds],
        num_images_per_prompt=3,
        eta=1.0,
        num_inference_steps=STEPS,
        guidance_scale=4.0,
        output_type="latent",
    ).images
    ours = run(pipe, method="base", eta=1.0, num_images_per_prompt=3, generator=[gen(s) for s in seeds]).images
    assert (ours - theirs).abs().max() < ATOL
    # two prompts x two images: four generators, in the order prompt 0's images, then prompt 1's
    two = pipe(
        [PROMPT, "a blue ball"],
        method="base",
        num_images_per_prompt=2,
        generator=[gen(s) for s in (1, 2, 3, 4)],
        num_inference_steps=STEPS,
        eta=1.0,
        output_type="latent",
        progress=False,
    ).images
    alone = pipe(
        "a blue ball", method="base", generator=gen(4), num_inference_steps=STEPS, eta=1.0, output_type="latent"
    )
    assert torch.allclose(two[3:4], alone.images, rtol=1e-5, atol=1e-5)
    calls = count_unet_calls(pipe)
    with pytest.raises(PipelineError, match=r"list of 2 generators but this call makes 3 image\(s\)"):
        run(pipe, method="base", num_images_per_prompt=3, generator=[gen(1), gen(2)])
    with pytest.raises(PipelineError, match="not both"):
        run(pipe, method="base", generator=[gen(1)], seed=3)
    assert calls[0] == 0


def test_return_dict_false_returns_a_tuple(tiny):
    pipe = tiny.pipeline("ddim")
    out = run(pipe, {"aes": 0.5, "align": 0.5}, output_type="np")
    images, nsfw = run(pipe, {"aes": 0.5, "align": 0.5}, output_type="np", return_dict=False)
    assert images.shape == (1, 16, 16, 3) and nsfw is None and (images == out.images).all()


@pytest.mark.parametrize("scheduler", ["ddim", "ddpm"])
def test_guidance_rescale_matches_diffusers(tiny, scheduler):
    pipe = tiny.pipeline(scheduler)
    theirs = diffusers_latents(tiny.base(scheduler), guidance_rescale=0.7)
    ours = run(pipe, method="base", guidance_rescale=0.7)
    assert (ours.images - theirs).abs().max() < ATOL
    assert (ours.images - run(pipe, method="base").images).abs().max() > 1e-3  # the rescale matters
    assert ours.cost.model_evals == STEPS * 2 and ours.config["guidance_rescale"] == 0.7
    # with a LoRA objective, against diffusers with the adapter loaded
    ref = tiny.base(scheduler)
    ref.load_lora_weights(tiny.aes, adapter_name="aes")
    lora = run(pipe, {"aes": 1.0}, guidance_rescale=0.7).images
    assert (lora - diffusers_latents(ref, guidance_rescale=0.7)).abs().max() < ATOL
    # MSDDA with the reference: every model (and the reference) is guided and rescaled; costs as without
    fused = run(pipe, {"aes": 0.5, "align": 0.3}, guidance_rescale=0.5)
    assert fused.cost.model_evals == run(pipe, {"aes": 0.5, "align": 0.3}).cost.model_evals == STEPS * 2 * 3
    calls = count_unet_calls(pipe)
    for bad in (-0.1, 1.5, float("nan"), "0.7"):
        with pytest.raises(PipelineError, match=r"guidance_rescale=.*\[0, 1\]"):
            run(pipe, method="base", guidance_rescale=bad)
    assert calls[0] == 0


def test_cross_attention_kwargs_scale_lora_as_diffusers(tiny):
    pipe = tiny.pipeline("ddim")
    ref = tiny.base("ddim")
    ref.load_lora_weights(tiny.aes, adapter_name="aes")
    scale = {"scale": 0.5}
    ours = run(pipe, method="single:aes", cross_attention_kwargs=scale).images
    theirs = diffusers_latents(ref, cross_attention_kwargs=scale)
    assert (ours - theirs).abs().max() < ATOL
    full = run(pipe, method="single:aes").images
    assert (ours - full).abs().max() > 1e-3 and scale == {"scale": 0.5}
    # scale 0 is the base model; every UNet call gets the kwargs (all models of a fused call, the soup)
    zero = run(pipe, method="single:aes", cross_attention_kwargs={"scale": 0.0}).images
    assert (zero - run(pipe, method="base").images).abs().max() < ATOL
    for method in ("msdda", "rewarded-soup"):
        off = run(pipe, {"aes": 0.5, "align": 0.5}, method=method, cross_attention_kwargs={"scale": 0.0})
        assert (off.images - run(pipe, method="base").images).abs().max() < ATOL
    seen = []
    pipe.unet.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw.get("cross_attention_kwargs")), with_kwargs=True
    )
    run(pipe, {"aes": 0.5, "align": 0.3}, cross_attention_kwargs={"scale": 0.9})
    assert len(seen) == STEPS * 3 and all(k == {"scale": 0.9} for k in seen)
    with pytest.raises(PipelineError, match="cross_attention_kwargs is a float"):
        run(pipe, method="base", cross_attention_kwargs=0.5)


def test_callback_tensor_inputs_and_interrupt(tiny):
    pipe = tiny.pipeline("ddim")
    embeds, negative = pipe.base.encode_prompt(PROMPT, "cpu", 1, True)
    seen = {}

    def callback(p, i, t, kwargs):
        seen[i] = kwargs
        return kwargs  # the common diffusers idiom: hand back what was given

    inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]
    out = run(pipe, {"aes": 1.0}, callback_on_step_end=callback, callback_on_step_end_tensor_inputs=inputs)
    assert sorted(seen) == list(range(STEPS)) and set(seen[0]) == set(inputs)
    # laid out as in diffusers' SD pipeline: prompt_embeds = [negative; positive] under guidance
    assert torch.equal(seen[0]["prompt_embeds"], torch.cat([negative, embeds]))
    assert torch.equal(seen[0]["negative_prompt_embeds"], negative)
    assert torch.equal(seen[STEPS - 1]["latents"], out.images)
    # diffusers' own pipeline hands the callback the same embeddings
    theirs = {}
    tiny.base("ddim")(
        PROMPT,
        generator=gen(),
        num_inference_steps=STEPS,
        guidance_scale=4.0,
        output_type="latent",
        callback_on_step_end=lambda p, i, t, kw: theirs.setdefault(i, dict(kw)) and kw,
        callback_on_step_end_tensor_inputs=inputs,
    )
    assert torch.allclose(theirs[0]["prompt_embeds"], seen[0]["prompt_embeds"])
    assert torch.equal(theirs[0]["negative_prompt_embeds"], seen[0]["negative_prompt_embeds"])
    # a callback that replaces the embeddings is refused (they are fixed for the run)
    with pytest.raises(PipelineError, match="returned a new 'prompt_embeds'"):
        run(
            pipe,
            {"aes": 1.0},
            callback_on_step_end=lambda p, i, t, kw: {"prompt_embeds": kw["prompt_embeds"].chunk(2)[-1]},
            callback_on_step_end_tensor_inputs=["prompt_embeds"],
        )

    # interrupt: the run stops after the step whose callback set it, and returns that step's latents
    def stop(p, i, t, kwargs):
        seen["stop"] = kwargs["latents"]
        p.interrupt = True
        return {}

    halted = run(pipe, {"aes": 1.0}, callback_on_step_end=stop)
    assert halted.config["interrupted"] and halted.config["steps_run"] == 1
    assert torch.equal(halted.images, seen["stop"])
    again = run(pipe, {"aes": 1.0})  # the next call starts with interrupt False
    assert not again.config["interrupted"] and again.config["steps_run"] == STEPS


def _assert_same_state(before: dict[str, torch.Tensor], unet: nn.Module) -> None:
    after = unet.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_wrapped_pipeline_is_not_mutated(tiny):
    from peft.tuners.tuners_utils import BaseTunerLayer

    base = tiny.base("ddpm")
    base.unet.train()  # a non-default flag, to see that it is restored
    scheduler, config = base.scheduler, dict(base.scheduler.config)
    before = _snapshot(base.unet)
    pointers = {k: v.data_ptr() for k, v in base.unet.state_dict().items()}
    pipe = MSDDAPipeline(base, {"aes": tiny.aes, "align": tiny.align, "full": tiny.full_dir}, scheduler="ddim")
    # the pipeline has its own handle and scheduler; the modules are shared, not copied
    assert base.scheduler is scheduler and dict(base.scheduler.config) == config
    assert isinstance(pipe.base.scheduler, DDIMScheduler) and isinstance(base.scheduler, DDPMScheduler)
    assert pipe.base is not base and pipe.unet is base.unet and pipe.base.vae is base.vae
    for kw in (
        {"weights": {"aes": 0.5, "align": 0.5}},
        {"weights": {"aes": 0.5, "align": 0.5}, "method": "rewarded-soup"},
    ):
        run(pipe, **kw)
    assert base.scheduler is scheduler and dict(base.scheduler.config) == config
    assert (diffusers_latents(base) - diffusers_latents(tiny.base("ddpm"))).abs().max() < ATOL  # adapters are off
    pipe.release()
    _assert_same_state(before, base.unet)
    assert {k: v.data_ptr() for k, v in base.unet.state_dict().items()} == pointers  # the very same tensors
    assert not any(isinstance(m, BaseTunerLayer) for m in base.unet.modules())
    assert not hasattr(base.unet, "peft_config") and base.unet.training
    assert not any(p.requires_grad is False for p in base.unet.parameters())
    pipe.release()  # idempotent
    with pytest.raises(PipelineError, match="was released"):
        run(pipe, {"aes": 1.0})


def test_release_keeps_the_callers_own_adapters(tiny):
    base = tiny.base("ddim")
    base.load_lora_weights(tiny.aes, adapter_name="mine")
    before = _snapshot(base.unet)
    grads = {n: p.requires_grad for n, p in base.unet.named_parameters()}
    expected = diffusers_latents(base)  # with the caller's adapter active
    with MSDDAPipeline(base, {"own": "mine", "align": tiny.align}) as pipe:
        single = run(pipe, method="single:own").images
        run(pipe, {"own": 0.5, "align": 0.5})
    assert (single - expected).abs().max() < ATOL
    _assert_same_state(before, base.unet)
    assert set(base.unet.peft_config) == {"mine"}
    assert {n: p.requires_grad for n, p in base.unet.named_parameters()} == grads
    assert torch.equal(diffusers_latents(base), expected)  # the caller's adapter is active again
    # a failing call inside the block still restores the UNet
    with pytest.raises(PlanError), MSDDAPipeline(base, {"align": tiny.align}) as pipe:
        run(pipe, {"nope": 1.0})
    _assert_same_state(before, base.unet)


def test_from_pipe_reuses_the_components(tiny):
    from diffusers import StableDiffusionImg2ImgPipeline

    base = tiny.base("ddim")
    before = _snapshot(base.unet)
    expected = run(tiny.pipeline("ddim"), {"aes": 0.5, "align": 0.5}).images
    with MSDDAPipeline.from_pipe(base, {"aes": tiny.aes, "align": tiny.align}) as pipe:
        assert pipe.unet is base.unet and pipe.base.text_encoder is base.text_encoder
        assert torch.equal(run(pipe, {"aes": 0.5, "align": 0.5}).images, expected)
        # from another MSDDAPipeline: its modules (and the adapters loaded into them), not its objectives
        with MSDDAPipeline.from_pipe(pipe, {"own": "aes"}, scheduler="ddpm") as other:
            assert other.objective_names == ["own"] and isinstance(other.base.scheduler, DDPMScheduler)
            assert other.unet is base.unet
    _assert_same_state(before, base.unet)
    # a sibling pipeline (img2img) and diffusers-style component overrides, the scheduler among them
    img2img = StableDiffusionImg2ImgPipeline(**base.components, requires_safety_checker=False)
    ddpm = DDPMScheduler.from_config(base.scheduler.config)
    with MSDDAPipeline.from_pipe(img2img, {"aes": tiny.aes}, scheduler=ddpm, safety_checker=None) as pipe:
        assert isinstance(pipe.base.scheduler, DDPMScheduler) and pipe.base.scheduler is not ddpm
        out = run(pipe, method="base").images
    assert (out - diffusers_latents(tiny.base("ddpm"))).abs().max() < ATOL
    with pytest.raises(PipelineError, match=r"from_pipe got \['unet2'\], which are not components"):
        MSDDAPipeline.from_pipe(base, {}, unet2=None)
    _assert_same_state(before, base.unet)


# ----- CLI: diffusers-style options ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli(tiny, tmp_path_factory):
    """(invoke, base_dir): invoke(*extra_args, out=folder) runs `sample` on the tiny base with 2 DDIM steps."""
    import typer
    from typer.testing import CliRunner

    from msdda.pipelines.cli import register

    base_dir = tmp_path_factory.mktemp("cli_base") / "base"
    tiny.base("ddim").save_pretrained(base_dir)
    app = typer.Typer()

    @app.callback()
    def main() -> None:
        """test app"""

    register(app)

    def invoke(*extra: str, out: Path, base: Path = base_dir, prompt: bool = True):
        args = ["sample", "--base", str(base), "--objective", f"aes={tiny.aes}", "--out", str(out)]
        args += ["--steps", "2", "--guidance-scale", "3", *(["--prompt", PROMPT] if prompt else []), *extra]
        return CliRunner().invoke(app, args)

    return invoke, base_dir


def _flat(output: str) -> str:
    """CLI output with rich's error box and line wrapping removed."""
    import re

    return " ".join(re.sub("[│╭╮╰╯─]", " ", output).split())


def _png(path: Path):
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(path)).astype(int)


def test_cli_betas(cli, tmp_path):
    invoke, _ = cli
    a = invoke("--weights", "aes=1", "--betas", "aes=0.5", "--beta", "1", "--quiet", out=tmp_path / "a")
    assert a.exit_code == 0, a.output
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["exponents"] == {"aes": 0.5, "reference": 0.5} and config["betas_option"] == {"aes": 0.5}
    b = invoke("--weights", "aes=0.5", "--quiet", out=tmp_path / "b")  # the same exponents, reached by weights
    assert b.exit_code == 0, b.output
    assert (_png(tmp_path / "a" / "image_000.png") == _png(tmp_path / "b" / "image_000.png")).all()
    for bad, match in ((["--betas", "nope=1"], "no --objective is named 'nope'"), (["--betas", "aes=0"], "> 0")):
        r = invoke("--weights", "aes=1", *bad, out=tmp_path / "bad")
        assert r.exit_code == 2 and match in _flat(r.output), r.output
    assert not (tmp_path / "bad").exists()


def test_cli_prompt_file(cli, tmp_path):
    invoke, _ = cli
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# a comment\n\na red cube\n  \n# another\na blue ball  \n")
    r = invoke("--weights", "aes=1", "--prompt-file", str(prompts), "--quiet", out=tmp_path / "o", prompt=False)
    assert r.exit_code == 0, r.output
    config = json.loads((tmp_path / "o" / "config.json").read_text())
    assert config["prompts"] == ["a red cube", "a blue ball"] and config["prompt_file"] == str(prompts)
    assert config["images"] == ["image_000.png", "image_001.png"]
    assert config["image_prompts"] == ["a red cube", "a blue ball"]
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n")
    for args, match in (
        (["--prompt-file", str(empty)], "holds no prompts"),
        (["--prompt-file", str(tmp_path / "missing.txt")], "cannot read it"),
        (["--prompt-file", str(prompts), "--prompt", "x"], "--prompt or --prompt-file, not both"),
        ([], "pass --prompt TEXT"),
    ):
        r = invoke("--weights", "aes=1", *args, out=tmp_path / "bad", prompt=False)
        assert r.exit_code == 2 and match in _flat(r.output), r.output
    assert not (tmp_path / "bad").exists()


def test_cli_seeds(cli, tmp_path):
    invoke, _ = cli
    r = invoke("--weights", "aes=1", "--seeds", "3,4", "--eta", "1", "--quiet", out=tmp_path / "s")
    assert r.exit_code == 0, r.output
    config = json.loads((tmp_path / "s" / "config.json").read_text())
    assert config["seeds"] == [3, 4] and config["image_seeds"] == [3, 4] and len(config["images"]) == 2
    one = invoke("--weights", "aes=1", "--seed", "4", "--eta", "1", "--quiet", out=tmp_path / "one")
    assert one.exit_code == 0, one.output
    # image 1 of the --seeds run is the --seed 4 image (up to a PNG rounding step from batch-size float rounding)
    diff = abs(_png(tmp_path / "s" / "image_001.png") - _png(tmp_path / "one" / "image_000.png"))
    assert diff.max() <= 1
    assert abs(_png(tmp_path / "s" / "image_000.png") - _png(tmp_path / "one" / "image_000.png")).max() > 1
    for args, match in (
        (["--seeds", "1", "--seed", "2"], "--seed or --seeds, not both"),
        (["--seeds", "1,x"], "not a comma-separated list"),
        (["--seeds", "1,-2"], "outside"),
        (["--seeds", "1,2", "--num-images", "2"], "drop --num-images 2"),
    ):
        r = invoke("--weights", "aes=1", *args, out=tmp_path / "bad")
        assert r.exit_code == 2 and match in _flat(r.output), r.output
    assert not (tmp_path / "bad").exists()


def test_cli_safety_checker(cli, tiny, tmp_path):
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPImageProcessor

    invoke, _ = cli
    torch.manual_seed(8)
    checker = StableDiffusionSafetyChecker(
        CLIPConfig(
            text_config=dict(vocab_size=514, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                             num_attention_heads=2, max_position_embeddings=16),
            vision_config=dict(image_size=16, patch_size=8, hidden_size=16, intermediate_size=32,
                               num_hidden_layers=1, num_attention_heads=2),
            projection_dim=8,
        )
    ).eval()  # fmt: skip
    processor = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    base = tiny.base("ddim")
    with_checker = StableDiffusionPipeline(
        **{**base.components, "safety_checker": checker, "feature_extractor": processor}
    )
    folder = tmp_path / "with_checker"
    with_checker.save_pretrained(folder)
    kept = invoke("--weights", "aes=1", "--quiet", out=tmp_path / "kept", base=folder)
    assert kept.exit_code == 0, kept.output
    config = json.loads((tmp_path / "kept" / "config.json").read_text())
    assert config["safety_checker"] is True and isinstance(config["nsfw_content_detected"], list)
    off = invoke("--weights", "aes=1", "--quiet", "--no-safety-checker", out=tmp_path / "off", base=folder)
    assert off.exit_code == 0, off.output
    config = json.loads((tmp_path / "off" / "config.json").read_text())
    assert config["safety_checker"] is False and config["nsfw_content_detected"] is None


def test_cli_quiet_silences_diffusers_and_restores_it(cli, tmp_path):
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    invoke, _ = cli
    verbosity = (diffusers_logging.get_verbosity(), transformers_logging.get_verbosity())
    loud = invoke("--weights", "aes=1", out=tmp_path / "loud")
    assert loud.exit_code == 0 and "Loading pipeline components" in loud.output
    quiet = invoke("--weights", "aes=1", "--quiet", out=tmp_path / "quiet")
    assert quiet.exit_code == 0 and "Loading pipeline components" not in quiet.output, quiet.output
    assert quiet.output.strip().splitlines() == [f"wrote 1 image(s) and config.json to {tmp_path / 'quiet'}"]
    # the libraries' global settings are back as they were (the command may run inside a larger program)
    assert diffusers_logging.is_progress_bar_enabled() and transformers_logging.is_progress_bar_enabled()
    assert (diffusers_logging.get_verbosity(), transformers_logging.get_verbosity()) == verbosity
