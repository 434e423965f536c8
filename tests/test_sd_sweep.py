"""`msdda sweep --task sd` and `msdda report` on a tiny Stable Diffusion pipeline saved to disk (no downloads).

Every method runs on 2 prompts x 2 seeds with the JPEG rewards (RGG with the differentiable `brightness`),
samples are stored as PNG images, the report renders; a sweep unit equals MSDDAPipeline at the unit's
generator seed (same noise); bad options fail before any model loads.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from diffusers import StableDiffusionPipeline  # noqa: E402
from peft import LoraConfig, get_peft_model_state_dict  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from msdda.cli import app  # noqa: E402
from msdda.evaluation.sweep import SweepConfig, Unit, run_unit, sample_image_paths, unit_seed  # noqa: E402
from msdda.pipelines.rewards import brightness  # noqa: E402
from msdda.pipelines.sd import MSDDAPipeline  # noqa: E402
from msdda.pipelines.sd_task import SDTaskError, check_sd_options, sd_bundle  # noqa: E402
from test_sd_pipeline import make_text_encoder, make_tokenizer, make_unet, make_vae, sd_scheduler  # noqa: E402

PROMPTS = ["a red cube", "# a comment line", "", "a blue sphere"]
STEPS = 2
BATCH = 2
ETA = 0.5  # DDIM with noise: every step draws from the generator, so noise equality is tested at every step
ALL_METHODS = "base,msdda,db-mpa,db-mpa-ls,rewarded-soup,code"


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: torch on one thread for this module


def _components(root: Path) -> dict:
    """The tiny SD parts of test_sd_pipeline (same configs and seeds), DDIM with SD 1.5's settings."""
    return dict(unet=make_unet(), text_encoder=make_text_encoder(), vae=make_vae(), scheduler=sd_scheduler("ddim"),
                tokenizer=make_tokenizer(root / "tok"))  # fmt: skip


def _save_lora(unet: torch.nn.Module, folder: Path, name: str, seed: int) -> Path:
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    u = copy.deepcopy(unet)
    u.add_adapter(cfg, adapter_name=name)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in u.named_parameters():
            if "lora_" in pname:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    StableDiffusionPipeline.save_lora_weights(
        folder,
        unet_lora_layers=get_peft_model_state_dict(u, adapter_name=name),
        unet_lora_adapter_metadata=cfg.to_dict(),
    )
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("sd_sweep")
    parts = _components(root)
    pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(root / "base", safe_serialization=True)
    loras = {"aes": _save_lora(parts["unet"], root / "aes", "aes", 11)}
    loras["pick"] = _save_lora(parts["unet"], root / "pick", "pick", 12)
    prompt_file = root / "prompts.txt"
    prompt_file.write_text("\n".join(PROMPTS) + "\n")
    return {"root": root, "base": root / "base", "loras": loras, "prompt_file": prompt_file}


def _args(tiny: dict, out: Path, *extra: str, rewards=("jpeg-compressibility", "jpeg-incompressibility")) -> list[str]:
    options = tiny["root"] / "options.json"
    options.write_text(json.dumps({"eta": ETA, "guidance_scale": 3.0}))
    args = ["sweep", "--task", "sd", "--out", str(out), "--base", str(tiny["base"]), "--task-options", str(options)]
    for (name, path), spec in zip(tiny["loras"].items(), rewards, strict=True):
        args += ["--objective", f"{name}={path}", "--reward", f"{name}={spec}"]
    args += ["--prompt-file", str(tiny["prompt_file"]), "--seeds", "0,1", "--steps", str(STEPS)]
    return [*args, "--batch-size", str(BATCH), "--quiet", *extra]


def _flat(text: str) -> str:
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


