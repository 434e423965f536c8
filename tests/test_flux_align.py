"""`msdda align --task flux` on a tiny FLUX.1-dev pipeline saved to disk: a LoRA on the transformer trained on
flow matching's SDE kernels over packed latents (the embedded guidance, no classifier-free guidance); the file
is diffusers' FLUX layout and reproduces the trained transformer; the reference is the base exactly."""

from __future__ import annotations

import json

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402

from msdda import cli  # noqa: E402
from msdda.pipelines.sd_align import LORA_FILE  # noqa: E402
from test_flux_pipeline import Tiny  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_cli_trains_a_flux_lora_that_diffusers_loads(tmp_path, capsys):
    tiny = Tiny(tmp_path)
    tiny.base().save_pretrained(tmp_path / "base", safe_serialization=True)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cube\na blue sphere\n")
    seen = []
    forward = diffusers.FluxTransformer2DModel.forward

    def spy(self, *args, **kwargs):
        seen.append((kwargs.get("guidance"), kwargs["hidden_states"].shape, kwargs["timestep"]))
        return forward(self, *args, **kwargs)

    out = tmp_path / "lora"
    args = ["align", "--task", "flux", "--base", str(tmp_path / "base"), "--prompt-file", str(prompts), "--reward",
            "brightness", "--trainer", "step-rl", "--eta", "0.7", "--steps", "2", "--num-inference-steps", "3",
            "--trajectories", "2", "--states", "1", "--candidates", "2", "--eval-samples", "1", "--lr", "5e-2",
            "--height", "32", "--width", "32", "--log-every", "1", "--out", str(out), "--quiet"]  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(diffusers.FluxTransformer2DModel, "forward", spy)
        cli.entry(args)
    assert "aligned a LoRA to 'brightness'" in capsys.readouterr().out
    assert seen and all(g is not None and bool((g == 3.5).all()) for g, _, _ in seen)  # dev: embedded 3.5, no CFG
    probe = diffusers.FluxPipeline.from_pretrained(str(tmp_path / "base"), local_files_only=True)
    tokens = (32 // (2 * probe.vae_scale_factor)) ** 2  # diffusers packs 2 x 2 latent patches into one token
    assert {tuple(s[1:]) for _, s, _ in seen} == {(tokens, probe.transformer.config.in_channels)}  # packed latents
    assert all(float(t.max()) <= 1.0 for *_, t in seen)  # the transformer gets sigma, as FluxPipeline passes it
    doc = json.loads((out / "align_config.json").read_text())
    assert doc["task"] == "flux" and doc["options"]["scheduler"] == "flow" and doc["options"]["eta"] == 0.7
    assert [json.loads(x)["step"] for x in (out / "train_log.jsonl").read_text().splitlines()] == [0, 1, 2]
    state = load_file(str(out / LORA_FILE))
    assert state and all(k.startswith("transformer.") for k in state)

    fresh = diffusers.FluxPipeline.from_pretrained(str(tmp_path / "base"), local_files_only=True)
    g = torch.Generator().manual_seed(2)
    cfg = fresh.transformer.config
    kw = dict(hidden_states=torch.randn(1, 16, cfg.in_channels, generator=g), timestep=torch.tensor([0.6]),
              guidance=torch.tensor([3.5]), pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=g),
              encoder_hidden_states=torch.randn(1, 8, cfg.joint_attention_dim, generator=g),
              txt_ids=torch.zeros(8, 3), img_ids=torch.zeros(16, 3), return_dict=False)  # fmt: skip
    with torch.no_grad():
        base = fresh.transformer(**kw)[0]
        fresh.load_lora_weights(str(out))
        loaded = fresh.transformer(**kw)[0]
    assert float((loaded - base).abs().max()) > 1e-4  # the trained adapter loads and acts


def test_the_flux_file_reproduces_the_trained_transformer_and_the_reference_is_the_base(tmp_path):
    from msdda.pipelines.sd_align import SDAlignOptions, align_flux, sd_train_config

    tiny = Tiny(tmp_path)
    tiny.base().save_pretrained(tmp_path / "base", safe_serialization=True)
    cfg = sd_train_config("step-rl", "brightness", steps=1, num_inference_steps=3, trajectories=2, states_per_trajectory=1,
                          samples=2, eval_samples=1, lr=5e-2, guidance_scale=3.5)  # fmt: skip
    result = align_flux(tmp_path / "base", "brightness", ["a red cube"], tmp_path / "lora", cfg,
                        options=SDAlignOptions(eta=0.7, height=32, width=32), progress=False)  # fmt: skip
    fresh = diffusers.FluxPipeline.from_pretrained(str(tmp_path / "base"), local_files_only=True)
    g = torch.Generator().manual_seed(3)
    c = fresh.transformer.config
    kw = dict(hidden_states=torch.randn(1, 16, c.in_channels, generator=g), timestep=torch.tensor([0.4]),
              guidance=torch.tensor([3.5]), pooled_projections=torch.randn(1, c.pooled_projection_dim, generator=g),
              encoder_hidden_states=torch.randn(1, 8, c.joint_attention_dim, generator=g), txt_ids=torch.zeros(8, 3),
              img_ids=torch.zeros(16, 3), return_dict=False)  # fmt: skip
    trained = result.train.model
    with torch.no_grad():
        ours = trained(**kw)[0]
        trained.disable_adapters()
        reference = trained(**kw)[0]
        trained.enable_adapters()
        base = fresh.transformer(**kw)[0]
        fresh.load_lora_weights(str(tmp_path / "lora"))
        loaded = fresh.transformer(**kw)[0]
    assert torch.equal(reference, base)
    assert float((loaded - ours).abs().max()) < 1e-5
