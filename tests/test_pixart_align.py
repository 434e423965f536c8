"""`msdda align --task pixart` on a tiny PixArt-alpha pipeline saved to disk (no downloads): a LoRA on the
transformer trained on DDPM kernels with its learned variance; the file loads in MSDDAPixArtPipeline and
reproduces the trained transformer; the variance half moved with the mean; the reference is the base exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402

from msdda import cli  # noqa: E402
from msdda.pipelines.pixart import MSDDAPixArtPipeline  # noqa: E402
from msdda.pipelines.sd_align import LORA_FILE, SDAlignError, SDAlignOptions, align_pixart, sd_train_config  # noqa: E402
from test_pixart_pipeline import WORDS, make_text_encoder, make_transformer, make_vae  # noqa: E402

PROMPTS = ["a red cube", "a blue sphere"]
FAST = dict(steps=2, num_inference_steps=3, checkpoint_every=1, log_every=1, lr=5e-2, eval_samples=2)


def _tokenizer():
    """A unigram T5 tokenizer built in code (the word-level one of test_pixart_pipeline does not survive
    save_pretrained / from_pretrained): the same ids, pad 0, eos 1, unk 2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + w, -1.0) for w in WORDS]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", extra_ids=0,
                           model_max_length=8)  # fmt: skip


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pixart_align")
    pipe = diffusers.PixArtAlphaPipeline(tokenizer=_tokenizer(), text_encoder=make_text_encoder(), vae=make_vae(),
                                         transformer=make_transformer(), scheduler=diffusers.DPMSolverMultistepScheduler())  # fmt: skip
    pipe.save_pretrained(root / "base", safe_serialization=True)
    return root / "base"


def _inputs(seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([900, 300])
    embeds, mask = torch.randn(2, 8, 16, generator=g), torch.ones(2, 8, dtype=torch.long)
    return x, t, {"encoder_hidden_states": embeds, "encoder_attention_mask": mask,
                  "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}  # fmt: skip


def test_trained_lora_loads_in_the_pixart_pipeline_and_its_variance_adapted(base_dir, tmp_path):
    out = tmp_path / "lora"
    cfg = sd_train_config(
        "step-rl", "brightness", lora_targets=["to_q", "to_k", "to_v", "to_out.0", "proj_out"], **FAST
    )
    result = align_pixart(base_dir, "brightness", PROMPTS, out, cfg, progress=False)
    doc = json.loads((out / "align_config.json").read_text())
    assert doc["task"] == "pixart" and doc["options"]["scheduler"] == "ddpm"
    assert all(k.startswith("transformer.") for k in load_file(str(out / LORA_FILE)))
    trained = result.train.model  # the transformer with its adapter
    x, t, kw = _inputs()
    fresh = diffusers.PixArtAlphaPipeline.from_pretrained(str(base_dir), local_files_only=True)
    with torch.no_grad():
        ours = trained(x, timestep=t, return_dict=False, **kw)[0]
        base = fresh.transformer(x, timestep=t, return_dict=False, **kw)[0]
        with MSDDAPixArtPipeline(fresh, {"bright": str(out)}) as pipe:
            loaded = pipe.denoiser("bright").transformer  # the base transformer, now holding the adapter
            with pipe.switch.active(pipe.objectives["bright"].adapter):
                via_pipe = loaded(x, timestep=t, return_dict=False, **kw)[0]
    assert ours.shape[1] == 8  # noise prediction and the learned variance value
    assert float((via_pipe - ours).abs().max()) < 1e-5  # the file holds the trained adapter
    assert float((ours[:, :4] - base[:, :4]).abs().max()) > 1e-4  # the mean moved
    assert float((ours[:, 4:] - base[:, 4:]).abs().max()) > 1e-4  # and so did the variance half (learned_range)
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2] and rows[0]["eval_kl_per_step"] == 0.0


def test_cli_trains_pixart_and_refuses_what_does_not_apply(base_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "_debug", False)
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    args = ["align", "--task", "pixart", "--base", str(base_dir), "--prompt-file", str(prompts), "--reward",
            "jpeg-compressibility", "--trainer", "step-rl", "--steps", "1", "--num-inference-steps", "3",
            "--trajectories", "2", "--states", "1", "--candidates", "2", "--eval-samples", "1", "--quiet"]  # fmt: skip

    def run(extra: list[str]) -> tuple[int, str]:
        try:
            cli.entry([*args, *extra])
            code = 0
        except SystemExit as exc:
            code = int(exc.code or 0)
        c = capsys.readouterr()
        return code, c.out + c.err

    code, text = run(["--out", str(tmp_path / "ok")])
    assert code == 0 and "aligned a LoRA to 'jpeg-compressibility'" in text, text
    assert (tmp_path / "ok" / LORA_FILE).is_file()
    code, text = run(["--out", str(tmp_path / "vh"), "--variance-head"])
    assert code == 2 and "predicts its own variance already" in text and not (tmp_path / "vh").exists()
    code, text = run(["--out", str(tmp_path / "eta"), "--eta", "0.5"])
    assert code == 2 and "eta" in text and not (tmp_path / "eta").exists()
    code, text = run(["--out", str(tmp_path / "sd"), "--task", "sd"])  # a PixArt folder under --task sd
    assert code == 2 and "needs SD 1.x / 2.x" in text and "use --task pixart" in text
    with pytest.raises(SDAlignError, match="not a diffusers pipeline folder"):
        align_pixart(tmp_path, "brightness", PROMPTS, tmp_path / "x", sd_train_config("step-rl", "brightness"),
                     options=SDAlignOptions())  # fmt: skip
