"""`msdda report RUN_DIR`: metrics.json and a self-contained HTML page from a sweep's results store.

Metrics: per (method, weights) means with 95% bootstrap intervals; each method's points (one per weight,
or one for weight-free methods), the pooled empirical Pareto front, hypervolume against one stated
reference point shared by every method; per-weight win rates of MSDDA against each baseline on the
scalarised reward sum_k w_k r_k, paired by (prompt, seed, sample index); cost per method, with what its
models cost to train (`training_seconds`): step-rl trains one policy per w, so its figure is the sum of its
policies' training seconds over the weight vectors it ran; a fusion method (msdda, db-mpa, db-mpa-ls,
rewarded-soup) is built from K aligned models trained once and shared by every w, so its figure is their sum;
base and the reward-guided methods train nothing beyond the base model (0).
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from msdda.atomic import write_bytes_atomic, write_json_atomic, write_text_atomic
from msdda.errors import MSDDAError
from msdda.evaluation.metrics import default_reference_point, hypervolume, pareto_front, summarise, win_rate
from msdda.evaluation.store import CONFIG_FILE, RESULTS_FILE, read_run_rows, results_files
from msdda.evaluation.sweep import FUSION_METHODS, iter_units, sample_image_paths, samples_path
from msdda.sampling import MSDDA, RGG, CoDe, SingleModel
from msdda.sampling.methods import BASE, STEP_RL

logger = logging.getLogger(__name__)

# per sampler call (one batch of `batch_size` samples), plus wall seconds per sample
DIAGNOSE_FILE = "diagnose.json"  # written by `msdda diagnose --out RUN`; shown when present
COST_KEYS = ("model_evals", "reward_evals", "reward_grads", "seconds", "seconds_per_sample", "peak_memory_bytes")


class ReportError(MSDDAError):
    """The run folder cannot be reported on (missing or empty results)."""


def _weights_key(w: Mapping[str, float] | None, objectives: Sequence[str]) -> str:
    return "-" if w is None else ", ".join(f"{w[o]:.3g}" for o in objectives)


def compute_metrics(run_dir: Path | str, reference_point: Sequence[float] | None = None) -> dict[str, Any]:
    """Everything the report shows, as a JSON-able dict (also written to metrics.json)."""
    run_dir = Path(run_dir)
    if not results_files(run_dir):
        raise ReportError(
            f"{run_dir} has no {RESULTS_FILE} (nor results.rank*.jsonl); run `msdda sweep ... --out {run_dir}` first"
        )
    config = _read_config(run_dir)
    rows = read_run_rows(run_dir)  # the union of every rank's results file; corrupt lines skipped with a warning
    if not rows:
        raise ReportError(f"the results files of {run_dir} hold no complete rows yet")
    objectives = list(config.get("objectives") or rows[0]["rewards"].keys())

    def complete(r: dict[str, Any]) -> bool:
        return set(objectives) <= set(r["rewards"]) and (r["weights"] is None or set(objectives) <= set(r["weights"]))

    lacking = [r for r in rows if not complete(r)]
    if lacking:
        logger.warning(
            "%s: skipped %d row(s) without a reward (or weight) for every objective %s (first: unit %r)",
            run_dir,
            len(lacking),
            objectives,
            lacking[0]["unit"],
        )
        rows = [r for r in rows if complete(r)]
        if not rows:
            raise ReportError(f"no row of {run_dir} has a reward for every objective {objectives}")
    flat = [{"method": r["method"], "weights": r["weights"], **r["rewards"]} for r in rows]
    groups = summarise(flat, objectives, group_keys=("method", "weights"))
    table = []
    points: dict[str, list[list[float]]] = {}
    for g in groups:
        w = g["weights"]
        table.append(
            {
                "method": g["method"],
                "weights": w,
                "weights_label": _weights_key(w, objectives),
                "n": g["n"],
                "mean": g["mean"],
                "ci95": g["ci95"],
            }
        )
        points.setdefault(g["method"], []).append([g["mean"][o] for o in objectives])
    methods = list(dict.fromkeys(r["method"] for r in rows))
    ref = (
        np.asarray(reference_point, dtype=float)
        if reference_point is not None
        else default_reference_point({m: np.asarray(p) for m, p in points.items()})
    )
    hv = {m: float(hypervolume(np.asarray(points[m]), ref)) for m in methods}
    all_points = np.asarray([p for m in methods for p in points[m]])
    owners = [m for m in methods for _ in points[m]]
    front = [owners[i] for i in pareto_front(all_points)]

    return {
        "run_dir": str(run_dir),
        "task": config.get("task"),
        "objectives": objectives,
        "methods": methods,
        "reference_point": [float(x) for x in ref],
        "hypervolume": hv,
        "pareto_front_methods": {m: front.count(m) for m in methods},
        "table": table,
        "win_rates": _win_rates(rows, objectives, methods),
        "cost": _cost(rows, methods),
        "rows": len(rows),
    }


def _read_config(run_dir: Path) -> dict[str, Any]:
    """config.json of the run ({} if absent); ReportError naming the file if it is not a JSON object."""
    path = run_dir / CONFIG_FILE
    if not path.exists():
        return {}
    try:
        config = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ReportError(f"{path} is not valid JSON ({exc}); rerun the sweep into a new folder") from None
    if not isinstance(config, dict):
        raise ReportError(f"{path} holds a {type(config).__name__}, not a sweep config (a JSON object)")
    return config


def _win_rates(
    rows: Sequence[dict[str, Any]], objectives: Sequence[str], methods: Sequence[str]
) -> dict[str, dict[str, float]]:
    """{baseline: {weights_label: P(MSDDA's scalarised reward > baseline's)}}, paired per sample."""
    if MSDDA.name not in methods:
        return {}
    raw: dict[tuple[str, str], dict[tuple[int, int, int], dict[str, float]]] = {}
    for r in rows:
        wl = _weights_key(r["weights"], objectives)
        raw.setdefault((r["method"], wl), {})[(r["prompt_index"], r["seed"], r["index"])] = r["rewards"]
    out: dict[str, dict[str, float]] = {}
    msdda_keys = [k for k in raw if k[0] == MSDDA.name]
    for baseline in methods:
        if baseline == MSDDA.name:
            continue
        per_weight = {}
        for _, wl in msdda_keys:
            other = raw.get((baseline, wl)) or raw.get((baseline, "-"))
            if not other:
                continue
            w = [float(x) for x in wl.split(", ")]
            mine = raw[(MSDDA.name, wl)]
            keys = sorted(set(mine) & set(other))
            if not keys:
                continue
            a = np.array([sum(wi * mine[k][o] for wi, o in zip(w, objectives, strict=True)) for k in keys])
            b = np.array([sum(wi * other[k][o] for wi, o in zip(w, objectives, strict=True)) for k in keys])
            per_weight[wl] = float(win_rate(a, b))
        out[baseline] = per_weight
    return out


def _cost(rows: Sequence[dict[str, Any]], methods: Sequence[str]) -> dict[str, dict[str, float | None]]:
    """Mean cost per sampler call (a batch) for each method, and wall seconds per sample."""
    acc: dict[str, dict[str, list[float]]] = {m: {k: [] for k in COST_KEYS} for m in methods}
    for _, unit_rows in iter_units(rows):
        r = unit_rows[0]
        cost = dict(r["cost"])
        if isinstance(cost.get("seconds"), int | float):  # rows of older or foreign stores may lack it
            cost["seconds_per_sample"] = cost["seconds"] / r["batch"]
        if cost.get("peak_memory_bound"):  # an upper bound only (a CUDA run below an earlier peak): not a value
            cost.pop("peak_memory_bytes", None)
        for k in COST_KEYS:
            if isinstance(cost.get(k), int | float):
                acc[r["method"]][k].append(cost[k])
    out: dict[str, dict[str, float | None]] = {
        m: {k: (float(np.mean(v)) if v else None) for k, v in acc[m].items()} for m in methods
    }
    for m in methods:
        out[m]["training_seconds"] = _training_seconds([r for r in rows if r["method"] == m], m)
    return out


def _training_seconds(rows: Sequence[dict[str, Any]], method: str) -> float | None:
    """Seconds of training behind a method's rows (module docstring); None when the rows do not record it."""
    name = method.partition(":")[0]
    if name == STEP_RL:  # one policy per weight vector: sum over the distinct weights run
        per_w: dict[str, float] = {}
        for r in rows:
            if isinstance(r.get("train_seconds"), int | float):
                per_w[json.dumps(r["weights"], sort_keys=True)] = float(r["train_seconds"])
            else:
                return None  # a policy of unknown training cost: no total
        return math.fsum(per_w.values()) if per_w else None
    if name in (*FUSION_METHODS, SingleModel.name):  # K aligned models trained once, shared by every w
        found = [
            float(r["aligned_train_seconds"]) for r in rows if isinstance(r.get("aligned_train_seconds"), int | float)
        ]
        return max(found) if found else None
    if name in (BASE, CoDe.name, RGG.name):
        return 0.0
    return None


