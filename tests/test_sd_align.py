"""`msdda align --task sd` on a tiny Stable Diffusion pipeline saved to disk (no downloads).

The trained LoRA is a standard diffusers file: diffusers' `load_lora_weights` and `msdda sample` both load it
and reproduce the trained UNet; the reference is the base UNet exactly; rewards see decoded images and the
prompt texts; a resumed run equals an uninterrupted one bit for bit; gradient checkpointing and chunked rewards
give the same training step; bad options fail before anything loads or is written.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from diffusers import StableDiffusionPipeline  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from msdda import cli  # noqa: E402
from msdda.pipelines.sd_align import (  # noqa: E402
    ADAPTER,
    LORA_FILE,
    SDAlignError,
    SDAlignOptions,
    align_sd,
    sd_train_config,
)
from test_sd_sweep import _components  # noqa: E402

PROMPTS = ["a red cube", "a blue sphere"]
# Small and fast: 3 sampling steps, 2 trajectories x 2 states, a high lr so 2 steps move the LoRA visibly.
FAST = dict(steps=2, num_inference_steps=3, checkpoint_every=1, log_every=1, lr=1e-2, eval_samples=2)
SEEN: list[tuple[tuple[int, ...], float, float, list[str]]] = []


def recording_reward(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Mean brightness; records what it was given (shape, range, prompt texts)."""
    SEEN.append((tuple(images.shape), float(images.detach().min()), float(images.detach().max()), list(prompts)))
    return images.mean(dim=(1, 2, 3))


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: torch on one thread for this module


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("sd_align")
    parts = _components(root)
    pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(root / "base", safe_serialization=True)
    prompt_file = root / "prompts.txt"
    prompt_file.write_text("# training prompts\n" + "\n".join(PROMPTS) + "\n\n")
    return {"root": root, "base": root / "base", "prompt_file": prompt_file}


def _base_pipe(tiny: dict) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny["base"]), safety_checker=None, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _cli_args(tiny: dict, out: Path, *extra: str) -> list[str]:
    return [
        "align", "--task", "sd", "--base", str(tiny["base"]), "--prompt-file", str(tiny["prompt_file"]),
        "--out", str(out), "--steps", "2", "--num-inference-steps", "3", "--trajectories", "2", "--states", "2",
        "--candidates", "2", "--eval-samples", "2", "--checkpoint-every", "1", "--log-every", "1", "--lr", "1e-2",
        "--quiet", *extra,
    ]  # fmt: skip


def _entry(args: list[str], capsys) -> tuple[int, str]:
    try:
        cli.entry(args)
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory) -> Path:
    """`msdda align --task sd` for 2 steps (step-RL, the differentiable brightness reward)."""
    out = tmp_path_factory.mktemp("trained") / "lora"
    cli.entry(_cli_args(tiny, out, "--reward", "brightness", "--trainer", "step-rl", "--lora-rank", "4"))
    return out