def _invoke(args: list[str]):
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def test_sweep_every_method_and_report(tiny, tmp_path):
    out = tmp_path / "run"
    _invoke(_args(tiny, out, "--methods", ALL_METHODS, "--grid-points", "3"))
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["task"] == "sd" and cfg["prompts"] == ["a red cube", "a blue sphere"]  # blank and # lines skipped
    assert cfg["task_options"]["rewards"]["aes"] == "jpeg-compressibility"
    methods = {r["method"] for r in rows}
    assert methods == set(ALL_METHODS.split(","))
    # base: 2 prompts x 2 seeds x batch; each weighted method: 3 weights x 2 x 2 x batch
    assert len(rows) == BATCH * 4 * (1 + 5 * 3)
    for r in rows:
        assert r["rewards"]["aes"] < 0 < r["rewards"]["pick"]  # minus / plus the JPEG size in kB
        assert abs(r["rewards"]["aes"] + r["rewards"]["pick"]) < 1e-6  # the same image scored both ways
    # the extremes of the fusion methods differ from the base model: the objectives are really used
    msdda = {r["rewards"]["pick"] for r in rows if r["method"] == "msdda"}
    assert len(msdda) > len({r["rewards"]["pick"] for r in rows if r["method"] == "base"})
    unit = rows[0]["unit"]
    pngs = sample_image_paths(out, unit, BATCH)
    assert all(p.exists() for p in pngs) and not list((out / "samples").glob("*.safetensors"))
    from PIL import Image

    with Image.open(pngs[0]) as im:
        assert im.size == (16, 16) and im.mode == "RGB"
    # `msdda sample` at the unit's generator seed draws the same images (docs/stable_diffusion.md)
    row = next(
        r
        for r in rows
        if r["method"] == "msdda"
        and r["weights"] == {"aes": 0.5, "pick": 0.5}
        and r["prompt_index"] == 1
        and r["seed"] == 1
    )
    sampled = tmp_path / "sampled"
    args = ["sample", "--base", str(tiny["base"]), "--prompt", "a blue sphere", "--out", str(sampled)]
    args += [f"--objective={k}={v}" for k, v in tiny["loras"].items()]
    args += ["--weights", "aes=0.5", "--weights", "pick=0.5", "--steps", str(STEPS), "--guidance-scale", "3"]
    args += ["--eta", str(ETA), "--seed", str(unit_seed(1, 1)), "--num-images", str(BATCH), "--quiet"]
    _invoke([*args, "--no-safety-checker"])
    import numpy as np

    for i, png in enumerate(sample_image_paths(out, row["unit"], BATCH)):
        with Image.open(png) as a, Image.open(sampled / f"image_{i:03d}.png") as b:
            diff = np.abs(np.asarray(a, dtype=int) - np.asarray(b.convert("RGB"), dtype=int))
        assert diff.max() <= 1, diff.max()  # measured 0; 1 allows uint8 rounding of images equal to ~1e-6
    # a rerun resumes: nothing to do
    again = _invoke(_args(tiny, out, "--methods", ALL_METHODS, "--grid-points", "3"))
    assert again.output.startswith("0 of 64 units"), again.output
    report = CliRunner().invoke(app, ["report", str(out)])
    assert report.exit_code == 0, (report.output, report.exception)
    for name in ("metrics.json", "pareto.png", "report.html"):
        assert (out / name).stat().st_size > 0
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64") >= 1 + 16  # the Pareto figure plus a grid per (method, weight)
    assert "No image samples stored" not in html


def test_rgg_needs_differentiable_rewards(tiny, tmp_path):
    out = tmp_path / "rgg"
    _invoke(_args(tiny, out, "--methods", "rgg", "--grid-points", "2", rewards=("brightness", "brightness")))
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 4 * BATCH and all(0 <= r["rewards"]["aes"] <= 1 for r in rows)
    # with the JPEG rewards (no gradient) RGG is refused, naming why
    bad = CliRunner().invoke(app, _args(tiny, tmp_path / "rgg-jpeg", "--methods", "rgg"))
    assert bad.exit_code != 0 and "differentiable" in _flat(bad.output + str(bad.exception))


