"""The digits demo: summary.json schema on a tiny run, plots written, mismatched weights rejected before sampling."""

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from msdda.alignment import CheckpointError, training_scheduler_config
from msdda.cli import app
from msdda.core import KernelScheduler
from msdda.evaluation.digits_demo import run_digits_demo
from msdda.models.io import save_pretrained
from msdda.tasks.digits import DigitsDenoiser, DigitsDenoiserConfig
from msdda.tasks.digits.training import MODEL_TYPE, shipped_dir

TINY = DigitsDenoiserConfig(base_channels=8, channel_mult=(1, 2), time_embed_dim=16, num_groups=4)


def _save(d: Path, seed: int, arch: DigitsDenoiserConfig = TINY, beta: float = 0.1) -> Path:
    torch.manual_seed(seed)
    m = DigitsDenoiser(arch)
    with torch.no_grad():
        m.conv_out.weight.normal_(0, 0.05)
    save_pretrained(m, d, model_type=MODEL_TYPE, task="digits", architecture=arch.to_dict(),
                   scheduler=KernelScheduler(training_scheduler_config()).config.to_dict(),
                   metadata={"dpo_config": {"beta": beta}})
    return d


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_models")
    return {"base": _save(root / "base", 0), "ink": _save(root / "a", 1), "template": _save(root / "b", 2)}


def _check_schema(summary: dict, grid: list[float], n: int) -> None:
    assert set(summary) == {"task", "objectives", "results"}
    assert summary["task"] == "digits"
    assert summary["objectives"] == ["ink", "template"]
    methods = [r["method"] for r in summary["results"]]
    assert methods.count("base") == 1
    assert methods.count("msdda") == methods.count("db-mpa") == len(grid)
    for r in summary["results"]:
        assert set(r) == {"method", "weights", "n", "rewards", "seconds", "model_evals"}
        assert r["method"] in {"base", "msdda", "db-mpa"}
        assert r["n"] == n and isinstance(r["n"], int)
        assert isinstance(r["seconds"], float) and isinstance(r["model_evals"], int) and r["model_evals"] > 0
        assert set(r["rewards"]) == {"ink", "template"}
        for stats in r["rewards"].values():
            assert set(stats) == {"mean", "ci95"}
            lo, hi = stats["ci95"]
            assert isinstance(stats["mean"], float) and lo <= stats["mean"] <= hi
        if r["method"] != "base":
            assert set(r["weights"]) == {"ink", "template"}
            assert r["weights"]["ink"] + r["weights"]["template"] == pytest.approx(1.0)
    assert sorted(r["weights"]["ink"] for r in summary["results"] if r["method"] == "msdda") == sorted(grid)


def test_tiny_demo_writes_the_summary_schema_and_plots(tiny_dirs, tmp_path):
    grid = [0.0, 0.5, 1.0]
    summary = run_digits_demo(tmp_path, grid=grid, samples=6, steps=3, model_dirs=tiny_dirs, progress=False)
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    _check_schema(on_disk, grid, 6)
    assert (tmp_path / "pareto.png").stat().st_size > 0
    for w in ("0", "0.5", "1"):
        assert (tmp_path / f"samples_w{w}.png").stat().st_size > 0
    # one-hot weights: MSDDA returns that model's kernel, DB-MPA that model's step: identical samples
    by = {(r["method"], r["weights"].get("ink")): r for r in on_disk["results"]}
    for w in (0.0, 1.0):
        for o in ("ink", "template"):
            assert by[("msdda", w)]["rewards"][o]["mean"] == pytest.approx(by[("db-mpa", w)]["rewards"][o]["mean"])


def test_demo_rejects_a_model_of_another_architecture_before_sampling(tiny_dirs, tmp_path):
    other = _save(tmp_path / "wide", 3, DigitsDenoiserConfig(base_channels=16, channel_mult=(1, 2),
                                                              time_embed_dim=16, num_groups=4))
    dirs = {**tiny_dirs, "template": other}
    with pytest.raises(CheckpointError, match="another architecture"):
        run_digits_demo(tmp_path / "out", grid=[0.5], samples=4, steps=2, model_dirs=dirs, progress=False)
    assert not (tmp_path / "out" / "summary.json").exists()


@pytest.mark.skipif(not (shipped_dir("aligned-ink") / "model.safetensors").exists(), reason="weights not shipped")
def test_cli_demo_with_shipped_weights_tiny(tmp_path):
    res = CliRunner().invoke(app, ["demo", "--out", str(tmp_path), "--samples", "10", "--steps", "3",
                                   "--weights", "0,1", "--quiet"])
    assert res.exit_code == 0, res.output
    _check_schema(json.loads((tmp_path / "summary.json").read_text()), [0.0, 1.0], 10)
    assert "msdda" in res.output


def test_cli_gaussian_demo_still_available(tmp_path):
    res = CliRunner().invoke(app, ["demo", "--task", "gaussian", "--out", str(tmp_path), "--samples", "50",
                                   "--steps", "5", "--quiet"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "summary.json").read_text())["results"]
