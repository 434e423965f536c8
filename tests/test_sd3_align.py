"""`msdda align --task sd3` on a tiny SD3 pipeline saved to disk: a LoRA on the transformer trained on flow
matching's SDE kernels (noise level eta > 0); the file is diffusers' SD3 layout and reproduces the trained
transformer; the reference is the base exactly; eta 0 is refused before anything loads."""

from __future__ import annotations

import copy
import json

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402

import test_sd3_pipeline as t3  # noqa: E402
from msdda import cli  # noqa: E402
from msdda.pipelines.sd_align import LORA_FILE, SDAlignOptions, align_sd3, sd_train_config  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3_align")
    tok = t3.make_tokenizer(root / "tok")
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=t3.make_transformer(), scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=t3.make_vae(), text_encoder=t3.make_clip(1), tokenizer=tok, text_encoder_2=t3.make_clip(2),
        tokenizer_2=copy.deepcopy(tok), text_encoder_3=t3.make_t5(), tokenizer_3=t3.make_t5_tokenizer(),
    )  # fmt: skip
    pipe.save_pretrained(root / "base", safe_serialization=True)
    return root / "base"


def _inputs(fresh):
    g = torch.Generator().manual_seed(5)
    cfg = fresh.transformer.config
    x = torch.randn(2, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    hidden = torch.randn(2, 6, cfg.joint_attention_dim, generator=g)
    pooled = torch.randn(2, cfg.pooled_projection_dim, generator=g)
    return dict(hidden_states=x, timestep=torch.tensor([750.0, 250.0]), encoder_hidden_states=hidden,
                pooled_projections=pooled, return_dict=False)  # fmt: skip


def test_sd3_lora_trains_on_flow_kernels_and_loads_in_diffusers(base_dir, tmp_path):
    cfg = sd_train_config("step-rl", "brightness", steps=2, num_inference_steps=3, trajectories=2,
                          states_per_trajectory=1, samples=2, eval_samples=1, lr=5e-2, log_every=1)  # fmt: skip
    result = align_sd3(base_dir, "brightness", ["a red cube"], tmp_path / "lora", cfg,
                       options=SDAlignOptions(eta=0.7), progress=False)  # fmt: skip
    doc = json.loads((tmp_path / "lora" / "align_config.json").read_text())
    assert doc["task"] == "sd3" and doc["options"]["scheduler"] == "flow" and doc["options"]["eta"] == 0.7
    assert all(k.startswith("transformer.") for k in load_file(str(tmp_path / "lora" / LORA_FILE)))
    rows = [json.loads(x) for x in (tmp_path / "lora" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2] and rows[0]["eval_kl_per_step"] == 0.0 < rows[-1]["eval_kl_per_step"]
    fresh = diffusers.StableDiffusion3Pipeline.from_pretrained(str(base_dir), local_files_only=True)
    kw = _inputs(fresh)
    trained = result.train.model
    with torch.no_grad():
        base = fresh.transformer(**kw)[0]
        ours = trained(**kw)[0]
        trained.disable_adapters()
        reference = trained(**kw)[0]
        trained.enable_adapters()
        fresh.load_lora_weights(str(tmp_path / "lora"))
        loaded = fresh.transformer(**kw)[0]
    assert torch.equal(reference, base)  # the reference is the base transformer
    assert float((ours - base).abs().max()) > 1e-4
    assert float((loaded - ours).abs().max()) < 1e-5  # the file reproduces the trained transformer


def test_eta_zero_and_wrong_scheduler_are_refused(base_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "_debug", False)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cube\n")
    for extra, message in (
        (["--eta", "0"], "point mass"),
        (["--scheduler", "ddim"], "--task sd3 trains on flow kernels"),
    ):
        out = tmp_path / "never"
        try:
            cli.entry(["align", "--task", "sd3", "--base", str(base_dir), "--prompt-file", str(prompts), "--reward",
                       "brightness", "--trainer", "step-rl", "--out", str(out), "--quiet", *extra])  # fmt: skip
            code = 0
        except SystemExit as exc:
            code = int(exc.code or 0)
        text = capsys.readouterr().err
        assert code == 2 and message in text, text
        assert not out.exists()


def test_sd3_variance_heads_on_flow_kernels_make_msdda_differ(base_dir, tmp_path):
    """A variance head on SD3 (flow SDE kernels): the kernel is the flow step's with var * exp(var * d_logvar),
    so two heads give MSDDA's precision weighting something to weigh; DB-MPA's average does not see it."""
    from msdda.core.kernel import apply_kernel_offsets
    from msdda.core.schedule import as_kernel_scheduler
    from msdda.models.variance_head import VARIANCE_HEAD_FILE, with_variance_offsets
    from msdda.pipelines.sd3 import MSDDASD3Pipeline

    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(4)
    ks = as_kernel_scheduler(sched, eta=0.7)
    g = torch.Generator().manual_seed(0)
    x, v, d = torch.randn(2, 4, 2, 2, generator=g), torch.randn(2, 4, 2, 2, generator=g), torch.randn(2, 4, generator=g)
    t = float(ks.timesteps[1])
    plain, headed = ks.kernel(v, t, x), ks.kernel(with_variance_offsets(v, d), t, x)
    want_mean, want_var = apply_kernel_offsets(plain.mean, plain.var, with_variance_offsets(v, d)[:, 4:])
    torch.testing.assert_close(headed.mean, want_mean)
    torch.testing.assert_close(headed.var, want_var)

    dirs = {}
    for name, reward, seed in (("a", "brightness", 0), ("b", "jpeg-compressibility", 1)):
        cfg = sd_train_config("step-rl", reward, steps=2, num_inference_steps=3, trajectories=2,
                              states_per_trajectory=1, samples=2, eval_samples=1, lr=5e-2, seed=seed)  # fmt: skip
        align_sd3(base_dir, reward, ["a red cube"], tmp_path / name, cfg,
                  options=SDAlignOptions(eta=0.7, variance_head=True), progress=False)  # fmt: skip
        assert (tmp_path / name / VARIANCE_HEAD_FILE).is_file()
        dirs[name] = str(tmp_path / name)
    with MSDDASD3Pipeline.from_pretrained(base_dir, dirs) as pipe:
        kw = dict(num_inference_steps=3, eta=0.7, output_type="latent", progress=False)
        a = pipe("a red cube", {"a": 0.5, "b": 0.5}, method="msdda", generator=torch.Generator().manual_seed(0), **kw)
        b = pipe("a red cube", {"a": 0.5, "b": 0.5}, method="db-mpa", generator=torch.Generator().manual_seed(0), **kw)
    assert float((a.images - b.images).abs().max()) > 1e-4
