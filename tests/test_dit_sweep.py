"""`msdda sweep --task sd` on a DiT folder: the prompt file holds class names, the bundle is MSDDADiTPipeline's
(class ids as conditions, the null class for guidance, DDPM with the learned variance by default), and MSDDA
differs from DB-MPA there."""

from __future__ import annotations

import json

import pytest

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

from typer.testing import CliRunner  # noqa: E402

from msdda.cli import app  # noqa: E402
from test_dit_pipeline import make_base, make_lora, save_peft  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_sweep_on_a_dit_folder(tmp_path):
    base = make_base()
    base.save_pretrained(tmp_path / "base", safe_serialization=True)
    index = tmp_path / "base" / "model_index.json"  # the hub's DiT folders carry id2label there
    index.write_text(json.dumps({**json.loads(index.read_text()), "id2label": {"1": "goldfish", "2": "white shark"}}))
    a = save_peft(tmp_path / "a", *make_lora(base.transformer, 10))
    b = save_peft(tmp_path / "b", *make_lora(base.transformer, 11))
    (tmp_path / "classes.txt").write_text("goldfish\n")
    (tmp_path / "o.json").write_text(json.dumps({"guidance_scale": 3.0}))
    out = tmp_path / "run"
    args = ["sweep", "--task", "sd", "--base", str(tmp_path / "base"), "--task-options", str(tmp_path / "o.json"),
            "--objective", f"a={a}", "--reward", "a=brightness", "--objective", f"b={b}", "--reward",
            "b=jpeg-compressibility", "--prompt-file", str(tmp_path / "classes.txt"), "--seeds", "0", "--steps", "3",
            "--batch-size", "2", "--methods", "base,msdda,db-mpa", "--grid-points", "3", "--out", str(out), "--quiet"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, (result.output, result.exception)
    assert json.loads((out / "config.json").read_text())["task_options"]["scheduler"] == "ddpm"
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert {r["method"] for r in rows} == {"base", "msdda", "db-mpa"} and len(rows) == 2 * (1 + 2 * 3)
    mid = lambda m: sorted(r["rewards"]["a"] for r in rows if r["method"] == m and r["weights"]["a"] == 0.5)  # noqa: E731
    assert max(abs(x - y) for x, y in zip(mid("msdda"), mid("db-mpa"), strict=True)) > 1e-5  # per-model variances
