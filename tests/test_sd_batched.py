"""K objectives of the SD pipeline in one batched UNet call (msdda.pipelines.objectives.UNetBatch).

LoRA objectives run as one UNet forward through peft's mixed-adapter batches, full UNets as one vmapped
call. Everything is compared with the sequential path on tiny SD parts (built as in test_sd_pipeline.py):
outputs and sampled latents agree to ATOL (float32 rounding of a larger batch; measured <= 1e-5),
costs are counted the same, the hooks are gone afterwards (the UNet computes bit-identically to before)
and forced batching where it cannot work raises BatchingError naming the reason.
"""

from __future__ import annotations

import copy
import logging
import warnings

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("transformers")

from peft import LoraConfig  # noqa: E402

from msdda.models import ClassifierFreeGuidance  # noqa: E402
from msdda.models import batched as batched_mod  # noqa: E402
from msdda.models.batched import BatchingError  # noqa: E402
from msdda.pipelines import MSDDAPipeline  # noqa: E402
from msdda.pipelines.objectives import UNetBatch, mixed_adapter_rows  # noqa: E402
from test_sd_pipeline import PROMPT, STEPS, Tiny, count_unet_calls, gen, run  # noqa: E402

ATOL = 5e-5  # batched vs sequential: float32 rounding of the K-times larger batch (measured ~1e-5 at most)
SCALE = 3.0


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add OpenMP spinning on a shared 2-core machine
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Tiny:
    t = Tiny(tmp_path_factory.mktemp("tiny_sd_batched"))
    # A third adapter, also on the feed-forward and a ResNet 3x3 conv, so K = 3 mixes Linear and Conv2d LoRAs.
    t.third = t._diffusers_lora(
        "third", 15, LoraConfig(r=3, lora_alpha=6, target_modules=["to_k", "ff.net.2", "conv1"])
    )
    return t


def _pipe(tiny, k: int = 3, scheduler: str = "ddim") -> MSDDAPipeline:
    objectives = {"aes": tiny.aes, "align": tiny.align, "third": tiny.third}
    return MSDDAPipeline(tiny.base(scheduler), dict(list(objectives.items())[:k]))


def _inputs(b: int = 2):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(b, 4, 8, 8, generator=g)
    cond = torch.randn(b, 16, 16, generator=g)
    null = torch.randn(b, 16, 16, generator=g)
    return x, torch.full((b,), 601, dtype=torch.long), cond, null


def _lora_hooks(unet) -> int:
    from peft.tuners.lora import LoraLayer

    return sum(len(m._forward_pre_hooks) for m in unet.modules() if isinstance(m, LoraLayer))


# ----- the evaluator on its own ------------------------------------------------------------------------


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("guidance", [SCALE, None], ids=["cfg", "no-cfg"])
def test_one_unet_call_equals_the_sequential_calls(tiny, k, guidance):
    pipe = _pipe(tiny, k)
    names = [*pipe.objective_names, None]  # K adapters and the reference (adapters off)
    x, t, cond, null = _inputs()
    seq_dens = [pipe.denoiser(n) for n in names]
    bat_dens = [pipe.denoiser(n) for n in names]
    wrap = (lambda d: ClassifierFreeGuidance(d, guidance, null)) if guidance else (lambda d: d)
    with torch.no_grad():
        seq = [wrap(d)(x, t, cond) for d in seq_dens]
        batch = UNetBatch.build(bat_dens, required=True, guidance_scale=guidance, null_cond=null)
        assert batch.groups == [("adapters", list(range(k + 1)))] and batch.unet_calls_per_step == 1
        calls = count_unet_calls(pipe)
        out = batch(x, t, cond)
        assert calls[0] == 1  # K adapters + reference, cond and uncond: one UNet forward of batch (K+1)*2B
        # A subset (a rule's select()), in the order asked for.
        sub = batch.evaluate(x, t, cond, [k, 0])
        assert calls[0] == 2
    for o, s in zip(out, seq, strict=True):
        assert o.shape == s.shape == (2, 4, 8, 8)
        torch.testing.assert_close(o, s, rtol=0, atol=ATOL)
    torch.testing.assert_close(sub[0], seq[k], rtol=0, atol=ATOL)
    torch.testing.assert_close(sub[1], seq[0], rtol=0, atol=ATOL)
    # The objectives differ from each other (so routing a row to the wrong adapter would show).
    assert min((seq[i] - seq[j]).abs().max() for i in range(k + 1) for j in range(i)) > 1e-3
    # Cost counting: every denoiser counted as many UNet rows as in its own calls (2B with CFG).
    rows = 2 * 2 if guidance else 2
    assert [d.forwards for d in seq_dens] == [rows] * (k + 1)
    assert [d.forwards for d in bat_dens] == [2 * rows, *([rows] * (k - 1)), 2 * rows]  # members 0 and k twice


