"""MSDDASD3Pipeline on tiny SD3 components built from config (no downloads), 3 steps on CPU.

The tiny parts follow diffusers' own SD3 fast-test components (two CLIP text encoders with projections, a T5
encoder, an SD3Transformer2DModel with pooled projections, an AutoencoderKL with a shift factor), shrunk.
Exact comparisons: K = 1 (the base, one LoRA at weight 1 and at joint_attention_kwargs scale 0.5, a full
transformer) against diffusers' StableDiffusion3Pipeline with the same seed (the ODE, eta 0); the SDE path
(eta > 0) against a hand-written loop of Flow-GRPO's formula with the same noise; MSDDA == DB-MPA at eta 0
and eta > 0; rewarded-soup against diffusers' set_adapters weights; generator lists == single runs; batched
== one by one; the caller's pipeline unchanged after release; bad input refused before any denoising.
"""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("transformers")

from diffusers import (  # noqa: E402
    AutoencoderKL,
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402
from peft import LoraConfig, get_peft_model_state_dict  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel  # noqa: E402

from msdda.core.errors import ScheduleError, UnsupportedSchedulerError  # noqa: E402
from msdda.pipelines import AdapterError, MSDDAPipeline, PipelineError  # noqa: E402
from msdda.pipelines.sd3 import MSDDASD3Pipeline  # noqa: E402
from test_pixart_align import _tokenizer as make_t5_tokenizer  # noqa: E402
from test_sd_pipeline import _randomise_lora, gen, make_tokenizer  # noqa: E402

PROMPT = "a red cube"
STEPS = 3
ETA = 0.7  # Flow-GRPO's noise level
RTOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# ----- tiny components ------------------------------------------------------------------------------------


def make_transformer(seed: int = 0) -> SD3Transformer2DModel:
    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=8,
        patch_size=1,
        in_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        caption_projection_dim=16,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        out_channels=4,
    ).eval()


def make_clip(seed: int) -> CLIPTextModelWithProjection:
    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=514, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=16, bos_token_id=512, eos_token_id=513,
                            pad_token_id=513, projection_dim=16)  # fmt: skip
    return CLIPTextModelWithProjection(config).eval()


def make_t5() -> T5EncoderModel:
    torch.manual_seed(3)
    config = T5Config(vocab_size=13, d_model=32, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                      relative_attention_num_buckets=8)  # fmt: skip
    return T5EncoderModel(config).eval()


def make_vae() -> AutoencoderKL:
    torch.manual_seed(4)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                         norm_num_groups=8, layers_per_block=1, sample_size=16, use_quant_conv=False,
                         use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035).eval()  # fmt: skip


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3")
    tok = make_tokenizer(root / "tokenizer")
    pipe = StableDiffusion3Pipeline(
        transformer=make_transformer(), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=make_vae(),
        text_encoder=make_clip(1), tokenizer=tok, text_encoder_2=make_clip(2), tokenizer_2=copy.deepcopy(tok),
        text_encoder_3=make_t5(), tokenizer_3=make_t5_tokenizer(),
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    loras = {}
    for name, seed in (("a", 10), ("b", 11)):
        # alpha = r: a save_lora_weights file without adapter metadata carries no alpha, and diffusers reads r
        t = copy.deepcopy(pipe.transformer)
        t.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "add_k_proj"]))
        _randomise_lora(t, seed, scale=1.0)
        StableDiffusion3Pipeline.save_lora_weights(
            root / name, transformer_lora_layers=get_peft_model_state_dict(t), safe_serialization=True
        )
        loras[name] = root / name
    full = make_transformer(seed=7)
    full.save_pretrained(root / "full", safe_serialization=True)
    return {"pipe": pipe, "loras": loras, "full": root / "full", "root": root}


def run(pipe, weights=None, **kw):
    kw.setdefault("num_inference_steps", STEPS)
    kw.setdefault("output_type", "latent")
    kw.setdefault("guidance_scale", 4.0)
    kw.setdefault("progress", False)
    kw.setdefault("generator", gen())
    return pipe(kw.pop("prompt", PROMPT), weights, **kw)


def reference(pipe, **kw):
    kw.setdefault("num_inference_steps", STEPS)
    kw.setdefault("output_type", "latent")
    kw.setdefault("guidance_scale", 4.0)
    kw.setdefault("generator", gen())
    return pipe(kw.pop("prompt", PROMPT), **kw).images


