"""`msdda sweep --task sd` on an SDXL folder: the bundle is MSDDAXLPipeline's (prompts encoded with the pooled
embeddings and time ids), every fusion method runs, and a unit equals MSDDAXLPipeline at the unit's seed."""

from __future__ import annotations

import json

import numpy as np
import pytest

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("transformers")

from typer.testing import CliRunner  # noqa: E402

from msdda.cli import app  # noqa: E402
from msdda.evaluation.sweep import sample_image_paths, unit_seed  # noqa: E402
from test_sdxl_pipeline import TinyXL  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_sweep_on_an_sdxl_folder(tmp_path):
    from msdda.pipelines.sdxl import MSDDAXLPipeline

    tiny = TinyXL(tmp_path)
    tiny.base("ddim").save_pretrained(tmp_path / "base")
    (tmp_path / "p.txt").write_text("a red cube\n")
    (tmp_path / "o.json").write_text(json.dumps({"eta": 0.5, "guidance_scale": 5.0}))
    out = tmp_path / "run"
    args = ["sweep", "--task", "sd", "--base", str(tmp_path / "base"), "--task-options", str(tmp_path / "o.json"),
            "--objective", f"aes={tiny.aes}", "--reward", "aes=brightness", "--objective", f"align={tiny.align}",
            "--reward", "align=jpeg-compressibility", "--prompt-file", str(tmp_path / "p.txt"), "--seeds", "0",
            "--steps", "2", "--batch-size", "1", "--methods", "base,msdda,db-mpa,rewarded-soup", "--grid-points", "3",
            "--out", str(out), "--quiet"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, (result.output, result.exception)
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert {r["method"] for r in rows} == {"base", "msdda", "db-mpa", "rewarded-soup"} and len(rows) == 1 + 3 * 3
    mid = {r["method"]: r["rewards"]["aes"] for r in rows if r["weights"] == {"aes": 0.5, "align": 0.5}}
    assert mid["msdda"] == pytest.approx(mid["db-mpa"], abs=1e-5)  # fixed variance: the same rule
    row = next(r for r in rows if r["method"] == "msdda" and r["weights"] == {"aes": 0.5, "align": 0.5})
    png = sample_image_paths(out, row["unit"], 1)[0]
    from PIL import Image

    with Image.open(png) as im:
        got = np.asarray(im, dtype=np.float32) / 255
    with MSDDAXLPipeline.from_pretrained(tmp_path / "base", {"aes": str(tiny.aes), "align": str(tiny.align)},
                                         scheduler="ddim") as pipe:  # fmt: skip
        ref = pipe("a red cube", {"aes": 0.5, "align": 0.5}, num_inference_steps=2, eta=0.5, guidance_scale=5.0,
                   seed=unit_seed(0, 0), output_type="np", progress=False).images[0]  # fmt: skip
    assert float(np.abs(got - ref).max()) <= 1 / 255 + 1e-6