# ----- figures -------------------------------------------------------------------------------------------
def pareto_view(metrics: Mapping[str, Any]) -> tuple[dict[str, tuple[float, float]], int]:
    """Axis limits per objective and the number of table points left outside them.

    The view spans the points that reach the hypervolume reference point in every objective (the others add
    nothing to any front), padded by 5%: one run-away point (e.g. reward guidance that diverged) would
    otherwise squeeze every other method into a corner. Without a reference point every point is shown.
    """
    objs = metrics["objectives"]
    ref = metrics.get("reference_point")
    points = [[float(r["mean"][o]) for o in objs] for r in metrics["table"]]
    shown = points if ref is None else [p for p in points if all(v >= q for v, q in zip(p, ref, strict=True))]
    shown = shown or points
    limits = {}
    for k, o in enumerate(objs):
        lo = min(p[k] for p in shown)
        hi = max(p[k] for p in shown)
        if ref is not None:
            lo = min(lo, float(ref[k]))
        pad = 0.05 * (hi - lo) or 0.05 * max(abs(hi), 1e-12)
        limits[o] = (lo - pad, hi + pad)
    hidden = sum(
        any(not limits[o][0] <= p[k] <= limits[o][1] for k, o in enumerate(objs)) for p in points
    )
    return limits, hidden