def test_hooks_are_removed_and_the_unet_computes_as_before(tiny):
    pipe = _pipe(tiny, 3)
    x, t, cond, null = _inputs()
    unet = pipe.unet

    def base_and_aes():
        with torch.no_grad():
            return pipe.denoiser(None)(x, t, cond), pipe.denoiser("aes")(x, t, cond)

    before = base_and_aes()
    states = [(list(m.active_adapters), m.disable_adapters) for m in pipe.switch.layers]
    batch = UNetBatch.build([pipe.denoiser(n) for n in ("aes", "third")], required=True, guidance_scale=None,
                            null_cond=None)
    with torch.no_grad():
        batch(x, t, cond)
    assert _lora_hooks(unet) == 0
    assert not pipe.switch.any_enabled()
    after = base_and_aes()
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    # An error inside the routed call still removes the hooks and disables the adapters.
    with pytest.raises(RuntimeError, match="boom"), mixed_adapter_rows(pipe.switch, ["aes", "__base__"]):
        assert _lora_hooks(unet) == len(pipe.switch.layers) > 0 and pipe.switch.any_enabled()
        raise RuntimeError("boom")
    assert _lora_hooks(unet) == 0 and not pipe.switch.any_enabled()
    # A failing batched UNet call (a wrong condition width) as well.
    with pytest.raises(BatchingError, match="batched UNet call of objectives 'aes', 'third' failed"), torch.no_grad():
        batch(x, t, torch.randn(2, 16, 9))
    assert _lora_hooks(unet) == 0 and not pipe.switch.any_enabled()
    assert all(torch.equal(a, b) for a, b in zip(before, base_and_aes(), strict=True))
    assert all(m.disable_adapters for m in pipe.switch.layers) and all(disabled for _, disabled in states)


# ----- the pipeline -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("k", "weights"),
    [
        (2, {"aes": 0.3, "align": 0.7}),
        (3, {"aes": 0.3, "align": 0.2, "third": 0.3}),  # the reference takes 0.2: it joins the batch
    ],
)
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_pipeline_batched_equals_sequential(tiny, k, weights, eta):
    pipe = _pipe(tiny, k)
    calls = count_unet_calls(pipe)
    seq = run(pipe, weights, eta=eta, generator=gen(3), batch_models=False)
    seq_calls = calls[0]
    bat = run(pipe, weights, eta=eta, generator=gen(3), batch_models=True)
    members = len(seq.config["exponents"])
    assert members == k + (1 if "third" in weights else 0)
    assert seq_calls == STEPS * members and calls[0] - seq_calls == STEPS  # one UNet call per step
    torch.testing.assert_close(bat.images, seq.images, rtol=0, atol=ATOL)
    assert bat.cost.model_evals == seq.cost.model_evals == STEPS * 2 * members
    # Auto on CPU: one by one (bit-identical to batch_models=False); images via the VAE agree as well.
    calls[0] = 0
    assert torch.equal(run(pipe, weights, eta=eta, generator=gen(3)).images, seq.images)
    assert calls[0] == STEPS * members
    if eta == 1.0 and k == 3:
        img_seq = run(pipe, weights, eta=eta, generator=gen(3), output_type="np", batch_models=False).images
        img_bat = run(pipe, weights, eta=eta, generator=gen(3), output_type="np", batch_models=True).images
        assert abs(img_seq - img_bat).max() < 1e-4 and img_seq.shape == (1, 16, 16, 3)


