"""MSDDADiTPipeline on a tiny class-conditional DiT built from config (no downloads), 3 steps on CPU.

References are independent of the pipeline: a hand-written loop over diffusers' DDPMScheduler.step
(variance_type "learned_range") on the transformer's FULL [B, 2C] output with guidance written out
([cond; null] labels in one call, the noise half guided, the variance half from the conditional pass),
and transformers with LoRA deltas merged by hand (W + c alpha/r B A).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, DiTPipeline, DiTTransformer2DModel  # noqa: E402
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from msdda.pipelines.dit import MSDDADiTPipeline  # noqa: E402
from msdda.pipelines.errors import PipelineError  # noqa: E402

STEPS = 3
SCALE = 4.0
CLASSES = 10
RTOL = 1e-5  # measured: ~2.4e-7 of max |x| against the references (base, one LoRA), 1e-7 MSDDA vs DB-MPA
CALL = {"num_inference_steps": STEPS, "output_type": "latent", "progress": False}
TARGETS = ("transformer_blocks.0.attn1.to_q", "transformer_blocks.0.attn1.to_v", "proj_out_2")
ID2LABEL = {0: "tench, Tinca tinca", 1: "goldfish", 2: "white shark", **{i: f"thing{i}" for i in range(3, CLASSES)}}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def make_transformer(out_channels: int = 8, seed: int = 1) -> DiTTransformer2DModel:
    torch.manual_seed(seed)
    model = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=out_channels,
        num_layers=1,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=CLASSES,
    ).eval()
    with torch.no_grad():  # a tamer output head: outputs of order 0.1-1 as a trained model's
        model.proj_out_2.weight.mul_(0.2)
        model.proj_out_2.bias.mul_(0.2)
    return model


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


def make_base(transformer=None, scheduler=None) -> DiTPipeline:
    pipe = DiTPipeline(
        transformer=transformer if transformer is not None else make_transformer(),
        vae=make_vae(),
        scheduler=scheduler or DDIMScheduler(),  # what DiT ships is a Karras-family scheduler; msdda replaces it
        id2label=ID2LABEL,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_lora(transformer, seed: int, targets=TARGETS, rank: int = 2, alpha: float = 4.0, eps_only: bool = False):
    """A random LoRA built by hand. eps_only: proj_out_2's lora_B rows producing the variance channels are zero
    (DiT unpatchifies proj_out_2's features as (p, p, C_out), channel last), so only the noise half changes."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name in targets:
        layer = transformer.get_submodule(name)
        a = torch.randn(rank, layer.in_features, generator=g) * 0.2
        b = torch.randn(layer.out_features, rank, generator=g) * 0.2
        if eps_only:
            c_out, c = transformer.config.out_channels, transformer.config.in_channels
            b[torch.arange(layer.out_features) % c_out >= c] = 0.0
        state[f"{name}.lora_A.weight"], state[f"{name}.lora_B.weight"] = a, b
    return state, {"r": rank, "lora_alpha": alpha, "target_modules": list(targets)}


def save_peft(folder: Path, state, config) -> Path:
    folder.mkdir(parents=True)
    peft.LoraConfig(**config).save_pretrained(str(folder))
    save_file(
        {f"base_model.model.{k}": v.contiguous() for k, v in state.items()}, str(folder / "adapter_model.safetensors")
    )
    return folder


def merged(transformer, loras):
    """A plain copy of `transformer` with W += sum_k c_k (alpha/r) B_k A_k merged by hand; loras: [(state, config, c)]."""
    out = DiTTransformer2DModel.from_config(transformer.config)
    out.load_state_dict(
        {k.replace(".base_layer.", "."): v for k, v in transformer.state_dict().items() if "lora_" not in k}
    )
    with torch.no_grad():
        for state, config, c in loras:
            for name in config["target_modules"]:
                a, b = state[f"{name}.lora_A.weight"], state[f"{name}.lora_B.weight"]
                out.get_submodule(name).weight += c * (config["lora_alpha"] / config["r"]) * (b @ a)
    return out.eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("dit")
    base = make_base()
    tr = base.transformer
    loras = {
        "a": make_lora(tr, 10),
        "b": make_lora(tr, 11),
        "ea": make_lora(tr, 12, targets=("proj_out_2",), eps_only=True),
        "eb": make_lora(tr, 13, targets=("proj_out_2",), eps_only=True),
    }
    paths = {k: save_peft(root / k, *v) for k, v in loras.items()}
    pipe = MSDDADiTPipeline(base, {k: str(p) for k, p in paths.items()})
    return {"base": base, "pipe": pipe, "loras": loras}


def reference_loop(transformer, scheduler, labels, generator, *, scale=SCALE):
    """A learned-variance DDPM sampler written out: latents as diffusers draws them, one call on [x; x] with
    labels [cond; null], guidance on the noise half (variance from the conditional pass), then
    DDPMScheduler.step on the FULL [B, 2C] output with the same generator."""
    sch = copy.deepcopy(scheduler)
    sch.set_timesteps(STEPS)
    c, b = transformer.config.in_channels, len(labels)
    cls = torch.tensor(labels)
    x = randn_tensor((b, c, 8, 8), generator=generator, dtype=torch.float32) * sch.init_noise_sigma
    with torch.no_grad():
        for t in sch.timesteps:
            if scale > 1:
                both = torch.cat([cls, torch.full((b,), CLASSES)])
                out = transformer(torch.cat([x, x]), timestep=t.expand(2 * b), class_labels=both, return_dict=False)[0]
                cnd, u = out.chunk(2)
                out = torch.cat([u[:, :c] + scale * (cnd[:, :c] - u[:, :c]), cnd[:, c:]], dim=1)
            else:
                out = transformer(x, timestep=t.expand(b), class_labels=cls, return_dict=False)[0]
            if sch.config.variance_type not in ("learned", "learned_range"):
                out = out[:, :c]
            x = sch.step(out, t, x, generator=generator).prev_sample
    return x


def learned_ddpm(base) -> DDPMScheduler:
    return DDPMScheduler.from_config(base.scheduler.config, variance_type="learned_range", clip_sample=False)


def close(a, b, rtol=RTOL):
    scale = max(float(b.abs().max()), 1.0)
    err = float((a - b).abs().max())
    assert err <= rtol * scale, f"max |diff| {err:.3g} > {rtol:g} x {scale:.3g}"
    return err


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ----- tests ----------------------------------------------------------------------------------------------


def test_default_scheduler_is_learned_range_ddpm(tiny):
    pipe, base = tiny["pipe"], tiny["base"]
    sch = pipe.base.scheduler
    assert type(sch).__name__ == "DDPMScheduler" and sch.config.variance_type == "learned_range"
    assert type(base.scheduler).__name__ == "DDIMScheduler"  # the caller's is untouched
    assert pipe.learned_variance and pipe.num_classes == CLASSES


@pytest.mark.parametrize("scale", [SCALE, 1.0])
def test_base_equals_reference_ddpm_loop_with_full_output(tiny, scale):
    pipe, base = tiny["pipe"], tiny["base"]
    got = pipe([1, 7], method="base", guidance_scale=scale, generator=gen(3), **CALL).images
    want = reference_loop(base.transformer, learned_ddpm(base), [1, 7], gen(3), scale=scale)
    close(got, want)


def test_one_lora_equals_the_merged_transformer_loop(tiny):
    pipe, base, loras = tiny["pipe"], tiny["base"], tiny["loras"]
    want = reference_loop(merged(base.transformer, [(*loras["a"], 1.0)]), learned_ddpm(base), [2, 5], gen(4))
    for kw in ({"method": "msdda", "weights": {"a": 1.0}}, {"method": "single:a"}):
        close(pipe([2, 5], generator=gen(4), **kw, **CALL).images, want)


def test_rewarded_soup_equals_hand_merged_deltas(tiny):
    pipe, base, loras = tiny["pipe"], tiny["base"], tiny["loras"]
    got = pipe([3], {"a": 0.3, "b": 0.7}, method="rewarded-soup", generator=gen(5), **CALL).images
    soup = merged(base.transformer, [(*loras["a"], 0.3), (*loras["b"], 0.7)])
    close(got, reference_loop(soup, learned_ddpm(base), [3], gen(5)))


def test_msdda_differs_from_dbmpa_when_variances_differ(tiny):
    pipe = tiny["pipe"]
    w = {"a": 0.5, "b": 0.5}
    ms = pipe([1, 2], w, method="msdda", generator=gen(7), **CALL)
    db = pipe([1, 2], w, method="db-mpa", generator=gen(7), **CALL)
    diff = float((ms.images - db.images).abs().max())
    assert diff > 1.0, diff  # measured 6.4 on latents of max |x| ~46 (14%); equal variances give 4e-6
    assert ms.config["learned_variance"] and ms.config["exponents"] == {"a": 0.5, "b": 0.5}


def test_msdda_equals_dbmpa_when_variance_halves_are_equal(tiny):
    pipe = tiny["pipe"]
    x = torch.randn(1, 4, 8, 8, generator=gen(0))
    t, cls = torch.tensor([500]), torch.tensor([1])
    with torch.no_grad():
        outs = [pipe.denoiser(n)(x, t, cls) for n in ("ea", "eb", None)]
    assert torch.equal(outs[0][:, 4:], outs[2][:, 4:]) and torch.equal(outs[1][:, 4:], outs[2][:, 4:])
    assert float((outs[0][:, :4] - outs[1][:, :4]).abs().max()) > 1e-2
    w = {"ea": 0.3, "eb": 0.7}
    ms = pipe([1, 2], w, method="msdda", generator=gen(8), **CALL).images
    db = pipe([1, 2], w, method="db-mpa", generator=gen(8), **CALL).images
    close(ms, db)


def test_other_methods_run_with_rewards_on_images_and_class_names(tiny):
    pipe = tiny["pipe"]
    w = {"a": 0.5, "b": 0.5}
    ls = pipe([1], w, method="db-mpa-ls", generator=gen(0), **CALL)
    assert ls.cost.model_evals == 2 * STEPS  # one guided model (a CFG pair) per step
    seen = []

    def reward(images, prompts):
        seen.append((images.min().item(), images.max().item(), list(prompts)))
        return images.mean(dim=(1, 2, 3))

    out = pipe(
        [1, 0],
        {"bright": 1.0},
        method="code",
        rewards={"bright": reward},
        method_options={"num_candidates": 2, "block_size": 1},
        generator=gen(0),
        **CALL,
    )
    assert torch.isfinite(out.images).all() and out.cost.reward_evals
    assert seen and all(lo >= 0.0 and hi <= 1.0 and p == ["goldfish", "Tinca tinca"] for lo, hi, p in seen)


def test_label_names_generator_lists_and_outputs(tiny):
    pipe = tiny["pipe"]
    by_id = pipe([1, 2], method="base", generator=[gen(1), gen(2)], **CALL).images
    by_name = pipe(["goldfish", "white shark"], method="base", generator=[gen(1), gen(2)], **CALL).images
    assert torch.equal(by_id, by_name)
    one = pipe(2, method="base", generator=gen(2), **CALL).images
    close(by_id[1:], one)
    img = pipe([1], method="base", generator=gen(1), **{**CALL, "output_type": "pt"}).images
    assert img.shape == (1, 3, 16, 16) and float(img.min()) >= 0 and float(img.max()) <= 1
    assert len(pipe([1], method="base", generator=gen(1), **{**CALL, "output_type": "pil"}).images) == 1


def test_ddim_runs(tiny):
    pipe = MSDDADiTPipeline(tiny["base"], {}, scheduler="ddim")
    out = pipe([1], method="base", eta=0.5, generator=gen(0), **CALL)
    assert torch.isfinite(out.images).all() and not out.config["learned_variance"]
    pipe.release()


def test_fixed_variance_transformer_gives_msdda_equal_to_dbmpa(tmp_path):
    base = make_base(make_transformer(out_channels=4, seed=3))
    la, lb = make_lora(base.transformer, 20), make_lora(base.transformer, 21)
    pipe = MSDDADiTPipeline(base, {"a": str(save_peft(tmp_path / "a", *la)), "b": str(save_peft(tmp_path / "b", *lb))})
    assert pipe.base.scheduler.config.variance_type == "fixed_small" and not pipe.learned_variance
    w = {"a": 0.4, "b": 0.6}
    ms = pipe([1], w, method="msdda", generator=gen(0), **CALL).images
    db = pipe([1], w, method="db-mpa", generator=gen(0), **CALL).images
    close(ms, db)
    pipe.release()


def test_bad_inputs_fail_before_denoising(tiny):
    pipe = tiny["pipe"]
    calls = []
    hook = pipe.transformer.register_forward_hook(lambda *a: calls.append(1))
    try:
        for labels, match in (
            ([CLASSES], "out of range"),
            ([-1], "out of range"),
            (["no such fish"], "not a label name"),
            ([1.5], "pass an int id"),
            ([], "non-empty"),
        ):
            with pytest.raises(PipelineError, match=match):
                pipe(labels, method="base", **CALL)
        with pytest.raises(PipelineError, match="list of 1 generators"):
            pipe([1, 2], method="base", generator=[gen(0)], **CALL)
        with pytest.raises(PipelineError, match="latents are"):
            pipe([1], method="base", latents=torch.zeros(1, 4, 4, 4), **CALL)
    finally:
        hook.remove()
    assert not calls


def test_non_dit_base_is_refused():
    class StableDiffusionPipeline:  # any other pipeline class
        pass

    with pytest.raises(PipelineError, match="not a DiT pipeline"):
        MSDDADiTPipeline(StableDiffusionPipeline(), {})