def test_cli_writes_a_diffusers_lora_config_and_log(trained):
    state = load_file(str(trained / LORA_FILE))
    assert state and all(k.startswith("unet.") for k in state)  # diffusers' layout
    downs = [v for k, v in state.items() if "lora_B" in k or "lora.up" in k]
    assert downs and max(float(v.abs().max()) for v in downs) > 1e-4  # lora_B starts at 0: it trained
    assert {v.shape[0] for k, v in state.items() if "lora_A" in k or "lora.down" in k} == {4}  # --lora-rank 4
    doc = json.loads((trained / "align_config.json").read_text())
    assert doc["task"] == "sd" and doc["reward"] == "brightness" and doc["trainer"] == "step-rl"
    assert doc["prompts"] == PROMPTS  # comment and blank lines skipped
    assert doc["train_config"]["steps"] == 2 and doc["train_config"]["lora_rank"] == 4
    assert doc["options"]["eta"] == 1.0 and doc["options"]["scheduler"] == "ddim"
    rows = [json.loads(line) for line in (trained / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert rows[0]["eval_kl_per_step"] == 0.0  # the policy starts at the reference (lora_B = 0)
    assert rows[-1]["eval_kl_per_step"] > 0  # and moved away from it
    assert (trained / "checkpoints").is_dir()


def test_lora_loads_in_diffusers_and_msdda_sample(trained, tiny, tmp_path, capsys):
    kw = dict(prompt=PROMPTS[0], num_inference_steps=3, guidance_scale=3.0, height=16, width=16, output_type="np")
    plain = _base_pipe(tiny)
    before = plain(generator=torch.Generator().manual_seed(0), **kw).images
    pipe = _base_pipe(tiny)
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.load_lora_weights(str(trained))
    ours = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    assert abs(ours - before).max() > 3 / 255  # the adapter changes the images by more than the PNG rounding
    out = tmp_path / "sampled"
    code, text = _entry(
        ["sample", "--base", str(tiny["base"]), "--objective", f"bright={trained}", "--weights", "bright=1",
         "--prompt", PROMPTS[0], "--steps", "3", "--guidance-scale", "3", "--seed", "0", "--out", str(out),
         "--quiet"],
        capsys,
    )  # fmt: skip
    assert code == 0, text
    from PIL import Image

    with Image.open(out / "image_000.png") as im:
        sampled = torch.from_numpy(np.asarray(im, dtype=np.float32)) / 255
    # one objective at weight 1 is the adapter itself; PNGs are rounded to 1/255
    assert float((sampled - torch.from_numpy(ours[0])).abs().max()) <= 1 / 255 + 1e-6


def _api_run(tiny: dict, out: Path, trainer: str = "step-rl", reward: str = "brightness", **kw):
    options = kw.pop("options", SDAlignOptions())
    cfg = sd_train_config(trainer, reward, **{**FAST, **kw})
    return align_sd(tiny["base"], reward, PROMPTS, out, cfg, options=options, resume=True, progress=False)


def _lora(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / LORA_FILE))


def test_trained_unet_equals_the_saved_file_and_reference_is_the_base(tiny, tmp_path):
    result = _api_run(tiny, tmp_path / "run")
    unet = result.train.model  # the UNet with the trained adapter
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(2, 4, 2, 2, generator=g), torch.tensor([500, 20])
    hidden = torch.randn(2, 16, 16, generator=g)
    with torch.no_grad():
        trained_out = unet(x, t, encoder_hidden_states=hidden).sample
        unet.disable_adapters()
        reference_out = unet(x, t, encoder_hidden_states=hidden).sample
        unet.enable_adapters()
        fresh = _base_pipe(tiny)
        base_out = fresh.unet(x, t, encoder_hidden_states=hidden).sample
        fresh.load_lora_weights(str(tmp_path / "run"))
        loaded_out = fresh.unet(x, t, encoder_hidden_states=hidden).sample
    assert torch.equal(reference_out, base_out)  # the reference is the base UNet, bit for bit
    assert float((trained_out - base_out).abs().max()) > 1e-4
    assert float((loaded_out - trained_out).abs().max()) < 1e-6  # the file holds the trained adapter
    assert ADAPTER in unet.peft_config


def test_reward_sees_decoded_images_and_prompt_texts(tiny, tmp_path):
    SEEN.clear()
    _api_run(tiny, tmp_path / "rec", reward="test_sd_align:recording_reward", steps=1)
    assert SEEN
    for shape, lo, hi, prompts in SEEN:
        assert shape[1:] == (3, 16, 16) and 0.0 <= lo <= hi <= 1.0  # images in [0, 1], not latents
        assert len(prompts) == shape[0] and set(prompts) <= set(PROMPTS)
    # the held-out batch (2 samples) and the training candidates (2 trajectories x 2 states x 2 samples)
    assert {s[0] for s, *_ in SEEN} >= {2, 8}


def test_resume_equals_an_uninterrupted_run(tiny, tmp_path):
    _api_run(tiny, tmp_path / "whole", steps=3)
    _api_run(tiny, tmp_path / "cut", steps=2)  # checkpoints after step 1 (never at the last step)
    _api_run(tiny, tmp_path / "cut", steps=3)  # resumes from step 1
    whole, cut = _lora(tmp_path / "whole"), _lora(tmp_path / "cut")
    assert whole.keys() == cut.keys() and all(torch.equal(whole[k], cut[k]) for k in whole)
    rows = [json.loads(line)["step"] for line in (tmp_path / "cut" / "train_log.jsonl").read_text().splitlines()]
    assert rows == [0, 1, 2, 3]
    ckpt = next((tmp_path / "cut" / "checkpoints").iterdir())
    names = load_file(str(ckpt / "lora.safetensors")).keys()
    assert names and all("lora_" in n for n in names)  # checkpoints hold the adapter, not the UNet


def test_gradient_checkpointing_and_reward_chunks_give_the_same_step(tiny, tmp_path):
    plain = _api_run(tiny, tmp_path / "plain", steps=1)
    opts = SDAlignOptions(gradient_checkpointing=True, reward_batch=3)  # 8 candidates in chunks of 3, recomputed
    chunked = _api_run(tiny, tmp_path / "ckpt", steps=1, options=opts)
    a, b = _lora(tmp_path / "plain"), _lora(tmp_path / "ckpt")
    # Adam's first update is lr * g / (|g| + eps): where |g| is near eps (1e-8) the float32 rounding of a chunked
    # sum is amplified, so the adapters agree to 1e-3 * lr rather than to rounding (measured: 6e-6 at lr 1e-2)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-3 * FAST["lr"]
    assert plain.train.history[-1]["step_reward"] == pytest.approx(chunked.train.history[-1]["step_reward"], abs=1e-7)


@pytest.mark.parametrize("trainer", ["bt", "hard"])
def test_dpo_trainers_with_a_black_box_reward(tiny, tmp_path, trainer):
    result = _api_run(tiny, tmp_path / trainer, trainer=trainer, reward="jpeg-compressibility", candidates=2)
    rows = result.train.history
    assert [r["step"] for r in rows] == [0, 1, 2] and all(r["eval_reward"] < 0 for r in rows)  # minus kB
    assert (tmp_path / trainer / LORA_FILE).is_file()


def test_bfloat16_trains_the_adapter_in_float32(tiny, tmp_path):
    result = _api_run(tiny, tmp_path / "bf16", steps=1, options=SDAlignOptions(dtype="bfloat16"))
    dtypes = {n: p.dtype for n, p in result.train.model.named_parameters()}
    assert {d for n, d in dtypes.items() if "lora_" in n} == {torch.float32}
    assert {d for n, d in dtypes.items() if "lora_" not in n} == {torch.bfloat16}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--reward", "brightness", "--eta", "0"], r"eta.*point mass"),
        (["--reward", "sharpness"], r"unknown spec 'sharpness'"),
        (["--reward", "pickscore=/nowhere"], r"/nowhere does not exist"),
        (["--reward", "brightness", "--dtype", "float64"], r"dtype='float64'"),
        (["--reward", "brightness", "--scheduler", "euler"], r"scheduler='euler'"),
        (["--reward", "brightness", "--height", "12"], r"height=12 must be a positive multiple of 8"),
        (["--reward", "brightness", "--lora"], r"--lora is a digits option"),
        (["--reward", "brightness", "--trainer", "dpo"], r"--trainer 'dpo'"),
        (["--reward", "msdda.no_such_module:f"], r"cannot import"),
    ],
)
def test_bad_options_fail_before_anything_is_written(tiny, tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.setattr(cli, "_debug", False)
    out = tmp_path / "never"
    code, text = _entry(_cli_args(tiny, out, *extra), capsys)
    assert code == 2, text
    lines = [line for line in text.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and re.search(message, lines[0]), text
    assert not out.exists()


def test_missing_base_and_prompts(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "_debug", False)
    args = _cli_args(tiny, tmp_path / "o", "--reward", "brightness")
    no_base = [a for i, a in enumerate(args) if a != "--base" and args[i - 1] != "--base"]
    code, text = _entry(no_base, capsys)
    assert code == 2 and "needs --base" in text
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    args[args.index(str(tiny["prompt_file"]))] = str(empty)
    code, text = _entry(args, capsys)
    assert code == 2 and "prompt" in text.lower()
    code, text = _entry(["align", "--out", str(tmp_path / "d"), "--reward", "ink", "--dtype", "float16"], capsys)
    assert code == 2 and "belong to --task sd" in text
    with pytest.raises(SDAlignError, match="non-empty list of texts"):
        align_sd(tiny["base"], "brightness", [], tmp_path / "x", sd_train_config("step-rl", "brightness"))
    assert not (tmp_path / "o").exists() and not (tmp_path / "x").exists()


def test_weighted_rewards_train_the_step_rl_policy_a_sweep_uses(tiny, tmp_path, capsys, monkeypatch):
    """Multi-objective step-level RL on SD: one LoRA per reward and one on 0.5 r_a + 0.5 r_b (all step-rl at
    beta 0.05), then `msdda sweep --methods step-rl,msdda`: the one-hot weights use the objectives' own LoRAs,
    the middle one the weighted LoRA; a weight vector without a policy fails before sampling, naming the command."""
    monkeypatch.setattr(cli, "_debug", False)
    common = ["--trainer", "step-rl", "--beta", "0.05", "--steps", "1"]
    dirs = {}
    for name, rewards in (
        ("a", ["brightness"]),
        ("b", ["jpeg-compressibility"]),
        ("ab", ["brightness", "jpeg-compressibility"]),
    ):
        args = _cli_args(tiny, tmp_path / name, *common, *[x for r in rewards for x in ("--reward", r)])
        if len(rewards) > 1:
            args += ["--reward-weights", "0.5,0.5"]
        code, text = _entry(args, capsys)
        assert code == 0, text
        dirs[name] = tmp_path / name
    doc = json.loads((dirs["ab"] / "align_config.json").read_text())
    assert doc["reward"] == ["brightness", "jpeg-compressibility"] and doc["reward_weights"] == [0.5, 0.5]
    assert doc["train_config"]["reward"] == "0.5*brightness+0.5*jpeg-compressibility"

    def sweep(out: Path, grid: str, policies: list) -> tuple[int, str]:
        options = tmp_path / "options.json"
        options.write_text(json.dumps({"eta": 0.5, "guidance_scale": 3.0, "betas": {"a": 0.05, "b": 0.05},
                                       "policies": policies}))  # fmt: skip
        return _entry(
            ["sweep", "--task", "sd", "--out", str(out), "--base", str(tiny["base"]), "--task-options", str(options),
             "--objective", f"a={dirs['a']}", "--reward", "a=brightness", "--objective", f"b={dirs['b']}",
             "--reward", "b=jpeg-compressibility", "--prompt-file", str(tiny["prompt_file"]), "--seeds", "0",
             "--steps", "2", "--batch-size", "1", "--methods", "step-rl,msdda", "--grid-points", grid, "--quiet"],
            capsys,
        )  # fmt: skip

    listed = [{"weights": {"a": 0.5, "b": 0.5}, "path": str(dirs["ab"])}]
    code, text = sweep(tmp_path / "run", "3", listed)
    assert code == 0, text
    rows = [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    policy = {tuple(sorted(r["weights"].items())): r["policy"] for r in rows if r["method"] == "step-rl"}
    assert policy == {(("a", 0.0), ("b", 1.0)): "aligned:b", (("a", 0.5), ("b", 0.5)): str(dirs["ab"]),
                      (("a", 1.0), ("b", 0.0)): "aligned:a"}  # fmt: skip
    mid = {r["method"]: r["rewards"]["a"] for r in rows if r["weights"] == {"a": 0.5, "b": 0.5}}
    assert mid["step-rl"] != mid["msdda"]  # the weighted LoRA is a model of its own, not the fusion
    code, text = sweep(tmp_path / "missing", "5", listed)
    assert code == 2 and "no step-RL LoRA is listed for weights" in text and "--reward-weights 0.25,0.75" in text
    assert not (tmp_path / "missing" / "results.jsonl").exists()


def test_two_processes_train_the_same_lora_as_one(tiny, tmp_path, capsys):
    """torchrun with 2 gloo processes and --data-shards 2 (each rank takes one shard, DDP averages the
    gradients) trains the LoRA a single process trains on the same 2 shards (measured: bit for bit); rank 0
    alone writes and reports."""
    import os
    import subprocess
    import sys

    args = [*_cli_args(tiny, tmp_path / "one", "--reward", "brightness", "--trainer", "step-rl"), "--data-shards", "2"]
    code, text = _entry(args, capsys)
    assert code == 0, text
    two = [a if a != str(tmp_path / "one") else str(tmp_path / "two") for a in args]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "msdda.cli", *two]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert res.stdout.count("aligned a LoRA to 'brightness'") == 1
    a, b = _lora(tmp_path / "one"), _lora(tmp_path / "two")
    assert a.keys() == b.keys()
    for k in a:  # the all-reduce may round differently elsewhere; Adam would amplify that where |g| ~ eps
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def test_variance_head_trains_beside_the_lora_and_moves_only_the_variance(tiny, tmp_path, capsys):
    from msdda.core.schedule import KernelScheduler, apply_kernel_offsets
    from msdda.models.variance_head import VARIANCE_HEAD_FILE, load_variance_head, with_variance_offsets

    out = tmp_path / "vh"
    code, text = _entry(_cli_args(tiny, out, "--reward", "brightness", "--trainer", "step-rl", "--variance-head",
                                  "--variance-head-buckets", "10"), capsys)  # fmt: skip
    assert code == 0, text
    head = load_variance_head(out / VARIANCE_HEAD_FILE)
    assert head.config() == {"num_train_timesteps": 1000, "channels": 4, "buckets": 10}
    assert float(head.log_var.abs().max()) > 1e-4  # zero-initialised, and it trained
    assert json.loads((out / "align_config.json").read_text())["variance_head"] == head.config()
    ckpt = next((out / "checkpoints").iterdir())
    assert "variance_head__log_var" in load_file(str(ckpt / "lora.safetensors"))  # checkpointed with the LoRA
    # the kernel with the head: the scheduler's mean, the variance var * exp(var * d_logvar) (apply_kernel_offsets)
    sched = KernelScheduler.from_diffusers(
        diffusers.DDIMScheduler.from_pretrained(str(tiny["base"] / "scheduler")), eta=1.0
    )
    sched.set_timesteps(3)
    t = int(sched.timesteps[0])
    g = torch.Generator().manual_seed(4)
    x, eps = torch.randn(2, 4, 2, 2, generator=g), torch.randn(2, 4, 2, 2, generator=g)
    with torch.no_grad():
        d = head(torch.tensor([t, t]))
        plain = sched.kernel(eps, t, x)
        headed = sched.kernel(with_variance_offsets(eps, d), t, x)
    torch.testing.assert_close(headed.mean, plain.mean, rtol=0, atol=1e-7)
    expected = apply_kernel_offsets(
        plain.mean.double(), plain.var.double(), with_variance_offsets(eps, d)[:, 4:].double()
    )[1]
    torch.testing.assert_close(headed.var.double(), expected, rtol=1e-6, atol=0)
    assert float((headed.var - plain.var).abs().max()) > 0
    code, text = _entry(
        _cli_args(tiny, tmp_path / "x", "--reward", "brightness", "--variance-head-buckets", "5"), capsys
    )
    assert code == 2 and "pass both" in text


def test_variance_heads_make_msdda_differ_from_dbmpa_in_the_pipeline(tiny, tmp_path, capsys):
    """Two LoRAs trained with --variance-head: their kernels' variances differ, so MSDDA's precision-weighted
    fusion is not DB-MPA's average (DDIM eta 1); the same LoRAs without their heads give equal samples (the
    fixed-variance theorem); one UNet call for both objectives equals two."""
    import shutil

    from msdda.models.variance_head import VARIANCE_HEAD_FILE
    from msdda.pipelines.sd import MSDDAPipeline

    dirs = {}
    for name, reward, seed in (("a", "brightness", "0"), ("b", "jpeg-compressibility", "1")):
        args = _cli_args(tiny, tmp_path / name, "--reward", reward, "--trainer", "step-rl", "--variance-head",
                         "--lr", "5e-2", "--seed", seed)  # fmt: skip
        code, text = _entry(args, capsys)
        assert code == 0, text
        dirs[name] = tmp_path / name
    plain = {}
    for name in dirs:  # the same LoRAs without their heads
        plain[name] = tmp_path / f"{name}-plain"
        plain[name].mkdir()
        shutil.copy(dirs[name] / LORA_FILE, plain[name] / LORA_FILE)

    def latents(objectives: dict, method: str, **kw) -> torch.Tensor:
        with MSDDAPipeline(_base_pipe(tiny), objectives) as pipe:
            out = pipe(PROMPTS[0], {"a": 0.5, "b": 0.5}, method=method, num_inference_steps=3, eta=1.0,
                       guidance_scale=3.0, output_type="latent", generator=torch.Generator().manual_seed(0),
                       progress=False, **kw)  # fmt: skip
        return out.images

    with_heads = {m: latents(dirs, m) for m in ("msdda", "db-mpa")}
    without = {m: latents(plain, m) for m in ("msdda", "db-mpa")}
    assert float((without["msdda"] - without["db-mpa"]).abs().max()) < 1e-5  # fixed variance: the same rule
    gap = float((with_heads["msdda"] - with_heads["db-mpa"]).abs().max())
    assert gap > 1e-4, gap  # per-objective variances: MSDDA weighs each mean by its precision
    batched = latents(dirs, "msdda", batch_models=True)
    assert float((batched - with_heads["msdda"]).abs().max()) < 5e-5  # one UNet call = two, heads included
    assert (dirs["a"] / VARIANCE_HEAD_FILE).is_file()