def test_auto_batches_where_allowed(tiny, monkeypatch):
    """batch_models=None batches on accelerators; AUTO_BATCH_ON_CPU stands in for one here."""
    pipe = _pipe(tiny, 2)
    weights = {"aes": 0.5, "align": 0.5}
    forced = run(pipe, weights, batch_models=True)
    monkeypatch.setattr(batched_mod, "AUTO_BATCH_ON_CPU", True)
    calls = count_unet_calls(pipe)
    auto = run(pipe, weights)
    assert calls[0] == STEPS and torch.equal(auto.images, forced.images)
    # guidance_rescale is applied per objective: auto evaluates one by one, forcing names the reason.
    calls[0] = 0
    run(pipe, weights, guidance_rescale=0.7)
    assert calls[0] == 2 * STEPS
    with pytest.raises(BatchingError, match="guidance_rescale=0.7 is applied to each objective"):
        run(pipe, weights, guidance_rescale=0.7, batch_models=True)


def test_subset_rules_and_soup_under_batching(tiny):
    """DB-MPA-LS evaluates the one model it drew, rewarded-soup one soup adapter: batching changes nothing."""
    pipe = _pipe(tiny, 3)
    weights = {"aes": 0.3, "align": 0.3, "third": 0.2}
    for method in ("db-mpa-ls", "rewarded-soup"):
        seq = run(pipe, weights, method=method, eta=1.0, batch_models=False)
        bat = run(pipe, weights, method=method, eta=1.0, batch_models=True)
        assert torch.equal(seq.images, bat.images)
        assert seq.cost.model_evals == bat.cost.model_evals == STEPS * 2
    # db-mpa with the reference: K + 1 members in one call per step.
    calls = count_unet_calls(pipe)
    seq = run(pipe, weights, method="db-mpa", batch_models=False)
    bat = run(pipe, weights, method="db-mpa", batch_models=True)
    assert calls[0] == STEPS * 4 + STEPS
    torch.testing.assert_close(bat.images, seq.images, rtol=0, atol=ATOL)


def test_full_unets_are_vmapped(tiny, monkeypatch):
    """Full-UNet objectives (and the base, when it holds no adapters) run as one vmapped call."""
    other = copy.deepcopy(tiny.full)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(0.98)
    pipe = MSDDAPipeline(tiny.base("ddim"), {"full": tiny.full_dir, "other": other})
    weights = {"full": 0.4, "other": 0.4}  # the reference takes 0.2
    members = [pipe.denoiser(n) for n in ("full", "other", None)]
    assert UNetBatch.build(members, required=True, guidance_scale=None, null_cond=None).groups == [
        ("vmap", [0, 1, 2])
    ]
    seq = run(pipe, weights, eta=1.0, batch_models=False)
    stacked_calls = []
    original = batched_mod.StackedDenoisers.__call__
    monkeypatch.setattr(
        batched_mod.StackedDenoisers, "__call__", lambda s, *a: stacked_calls.append(1) or original(s, *a)
    )
    with warnings.catch_warnings():
        # on CPU vmap has no batching rule for fused attention and loops over the models there (it says so)
        warnings.filterwarnings("ignore", message=".*batching rule.*")
        bat = run(pipe, weights, eta=1.0, batch_models=True)
    assert len(stacked_calls) == STEPS  # one vmapped call (3 UNets, cond + uncond) per step
    torch.testing.assert_close(bat.images, seq.images, rtol=0, atol=ATOL)
    assert bat.cost.model_evals == seq.cost.model_evals == STEPS * 2 * 3


# ----- where batching cannot work ------------------------------------------------------------------------


