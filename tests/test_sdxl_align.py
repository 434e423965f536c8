"""`msdda align --task sdxl` on a tiny SDXL pipeline saved to disk: the LoRA file is diffusers' SDXL layout,
loads with StableDiffusionXLPipeline.load_lora_weights and reproduces the trained UNet, with the pooled
embeddings and time ids reaching the UNet during training."""

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
from test_sdxl_pipeline import TinyXL  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_cli_trains_an_sdxl_lora_that_diffusers_loads(tmp_path, capsys):
    tiny = TinyXL(tmp_path)
    tiny.base("ddim").save_pretrained(tmp_path / "base")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cube\na blue sphere\n")
    seen = []
    unet_forward = diffusers.UNet2DConditionModel.forward

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("added_cond_kwargs"))
        return unet_forward(self, *args, **kwargs)

    out = tmp_path / "lora"
    args = ["align", "--task", "sdxl", "--base", str(tmp_path / "base"), "--prompt-file", str(prompts), "--reward",
            "brightness", "--trainer", "step-rl", "--steps", "2", "--num-inference-steps", "3", "--trajectories",
            "2", "--states", "1", "--candidates", "2", "--eval-samples", "1", "--lr", "5e-2", "--guidance-scale",
            "5", "--out", str(out), "--quiet"]  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(diffusers.UNet2DConditionModel, "forward", spy)
        cli.entry(args)
    assert "aligned a LoRA to 'brightness'" in capsys.readouterr().out
    added = [a for a in seen if a is not None]
    assert added and all(set(a) == {"text_embeds", "time_ids"} for a in added)
    assert all(torch.equal(a["time_ids"][0], torch.tensor([16.0, 16.0, 0.0, 0.0, 16.0, 16.0])) for a in added)
    assert json.loads((out / "align_config.json").read_text())["task"] == "sdxl"
    assert all(k.startswith("unet.") for k in load_file(str(out / LORA_FILE)))

    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(2, 4, 2, 2, generator=g), torch.tensor([500, 20])
    hidden = torch.randn(2, 4, 32, generator=g)
    added = {"text_embeds": torch.randn(2, 16, generator=g), "time_ids": torch.randn(2, 6, generator=g)}
    fresh = diffusers.StableDiffusionXLPipeline.from_pretrained(str(tmp_path / "base"), local_files_only=True)
    with torch.no_grad():
        base = fresh.unet(x, t, encoder_hidden_states=hidden, added_cond_kwargs=added).sample
        fresh.load_lora_weights(str(out))
        loaded = fresh.unet(x, t, encoder_hidden_states=hidden, added_cond_kwargs=added).sample
    assert float((loaded - base).abs().max()) > 1e-4  # the adapter trained and loads


def test_the_file_reproduces_the_trained_unet(tmp_path):
    from msdda.pipelines.sd_align import align_sdxl, sd_train_config

    tiny = TinyXL(tmp_path)
    tiny.base("ddim").save_pretrained(tmp_path / "base")
    cfg = sd_train_config("step-rl", "brightness", steps=1, num_inference_steps=3, trajectories=2, states_per_trajectory=1,
                          samples=2, eval_samples=1, lr=5e-2)  # fmt: skip
    result = align_sdxl(tmp_path / "base", "brightness", ["a red cube"], tmp_path / "lora", cfg, progress=False)
    g = torch.Generator().manual_seed(4)
    x, t = torch.randn(2, 4, 2, 2, generator=g), torch.tensor([700, 100])
    hidden = torch.randn(2, 4, 32, generator=g)
    added = {"text_embeds": torch.randn(2, 16, generator=g), "time_ids": torch.randn(2, 6, generator=g)}
    fresh = diffusers.StableDiffusionXLPipeline.from_pretrained(str(tmp_path / "base"), local_files_only=True)
    fresh.load_lora_weights(str(tmp_path / "lora"))
    with torch.no_grad():
        ours = result.train.model(x, t, encoder_hidden_states=hidden, added_cond_kwargs=added).sample
        loaded = fresh.unet(x, t, encoder_hidden_states=hidden, added_cond_kwargs=added).sample
    assert float((loaded - ours).abs().max()) < 1e-6


def test_sdxl_variance_heads_make_msdda_differ_from_dbmpa(tmp_path):
    from msdda.models.variance_head import VARIANCE_HEAD_FILE
    from msdda.pipelines.sd_align import SDAlignOptions, align_sdxl, sd_train_config
    from msdda.pipelines.sdxl import MSDDAXLPipeline

    tiny = TinyXL(tmp_path)
    tiny.base("ddim").save_pretrained(tmp_path / "base")
    dirs = {}
    for name, reward, seed in (("a", "brightness", 0), ("b", "jpeg-compressibility", 1)):
        cfg = sd_train_config("step-rl", reward, steps=2, num_inference_steps=3, trajectories=2, states_per_trajectory=1,
                              samples=2, eval_samples=1, lr=5e-2, seed=seed)  # fmt: skip
        align_sdxl(tmp_path / "base", reward, ["a red cube"], tmp_path / name, cfg,
                   options=SDAlignOptions(variance_head=True), progress=False)  # fmt: skip
        assert (tmp_path / name / VARIANCE_HEAD_FILE).is_file()
        dirs[name] = str(tmp_path / name)
    with MSDDAXLPipeline.from_pretrained(tmp_path / "base", dirs, scheduler="ddim") as pipe:
        kw = dict(num_inference_steps=3, eta=1.0, guidance_scale=5.0, output_type="latent", progress=False)
        a = pipe("a red cube", {"a": 0.5, "b": 0.5}, method="msdda", generator=torch.Generator().manual_seed(0), **kw)
        b = pipe("a red cube", {"a": 0.5, "b": 0.5}, method="db-mpa", generator=torch.Generator().manual_seed(0), **kw)
    assert float((a.images - b.images).abs().max()) > 1e-4  # the heads give each objective its own variance
