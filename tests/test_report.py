"""Report metrics against independent computations, and the HTML page as headless Chromium renders it."""

import json
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest

from msdda.evaluation.report import ReportError, compute_metrics, pareto_figure, pareto_view, write_report
from msdda.evaluation.store import read_rows
from msdda.evaluation.sweep import SweepConfig, run_sweep
from msdda.evaluation.tasks import get_task_bundle

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("report") / "run"
    cfg = SweepConfig(
        task="gaussian", methods=["base", "msdda", "db-mpa", "code"], grid_points=3, seeds=[0, 1], batch_size=6, steps=6
    )
    run_sweep(cfg, d, lambda c: get_task_bundle(c.task), progress=False)
    return d


def staircase_hv(points, ref):
    """Independent 2-D hypervolume: sort by x descending, sum the new strips."""
    pts = sorted((p for p in points if p[0] > ref[0] and p[1] > ref[1]), key=lambda p: -p[0])
    area, best_y = 0.0, ref[1]
    for x, y in pts:
        if y > best_y:
            area += (x - ref[0]) * (y - best_y)
            best_y = y
    return area


def test_metrics_match_independent_computation(run_dir):
    m = compute_metrics(run_dir)
    rows = read_rows(run_dir / "results.jsonl")
    objs = m["objectives"]
    means = {}
    for r in rows:
        means.setdefault((r["method"], json.dumps(r["weights"], sort_keys=True)), []).append(
            [r["rewards"][o] for o in objs]
        )
    for method in m["methods"]:
        pts = [np.mean(v, axis=0) for (meth, _), v in means.items() if meth == method]
        assert m["hypervolume"][method] == pytest.approx(staircase_hv(pts, m["reference_point"]), rel=1e-12)
    # the paper-style cells are plain means
    for cell in m["table"]:
        got = np.mean(means[(cell["method"], json.dumps(cell["weights"], sort_keys=True))], axis=0)
        assert [cell["mean"][o] for o in objs] == pytest.approx(list(got), rel=1e-12)
        for o in objs:
            lo, hi = cell["ci95"][o]
            assert lo <= cell["mean"][o] <= hi
    # win rate of MSDDA vs DB-MPA at w = (0.5, 0.5), recomputed by hand
    key = {(r["method"], json.dumps(r["weights"], sort_keys=True), r["seed"], r["index"]): r["rewards"] for r in rows}
    half = json.dumps({"objective_1": 0.5, "objective_2": 0.5}, sort_keys=True)
    wins = []
    for s in (0, 1):
        for i in range(6):
            a = sum(0.5 * key[("msdda", half, s, i)][o] for o in objs)
            b = sum(0.5 * key[("db-mpa", half, s, i)][o] for o in objs)
            wins.append(1.0 if a > b else 0.5 if a == b else 0.0)
    assert m["win_rates"]["db-mpa"]["0.5, 0.5"] == pytest.approx(np.mean(wins))
    assert m["cost"]["code"]["reward_evals"] > 0 and m["cost"]["msdda"]["reward_evals"] == 0
    assert m["cost"]["msdda"]["model_evals"] == 2 * 6 + 0  # two aligned models x 6 steps (exponents sum to 1)


def test_report_errors(tmp_path):
    with pytest.raises(ReportError, match="has no results.jsonl"):
        compute_metrics(tmp_path)


class DataCollector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.items, self._open = [], None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "data-metric" in a:
            self._open = a
        if a.get("id") == "reference-point":
            self._open = {"data-metric": "reference_point"}

    def handle_data(self, data):
        if self._open is not None and data.strip():
            self.items.append((self._open, data.strip()))
            self._open = None


@pytest.mark.skipif(CHROMIUM is None, reason="install Debian's chromium (make test does) to render the page")
def test_html_numbers_match_metrics_json_in_headless_chromium(run_dir, tmp_path):
    paths = write_report(run_dir)
    metrics = json.loads(paths["metrics"].read_text())
    dom = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--no-first-run",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--dump-dom",
            paths["html"].resolve().as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    parser = DataCollector()
    parser.feed(dom)
    seen = {"hypervolume": 0, "mean": 0, "win_rate": 0, "reference_point": 0}
    cells = {(c["method"], c["weights_label"]): c for c in metrics["table"]}
    for attrs, text in parser.items:
        kind = attrs["data-metric"]
        if kind == "hypervolume":
            assert float(text) == pytest.approx(metrics["hypervolume"][attrs["data-method"]], rel=1e-5)
        elif kind == "mean":
            cell = cells.get((attrs["data-method"], attrs["data-weights"])) or cells[(attrs["data-method"], "-")]
            assert float(text) == pytest.approx(cell["mean"][attrs["data-objective"]], abs=5e-5)
        elif kind == "win_rate":
            assert float(text) == pytest.approx(
                metrics["win_rates"][attrs["data-baseline"]][attrs["data-weights"]], abs=5e-4
            )
        elif kind == "reference_point":
            assert [float(x) for x in text.split(",")] == pytest.approx(metrics["reference_point"], rel=1e-3)
        else:
            continue
        seen[kind] += 1
    assert seen["hypervolume"] == len(metrics["methods"])
    assert seen["mean"] == 3 * len(metrics["methods"]) * 2  # 3 weights x methods x 2 objectives
    assert seen["win_rate"] == 3 * 3 and seen["reference_point"] == 1


def test_report_shows_the_diagnostic_when_present(run_dir, tmp_path):
    import shutil as sh

    from msdda.evaluation.diagnose import run_diagnose
    from msdda.evaluation.report import write_report

    copy = tmp_path / "with-diagnose"
    sh.copytree(run_dir, copy)
    run_diagnose(get_task_bundle("gaussian"), timesteps=[500, 20], draws=64, kernel_draws=16, out_dir=copy, progress=False)
    page = write_report(copy)["html"].read_text()
    assert "Step-optimality diagnostic" in page and "J* - J" in page
    (copy / "diagnose.json").write_text("{not json")
    assert "Step-optimality diagnostic" not in write_report(copy)["html"].read_text()  # a warning, not a crash


def test_pareto_view_leaves_run_away_points_outside_the_axes():
    def row(method, a, b):
        return {"method": method, "weights": None, "mean": {"a": a, "b": b}}

    metrics = {
        "objectives": ["a", "b"],
        "methods": ["x", "y"],
        "reference_point": [0.0, -1.0],
        "table": [row("x", 0.5, 0.0), row("x", 1.0, -0.5), row("y", 0.2, -0.2), row("y", 4e3, -1e11)],
    }
    limits, hidden = pareto_view(metrics)
    assert hidden == 1  # y's diverged point (below the reference in b)
    assert limits["a"] == pytest.approx((0.0 - 0.05, 1.0 + 0.05))
    assert limits["b"] == pytest.approx((-1.0 - 0.05, 0.0 + 0.05))
    assert pareto_figure(metrics)[:8] == b"\x89PNG\r\n\x1a\n"
    no_ref = dict(metrics, reference_point=None)
    assert pareto_view(no_ref)[1] == 0  # without a reference point every point is in view
