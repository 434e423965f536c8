"""`msdda align --task dit` on a tiny DiT pipeline saved to disk: the prompt file holds class names, the LoRA
trains on DDPM kernels with the transformer's learned variance (both halves move), and MSDDADiTPipeline loads
it and reproduces the trained transformer."""

from __future__ import annotations

import json

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

from msdda import cli  # noqa: E402
from msdda.pipelines.sd_align import LORA_FILE  # noqa: E402
from test_dit_pipeline import make_base  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_dit_lora_trains_on_class_names_and_loads(tmp_path, capsys, monkeypatch):
    from msdda.pipelines.dit import MSDDADiTPipeline

    make_base().save_pretrained(tmp_path / "base", safe_serialization=True)
    index = tmp_path / "base" / "model_index.json"  # the hub's DiT folders carry id2label in model_index.json
    index.write_text(json.dumps({**json.loads(index.read_text()), "id2label": {"1": "goldfish", "2": "white shark"}}))
    (tmp_path / "classes.txt").write_text("goldfish\nwhite shark\n")
    out = tmp_path / "lora"
    args = ["align", "--task", "dit", "--base", str(tmp_path / "base"), "--prompt-file", str(tmp_path / "classes.txt"),
            "--reward", "brightness", "--trainer", "step-rl", "--steps", "2", "--num-inference-steps", "3",
            "--trajectories", "2", "--states", "1", "--candidates", "2", "--eval-samples", "1", "--lr", "5e-2",
            "--lora-targets", "to_q,to_k,to_v,proj_out_2", "--log-every", "1", "--out", str(out), "--quiet"]  # fmt: skip
    cli.entry(args)
    assert "aligned a LoRA to 'brightness'" in capsys.readouterr().out
    doc = json.loads((out / "align_config.json").read_text())
    assert (
        doc["task"] == "dit" and doc["options"]["scheduler"] == "ddpm" and doc["prompts"] == ["goldfish", "white shark"]
    )
    assert (out / LORA_FILE).is_file()
    base = diffusers.DiTPipeline.from_pretrained(str(tmp_path / "base"), local_files_only=True)
    g = torch.Generator().manual_seed(1)
    cfg = base.transformer.config
    x = torch.randn(2, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    kw = dict(timestep=torch.tensor([700, 300]), class_labels=torch.tensor([1, 2]), return_dict=False)
    with torch.no_grad():
        plain = base.transformer(x, **kw)[0]
        with MSDDADiTPipeline(base, {"o": str(out)}) as pipe, pipe.switch.active(pipe.objectives["o"].adapter):
            loaded = pipe.transformer(x, **kw)[0]
    c = cfg.in_channels
    assert float((loaded[:, :c] - plain[:, :c]).abs().max()) > 1e-4  # the noise half moved
    assert float((loaded[:, c:] - plain[:, c:]).abs().max()) > 1e-4  # and the learned variance with it
    monkeypatch.setattr(cli, "_debug", False)
    (tmp_path / "bad.txt").write_text("a unicorn\n")
    bad = [a if a != str(tmp_path / "classes.txt") else str(tmp_path / "bad.txt") for a in args]
    bad[bad.index(str(out))] = str(tmp_path / "never")
    with pytest.raises(SystemExit) as exc:
        cli.entry(bad)
    assert exc.value.code == 2 and "not in the folder's id2label" in capsys.readouterr().err
