"""MSDDAFluxPipeline on tiny FLUX components built from config (no downloads), 3 steps on CPU.

References are independent of the pipeline: diffusers' own FluxPipeline (K = 1 at eta 0 with FLUX.1-dev's
guidance embedding and the dynamic shift, a schnell-style transformer without guidance embeds, true CFG with
a negative prompt, one LoRA loaded by diffusers' load_lora_weights, a full transformer, and set_adapters
weights for the rewarded soup), a hand-written loop of Flow-GRPO's SDE formula (eta > 0) with the same
noise, and the shift mu / sigma schedule written out from the formulas.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel  # noqa: E402
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402
from peft import LoraConfig, get_peft_model_state_dict  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import T5Config, T5EncoderModel  # noqa: E402

from msdda.pipelines.errors import AdapterError, ObjectiveError, PipelineError  # noqa: E402
from msdda.pipelines.flux import MSDDAFluxPipeline, flux_timesteps  # noqa: E402
from msdda.sampling.methods import PlanError  # noqa: E402
from test_pixart_align import _tokenizer as make_t5_tokenizer  # noqa: E402
from test_pixart_pipeline import WORDS  # noqa: E402
from test_sd_pipeline import make_text_encoder as make_clip  # noqa: E402
from test_sd_pipeline import make_tokenizer as make_clip_tokenizer  # noqa: E402

PROMPT = "a red cube"
STEPS = 3
SEQ = 8  # T5 max_sequence_length of the tiny tokenizer
H, W = 8, 16  # vae_scale_factor 1 (one VAE block): packed latents [B, (8/2)(16/2) = 32, 4]
RTOL = 1e-5
CALL = {"num_inference_steps": STEPS, "height": H, "width": W, "max_sequence_length": SEQ, "output_type": "latent"}
CALL["progress"] = False
DIFF = {k: v for k, v in CALL.items() if k != "progress"}
TARGETS = [
    "transformer_blocks.0.attn.to_q",
    "transformer_blocks.0.attn.add_v_proj",
    "transformer_blocks.0.ff.net.2",
    "single_transformer_blocks.0.attn.to_k",
    "single_transformer_blocks.0.proj_mlp",
    "proj_out",
]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models gain nothing from threads on a shared 2-core machine
    yield
    torch.set_num_threads(old)


# ----- tiny components ------------------------------------------------------------------------------------


def make_transformer(guidance: bool = True, seed: int = 3) -> FluxTransformer2DModel:
    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=16,
        pooled_projection_dim=16,  # the tiny CLIP's hidden size (FluxPipeline uses its pooler_output)
        axes_dims_rope=[4, 4, 8],
        guidance_embeds=guidance,
    ).eval()


def make_t5() -> T5EncoderModel:
    torch.manual_seed(4)
    config = T5Config(vocab_size=len(WORDS) + 3, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2,
                      relative_attention_num_buckets=8)  # fmt: skip
    return T5EncoderModel(config).eval()


def make_vae() -> AutoencoderKL:
    torch.manual_seed(5)  # diffusers' own FLUX test VAE: one block, 1 latent channel, FLUX's shift/scale
    return AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                         latent_channels=1, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
                         shift_factor=0.0609, scaling_factor=1.5035).eval()  # fmt: skip


def dev_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """FLUX.1-dev's scheduler config: shift 3 and the dynamic shift mu from the image sequence length."""
    return FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                           base_image_seq_len=256, max_image_seq_len=4096)  # fmt: skip