def rel(a, b) -> float:
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return float((a - b).abs().max() / b.abs().max())


def with_loras(pipe, names, loras):
    """A diffusers pipeline with its own deep copy of the transformer and the named LoRAs loaded into it."""
    other = StableDiffusion3Pipeline(**{**pipe.components, "transformer": copy.deepcopy(pipe.transformer)})
    other.set_progress_bar_config(disable=True)
    for n in names:
        other.load_lora_weights(str(loras[n]), adapter_name=n)
    return other


# ----- K = 1 against diffusers ----------------------------------------------------------------------------


def test_base_ode_equals_diffusers(tiny):
    pipe = tiny["pipe"]
    expected = reference(pipe)
    with MSDDASD3Pipeline(pipe, {}) as m:
        out = run(m, method="base")
        images = run(m, method="base", output_type="np").images
    assert out.config["eta"] == 0.0 and out.config["scheduler"] == "FlowMatchEulerDiscreteScheduler"
    assert rel(out.images, expected) < RTOL
    assert rel(images, reference(pipe, output_type="np")) < RTOL


def test_one_lora_equals_diffusers(tiny):
    pipe, loras = tiny["pipe"], tiny["loras"]
    other = with_loras(pipe, ["a"], loras)
    expected = reference(other)
    half = reference(other, joint_attention_kwargs={"scale": 0.5})
    with MSDDASD3Pipeline(pipe, {"a": loras["a"]}) as m:
        assert rel(run(m, {"a": 1.0}).images, expected) < RTOL
        assert rel(run(m, method="single:a").images, expected) < RTOL
        assert rel(run(m, {"a": 1.0}, joint_attention_kwargs={"scale": 0.5}).images, half) < RTOL
        assert rel(run(m, method="base").images, reference(pipe)) < RTOL  # adapters off for the reference
    assert rel(expected, reference(pipe)) > 1e-3  # the LoRA does change the images


def test_full_transformer_equals_diffusers(tiny):
    pipe = tiny["pipe"]
    other = StableDiffusion3Pipeline(
        **{**pipe.components, "transformer": SD3Transformer2DModel.from_pretrained(tiny["full"])}
    )
    other.set_progress_bar_config(disable=True)
    with MSDDASD3Pipeline(pipe, {"f": tiny["full"]}) as m:
        assert m.objectives["f"].kind == "transformer"
        assert rel(run(m, {"f": 1.0}).images, reference(other)) < RTOL


def test_from_pretrained_local_folder(tiny):
    folder = tiny["root"] / "base"
    tiny["pipe"].save_pretrained(folder, safe_serialization=True)
    with MSDDASD3Pipeline.from_pretrained(folder, {"a": tiny["loras"]["a"]}) as m:
        m.set_progress_bar_config(disable=True)
        assert rel(run(m, method="base").images, reference(tiny["pipe"])) < RTOL


# ----- the SDE kernel (eta > 0) ---------------------------------------------------------------------------


def test_sde_equals_flow_grpo_loop(tiny):
    """eta = a > 0 against Flow-GRPO's sde_step_with_logprob written out here, with the same noise draws:
    x_T, then one draw per step (the last step too), all from the one generator."""
    pipe = tiny["pipe"]
    g = gen(3)
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(PROMPT, None, None, do_classifier_free_guidance=True)
    x = pipe.prepare_latents(1, 4, 16, 16, embeds.dtype, torch.device("cpu"), g)
    sched = copy.deepcopy(pipe.scheduler)
    sched.set_timesteps(STEPS)
    sigmas = sched.sigmas.double()
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            out = pipe.transformer(hidden_states=torch.cat([x, x]), timestep=t.expand(2),
                                   encoder_hidden_states=torch.cat([negative, embeds]),
                                   pooled_projections=torch.cat([negative_pooled, pooled]), return_dict=False)[0]  # fmt: skip
            v = (out[:1] + 4.0 * (out[1:] - out[:1])).double()
            s, s_next = sigmas[i], sigmas[i + 1]
            dt = s_next - s
            std = ETA * torch.sqrt(s / (1 - torch.where(s == 1, sigmas[1], s)))
            mean = x.double() * (1 + std**2 / (2 * s) * dt) + v * (1 + std**2 * (1 - s) / (2 * s)) * dt
            x = (mean + std * torch.sqrt(-dt) * randn_tensor(x.shape, generator=g, dtype=x.dtype)).float()
    with MSDDASD3Pipeline(pipe, {}) as m:
        got = run(m, method="base", eta=ETA, generator=gen(3)).images
        ode = run(m, method="base", generator=gen(3)).images
    assert rel(got, x) < RTOL
    assert rel(got, ode) > 1e-2  # the SDE is stochastic: not the ODE's sample