def test_forced_batching_names_the_reason(tiny, caplog):
    x, t, cond, null = _inputs()
    pipe = _pipe(tiny, 2)
    # A LoRA scale that differs per objective: one UNet call takes one cross_attention_kwargs.
    dens = [pipe.denoiser("aes"), pipe.denoiser("align")]
    dens[1].cross_attention_kwargs = {"scale": 0.5}
    with pytest.raises(BatchingError, match="'aes' and 'align' pass different cross_attention_kwargs"):
        UNetBatch.build(dens, required=True, guidance_scale=None, null_cond=None)
    with caplog.at_level(logging.DEBUG, logger="msdda.pipelines.objectives"):
        assert UNetBatch.build(dens, required=False, guidance_scale=None, null_cond=None) is None
    assert "different cross_attention_kwargs" in caplog.text
    # The same scale for all: batched, and equal to diffusers' scaled sequential calls.
    for d in dens:
        d.cross_attention_kwargs = {"scale": 0.5}
    with torch.no_grad():
        seq_out = [d(x, t, cond) for d in dens]
        out = UNetBatch.build(dens, required=True, guidance_scale=None, null_cond=None)(x, t, cond)
    for o, s in zip(out, seq_out, strict=True):
        torch.testing.assert_close(o, s, rtol=0, atol=ATOL)
    # A LoRA objective beside a full UNet: two UNets, no single call.
    mixed = MSDDAPipeline(tiny.base("ddim"), {"aes": tiny.aes, "full": tiny.full_dir})
    with pytest.raises(BatchingError, match="'aes' and 'full' run on different UNets"):
        run(mixed, {"aes": 0.5, "full": 0.5}, batch_models=True)
    # Merged (fused) adapters: peft cannot route rows around weights that already hold an update.
    for layer in pipe.switch.layers:
        layer.merge(adapter_names=["aes"])
    try:
        with pytest.raises(BatchingError, match=r"merged into its weights \['aes'\]; call unet.unfuse_lora"):
            run(pipe, {"aes": 0.5, "align": 0.5}, batch_models=True)
    finally:
        for layer in pipe.switch.layers:
            layer.unmerge()
    # DoRA adapters: peft's mixed batches refuse them.
    base = tiny.base("ddim")
    base.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, use_dora=True, target_modules=["to_q"]), adapter_name="d")
    dora = MSDDAPipeline(base, {"dora": "d", "aes": tiny.aes})
    with pytest.raises(BatchingError, match="adapter 'd' uses DoRA"):
        run(dora, {"dora": 0.5, "aes": 0.5}, batch_models=True)
    seq = run(dora, {"dora": 0.5, "aes": 0.5})  # auto: one by one, as before
    assert torch.isfinite(seq.images).all()


def test_prompt_list_and_generator_list(tiny):
    """Two prompts, two images each, one generator per image: the batched rows stay with their images."""
    pipe = _pipe(tiny, 2)
    kw = dict(num_inference_steps=STEPS, output_type="latent", guidance_scale=SCALE, progress=False, eta=1.0,
              num_images_per_prompt=2)
    prompts = [PROMPT, "a blue ball"]
    seq = pipe(prompts, {"aes": 0.4, "align": 0.4}, generator=[gen(i) for i in range(4)], batch_models=False, **kw)
    bat = pipe(prompts, {"aes": 0.4, "align": 0.4}, generator=[gen(i) for i in range(4)], batch_models=True, **kw)
    assert bat.images.shape == (4, 4, 8, 8)
    torch.testing.assert_close(bat.images, seq.images, rtol=0, atol=ATOL)


def test_cli_batch_models_flag(tiny, tmp_path):
    import json

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

    def invoke(*extra: str, out):
        args = ["sample", "--base", str(base_dir), "--objective", f"aes={tiny.aes}", "--objective",
                f"align={tiny.align}", "--weights", "aes=0.5", "--weights", "align=0.3", "--out", str(out),
                "--steps", "2", "--guidance-scale", "3", "--prompt", PROMPT, "--quiet", *extra]
        return CliRunner().invoke(app, args)

    runs = {}
    for flag, value in (("on", True), ("off", False)):
        result = invoke("--batch-models", flag, out=tmp_path / flag)
        assert result.exit_code == 0, result.output
        record = json.loads((tmp_path / flag / "config.json").read_text())
        assert record["batch_models"] is value
        runs[flag] = record["cost"]["model_evals"]
    assert runs["on"] == runs["off"] == 2 * 2 * 3
    bad = invoke("--batch-models", "yes", out=tmp_path / "bad")
    assert bad.exit_code != 0 and "choose auto, on or off" in bad.output
