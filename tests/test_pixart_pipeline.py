"""MSDDAPixArtPipeline on tiny PixArt components built from config (no downloads), 3 steps on CPU.

References are independent of the pipeline: a hand-written loop over diffusers' DDPMScheduler.step with the
transformer's FULL [B, 2C] output (diffusers' own PixArt pipeline drops the variance half, and with a
learned_range DDPM it fails), transformers with the LoRA deltas merged by hand (W + alpha/r B A), and
diffusers' PixArtAlphaPipeline itself where it can run (a fixed-variance DDPM). MSDDA != DB-MPA when the
objectives' variance halves differ; MSDDA == DB-MPA when only their noise halves differ.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from diffusers import (  # noqa: E402
    AutoencoderKL,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    PixArtAlphaPipeline,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
)
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import T5Config, T5EncoderModel, T5TokenizerFast  # noqa: E402

from msdda.core.errors import ScheduleError, UnsupportedSchedulerError  # noqa: E402
from msdda.core.schedule import KernelScheduler  # noqa: E402
from msdda.pipelines.errors import AdapterError, ObjectiveError, PipelineError  # noqa: E402
from msdda.pipelines.pixart import MSDDAPixArtPipeline  # noqa: E402
from msdda.sampling.methods import PlanError  # noqa: E402

PROMPT = "a red cube"
STEPS = 3
SCALE = 4.5
SEQ = 8  # max_sequence_length of the tiny tokenizer
RTOL = 1e-4  # measured: ~3e-7 of max |x| against the references (float32 steps vs our float64 kernel math)
CALL = {"num_inference_steps": STEPS, "output_type": "latent", "use_resolution_binning": False}
CALL.update({"clean_caption": False, "max_sequence_length": SEQ, "progress": False})
TARGETS = ("transformer_blocks.0.attn1.to_q", "transformer_blocks.0.attn2.to_v", "proj_out")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models gain nothing from threads on a shared 2-core machine
    yield
    torch.set_num_threads(old)


# ----- tiny components ------------------------------------------------------------------------------------

WORDS = ["a", "red", "blue", "green", "cube", "ball", "photo", "of", "on", "the"]


def make_tokenizer() -> T5TokenizerFast:
    """A word-level T5 tokenizer built in code (no sentencepiece model): pad 0, eos 1, unk 2."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", extra_ids=0, model_max_length=SEQ
    )


def make_text_encoder() -> T5EncoderModel:
    torch.manual_seed(0)
    config = T5Config(
        vocab_size=len(WORDS) + 3,
        d_model=16,
        d_kv=4,
        d_ff=32,
        num_layers=1,
        num_heads=2,
        relative_attention_num_buckets=8,
    )
    return T5EncoderModel(config).eval()


def make_transformer(out_channels: int = 8, seed: int = 1, **kw) -> PixArtTransformer2DModel:
    torch.manual_seed(seed)
    config = {"num_attention_heads": 2, "attention_head_dim": 8, "cross_attention_dim": 16, **kw}
    model = PixArtTransformer2DModel(
        in_channels=4,
        out_channels=out_channels,
        num_layers=1,
        sample_size=8,
        patch_size=2,
        caption_channels=16,
        **config,
    ).eval()
    with torch.no_grad():  # a tamer output head: outputs of order 0.1-1 as a trained model's, so 20 steps stay finite
        model.proj_out.weight.mul_(0.2)
        model.proj_out.bias.mul_(0.2)
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