# ----- the methods --------------------------------------------------------------------------------------


@pytest.mark.parametrize("eta", [0.0, ETA])
def test_msdda_equals_db_mpa(tiny, eta):
    """Every objective's flow kernel has the schedule's variance, so the fused mean is the weighted mean."""
    loras = tiny["loras"]
    weights = {"a": 0.6, "b": 0.4}
    with MSDDASD3Pipeline(tiny["pipe"], loras) as m:
        fused = run(m, weights, eta=eta).images
        averaged = run(m, weights, method="db-mpa", eta=eta).images
        single = run(m, {"a": 1.0}, eta=eta).images
    assert rel(fused, averaged) < RTOL
    assert rel(fused, single) > 1e-3


def test_rewarded_soup_equals_set_adapters(tiny):
    pipe, loras = tiny["pipe"], tiny["loras"]
    other = with_loras(pipe, ["a", "b"], loras)
    other.set_adapters(["a", "b"], [0.6, 0.4])
    with MSDDASD3Pipeline(pipe, loras) as m:
        soup = run(m, {"a": 0.6, "b": 0.4}, method="rewarded-soup").images
    assert rel(soup, reference(other)) < RTOL


def test_code_runs_with_sde_and_is_refused_on_the_ode(tiny):
    reward = {"bright": lambda latents, prompts: latents.mean(dim=(1, 2, 3))}
    opts = {"num_candidates": 2, "block_size": 1}
    with MSDDASD3Pipeline(tiny["pipe"], {}) as m:
        out = run(m, {"bright": 1.0}, method="code", rewards=reward, reward_input="latent", eta=ETA,
                  method_options=opts)  # fmt: skip
        assert out.images.shape == (1, 4, 8, 8)
        with pytest.raises(PipelineError, match="eta > 0"):
            run(m, {"bright": 1.0}, method="code", rewards=reward, reward_input="latent", method_options=opts)


def test_generator_list_equals_single_runs(tiny):
    prompts = ["a red cube", "a blue ball"]
    with MSDDASD3Pipeline(tiny["pipe"], tiny["loras"]) as m:
        both = run(m, {"a": 0.5, "b": 0.5}, prompt=prompts, eta=ETA, generator=[gen(1), gen(2)]).images
        for i, (p, seed) in enumerate(zip(prompts, (1, 2), strict=True)):
            one = run(m, {"a": 0.5, "b": 0.5}, prompt=p, eta=ETA, generator=gen(seed)).images
            assert rel(both[i : i + 1], one) < RTOL


def test_batched_equals_one_by_one(tiny):
    """The LoRA objectives and the reference run as one transformer forward (peft mixed-adapter rows)."""
    weights = {"a": 0.5, "b": 0.3}  # sums to 0.8: the reference carries 0.2
    calls = []
    hook = tiny["pipe"].transformer.register_forward_hook(lambda *a: calls.append(1))
    try:
        with MSDDASD3Pipeline(tiny["pipe"], tiny["loras"]) as m:
            one = run(m, weights, eta=ETA, batch_models=False)
            sequential, calls[:] = len(calls), []
            batched = run(m, weights, eta=ETA, batch_models=True)
    finally:
        hook.remove()
    assert (sequential, len(calls)) == (3 * STEPS, STEPS)  # three members, one forward per step
    assert rel(batched.images, one.images) < RTOL
    assert batched.cost.model_evals == one.cost.model_evals


# ----- sharing, release and refusals ----------------------------------------------------------------------