class Tiny:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.tokenizer = make_clip_tokenizer(root / "clip_tok")
        self.text_encoder, self.t5, self.vae = make_clip(), make_t5(), make_vae()
        self.dev = make_transformer(True)
        self.schnell = make_transformer(False, seed=6)
        self.loras = {n: self._lora(n, seed) for n, seed in (("a", 10), ("b", 11))}
        self.peft_a = self._peft_folder("a", 10)

    def base(self, transformer=None, scheduler=None) -> FluxPipeline:
        pipe = FluxPipeline(
            scheduler=scheduler or dev_scheduler(),
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            text_encoder_2=self.t5,
            tokenizer_2=make_t5_tokenizer(),
            transformer=transformer if transformer is not None else self.dev,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def _lora_state(self, seed: int) -> tuple[dict[str, torch.Tensor], dict]:
        t = copy.deepcopy(self.dev)
        t.add_adapter(LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS, init_lora_weights=False), adapter_name="x")
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in t.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        return get_peft_model_state_dict(t, adapter_name="x"), t.peft_config["x"].to_dict()

    def _lora(self, name: str, seed: int) -> Path:
        """A diffusers-format FLUX LoRA, written by FluxPipeline.save_lora_weights (`transformer.` keys). "a"
        carries its peft config as metadata (alpha 4 kept, scaling 2), "b" none (diffusers then loads alpha = r)."""
        folder = self.root / f"lora_{name}"
        state, config = self._lora_state(seed)
        meta = {"transformer_lora_adapter_metadata": config} if name == "a" else {}
        FluxPipeline.save_lora_weights(folder, transformer_lora_layers=state, **meta)
        return folder

    def _peft_folder(self, name: str, seed: int) -> Path:
        folder = self.root / f"peft_{name}"
        LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS).save_pretrained(str(folder))
        save_file({f"base_model.model.{k}": v for k, v in self._lora_state(seed)[0].items()},
                  str(folder / "adapter_model.safetensors"))  # fmt: skip
        return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Tiny:
    return Tiny(tmp_path_factory.mktemp("flux"))


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def diffusers_run(pipe: FluxPipeline, seed: int = 0, **kw) -> torch.Tensor:
    return pipe(PROMPT, generator=gen(seed), **{**DIFF, **kw}).images


def run(pipe: MSDDAFluxPipeline, seed: int = 0, **kw) -> torch.Tensor:
    return pipe(PROMPT, generator=gen(seed), **{**CALL, **kw}).images


# ----- schedule -------------------------------------------------------------------------------------------


def test_schedule_is_diffusers_dynamic_shift(tiny):
    """mu and the sigma table from the formulas: mu = m L + b on the line through (256, 0.5), (4096, 1.15);
    sigma = e^mu / (e^mu + 1/s - 1) for s in linspace(1, 1/n, n), then 0."""
    sch, mu = flux_timesteps(dev_scheduler(), 4, 1024)
    m = (1.15 - 0.5) / (4096 - 256)
    assert mu == pytest.approx(1024 * m + 0.5 - m * 256, rel=1e-12)
    s = torch.linspace(1, 0.25, 4, dtype=torch.float64)
    expect = math.exp(mu) / (math.exp(mu) + (1 / s - 1))
    assert torch.allclose(sch.sigmas[:-1].double(), expect, atol=1e-6) and float(sch.sigmas[-1]) == 0.0
    assert torch.allclose(sch.timesteps.double(), 1000 * expect, atol=1e-3)


# ----- K = 1 against diffusers -------------------------------------------------------------------------------


def test_base_equals_diffusers_dev_and_images(tiny):
    """FLUX.1-dev style (guidance embeds, dynamic shift): latents and decoded images match diffusers'."""
    base = tiny.base()
    ref = diffusers_run(base, guidance_scale=3.5)
    with MSDDAFluxPipeline(base, {}) as pipe:
        out = pipe(PROMPT, method="base", generator=gen(0), **CALL)
        assert rel(out.images, ref) < RTOL
        assert out.config["mu"] == pytest.approx(0.5 + (1.15 - 0.5) / 3840 * (32 - 256))
        img = run(pipe, method="base", output_type="np")
    ref_img = diffusers_run(base, output_type="np")
    assert abs(img - ref_img).max() < 1e-5


def test_schnell_and_true_cfg_equal_diffusers(tiny):
    """No guidance embeds, no dynamic shift; and true CFG with a negative prompt."""
    base = tiny.base(tiny.schnell, FlowMatchEulerDiscreteScheduler(shift=1.0))
    ref = diffusers_run(base, guidance_scale=0.0)
    cfg = {"negative_prompt": "a blue ball", "true_cfg_scale": 2.5}
    ref_cfg = diffusers_run(base, **cfg)
    with MSDDAFluxPipeline(base, {}) as pipe:
        assert rel(run(pipe, method="base"), ref) < RTOL
        out = pipe(PROMPT, method="base", generator=gen(0), **CALL, **cfg)
        assert rel(out.images, ref_cfg) < RTOL
        assert out.cost.model_evals == 2 * STEPS and out.config["guidance_scale"] is None