def make_base(transformer=None, cls=PixArtAlphaPipeline, scheduler=None):
    pipe = cls(
        tokenizer=make_tokenizer(),
        text_encoder=make_text_encoder(),
        vae=make_vae(),
        transformer=transformer if transformer is not None else make_transformer(),
        scheduler=scheduler or DPMSolverMultistepScheduler(),  # what PixArt ships
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_lora(transformer, seed: int, targets=TARGETS, rank: int = 2, alpha: float = 4.0, eps_only: bool = False):
    """A random LoRA {module.lora_A.weight, module.lora_B.weight} built by hand (independent of peft).

    eps_only: rows of proj_out's lora_B that produce the variance channels are zero, so the adapter changes
    the noise half of the output only (PixArt unpatchifies proj_out's features as (p, p, C_out), channel last).
    """
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


def save_diffusers(file: Path, state) -> Path:
    """diffusers' format: 'transformer.'-prefixed peft keys; no alphas, so alpha = r (scaling 1)."""
    save_file({f"transformer.{k}": v.contiguous() for k, v in state.items()}, str(file))
    return file


def merged(transformer, loras):
    """A plain copy of `transformer` with W += sum_k c_k * (alpha/r) B_k A_k merged by hand; loras: [(state, config, c)]."""
    out = PixArtTransformer2DModel.from_config(transformer.config)
    # the base weights alone (the shared transformer may hold peft layers: x.base_layer.weight -> x.weight)
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
    root = tmp_path_factory.mktemp("pixart")
    base = make_base()
    tr = base.transformer
    loras = {
        "a": make_lora(tr, 10),
        "b": make_lora(tr, 11),
        "ea": make_lora(tr, 12, targets=("proj_out",), eps_only=True),
        "eb": make_lora(tr, 13, targets=("proj_out",), eps_only=True),
    }
    paths = {
        "a": save_peft(root / "a", *loras["a"]),
        "b": save_diffusers(root / "b.safetensors", loras["b"][0]),
        "ea": save_peft(root / "ea", *loras["ea"]),
        "eb": save_peft(root / "eb", *loras["eb"]),
    }
    loras["b"] = (loras["b"][0], {**loras["b"][1], "lora_alpha": loras["b"][1]["r"]})  # saved without alphas
    pipe = MSDDAPixArtPipeline(base, {k: str(p) for k, p in paths.items()})
    return {"base": base, "pipe": pipe, "loras": loras, "paths": paths, "root": root}


# ----- the independent reference loop ---------------------------------------------------------------------


def reference_loop(pipe_or_base, transformer, scheduler, generator, *, scale=SCALE, prompt=PROMPT, added=None):
    """What a learned-variance DDPM sampler does, written out: diffusers' prompt encoding and latents, guidance
    on the noise half ([negative; positive] as diffusers batches it, variance from the conditional pass), then
    DDPMScheduler.step on the FULL [B, 2C] output with the same generator."""
    base = pipe_or_base
    sch = copy.deepcopy(scheduler)
    sch.set_timesteps(STEPS)
    do_cfg = scale > 1
    emb, mask, neg, neg_mask = base.encode_prompt(prompt, do_cfg, clean_caption=False, max_sequence_length=SEQ)
    c = transformer.config.in_channels
    x = randn_tensor((emb.shape[0], c, 8, 8), generator=generator, dtype=emb.dtype) * sch.init_noise_sigma
    enc, enc_mask = (torch.cat([neg, emb]), torch.cat([neg_mask, mask])) if do_cfg else (emb, mask)
    if added is not None and do_cfg:
        added = {k: torch.cat([v, v]) for k, v in added.items()}
    with torch.no_grad():
        for t in sch.timesteps:
            x_in = torch.cat([x, x]) if do_cfg else x
            out = transformer(
                x_in,
                encoder_hidden_states=enc,
                encoder_attention_mask=enc_mask,
                timestep=t.expand(x_in.shape[0]),
                added_cond_kwargs=added or {"resolution": None, "aspect_ratio": None},
                return_dict=False,
            )[0]
            if do_cfg:
                u, cnd = out.chunk(2)
                out = torch.cat([u[:, :c] + scale * (cnd[:, :c] - u[:, :c]), cnd[:, c:]], dim=1)
            if sch.config.variance_type not in ("learned", "learned_range"):
                out = out[:, :c]  # a fixed-variance step takes the noise half only, as diffusers' pipeline passes it
            x = sch.step(out, t, x, generator=generator).prev_sample
    return x


def learned_ddpm(base) -> DDPMScheduler:
    return DDPMScheduler.from_config(base.scheduler.config, variance_type="learned_range", clip_sample=False)


def close(a, b, rtol=RTOL):
    scale = max(float(b.abs().max()), 1.0)
    err = float((a - b).abs().max())
    assert err <= rtol * scale, f"max |diff| {err:.3g} > {rtol:g} x {scale:.3g}"
    return err


# ----- tests ----------------------------------------------------------------------------------------------


def test_default_scheduler_is_learned_range_ddpm_and_callers_is_untouched(tiny):
    pipe, base = tiny["pipe"], tiny["base"]
    sch = pipe.base.scheduler
    assert type(sch) is DDPMScheduler and sch.config.variance_type == "learned_range" and not sch.config.clip_sample
    assert type(base.scheduler) is DPMSolverMultistepScheduler
    assert pipe.learned_variance


def test_diffusers_pixart_pipeline_drops_the_learned_variance(tiny):
    """diffusers' PixArt pipeline passes only noise_pred.chunk(2, dim=1)[0] to step(): with a learned_range
    DDPM that step fails (no variance: None + 1); with a fixed-variance DDPM it runs and equals ours."""
    base = tiny["base"]
    tr = base.transformer
    ours = MSDDAPixArtPipeline(base, {}, scheduler=DDPMScheduler.from_config(base.scheduler.config, clip_sample=False))
    theirs = PixArtAlphaPipeline(**{**base.components, "scheduler": learned_ddpm(base)})
    theirs.set_progress_bar_config(disable=True)
    kw = {k: v for k, v in CALL.items() if k != "progress"}
    with pytest.raises(TypeError):
        theirs(PROMPT, generator=torch.Generator().manual_seed(0), **kw)
    theirs.scheduler = DDPMScheduler.from_config(base.scheduler.config, clip_sample=False)  # fixed_small
    for output_type in ("latent", "pt"):
        kw["output_type"] = output_type
        want = theirs(PROMPT, generator=torch.Generator().manual_seed(0), **kw).images
        got = ours(PROMPT, method="base", generator=torch.Generator().manual_seed(0), **{**CALL, **kw}).images
        close(got, want)
    assert not ours.learned_variance and tr is base.transformer


@pytest.mark.parametrize("scale", [1.0, SCALE])
def test_base_equals_reference_ddpm_loop_with_full_output(tiny, scale):
    pipe, base = tiny["pipe"], tiny["base"]
    want = reference_loop(base, base.transformer, learned_ddpm(base), torch.Generator().manual_seed(3), scale=scale)
    got = pipe(PROMPT, method="base", guidance_scale=scale, generator=torch.Generator().manual_seed(3), **CALL)
    close(got.images, want)
    # the variance half matters: the same loop on the noise half alone (fixed_small) lands elsewhere
    fixed = DDPMScheduler.from_config(base.scheduler.config, clip_sample=False)
    other = reference_loop(base, base.transformer, fixed, torch.Generator().manual_seed(3), scale=scale)
    assert float((other - want).abs().max()) > 1e-2


@pytest.mark.parametrize("name", ["a", "b"])
def test_one_objective_equals_the_merged_transformer_loop(tiny, name):
    """K = 1: a LoRA objective (peft folder 'a', diffusers file 'b') at weight 1 = the reference loop on the
    base transformer with that LoRA's delta merged by hand."""
    pipe, base = tiny["pipe"], tiny["base"]
    state, config = tiny["loras"][name]
    ref = merged(base.transformer, [(state, config, 1.0)])
    want = reference_loop(base, ref, learned_ddpm(base), torch.Generator().manual_seed(4))
    for kw in ({"method": "msdda", "weights": {name: 1.0}}, {"method": f"single:{name}"}):
        got = pipe(PROMPT, generator=torch.Generator().manual_seed(4), **kw, **CALL).images
        close(got, want)


def test_alpha_micro_conditions_are_passed(tiny):
    """A transformer with use_additional_conditions gets resolution / aspect ratio as diffusers builds them."""
    # inner dim 24: the size embedding splits it in three
    tr = make_transformer(seed=5, use_additional_conditions=True, num_attention_heads=3, cross_attention_dim=24)
    base = make_base(tr)
    pipe = MSDDAPixArtPipeline(base, {})
    added = {"resolution": torch.tensor([[16.0, 16.0]]), "aspect_ratio": torch.tensor([[1.0]])}
    want = reference_loop(base, tr, learned_ddpm(base), torch.Generator().manual_seed(6), added=added)
    got = pipe(PROMPT, method="base", generator=torch.Generator().manual_seed(6), **CALL).images
    close(got, want)


def test_msdda_differs_from_dbmpa_when_variances_differ(tiny):
    pipe = tiny["pipe"]
    w = {"a": 0.5, "b": 0.5}
    ms = pipe(PROMPT, w, method="msdda", generator=torch.Generator().manual_seed(7), **CALL)
    db = pipe(PROMPT, w, method="db-mpa", generator=torch.Generator().manual_seed(7), **CALL)
    diff = float((ms.images - db.images).abs().max())
    assert diff > 1e-1, diff  # measured 3.6 on latents of max |x| ~30 (12%); equal variances give 4e-6
    assert ms.config["learned_variance"] and ms.config["exponents"] == {"a": 0.5, "b": 0.5}


def test_msdda_equals_dbmpa_when_variance_halves_are_equal(tiny):
    """Objectives 'ea'/'eb' change the noise half only (their variance halves equal the base's, checked), so the
    fused kernel is the weighted mean: MSDDA = DB-MPA to float rounding."""
    pipe = tiny["pipe"]
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = _cond(pipe)
    t = torch.tensor([500])
    outs = [pipe.denoiser(n)(x, t, cond) for n in ("ea", "eb", None)]
    assert torch.equal(outs[0][:, 4:], outs[2][:, 4:]) and torch.equal(outs[1][:, 4:], outs[2][:, 4:])
    assert float((outs[0][:, :4] - outs[1][:, :4]).abs().max()) > 1e-2
    w = {"ea": 0.3, "eb": 0.7}
    ms = pipe(PROMPT, w, method="msdda", generator=torch.Generator().manual_seed(8), **CALL).images
    db = pipe(PROMPT, w, method="db-mpa", generator=torch.Generator().manual_seed(8), **CALL).images
    close(ms, db, rtol=1e-5)


def _cond(pipe):
    from msdda.pipelines.pixart import TextCondition

    with torch.no_grad():
        emb, mask, _, _ = pipe.base.encode_prompt(PROMPT, False, clean_caption=False, max_sequence_length=SEQ)
    return TextCondition(emb, mask)


def test_kernel_equals_ddpm_step_at_every_timestep(tiny):
    """For a transformer output [B, 2C]: mean + sqrt(var) z = DDPMScheduler(learned_range).step with the same
    z at every timestep of a 1000-step and a 10-step schedule (the last step: step() returns the mean)."""
    pipe, base = tiny["pipe"], tiny["base"]
    cond = _cond(pipe)
    den = pipe.denoiser("a")
    for steps in (1000, 10):
        sch = learned_ddpm(base)
        sch.set_timesteps(steps)
        ks = KernelScheduler.from_diffusers(sch)
        x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
        worst = 0.0
        for i, t in enumerate(sch.timesteps):
            if steps == 1000 and i % 37 and int(t) > 2:
                continue  # every 37th timestep and the last three: the tiny model costs ~5 ms per call
            with torch.no_grad():
                out = den(x, t.view(1), cond)
            want = sch.step(out, t, x, generator=torch.Generator().manual_seed(int(t))).prev_sample
            k = ks.kernel(out, int(t), x)
            z = randn_tensor(x.shape, generator=torch.Generator().manual_seed(int(t)))
            got = k.mean if int(t) == 0 else k.mean + k.var.sqrt() * z
            assert k.var.shape == x.shape  # a per-element variance
            worst = max(worst, close(got, want, rtol=1e-5))
            x = want


def test_fixed_variance_transformer_gives_msdda_equal_to_dbmpa(tiny):
    tr = make_transformer(out_channels=4, seed=9)
    base = make_base(tr)
    loras = {"a": make_lora(tr, 20), "b": make_lora(tr, 21)}
    root = tiny["root"] / "fixed"
    pipe = MSDDAPixArtPipeline(base, {k: str(save_peft(root / k, *v)) for k, v in loras.items()})
    assert pipe.base.scheduler.config.variance_type == "fixed_small" and not pipe.learned_variance
    w = {"a": 0.4, "b": 0.6}
    ms = pipe(PROMPT, w, generator=torch.Generator().manual_seed(0), **CALL)
    db = pipe(PROMPT, w, method="db-mpa", generator=torch.Generator().manual_seed(0), **CALL)
    close(ms.images, db.images, rtol=1e-5)
    assert ms.config["learned_variance"] is False
    pipe.release()
    with pytest.raises(PipelineError, match="predicts no variance"):
        MSDDAPixArtPipeline(base, {}, scheduler=learned_ddpm(base))


def test_ddim_runs_and_unsupported_scheduler_is_refused(tiny):
    base = tiny["base"]
    pipe = MSDDAPixArtPipeline(base, {}, scheduler="ddim")
    out = pipe(PROMPT, method="base", eta=0.5, generator=torch.Generator().manual_seed(0), **CALL)
    assert out.images.shape == (1, 4, 8, 8) and not pipe.learned_variance
    with pytest.raises(UnsupportedSchedulerError, match="DDPMScheduler or DDIMScheduler"):
        MSDDAPixArtPipeline(base, {}, scheduler=None)  # DPM-Solver, as PixArt ships
    with pytest.raises(PipelineError, match="scheduler="):
        MSDDAPixArtPipeline(base, {}, scheduler="euler")


def test_bad_objectives_fail_with_typed_errors_and_leave_the_transformer(tiny, tmp_path):
    base = make_base(make_transformer(seed=1))
    before = {k: v.clone() for k, v in base.transformer.state_dict().items()}
    with pytest.raises(ObjectiveError, match="neither an existing path"):
        MSDDAPixArtPipeline(base, {"x": str(tmp_path / "missing")})
    # a LoRA for another base: an SD UNet module name, and shapes of a wider transformer
    unet_lora = {"down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.zeros(2, 16)}
    unet_lora["down_blocks.0.attentions.0.proj_in.lora_B.weight"] = torch.zeros(16, 2)
    with pytest.raises(AdapterError, match="another base"):
        MSDDAPixArtPipeline(base, {"x": str(save_diffusers(tmp_path / "unet.safetensors", unet_lora))})
    wide = make_transformer(seed=1, num_attention_heads=4)
    with pytest.raises(AdapterError, match="does not fit"):
        MSDDAPixArtPipeline(base, {"x": str(save_peft(tmp_path / "wide", *make_lora(wide, 1)))})
    with pytest.raises(AdapterError, match="trained for another base"):
        MSDDAPixArtPipeline(base, {"x": make_transformer(out_channels=4)})  # full transformer, no sigma half
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "lora.bin").write_bytes(b"x")
    with pytest.raises(AdapterError, match="never unpickles"):
        MSDDAPixArtPipeline(base, {"x": str(tmp_path / "p")})
    with pytest.raises(ObjectiveError, match="reserved"):
        MSDDAPixArtPipeline(base, {"reference": str(tmp_path / "p")})
    with pytest.raises(PipelineError, match="not a PixArt pipeline"):
        MSDDAPixArtPipeline(object(), {})
    after = base.transformer.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert "peft_config" not in vars(base.transformer)


def test_bad_calls_fail_before_denoising(tiny):
    pipe = tiny["pipe"]
    calls = []
    hook = pipe.transformer.register_forward_hook(lambda *a: calls.append(1))
    try:
        bad = [
            ({"weights": {"nope": 1.0}}, PlanError, "unknown objective"),
            ({"weights": {"a": 1.0}, "method": "nope"}, PlanError, "unknown method"),
            ({"weights": {"a": 1.0}, "generator": [torch.Generator()] * 2}, PipelineError, "list of 2"),
            ({"weights": {"a": 1.0}, "latents": torch.zeros(1, 4, 4, 4)}, PipelineError, "shape"),
            ({"weights": {"a": 1.0}, "output_type": "jpg"}, PipelineError, "output_type"),
            ({"weights": {"a": 1.0}, "use_resolution_binning": True}, PipelineError, "use_resolution_binning"),
            ({"weights": {"a": 1.0}, "eta": 0.5}, ScheduleError, "DDIM only"),
        ]
        for kw, error, match in bad:
            args = {**CALL, **kw}
            with pytest.raises(error, match=match):
                pipe(PROMPT, **args)
    finally:
        hook.remove()
    assert not calls


def test_generator_list_reproduces_single_images(tiny):
    pipe = tiny["pipe"]
    w = {"a": 0.5, "b": 0.5}
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    both = pipe([PROMPT, "a blue ball"], w, generator=gens, **CALL).images
    for i, (p, s) in enumerate(((PROMPT, 1), ("a blue ball", 2))):
        one = pipe(p, w, generator=torch.Generator().manual_seed(s), **CALL).images
        close(both[i : i + 1], one, rtol=1e-5)


def test_rewarded_soup_equals_hand_merged_deltas(tiny):
    pipe, base = tiny["pipe"], tiny["base"]
    la, lb = tiny["loras"]["a"], tiny["loras"]["b"]
    ref = merged(base.transformer, [(*la, 0.3), (*lb, 0.7)])
    want = reference_loop(base, ref, learned_ddpm(base), torch.Generator().manual_seed(5))
    got = pipe(PROMPT, {"a": 0.3, "b": 0.7}, method="rewarded-soup", generator=torch.Generator().manual_seed(5), **CALL)
    close(got.images, want)
    assert "msdda_rewarded_soup" not in vars(pipe.transformer).get("peft_config", {})


def test_full_transformer_objectives_and_their_soup(tiny, tmp_path):
    base = tiny["base"]
    la, lb = tiny["loras"]["a"], tiny["loras"]["b"]
    ta, tb = merged(base.transformer, [(*la, 1.0)]), merged(base.transformer, [(*lb, 1.0)])
    ta.save_pretrained(str(tmp_path / "ta"), safe_serialization=True)
    with MSDDAPixArtPipeline(base, {"a": str(tmp_path / "ta"), "b": tb}) as full:
        w = {"a": 0.5, "b": 0.5}
        lora = tiny["pipe"](PROMPT, w, generator=torch.Generator().manual_seed(2), **CALL).images
        got = full(PROMPT, w, generator=torch.Generator().manual_seed(2), **CALL).images
        close(got, lora, rtol=1e-4)
        soup = full(PROMPT, w, method="rewarded-soup", generator=torch.Generator().manual_seed(2), **CALL).images
        want = reference_loop(
            base,
            merged(base.transformer, [(*la, 0.5), (*lb, 0.5)]),
            learned_ddpm(base),
            torch.Generator().manual_seed(2),
        )
        close(soup, want, rtol=1e-4)


def test_other_methods_run_and_count(tiny):
    pipe = tiny["pipe"]
    w = {"a": 0.5, "b": 0.5}
    ls = pipe(PROMPT, w, method="db-mpa-ls", generator=torch.Generator().manual_seed(0), **CALL)
    assert ls.cost.model_evals == 2 * STEPS  # one guided model (a CFG pair) per step
    half = pipe(PROMPT, {"a": 0.5}, generator=torch.Generator().manual_seed(0), **CALL)
    assert half.config["exponents"] == {"a": 0.5, "reference": 0.5} and half.cost.model_evals == 4 * STEPS

    def reward(x, prompts):  # on latents: prefer a bright first channel
        return x[:, 0].mean(dim=(1, 2))

    for method, opts in (("code", {"num_candidates": 2, "block_size": 1}), ("rgg", {"scale": 0.1})):
        out = pipe(
            PROMPT,
            {"bright": 1.0},
            method=method,
            rewards={"bright": reward},
            reward_input="latent",
            method_options=opts,
            generator=torch.Generator().manual_seed(0),
            **CALL,
        )
        assert torch.isfinite(out.images).all() and (out.cost.reward_evals or out.cost.reward_grads)


def test_text_path_outputs_and_callback(tiny):
    pipe = tiny["pipe"]
    w = {"a": 0.5, "b": 0.5}
    with torch.no_grad():  # embeddings that require grad would pick another attention kernel (1e-5 apart)
        emb, mask, neg, neg_mask = pipe.base.encode_prompt(PROMPT, True, clean_caption=False, max_sequence_length=SEQ)
    by_text = pipe(PROMPT, w, generator=torch.Generator().manual_seed(1), **CALL).images
    by_emb = pipe(
        None,
        w,
        prompt_embeds=emb,
        prompt_attention_mask=mask,
        negative_prompt=None,
        negative_prompt_embeds=neg,
        negative_prompt_attention_mask=neg_mask,
        generator=torch.Generator().manual_seed(1),
        **CALL,
    ).images
    assert torch.equal(by_text, by_emb)
    (images,) = pipe(PROMPT, w, **{**CALL, "output_type": "np"}, return_dict=False)
    assert images.shape == (1, 16, 16, 3) and 0 <= images.min() <= images.max() <= 1
    seen = []

    def stop(p, i, t, kw):
        seen.append(int(t))
        p.interrupt = True
        return {}

    out = pipe(PROMPT, w, callback_on_step_end=stop, **CALL)
    assert len(seen) == 1 and out.config["interrupted"] and out.config["steps_run"] == 1


def test_release_restores_the_transformer_and_sigma_pipeline(tiny, tmp_path):
    tr = make_transformer(seed=1)
    before = {k: v.clone() for k, v in tr.state_dict().items()}
    base = make_base(tr, cls=PixArtSigmaPipeline)
    la = make_lora(tr, 10)
    with MSDDAPixArtPipeline(base, {"a": str(save_peft(tmp_path / "a", *la))}) as pipe:
        got = pipe(PROMPT, {"a": 1.0}, generator=torch.Generator().manual_seed(4), **CALL).images
        want = reference_loop(base, merged(tr, [(*la, 1.0)]), learned_ddpm(base), torch.Generator().manual_seed(4))
        close(got, want)
    after = tr.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert "peft_config" not in vars(tr)
    with pytest.raises(PipelineError, match="released"):
        pipe(PROMPT, {"a": 1.0}, **CALL)
