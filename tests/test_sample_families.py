"""`msdda sample` picks the pipeline from the --base folder's class: SD 1.x / 2.x, SDXL and PixArt folders
each sample with their msdda pipeline, and the PNGs equal that pipeline's images from Python."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("transformers")

from typer.testing import CliRunner  # noqa: E402

from msdda.cli import app  # noqa: E402
from test_pixart_align import _tokenizer as t5_tokenizer  # noqa: E402
from test_pixart_pipeline import make_lora, make_text_encoder, make_transformer, make_vae, save_peft  # noqa: E402
from test_sdxl_pipeline import TinyXL  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = "a red cube"


def _sample(base, objective, out, *extra):
    args = ["sample", "--base", str(base), "--objective", f"o={objective}", "--weights", "o=1", "--prompt", PROMPT,
            "--steps", "3", "--seed", "0", "--out", str(out), "--quiet", *extra]  # fmt: skip
    return CliRunner().invoke(app, args)


def _png(path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im, dtype=np.float32) / 255


def test_pixart_folder_samples_with_the_pixart_pipeline(tmp_path):
    from msdda.pipelines.pixart import MSDDAPixArtPipeline

    base = diffusers.PixArtAlphaPipeline(tokenizer=t5_tokenizer(), text_encoder=make_text_encoder(), vae=make_vae(),
                                         transformer=make_transformer(), scheduler=diffusers.DPMSolverMultistepScheduler())  # fmt: skip
    base.save_pretrained(tmp_path / "base", safe_serialization=True)
    lora = save_peft(tmp_path / "lora", *make_lora(base.transformer, 10))
    result = _sample(tmp_path / "base", lora, tmp_path / "out")
    assert result.exit_code == 0, (result.output, result.exception)
    doc = json.loads((tmp_path / "out" / "config.json").read_text())
    assert doc["pipeline"] == "MSDDAPixArtPipeline" and doc["scheduler_option"] == "ddpm"  # the learned variance
    with MSDDAPixArtPipeline.from_pretrained(tmp_path / "base", {"o": str(lora)}) as pipe:
        ref = pipe(PROMPT, {"o": 1.0}, num_inference_steps=3, seed=0, output_type="np", progress=False,
                   use_resolution_binning=False).images[0]  # fmt: skip
    assert float(np.abs(_png(tmp_path / "out" / "image_000.png") - ref).max()) <= 1 / 255 + 1e-6
    bad = _sample(tmp_path / "base", lora, tmp_path / "x", "--scheduler", "euler-ancestral")
    flat = " ".join(re.sub(r"[│╭╮╰╯─]", " ", bad.output).split())
    assert bad.exit_code == 2 and "PixArtAlphaPipeline takes one of ddpm, ddim or keep" in flat


def test_sdxl_folder_samples_with_the_sdxl_pipeline(tmp_path):
    from msdda.pipelines.sdxl import MSDDAXLPipeline

    tiny = TinyXL(tmp_path)
    tiny.base("ddim").save_pretrained(tmp_path / "base")
    result = _sample(tmp_path / "base", tiny.aes, tmp_path / "out", "--guidance-scale", "5")
    assert result.exit_code == 0, (result.output, result.exception)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["pipeline"] == "MSDDAXLPipeline"
    with MSDDAXLPipeline.from_pretrained(tmp_path / "base", {"o": str(tiny.aes)}, scheduler="ddim") as pipe:
        ref = pipe(PROMPT, {"o": 1.0}, num_inference_steps=3, seed=0, guidance_scale=5.0, output_type="np",
                   progress=False).images[0]  # fmt: skip
    assert float(np.abs(_png(tmp_path / "out" / "image_000.png") - ref).max()) <= 1 / 255 + 1e-6


def test_flux_folder_samples_with_the_flux_pipeline(tmp_path):
    from msdda.pipelines.flux import MSDDAFluxPipeline
    from test_flux_pipeline import Tiny as TinyFlux

    tiny = TinyFlux(tmp_path)
    tiny.base().save_pretrained(tmp_path / "base", safe_serialization=True)
    size = ["--height", "32", "--width", "32"]
    result = _sample(tmp_path / "base", tiny.loras["a"], tmp_path / "out", "--eta", "0.5", *size)
    assert result.exit_code == 0, (result.output, result.exception)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["pipeline"] == "MSDDAFluxPipeline"
    with MSDDAFluxPipeline.from_pretrained(tmp_path / "base", {"o": str(tiny.loras["a"])}) as pipe:
        ref = pipe(PROMPT, {"o": 1.0}, num_inference_steps=3, seed=0, eta=0.5, height=32, width=32, output_type="np",
                   progress=False).images[0]  # fmt: skip
    assert float(np.abs(_png(tmp_path / "out" / "image_000.png") - ref).max()) <= 1 / 255 + 1e-6
    bad = _sample(tmp_path / "base", tiny.loras["a"], tmp_path / "x", "--scheduler", "ddim", *size)
    flat = " ".join(re.sub(r"[│╭╮╰╯─]", " ", bad.output).split())
    assert bad.exit_code == 2 and "FluxPipeline takes none" in flat


def test_sd3_folder_samples_with_the_sd3_pipeline(tmp_path):
    import copy

    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    import test_sd3_pipeline as t3
    from msdda.pipelines.sd3 import MSDDASD3Pipeline

    tok = t3.make_tokenizer(tmp_path / "tok")
    base = diffusers.StableDiffusion3Pipeline(
        transformer=t3.make_transformer(), scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=t3.make_vae(), text_encoder=t3.make_clip(1), tokenizer=tok, text_encoder_2=t3.make_clip(2),
        tokenizer_2=copy.deepcopy(tok), text_encoder_3=t3.make_t5(), tokenizer_3=t3.make_t5_tokenizer(),
    )  # fmt: skip
    base.save_pretrained(tmp_path / "base", safe_serialization=True)
    t = copy.deepcopy(base.transformer)
    t.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v"]))
    t3._randomise_lora(t, 10, scale=1.0)
    diffusers.StableDiffusion3Pipeline.save_lora_weights(
        tmp_path / "lora", transformer_lora_layers=get_peft_model_state_dict(t)
    )
    result = _sample(tmp_path / "base", tmp_path / "lora", tmp_path / "out", "--eta", "0.5")
    assert result.exit_code == 0, (result.output, result.exception)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["pipeline"] == "MSDDASD3Pipeline"
    with MSDDASD3Pipeline.from_pretrained(tmp_path / "base", {"o": str(tmp_path / "lora")}) as pipe:
        ref = pipe(PROMPT, {"o": 1.0}, num_inference_steps=3, seed=0, eta=0.5, output_type="np",
                   progress=False).images[0]  # fmt: skip
    assert float(np.abs(_png(tmp_path / "out" / "image_000.png") - ref).max()) <= 1 / 255 + 1e-6