def test_one_lora_equals_diffusers_load_lora_weights(tiny):
    """One objective at weight 1 (diffusers format, and the same LoRA as a peft folder) = diffusers' pipeline
    with the LoRA loaded by its own load_lora_weights."""
    ref_pipe = tiny.base(copy.deepcopy(tiny.dev))
    ref_pipe.load_lora_weights(str(tiny.loras["a"]), adapter_name="a")
    ref = diffusers_run(ref_pipe)
    base = tiny.base()
    plain = diffusers_run(base)
    assert rel(plain, ref) > 1e-3  # the LoRA matters
    with MSDDAFluxPipeline(base, {"a": tiny.loras["a"], "p": tiny.peft_a}) as pipe:
        assert rel(run(pipe, weights={"a": 1.0}), ref) < RTOL
        assert rel(run(pipe, weights={"p": 1.0}), ref) < RTOL
        assert rel(run(pipe, method="single:a"), ref) < RTOL
    assert rel(diffusers_run(base), plain) == 0.0  # released: the caller's pipeline is the base again


def test_full_transformer_objective_and_from_pretrained(tiny, tmp_path):
    other = make_transformer(True, seed=7)
    tiny.base(other).save_pretrained(tmp_path / "tuned", safe_serialization=True)
    tiny.base().save_pretrained(tmp_path / "base", safe_serialization=True)
    ref = diffusers_run(tiny.base(other))
    with MSDDAFluxPipeline.from_pretrained(tmp_path / "base", {"t": tmp_path / "tuned"}) as pipe:
        assert pipe.objectives["t"].kind == "transformer"
        assert rel(run(pipe, weights={"t": 1.0}), ref) < RTOL
    with pytest.raises(AdapterError, match="num_single_layers"):
        wrong = FluxTransformer2DModel(**{**dict(tiny.dev.config), "num_single_layers": 2})
        MSDDAFluxPipeline(tiny.base(), {"t": wrong})


# ----- the SDE, the methods ---------------------------------------------------------------------------------


def flow_sde_loop(base: FluxPipeline, transformer, a: float, sde_type: str = "sde", seed: int = 0) -> torch.Tensor:
    """Flow-GRPO's SDE step (sde_step_with_logprob, sde_type 'sde' / 'cps') written out, with diffusers' x_T and
    randn_tensor noise from the same generator, at every step (the last one too)."""
    g = gen(seed)
    embeds, pooled, text_ids = base.encode_prompt(PROMPT, None, max_sequence_length=SEQ)
    x, image_ids = base.prepare_latents(1, 1, H, W, embeds.dtype, "cpu", g)
    sch, _ = flux_timesteps(base.scheduler, STEPS, x.shape[1])
    sig = sch.sigmas.double()
    for i, t in enumerate(sch.timesteps):
        with torch.no_grad():
            v = transformer(hidden_states=x, timestep=t.expand(1) / 1000, guidance=torch.full([1], 3.5),
                            pooled_projections=pooled, encoder_hidden_states=embeds, txt_ids=text_ids,
                            img_ids=image_ids, return_dict=False)[0].double()  # fmt: skip
        s, s_next = float(sig[i]), float(sig[i + 1])
        dt = s_next - s
        z = randn_tensor(x.shape, generator=g).double()
        if sde_type == "sde":
            std = a * math.sqrt(s / (1 - (float(sig[1]) if s == 1.0 else s)))
            mean = x.double() * (1 + std**2 / (2 * s) * dt) + v * (1 + std**2 * (1 - s) / (2 * s)) * dt
            x = (mean + std * math.sqrt(-dt) * z).float()
        else:  # Flow-CPS: x0_hat and the noise estimate recombined at sigma_next, std = sigma_next sin(a pi / 2)
            x0, x1 = x.double() - s * v, x.double() + (1 - s) * v
            std = s_next * math.sin(a * math.pi / 2)
            x = ((1 - s_next) * x0 + math.sqrt(s_next**2 - std**2) * x1 + std * z).float()
    return x