def pareto_figure(metrics: Mapping[str, Any]) -> bytes:
    """PNG bytes: mean reward of each objective pair, one line per method through its weights (view:
    `pareto_view`; points outside it are counted in the title)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    objs = metrics["objectives"]
    limits, hidden = pareto_view(metrics)
    pairs = [(0, 1)] if len(objs) == 2 else [(i, j) for i in range(len(objs)) for j in range(i + 1, len(objs))]
    fig, axes = plt.subplots(1, len(pairs), figsize=(5.2 * len(pairs), 4.4), squeeze=False)
    for ax, (i, j) in zip(axes[0], pairs, strict=True):
        for m in metrics["methods"]:
            pts = [(r["mean"][objs[i]], r["mean"][objs[j]]) for r in metrics["table"] if r["method"] == m]
            xs, ys = zip(*pts, strict=True)
            if len(pts) == 1:
                ax.scatter(xs, ys, marker="*", s=140, label=m, zorder=3)
            else:
                ax.plot(xs, ys, marker="o", label=m)
        ax.set_xlabel(f"mean {objs[i]}")
        ax.set_ylabel(f"mean {objs[j]}")
        ax.set_xlim(*limits[objs[i]])
        ax.set_ylim(*limits[objs[j]])
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    title = "Mean rewards per method across preference weights"
    if hidden:
        title += f" ({hidden} point{'s' if hidden > 1 else ''} below the reference point, outside the axes)"
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def image_grid_png(samples: np.ndarray, max_images: int = 20) -> bytes | None:
    """PNG bytes of a grid of [N, C, H, W] samples in [-1, 1]; None if they are not images."""
    if samples.ndim != 4 or samples.shape[1] not in (1, 3):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    imgs = np.clip((samples[:max_images] + 1) / 2, 0, 1)
    n = imgs.shape[0]
    cols = min(10, n)
    rows = math.ceil(n / cols)
    tile = 0.8 if imgs.shape[-1] <= 32 else 1.6  # inches: 8x8 digits small, decoded photos larger
    fig, axes = plt.subplots(
        rows, cols, figsize=(cols * tile, rows * tile), squeeze=False, gridspec_kw={"wspace": 0.08, "hspace": 0.08}
    )
    for ax in axes.flat:
        ax.axis("off")
    for ax, img in zip(axes.flat, imgs, strict=False):
        pixels = img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)
        ax.imshow(pixels, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight", pad_inches=0.02)
    plt.close(fig)
    return buf.getvalue()


def _unit_samples(run_dir: Path, key: str, batch: int) -> np.ndarray | None:
    """A unit's stored samples as [N, C, H, W] in [-1, 1]: its safetensors file, or its PNG images (tasks that
    decode their samples, e.g. Stable Diffusion); None if none are stored or the file cannot be read."""
    path = samples_path(run_dir, key)
    pngs = [p for p in sample_image_paths(run_dir, key, batch) if p.exists()]
    try:
        if path.exists():
            from safetensors.torch import load_file

            return load_file(str(path))["samples"].numpy()
        if pngs:
            from PIL import Image

            arrays = []
            for p in pngs:
                with Image.open(p) as im:
                    a = np.asarray(im.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
                arrays.append(a.transpose(2, 0, 1))
            return np.stack(arrays)
    except Exception as exc:  # a truncated or foreign file: the grid goes without it, the report still gets written
        logger.warning("%s: skipped unreadable samples of unit %s (%s: %s)", run_dir, key, type(exc).__name__, exc)
    return None


def _grids(run_dir: Path, rows: Sequence[dict[str, Any]], objectives: Sequence[str]) -> dict[tuple[str, str], bytes]:
    collected: dict[tuple[str, str], list[np.ndarray]] = {}
    for key, unit_rows in iter_units(rows):
        r = unit_rows[0]
        arr = _unit_samples(run_dir, key, int(r.get("batch", len(unit_rows))))
        if arr is None:
            continue
        collected.setdefault((r["method"], _weights_key(r["weights"], objectives)), []).append(arr)
    out = {}
    for k, arrs in collected.items():
        # round-robin over units (prompts, seeds), so a grid shows every prompt rather than one prompt's batch
        mixed = np.stack([a[i] for i in range(max(len(a) for a in arrs)) for a in arrs if i < len(a)])
        png = image_grid_png(mixed)
        if png is not None:
            out[k] = png
    return out


# ----- HTML ----------------------------------------------------------------------------------------------
def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _fmt(v: float | None, digits: int = 4) -> str:
    return "-" if v is None else f"{v:.{digits}g}"


def diagnose_section(run_dir: Path) -> str:
    """HTML for RUN/diagnose.json (written by `msdda diagnose --out RUN`), or "" when there is none."""
    path = run_dir / DIAGNOSE_FILE
    if not path.is_file():
        return ""
    from msdda.evaluation.diagnose import format_diagnose

    try:
        summary = json.loads(path.read_text())
        text = format_diagnose(summary)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.warning("%s could not be read (%s); the report leaves the diagnostic out", path, exc)
        return ""
    png = run_dir / "diagnose.png"
    image = _img(png.read_bytes(), "step-optimality diagnostic") if png.is_file() else ""
    return (
        "<h2>Step-optimality diagnostic (msdda diagnose)</h2>"
        "<p>How far each aligned model and each fusion rule is from the step optimum that MSDDA's guarantee "
        "assumes (docs/diagnose.md).</p>"
        f"{image}<pre id='diagnose'>{html.escape(text)}</pre>"
    )


def render_html(
    metrics: Mapping[str, Any], pareto_png: bytes, grids: Mapping[tuple[str, str], bytes], extra: str = ""
) -> str:
    """A self-contained page; every number carries data-* attributes naming what it is. extra: more sections
    (HTML) after the samples, e.g. the diagnostic."""
    objs = metrics["objectives"]
    e = html.escape
    hv_rows = "".join(
        f'<tr><td>{e(m)}</td><td class="num" data-metric="hypervolume" data-method="{e(m)}">'
        f'{metrics["hypervolume"][m]:.6g}</td><td class="num">{metrics["pareto_front_methods"][m]}</td></tr>'
        for m in sorted(metrics["methods"], key=lambda m: -metrics["hypervolume"][m])
    )
    weight_labels = list(dict.fromkeys(r["weights_label"] for r in metrics["table"] if r["weights"] is not None))
    methods = metrics["methods"]
    cells = {(r["method"], r["weights_label"]): r for r in metrics["table"]}
    paper_rows = ""
    for wl in weight_labels:
        tds = ""
        for m in methods:
            r = cells.get((m, wl)) or cells.get((m, "-"))
            if r is None:
                tds += "<td>-</td>"
                continue
            tds += (
                "<td class='num'>"
                + "<br>".join(
                    f'<span data-metric="mean" data-method="{e(m)}" data-weights="{e(wl)}" data-objective="{e(o)}">'
                    f"{r['mean'][o]:.4f}</span>"
                    for o in objs
                )
                + "</td>"
            )
        paper_rows += f"<tr><th>{e(wl)}</th>{tds}</tr>"
    ci_rows = "".join(
        f"<tr><td>{e(r['method'])}</td><td>{e(r['weights_label'])}</td><td class='num'>{r['n']}</td>"
        + "".join(
            f"<td class='num'>{r['mean'][o]:.4f} [{r['ci95'][o][0]:.4f}, {r['ci95'][o][1]:.4f}]</td>" for o in objs
        )
        + "</tr>"
        for r in metrics["table"]
    )
    win_rows = "".join(
        f"<tr><td>{e(b)}</td>"
        + "".join(
            f'<td class="num" data-metric="win_rate" data-baseline="{e(b)}" data-weights="{e(wl)}">{wr[wl]:.3f}</td>'
            if wl in wr
            else "<td>-</td>"
            for wl in weight_labels
        )
        + "</tr>"
        for b, wr in metrics["win_rates"].items()
    )
    cost_rows = "".join(
        f"<tr><td>{e(m)}</td>"
        + "".join(
            f'<td class="num" data-metric="cost" data-method="{e(m)}" data-key="{k}">{_fmt(c.get(k))}</td>'
            for k in (*COST_KEYS, "training_seconds")
        )
        + "</tr>"
        for m, c in metrics["cost"].items()
    )
    grid_html = ""
    for m in methods:
        figs = "".join(
            f"<figure>{_img(png, f'{m} {wl}')}<figcaption>{e(wl)}</figcaption></figure>"
            for (gm, wl), png in grids.items()
            if gm == m
        )
        if figs:
            grid_html += f"<h3>{e(m)}</h3><div class='grids'>{figs}</div>"
    obj_head = "".join(f"<th>{e(o)}</th>" for o in objs)
    method_head = "".join(f"<th>{e(m)}</th>" for m in methods)
    ref = ", ".join(f"{x:.4g}" for x in metrics["reference_point"])
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>msdda report: {e(str(metrics.get("task")))}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }} td, th {{ border: 1px solid #ccc; padding: 4px 8px; }}
td.num {{ text-align: right; font-variant-numeric: tabular-nums; }} th {{ background: #f3f3f3; }}
.grids {{ display: flex; flex-wrap: wrap; gap: 12px; }} figure {{ margin: 0; text-align: center; }}
</style></head><body>
<h1>msdda report: {e(str(metrics.get("task")))}</h1>
<p>{metrics["rows"]} samples; objectives: {e(", ".join(objs))}. All rewards are maximised.</p>
<h2>Pareto front</h2>{_img(pareto_png, "Pareto plot")}
<h2>Hypervolume</h2>
<p>Reference point (shared by all methods): <span id="reference-point">{ref}</span></p>
<table><tr><th>method</th><th>hypervolume</th><th>points on the pooled front</th></tr>{hv_rows}</table>
<h2>Mean rewards per weight (rows: weights on {e(", ".join(objs))}; columns: methods)</h2>
<table><tr><th>weights</th>{method_head}</tr>{paper_rows}</table>
<h2>Means with 95% bootstrap intervals</h2>
<table><tr><th>method</th><th>weights</th><th>n</th>{obj_head}</tr>{ci_rows}</table>
<h2>Win rate of MSDDA against each baseline (scalarised reward, paired samples)</h2>
<table><tr><th>baseline</th>{"".join(f"<th>{e(wl)}</th>" for wl in weight_labels)}</tr>{win_rows}</table>
<h2>Cost per sampler call (one batch)</h2>
<table><tr><th>method</th>{"".join(f"<th>{k}</th>" for k in COST_KEYS)}<th>training (s)</th></tr>{cost_rows}</table>
<p>peak_memory_bytes is per sampler call (a batch); on CPU it is the process's resident-set growth; on CUDA
the allocator's peak growth, leaving out calls that stayed below an earlier peak (only a bound is known).
training (s): step-rl trains one model per w (the sum over the weights it ran); a fusion method trains its K
aligned models once, shared by every w (their sum); base and the reward-guided methods 0; "-": not recorded.</p>
<h2>Samples</h2>{grid_html or "<p>No image samples stored.</p>"}
{extra}
</body></html>
"""


def write_report(run_dir: Path | str, reference_point: Sequence[float] | None = None) -> dict[str, Path]:
    """Write metrics.json, pareto.png and report.html into the run folder (atomically); return the paths."""
    run_dir = Path(run_dir)
    metrics = compute_metrics(run_dir, reference_point)
    pareto_png = pareto_figure(metrics)
    grids = _grids(run_dir, read_run_rows(run_dir), metrics["objectives"])
    page = render_html(metrics, pareto_png, grids, diagnose_section(run_dir))
    paths = {"metrics": run_dir / "metrics.json", "pareto": run_dir / "pareto.png", "html": run_dir / "report.html"}
    write_json_atomic(paths["metrics"], metrics)
    write_bytes_atomic(paths["pareto"], pareto_png)
    write_text_atomic(paths["html"], page)
    return paths