def test_sweep_unit_equals_the_pipeline(tiny):
    """A sweep unit's images equal MSDDAPipeline's at the unit's generator seed (same initial noise, same
    per-step noise, same conditions and decoding)."""
    objectives = {k: str(v) for k, v in tiny["loras"].items()}
    rewards = {"aes": "jpeg-compressibility", "pick": "brightness"}
    bundle = sd_bundle(base=str(tiny["base"]), objectives=objectives, rewards=rewards, eta=ETA, guidance_scale=3.0)
    cfg = SweepConfig(task="sd", methods=["msdda"], steps=STEPS, batch_size=BATCH, seeds=[1])
    prompts = ["a red cube", "a blue sphere"]
    weights = {"aes": 0.3, "pick": 0.7}
    unit = Unit("msdda", tuple(weights.items()), 1, 1)
    rows, samples = run_unit(unit, bundle, cfg, ["aes", "pick"], prompts)
    images = bundle.decode(samples)
    with MSDDAPipeline.from_pretrained(tiny["base"], objectives, safety_checker=None) as pipe:
        pipe.set_progress_bar_config(disable=True)
        ref = pipe(
            prompts[1],
            weights,
            seed=unit_seed(1, 1),
            num_images_per_prompt=BATCH,
            num_inference_steps=STEPS,
            guidance_scale=3.0,
            eta=ETA,
            output_type="pt",
        ).images
    assert images.shape == ref.shape == (BATCH, 3, 16, 16)
    assert torch.allclose(images, ref, atol=1e-5), (images - ref).abs().max()
    assert rows[0]["rewards"]["pick"] == pytest.approx(float(brightness(ref)[0]), abs=1e-5)
    other = run_unit(Unit("msdda", tuple(weights.items()), 1, 2), bundle, cfg, ["aes", "pick"], prompts)[1]
    assert not torch.allclose(other, samples)  # another seed, other noise


def _fail_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the options were checked")

    monkeypatch.setattr(MSDDAPipeline, "from_pretrained", refuse)


def test_bad_options_fail_before_loading(tiny, tmp_path, monkeypatch):
    _fail_loading(monkeypatch)
    args = _args(tiny, tmp_path / "bad")
    cases = [
        ([a for i, a in enumerate(args) if a != "--base" and (i == 0 or args[i - 1] != "--base")], "needs `base`"),
        ([*args, "--reward", "extra=sharpness"], "unknown spec 'sharpness'"),
        ([*args, "--reward", "x=pickscore=/nowhere"], "/nowhere does not exist"),
    ]
    missing = list(args)
    missing[missing.index(f"aes={tiny['loras']['aes']}")] = f"aes={tmp_path / 'no-such-lora'}"
    cases.append((missing, "no-such-lora does not exist"))
    for bad, message in cases:
        result = CliRunner().invoke(app, bad)
        assert result.exit_code == 2, (bad, result.output, result.exception)
        assert message in _flat(result.output), (message, result.output)
    assert not (tmp_path / "bad").exists()
    with pytest.raises(SDTaskError, match="unknown reward model kind 'nope'"):
        check_sd_options(
            {"base": str(tiny["base"]), "objectives": {k: str(v) for k, v in tiny["loras"].items()}}
            | {"rewards": {"aes": "nope=x", "pick": "brightness"}}
        )
    digits = CliRunner().invoke(app, ["sweep", "--out", str(tmp_path / "d"), "--base", str(tiny["base"])])
    assert digits.exit_code == 2 and "belong to --task sd" in _flat(digits.output)