@pytest.mark.parametrize(("a", "sde_type"), [(0.7, "sde"), (0.5, "cps")])
def test_sde_equals_hand_written_loop(tiny, a, sde_type):
    base = tiny.base()
    ref = flow_sde_loop(base, tiny.dev, a, sde_type)
    with MSDDAFluxPipeline(base, {}) as pipe:
        out = run(pipe, method="base", eta=a, sde_type=sde_type)
        assert rel(out, ref) < RTOL
        assert rel(out, run(pipe, method="base")) > 1e-2  # stochastic: not the ODE
        assert rel(run(pipe, method="base", eta=a, sde_type=sde_type, seed=1), out) > 1e-2


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")
@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_msdda_equals_db_mpa_and_soup_equals_set_adapters(tiny, eta):
    """The flow kernels' variance is the schedule's, so MSDDA with normalised weights is DB-MPA."""
    w = {"a": 0.3, "b": 0.7}
    with MSDDAFluxPipeline(tiny.base(), dict(tiny.loras)) as pipe:
        msdda = run(pipe, weights=w, eta=eta)
        assert rel(msdda, run(pipe, method="db-mpa", weights=w, eta=eta)) < RTOL
        assert rel(msdda, run(pipe, weights={"a": 1.0}, eta=eta)) > 1e-3
        if eta == 0.0:
            soup = run(pipe, method="rewarded-soup", weights=w)
            assert "msdda_rewarded_soup" not in tiny.dev.peft_config
    if eta == 0.0:
        ref_pipe = tiny.base(copy.deepcopy(tiny.dev))
        for n in w:
            ref_pipe.load_lora_weights(str(tiny.loras[n]), adapter_name=n)
        ref_pipe.set_adapters(list(w), list(w.values()))
        assert rel(soup, diffusers_run(ref_pipe)) < RTOL


def test_generator_list_rows_equal_single_runs(tiny):
    with MSDDAFluxPipeline(tiny.base(), {"a": tiny.loras["a"]}) as pipe:
        kw = {**CALL, "eta": 0.7, "num_images_per_prompt": 2, "weights": {"a": 0.5}}
        both = pipe(PROMPT, generator=[gen(3), gen(4)], **kw).images
        for row, seed in ((0, 3), (1, 4)):
            single = pipe(PROMPT, generator=gen(seed), **{**kw, "num_images_per_prompt": 1}).images
            assert rel(both[row : row + 1], single) < RTOL
        ode = pipe(PROMPT, method="base", generator=[gen(3), gen(4)], **{**CALL, "num_images_per_prompt": 2}).images
        ref = pipe.base(PROMPT, generator=[gen(3), gen(4)], num_images_per_prompt=2, **DIFF).images
        assert rel(ode, ref) < RTOL  # diffusers' own pipeline with the same generator list
        with pytest.raises(PipelineError, match="list of 3 generators"):
            pipe(PROMPT, generator=[gen(), gen(), gen()], **kw)


# ----- sharing and refusals ------------------------------------------------------------------------------------


def test_release_restores_the_callers_pipeline(tiny):
    base = tiny.base()
    keys = {k: v.clone() for k, v in tiny.dev.state_dict().items()}
    config = dict(base.scheduler.config)
    pipe = MSDDAFluxPipeline(base, dict(tiny.loras))
    run(pipe, weights={"a": 0.5, "b": 0.5})
    run(pipe, method="rewarded-soup", weights={"a": 0.5, "b": 0.5})
    assert base.scheduler is not pipe.base.scheduler and dict(base.scheduler.config) == config
    pipe.release()
    after = tiny.dev.state_dict()
    assert list(after) == list(keys) and all(torch.equal(after[k], v) for k, v in keys.items())
    assert not getattr(tiny.dev, "peft_config", None)
    with pytest.raises(PipelineError, match="released"):
        run(pipe)


