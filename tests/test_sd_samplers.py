"""MSDDAPipeline with Euler ancestral and first-order SDE-DPM-Solver++ (Gaussian steps of msdda.core.samplers):
the base equals diffusers' own pipeline with that scheduler and seed, one adapter equals diffusers with the
LoRA loaded, and MSDDA equals DB-MPA (both samplers' variances depend on the schedule only)."""

from __future__ import annotations

import json
import re

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("transformers")

from msdda.pipelines.sd import MSDDAPipeline  # noqa: E402
from test_sd_pipeline import PROMPT, Tiny  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
STEPS = 4
KINDS = {
    "euler-ancestral": lambda cfg: diffusers.EulerAncestralDiscreteScheduler.from_config(cfg),
    "sde-dpmsolver++": lambda cfg: diffusers.DPMSolverMultistepScheduler.from_config(
        cfg, algorithm_type="sde-dpmsolver++", solver_order=1
    ),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Tiny:
    return Tiny(tmp_path_factory.mktemp("tiny_sd_samplers"))


def _diffusers(tiny: Tiny, kind: str, lora=None) -> torch.Tensor:
    pipe = tiny.base("ddim")
    pipe.scheduler = KINDS[kind](pipe.scheduler.config)
    if lora is not None:
        pipe.load_lora_weights(str(lora))
    g = torch.Generator().manual_seed(0)
    return pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=4.0, generator=g, output_type="latent").images


def _ours(tiny: Tiny, kind: str, weights=None, method="msdda") -> torch.Tensor:
    with MSDDAPipeline(tiny.base("ddim"), {"aes": tiny.aes, "align": tiny.align}, scheduler=kind) as pipe:
        out = pipe(PROMPT, weights, method=method, num_inference_steps=STEPS, guidance_scale=4.0,
                   generator=torch.Generator().manual_seed(0), output_type="latent", progress=False)  # fmt: skip
    return out.images


@pytest.mark.parametrize("kind", list(KINDS))
def test_base_and_one_adapter_equal_diffusers(tiny, kind):
    ref = _diffusers(tiny, kind)
    got = _ours(tiny, kind, method="base")
    assert float((got - ref).abs().max()) <= 1e-4 * float(ref.abs().max()), float((got - ref).abs().max())
    ref_lora = _diffusers(tiny, kind, lora=tiny.aes)
    one = _ours(tiny, kind, {"aes": 1.0, "align": 0.0})
    assert float((one - ref_lora).abs().max()) <= 1e-4 * float(ref_lora.abs().max())
    assert float((ref_lora - ref).abs().max()) > 1e-3  # the adapter matters


@pytest.mark.parametrize("kind", list(KINDS))
def test_msdda_equals_dbmpa_on_schedule_only_variances(tiny, kind):
    w = {"aes": 0.3, "align": 0.7}
    a, b = _ours(tiny, kind, w, "msdda"), _ours(tiny, kind, w, "db-mpa")
    assert float((a - b).abs().max()) <= 1e-5 * float(a.abs().max())


def test_unknown_scheduler_name_is_refused(tiny):
    from msdda.pipelines.errors import PipelineError

    with pytest.raises(PipelineError, match="scheduler='unipc'; choose one of"):
        MSDDAPipeline(tiny.base("ddim"), {"aes": tiny.aes}, scheduler="unipc")


def test_cli_samples_with_euler_ancestral(tiny, tmp_path):
    from typer.testing import CliRunner

    from msdda.cli import app

    folder = tmp_path / "base"
    tiny.base("ddim").save_pretrained(folder, safe_serialization=True)
    out = tmp_path / "img"
    args = ["sample", "--base", str(folder), "--objective", f"aes={tiny.aes}", "--weights", "aes=1", "--prompt",
            PROMPT, "--steps", str(STEPS), "--scheduler", "euler-ancestral", "--out", str(out), "--quiet"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, (result.output, result.exception)
    assert json.loads((out / "config.json").read_text())["scheduler"] == "EulerAncestralDiscreteScheduler"
    bad = CliRunner().invoke(app, [*args[:-3], "--scheduler", "pndm", "--out", str(tmp_path / "x")])
    flat = " ".join(re.sub(r"[│╭╮╰╯─]", " ", bad.output).split())
    assert (
        bad.exit_code == 2
        and "'pndm'; StableDiffusionPipeline takes one of ddim, ddpm, euler-ancestral, sde-dpmsolver++" in flat
    )