def test_tasks_without_decode_keep_raw_samples(tmp_path):
    """The embedded tasks still store raw samples (safetensors) and draw from sample(seed=unit seed)."""
    from safetensors.torch import load_file

    from msdda.evaluation.sweep import build_method, run_sweep, samples_path
    from msdda.evaluation.tasks import get_task_bundle
    from msdda.sampling import sample

    cfg = SweepConfig(task="gaussian", methods=["msdda"], grid_points=2, steps=3, batch_size=2, seeds=[3])
    run_sweep(cfg, tmp_path / "g", lambda c: get_task_bundle(c.task, c.task_options), progress=False)
    bundle = get_task_bundle("gaussian")
    objectives = bundle.objectives[:2]
    unit = Unit("msdda", tuple((o, w) for o, w in zip(objectives, (0.0, 1.0), strict=True)), 0, 3)
    stored = load_file(str(samples_path(tmp_path / "g", unit.key)))["samples"]
    assert not list((tmp_path / "g" / "samples").glob("*.png"))
    plan = build_method("msdda", bundle, dict(unit.weights), cfg, objectives)
    direct = sample(
        plan.models,
        bundle.scheduler,
        plan.rule,
        shape=(2, *bundle.sample_shape),
        reference=plan.reference,
        num_inference_steps=3,
        seed=unit_seed(3, 0),
        dtype=bundle.dtype,
        progress=False,
    ).samples
    assert torch.equal(stored, direct.float())


def test_overwrite_removes_only_sample_pngs_of_the_sweep(tmp_path):
    from msdda.evaluation.store import own_files

    samples = tmp_path / "samples"
    samples.mkdir()
    ours = samples / "msdda_a=0.5,b=0.5_p0_s0.001.png"
    theirs = samples / "figure.png"
    ours.write_bytes(b"x")
    theirs.write_bytes(b"y")
    assert ours in own_files(tmp_path) and theirs not in own_files(tmp_path)


def test_default_methods_load_the_pipeline_once(tiny, tmp_path, monkeypatch):
    """Without --methods: every method the rewards allow (not rgg with the JPEG sizes), on one loaded pipeline."""
    calls = []
    original = MSDDAPipeline.from_pretrained.__func__

    def counting(cls, *args, **kwargs):
        calls.append(args)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(MSDDAPipeline, "from_pretrained", classmethod(counting))
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps([{"aes": 0.25, "pick": 0.75}]))
    out = tmp_path / "default"
    _invoke(_args(tiny, out, "--weights", str(grid)))
    assert len(calls) == 1
    methods = json.loads((out / "config.json").read_text())["methods"]
    assert methods == ["base", "msdda", "db-mpa", "db-mpa-ls", "rewarded-soup", "code"]


def test_soup_average_factors_reproduces_the_peer_baseline(tiny, tmp_path):
    """--soup-average factors: rewarded-soup averages the LoRA factors (Diffusion Blend's released baseline);
    at one-hot weights it is the adapter itself, as the delta soup is, and in between the two soups differ."""
    rows = {}
    for average in ("delta", "factors"):
        out = tmp_path / average
        _invoke(_args(tiny, out, "--methods", "rewarded-soup", "--grid-points", "3", "--soup-average", average))
        cfg = json.loads((out / "config.json").read_text())
        assert cfg.get("soup_average") == (None if average == "delta" else "factors")  # default left out
        rows[average] = {
            (r["weights"]["aes"], r["prompt_index"], r["seed"], r["index"]): r["rewards"]["pick"]
            for r in (json.loads(x) for x in (out / "results.jsonl").read_text().splitlines())
        }
    assert rows["delta"].keys() == rows["factors"].keys()
    for key, value in rows["delta"].items():
        if key[0] in (0.0, 1.0):
            assert rows["factors"][key] == pytest.approx(value, abs=1e-9)  # one adapter: the same soup
    assert any(rows["factors"][k] != v for k, v in rows["delta"].items() if k[0] == 0.5)


def test_soup_average_factors_is_refused_without_lora_objectives(tmp_path):
    from msdda.evaluation.store import SweepError
    from msdda.evaluation.sweep import run_sweep
    from msdda.evaluation.tasks import get_task_bundle

    cfg = SweepConfig(task="digits", methods=["rewarded-soup"], grid_points=2, soup_average="factors", steps=2,
                      batch_size=1)  # fmt: skip
    with pytest.raises(SweepError, match="interpolates full parameters"):
        run_sweep(cfg, tmp_path / "r", lambda c: get_task_bundle(c.task, c.task_options), progress=False)
    assert not (tmp_path / "r").exists()