def test_bad_inputs_fail_before_denoising(tiny, tmp_path):
    def mean(images, prompts):
        return images.mean(dim=(1, 2, 3))

    calls = []
    hook = tiny.dev.register_forward_hook(lambda *a: calls.append(1))
    try:
        with MSDDAFluxPipeline(tiny.base(), {"a": tiny.loras["a"]}) as pipe:
            cases = [
                ({"output_type": "jpeg"}, PipelineError, "output_type"),
                ({"eta": -0.1}, PipelineError, "eta"),
                ({"eta": 1.5, "sde_type": "cps"}, PipelineError, "cps"),
                ({"sde_type": "ode"}, PipelineError, "sde_type"),
                ({"method": "code", "weights": {"a": 1.0}, "rewards": {"a": mean}}, PipelineError, "CoDe with eta=0"),
                ({"weights": {"nope": 1.0}}, (ObjectiveError, PlanError), "nope"),
                ({"latents": torch.zeros(1, 4, 8, 16)}, PipelineError, "packed latents"),
                ({"num_inference_steps": 0}, PipelineError, "num_inference_steps"),
                ({"guidance_scale": float("nan")}, PipelineError, "guidance_scale"),
                ({"max_sequence_length": 600}, PipelineError, "max_sequence_length"),
            ]
            for kw, err, match in cases:
                with pytest.raises(err, match=match):
                    run(pipe, **{"weights": {"a": 1.0}, **kw})
        assert not calls
    finally:
        hook.remove()
    with pytest.raises(PipelineError, match="not a FLUX"):
        MSDDAFluxPipeline(object(), {})
    with pytest.raises(PipelineError, match="FlowMatchEulerDiscreteScheduler"):
        MSDDAFluxPipeline(tiny.base(scheduler=diffusers.DDIMScheduler()), {})
    bad = tmp_path / "bad.safetensors"
    save_file({"transformer.proj_out.lora_A.weight": torch.zeros(2, 5),
               "transformer.proj_out.lora_B.weight": torch.zeros(4, 2)}, str(bad))  # fmt: skip
    with pytest.raises(AdapterError, match="proj_out"):
        MSDDAFluxPipeline(tiny.base(), {"x": bad})
    (tmp_path / "lora.bin").write_bytes(b"")
    with pytest.raises(AdapterError, match="pickled"):
        MSDDAFluxPipeline(tiny.base(), {"x": tmp_path / "lora.bin"})
    assert not getattr(tiny.dev, "peft_config", None)  # failed constructions released themselves


def _brightness(images, prompts):
    return images.mean(dim=(1, 2, 3))


@pytest.mark.parametrize("method", ["code", "rgg", "db-mpa-ls"])
def test_every_method_runs(tiny, method):
    """The reward-guided and sampled methods run on packed latents (rewards see the decoded images)."""
    rewards = {"a": _brightness, "b": lambda images, prompts: -_brightness(images, prompts)}
    with MSDDAFluxPipeline(tiny.base(), dict(tiny.loras)) as pipe:
        options = {"tempering": "constant"} if method == "rgg" else None
        kw = {"method": method, "rewards": rewards, "method_options": options, "generator": gen(), **CALL}
        out = pipe(PROMPT, {"a": 0.5, "b": 0.5}, eta=0.7, **kw)
        assert out.images.shape == (1, 32, 4) and torch.isfinite(out.images).all()
        assert out.config["method"] == method
        if method == "rgg":
            with pytest.raises(PipelineError, match="tempering"):
                pipe(PROMPT, {"a": 0.5, "b": 0.5}, eta=0.7, **{**kw, "method_options": None})
            with pytest.raises(PipelineError, match="RGG with eta=0"):
                pipe(PROMPT, {"a": 0.5, "b": 0.5}, eta=0.0, **kw)


def test_callback_interrupt_and_tuple_output(tiny):
    seen = []

    def callback(pipe, i, t, kwargs):
        seen.append((i, float(t)))
        pipe.interrupt = i == 1
        return {"latents": kwargs["latents"] * 0}

    with MSDDAFluxPipeline(tiny.base(), {}) as pipe:
        out = pipe(PROMPT, method="base", callback_on_step_end=callback, generator=gen(), **CALL)
        assert [i for i, _ in seen] == [0, 1] and out.config["steps_run"] == 2 and out.config["interrupted"]
        assert seen[0][1] == pytest.approx(1000.0) and not out.images.abs().max()
        (images,) = pipe(PROMPT, method="base", return_dict=False, generator=gen(), **{**CALL, "output_type": "pt"})
        assert images.shape == (1, 3, H, W)
