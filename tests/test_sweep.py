"""Sweeps on the oracle task: grids, validation before any work, config checks, torn-write repair, a real kill."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from msdda.evaluation.store import SweepError, read_rows
from msdda.evaluation.sweep import SweepConfig, run_sweep, simplex_grid, validate_weights
from msdda.evaluation.tasks import UnknownTaskError, get_task_bundle


def factory(cfg):
    return get_task_bundle(cfg.task, cfg.task_options)


def small(**kw):
    base = dict(
        task="gaussian", methods=["base", "msdda", "db-mpa"], grid_points=3, seeds=[0, 1], batch_size=4, steps=6
    )
    base.update(kw)
    return SweepConfig(**base)


def comparable(rows):
    """Rows without wall-clock and memory figures (those differ between runs by nature)."""
    out = []
    for r in rows:
        r = dict(r)
        r["cost"] = {k: v for k, v in r["cost"].items() if k not in ("seconds", "peak_memory_bytes")}
        out.append(r)
    return sorted(out, key=lambda r: (r["unit"], r["index"]))


def test_simplex_grids():
    g2 = simplex_grid(["a", "b"], 5)
    assert [w["a"] for w in g2] == [0, 0.25, 0.5, 0.75, 1.0]
    g3 = simplex_grid(["a", "b", "c"], 3)
    assert len(g3) == 6 and all(abs(sum(w.values()) - 1) < 1e-12 for w in g3)
    assert {"a": 0.5, "b": 0.0, "c": 0.5} in g3


@pytest.mark.parametrize(
    ("grid", "pattern"),
    [
        ([], "the weight grid is empty"),
        ([{"a": 0.5, "zzz": 0.5}], "unknown objectives \\['zzz'\\]"),
        ([{"a": -0.5, "b": 1.5}], "weight -0.5 for 'a' must be finite and >= 0"),
        ([{"a": 0.5, "b": 0.2}], "sums to 0.7"),
        ([[0.5, 0.5]], "each entry maps objective names"),
        ([{"a": float("nan"), "b": 1}], "weight nan"),
    ],
)
def test_weight_grid_errors(grid, pattern):
    with pytest.raises(SweepError, match=pattern):
        validate_weights(grid, ["a", "b"])


@pytest.mark.parametrize(
    ("kw", "pattern"),
    [
        (dict(methods=["msdda", "magic"]), "unknown method 'magic'"),
        (dict(methods=["rewarded-soup"]), "no parameterised models, so rewarded-soup"),
        (dict(methods=["code"], code_candidates=0), "num_candidates=0"),
        (dict(objectives=["objective_1", "nope"]), "unknown objectives \\['nope'\\]"),
        (dict(weights=[{"objective_1": 2.0, "objective_2": -1.0}]), "must be finite and >= 0"),
        (dict(methods=["single:nope"]), "unknown objective 'nope'"),
        (dict(seeds=[]), "no seeds"),
    ],
)
def test_bad_sweeps_fail_before_writing_anything(tmp_path, kw, pattern):
    with pytest.raises(SweepError, match=pattern):
        run_sweep(small(**kw), tmp_path / "run", factory, progress=False)
    assert not (tmp_path / "run").exists()


def test_unknown_task_lists_valid_ones():
    # "sd" joins the list once the CLI (or msdda.pipelines.sd_task.register) has registered it
    with pytest.raises(UnknownTaskError, match="valid tasks: \\['digits', 'gaussian'(, 'sd')?\\]"):
        get_task_bundle("imagenet")


def test_sweep_rows_and_common_random_numbers(tmp_path):
    res = run_sweep(
        small(methods=["base", "msdda", "db-mpa", "code", "rgg", "db-mpa-ls"]), tmp_path / "r", factory, progress=False
    )
    rows = read_rows(tmp_path / "r" / "results.jsonl")
    assert res.units_total == (1 + 5 * 3) * 2 and len(rows) == res.units_total * 4
    assert len({(r["unit"], r["index"]) for r in rows}) == len(rows)
    by = {(r["method"], json.dumps(r["weights"]), r["seed"], r["index"]): r["rewards"] for r in rows}
    # at one-hot weights MSDDA and DB-MPA both reduce to the aligned model: same noise, same samples
    one_hot = json.dumps({"objective_1": 1.0, "objective_2": 0.0})
    assert by[("msdda", one_hot, 0, 0)] == pytest.approx(by[("db-mpa", one_hot, 0, 0)], rel=1e-9)
    # rows carry the true model count: K = 2 per step for the fusions, 1 (the drawn model) for DB-MPA-LS
    evals = {(r["method"], json.dumps(r["weights"])): r["cost"]["model_evals"] for r in rows}
    half = json.dumps({"objective_1": 0.5, "objective_2": 0.5})
    assert evals[("msdda", half)] == evals[("db-mpa", half)] == 2 * 6
    assert evals[("db-mpa-ls", half)] == evals[("base", "null")] == 6
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    assert cfg["task"] == "gaussian" and cfg["batch_size"] == 4


def test_different_config_is_refused_then_overwritten(tmp_path):
    run_sweep(small(), tmp_path / "r", factory, progress=False)
    before = (tmp_path / "r" / "results.jsonl").read_bytes()
    with pytest.raises(SweepError, match="different config \\(differs in \\['steps'\\]\\)"):
        run_sweep(small(steps=7), tmp_path / "r", factory, progress=False)
    assert (tmp_path / "r" / "results.jsonl").read_bytes() == before
    res = run_sweep(small(steps=7), tmp_path / "r", factory, progress=False, overwrite=True)
    assert res.units_run == res.units_total


def test_resume_repairs_torn_writes_and_incomplete_units(tmp_path):
    full = tmp_path / "full"
    run_sweep(small(), full, factory, progress=False)
    expected = comparable(read_rows(full / "results.jsonl"))
    part = tmp_path / "part"
    run_sweep(small(), part, factory, progress=False)
    lines = (part / "results.jsonl").read_text().splitlines(keepends=True)
    # keep two whole units, half of the third, and a torn line
    (part / "results.jsonl").write_text("".join(lines[:10]) + lines[10][:25])
    res = run_sweep(small(), part, factory, progress=False)
    assert res.units_run == res.units_total - 2
    assert comparable(read_rows(part / "results.jsonl")) == expected


def test_resume_after_a_real_kill(tmp_path):
    """Kill a sweep process mid-run (SIGKILL), rerun the same command: identical to an uninterrupted run."""
    script = tmp_path / "run.py"
    script.write_text(
        "import sys, time\n"
        "from msdda.evaluation.sweep import SweepConfig, run_sweep\n"
        "from msdda.evaluation.tasks import get_task_bundle\n"
        "cfg = SweepConfig(task='gaussian', methods=['base', 'msdda', 'db-mpa'], grid_points=3, seeds=[0, 1, 2],\n"
        "                  batch_size=4, steps=6)\n"
        "slow = float(sys.argv[2])\n"
        "run_sweep(cfg, sys.argv[1], lambda c: get_task_bundle(c.task), progress=False,\n"
        "          on_unit_done=lambda u: time.sleep(slow))\n"
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    subprocess.run([sys.executable, str(script), str(tmp_path / "full"), "0"], check=True, env=env)
    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(script), str(run), "0.3"], env=env)
    results = run / "results.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and (not results.exists() or results.read_text().count("\n") < 12):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(read_rows(results))
    assert 0 < done_before < 21 * 4  # it really was interrupted
    subprocess.run([sys.executable, str(script), str(run), "0"], check=True, env=env)
    assert comparable(read_rows(results)) == comparable(read_rows(tmp_path / "full" / "results.jsonl"))


def test_cli_sweep_report_and_clear_errors(tmp_path):
    from typer.testing import CliRunner

    from msdda.cli import app

    runner = CliRunner()
    out = tmp_path / "cli"
    args = [
        "sweep",
        "--task",
        "gaussian",
        "--methods",
        "base,msdda",
        "--grid-points",
        "3",
        "--seeds",
        "0",
        "--batch-size",
        "3",
        "--steps",
        "4",
        "--out",
        str(out),
        "--quiet",
    ]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "4 of 4 units run now; 12 rows" in res.output
    res = runner.invoke(app, args)  # rerun: resumes, nothing left to do
    assert "0 of 4 units run now; 12 rows" in res.output
    res = runner.invoke(app, ["report", str(out)])
    assert res.exit_code == 0 and (out / "report.html").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["hypervolume"]) == {"base", "msdda"}
    res = runner.invoke(app, ["sweep", "--task", "gaussian", "--seeds", "x", "--out", str(tmp_path / "bad")])
    assert res.exit_code == 2 and "--seeds 'x' must be comma-separated integers" in res.output