def test_caller_pipeline_unchanged_after_release(tiny):
    pipe = tiny["pipe"]
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    config = dict(pipe.scheduler.config)
    expected = reference(pipe)
    m = MSDDASD3Pipeline(pipe, {**tiny["loras"], "f": tiny["full"]}, scheduler="flow-match")
    run(m, {"a": 0.4, "b": 0.3, "f": 0.3}, eta=ETA)
    run(m, {"a": 0.5, "b": 0.5}, method="rewarded-soup")
    assert rel(reference(pipe), expected) == 0.0  # adapters are off outside MSDDA's calls
    m.release()
    after = pipe.transformer.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert not getattr(pipe.transformer, "peft_config", None)
    assert dict(pipe.scheduler.config) == config
    assert rel(reference(pipe), expected) == 0.0
    with pytest.raises(PipelineError, match="released"):
        run(m, {"a": 1.0})


def test_bad_inputs_refused_before_denoising(tiny, tmp_path):
    pipe = tiny["pipe"]
    calls = []
    hook = pipe.transformer.register_forward_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(PipelineError, match="Stable Diffusion 3"):
            MSDDAPipeline(pipe, {})
        with pytest.raises(PipelineError, match="flow-match"):
            MSDDASD3Pipeline(pipe, {}, scheduler="ddim")
        wrong = make_transformer()
        wrong.add_adapter(LoraConfig(r=2, target_modules=["to_q"]))
        state = {k.replace("to_q", "to_k").replace("attn.to_k", "attn.to_q"): v for k, v in
                 get_peft_model_state_dict(wrong).items()}  # fmt: skip
        state = {k: torch.zeros(v.shape[0] + 1, *v.shape[1:]) if "lora_B" in k else v for k, v in state.items()}
        StableDiffusion3Pipeline.save_lora_weights(tmp_path / "bad", transformer_lora_layers=state)
        with pytest.raises(AdapterError, match="this SD3 transformer"):
            MSDDASD3Pipeline(pipe, {"bad": tmp_path / "bad"})
        assert not getattr(pipe.transformer, "peft_config", None)  # the failed construction released itself
        with MSDDASD3Pipeline(pipe, {"a": tiny["loras"]["a"]}) as m:
            with pytest.raises(ScheduleError):
                run(m, {"a": 1.0}, eta=-0.5)
            with pytest.raises(PipelineError, match="joint_attention_kwargs"):
                run(m, {"a": 1.0}, cross_attention_kwargs={"scale": 0.5})
            with pytest.raises(TypeError, match="skip_guidance_layers"):
                run(m, {"a": 1.0}, skip_guidance_layers=[0])
            with pytest.raises(PipelineError, match="pooled_prompt_embeds"):
                run(m, {"a": 1.0}, pooled_prompt_embeds=torch.zeros(1, 5))
            with pytest.raises(PipelineError, match="divisible"):
                run(m, {"a": 1.0}, height=15)
            with pytest.raises(PipelineError, match="generator"):
                run(m, {"a": 1.0}, generator=[gen(), gen()])
            with pytest.raises(Exception, match="unknown objective|not an objective|'c'"):
                run(m, {"c": 1.0})
        dynamic = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
        with (
            MSDDASD3Pipeline.from_pipe(pipe, {}, scheduler=dynamic) as m,
            pytest.raises(PipelineError, match="dynamic"),
        ):
            run(m, method="base")
        unsupported = pytest.raises(UnsupportedSchedulerError, match="FlowMatchEulerDiscreteScheduler")
        with MSDDASD3Pipeline.from_pipe(pipe, {}, scheduler=DDIMScheduler()) as m, unsupported:
            run(m, method="base")
    finally:
        hook.remove()
    assert calls == []


def test_peft_folder_equals_diffusers_format(tiny, tmp_path):
    """The same adapter saved by peft (adapter_config.json + adapter_model.safetensors) samples the same images."""
    from peft import get_peft_model

    t = copy.deepcopy(tiny["pipe"].transformer)
    model = get_peft_model(t, LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "add_k_proj"]))
    _randomise_lora(model, 10, scale=1.0)  # the seed and targets of tiny's LoRA "a"
    model.save_pretrained(tmp_path / "peft", safe_serialization=True)
    with MSDDASD3Pipeline(tiny["pipe"], {"p": tmp_path / "peft", "a": tiny["loras"]["a"]}) as m:
        assert rel(run(m, {"p": 1.0}, eta=ETA).images, run(m, {"a": 1.0}, eta=ETA).images) < RTOL
