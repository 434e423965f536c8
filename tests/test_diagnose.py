"""The step-optimality diagnostic against the exact Gaussian oracle's closed forms, plus a digits smoke test."""

from __future__ import annotations

import json
import math

import pytest
import torch

from msdda.evaluation.diagnose import (
    CONFIG_FILE,
    JSON_FILE,
    PLOT_FILE,
    RATIO_MIN_Z,
    DiagnoseConfig,
    DiagnoseError,
    fit_optimum,
    format_diagnose,
    gaussian_kl,
    run_diagnose,
    simplex_grid,
)
from msdda.tasks.gaussian import gaussian_bundle

# Unequal KL strengths: MSDDA's exponents then differ from the weights, so DB-MPA (which averages the noise
# predictions with the raw weights) is measurably off the optimum while MSDDA stays exact. Strengths of 2 and 8
# keep every optimum within ~1.5 nats of the reference, where importance sampling from it is reliable (ESS above
# 5% of the draws); far optima (ESS of a few %) bias the fit low by a fraction of a standard error.
BETAS = (2.0, 8.0)
MID = "objective_1=0.5,objective_2=0.5"


class _Agreement:
    """z-scores (estimate - closed form) / standard error of many estimates. With a few hundred estimates a
    handful beyond 3 se is expected by chance; the reported errors must be calibrated and none far off."""

    def __init__(self) -> None:
        self.z: list[tuple[float, str]] = []

    def add(self, est: float, truth: float, se: float, what: str) -> None:
        self.z.append(((est - truth) / max(se, 1e-300), what))

    def check(self) -> None:
        zs = [z for z, _ in self.z]
        worst = sorted(self.z, key=lambda p: -abs(p[0]))
        assert abs(worst[0][0]) < 5, f"{worst[0][1]}: {worst[0][0]:.2f} standard errors from the closed form"
        beyond = sum(abs(z) > 3 for z in zs)
        assert beyond <= max(2, round(0.05 * len(zs))), worst[:10]  # normal: 0.3%; IS weights have wider tails
        # the standard errors are of the right size (a 32-group jackknife's own error and importance weights'
        # tails make its z-scores a little wider than normal)
        assert sum(z * z for z in zs) / len(zs) < 2.0, worst[:10]


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    bundle = gaussian_bundle(betas=BETAS)
    out = tmp_path_factory.mktemp("diagnose")
    summary = run_diagnose(
        bundle,
        methods=("msdda", "db-mpa", "db-mpa-ls", "base"),
        trajectories=2,
        timesteps=(960, 480, 100, 20),
        draws=16384,
        kernel_draws=4096,
        seed=0,
        out_dir=out,
        progress=False,
    )
    return bundle, summary, out


def _reference(task, state):
    x = torch.tensor(state["x_t"], dtype=torch.float64)[None]
    return task.reference_kernel(x, state["t"], state["prev_t"])


def test_reference_states_are_the_oracles(oracle):
    bundle, summary, _ = oracle
    task = bundle.base.task
    assert summary["num_states"] == 8 and summary["timesteps"] == [960, 480, 100, 20]
    for state in summary["states"]:
        ref = _reference(task, state)
        assert torch.allclose(torch.tensor(state["reference_mean"], dtype=torch.float64), ref.mean[0], atol=1e-9)
        assert torch.allclose(torch.tensor(state["reference_var"], dtype=torch.float64), ref.var[0], rtol=1e-9)


def test_optimum_fit_matches_closed_form(oracle):
    bundle, summary, _ = oracle
    task = bundle.base.task
    names = bundle.objectives
    agree = _Agreement()
    _close = agree.add
    for state in summary["states"]:
        ref = _reference(task, state)
        for k, o in enumerate(names):
            row = summary["optimum"][o]["per_state"][state["index"]]
            exact = task.aligned_kernel(k, ref)
            for d in range(task.dim):
                _close(row["mean"][d], float(exact.mean[0, d]), row["mean_se"][d], f"{o} mean t={state['t']}")
                _close(row["var"][d], float(exact.var[0, d]), row["var_se"][d], f"{o} var t={state['t']}")
            onehot = [1.0 if j == k else 0.0 for j in range(len(names))]
            j_exact = float(task.objective(exact, ref, onehot, BETAS[k]))
            _close(row["j_star"], j_exact, row["j_star_se"], f"{o} J* t={state['t']}")
            assert row["ess"] > 0.05 * 16384
        # the optimum of the weighted reward at beta_w = sum_k w_k beta_k
        for label, entry in summary["weighted_optimum"].items():
            w = [summary["rules"]["msdda"][label]["weights"][o] for o in names]
            if max(w) == 1.0:
                continue  # a vertex is the objective's own optimum, checked above
            beta_w = sum(wk * bk for wk, bk in zip(w, BETAS, strict=True))
            exact = task.optimal_kernel(ref, w, beta_w)
            row = entry["per_state"][state["index"]]
            for d in range(task.dim):
                _close(row["mean"][d], float(exact.mean[0, d]), row["mean_se"][d], f"{label} mean")
                _close(row["var"][d], float(exact.var[0, d]), row["var_se"][d], f"{label} var")
            _close(row["j_star"], float(task.objective(exact, ref, w, beta_w)), row["j_star_se"], f"{label} J*")
    assert len(agree.z) == 8 * (2 + 1) * 5  # states x (objectives + mid weight) x (2 means, 2 variances, J*)
    agree.check()


def test_oracle_models_are_the_optimum(oracle):
    bundle, summary, _ = oracle
    for k, o in enumerate(bundle.objectives):
        m = summary["models"][o]
        ratio = m["kl_to_optimum_over_reference"]
        assert ratio["median"] <= 0.05, ratio  # the bound the trained policies must meet too
        pooled = m["pooled_kl_ratio"]
        rows = m["per_state"]
        assert pooled["value"] == pytest.approx(
            sum(r["kl_to_optimum"] for r in rows) / sum(r["kl_optimum_to_reference"] for r in rows)
        )
        assert abs(pooled["value"]) <= 0.05 and pooled["se"] > 0 and pooled["states"] == len(rows)
        assert set(pooled["per_t"]) == {"960", "480", "100", "20"}
        for row in m["per_state"]:  # the ratio is noise over noise where the optimum barely moves: use nats
            assert row["kl_to_optimum"] <= 3 * row["kl_to_optimum_se"] + 1e-3, row
        assert abs(m["log_var_ratio"]["mean"]) < 3 * m["log_var_ratio"]["se"] + 1e-9
        # quadratic rewards leave the linear regime (the fitted beta exceeds beta at large t), for the model
        # and for the optimum alike
        assert m["fitted_beta"]["per_t"]["960"]["optimum"] > 1.02 * BETAS[k]
        assert m["fitted_beta"]["per_t"]["960"]["value"] > 1.02 * BETAS[k]
    # near t = 0 the step is short and the linear regime holds: the fitted beta is the trained beta
    for k, o in enumerate(bundle.objectives):
        assert summary["models"][o]["fitted_beta"]["per_t"]["20"]["value"] == pytest.approx(BETAS[k], rel=0.1)


def test_msdda_attains_the_optimum_and_db_mpa_does_not(oracle):
    _, summary, _ = oracle
    gaps = _Agreement()
    for label, entry in summary["rules"]["msdda"].items():
        gap = entry["j_star_minus_j"]
        gaps.add(gap["mean"], 0.0, gap["se"], f"msdda {label} mean")
        for row in entry["per_state"]:
            gaps.add(row["j_star_minus_j"], 0.0, row["j_star_minus_j_se"], f"msdda {label} t={row['t']}")
    gaps.check()
    db = summary["rules"]["db-mpa"][MID]["j_star_minus_j"]
    assert db["mean"] > 3 * db["se"] and db["over_reference"] > 0.05, db
    ls = summary["rules"]["db-mpa-ls"][MID]["j_star_minus_j"]
    assert ls["mean"] > 3 * ls["se"], ls
    base = summary["rules"]["base"][MID]["j_star_minus_j"]
    assert base["mean"] > 3 * base["se"] and base["over_reference"] == pytest.approx(1.0)


def test_outputs_written_and_config_round_trips(oracle):
    bundle, summary, out = oracle
    on_disk = json.loads((out / JSON_FILE).read_text())
    assert on_disk["config"] == summary["config"]
    cfg = DiagnoseConfig.from_dict(json.loads((out / CONFIG_FILE).read_text()))
    assert cfg.draws == 16384 and cfg.timesteps == (960, 480, 100, 20)
    assert (out / PLOT_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert summary["skipped"] == {}
    text = format_diagnose(summary)
    assert "objective_1" in text and "msdda" in text and "db-mpa" in text


def test_replaced_model_and_policy():
    bundle = gaussian_bundle()
    summary = run_diagnose(
        bundle,
        models={"objective_1": bundle.base},  # the reference in place of an aligned model: ratio exactly 1
        policies={"aligned-2": bundle.aligned["objective_2"]},
        methods=("msdda", "base"),
        timesteps=(480,),
        draws=256,
        kernel_draws=64,
        progress=False,
    )
    assert summary["models"]["objective_1"]["kl_to_optimum_over_reference"]["median"] == pytest.approx(1.0)
    assert summary["models"]["objective_2"]["kl_to_optimum_over_reference"]["median"] < 0.2
    pol = summary["rules"]["policy:aligned-2"]["objective_1=0,objective_2=1"]["j_star_minus_j"]
    assert math.isfinite(pol["mean"]) and pol["se"] > 0


def test_simplex_grid_and_fit_helpers():
    assert simplex_grid(["a", "b"], 3) == [{"a": 1.0, "b": 0.0}, {"a": 0.5, "b": 0.5}, {"a": 0.0, "b": 1.0}]
    assert len(simplex_grid(["a", "b", "c"], 3)) == 6
    # a linear reward r = c.z on N(0, 1): the optimum is N(c / beta, 1) and J* = |c|^2 / (2 beta)
    g = torch.Generator().manual_seed(0)
    half = torch.randn(20000, 3, generator=g, dtype=torch.float64)
    z = torch.cat([half, -half])
    c, beta = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64), 1.0
    groups = torch.cat([torch.arange(20000) % 20] * 2)
    fit = fit_optimum(z, z @ c, beta, groups, 20)
    assert torch.all((fit.mean - c / beta).abs() < 3 * fit.mean_se)
    assert abs(fit.j_star - float(c @ c) / (2 * beta)) < 3 * fit.j_se


@pytest.mark.parametrize(
    "kwargs",
    [{"draws": 7}, {"objectives": ["nope"]}, {"weights": [{"nope": 1.0}]}, {"methods": ["unknown"]}],
)
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(Exception) as info:
        run_diagnose(gaussian_bundle(), timesteps=(480,), draws=kwargs.pop("draws", 64), progress=False, **kwargs)
    assert isinstance(info.value, DiagnoseError) or "unknown method" in str(info.value)


def test_digits_smoke(tmp_path):
    from msdda.evaluation.tasks import get_task_bundle

    bundle = get_task_bundle("digits")
    cfg = DiagnoseConfig(
        objectives=("ink", "template"),
        prompt_indices=(3,),
        timesteps=(900, 0),  # t = 0 is the final step: the step reward is the reward of x_0 itself
        num_inference_steps=10,
        draws=64,
        kernel_draws=8,
        jackknife_groups=4,
    )
    summary = run_diagnose(bundle, config=cfg, out_dir=tmp_path, progress=False)
    assert summary["timesteps"] == [900, 0] and summary["num_states"] == 2
    assert [s["prev_t"] for s in summary["states"]] == [800, -1]
    assert set(summary["models"]) == {"ink", "template"}
    # step-rl too: the shipped ink and template models are step-RL policies and the w = 0.5 policy ships
    assert set(summary["rules"]) == {"msdda", "db-mpa", "db-mpa-ls", "rewarded-soup", "base", "step-rl"}
    for o, m in summary["models"].items():
        assert math.isfinite(m["log_var_ratio"]["mean"])
        defined = []
        for row, opt in zip(m["per_state"], summary["optimum"][o]["per_state"], strict=True):
            assert row["ess"] >= 1 and math.isfinite(row["kl_to_optimum"])
            # a ratio only where the optimum is told apart from the reference (64 draws: often not)
            told_apart = opt["kl_to_reference"] > RATIO_MIN_Z * opt["kl_to_reference_se"]
            assert (row["kl_to_optimum_over_reference"] is not None) == told_apart
            if told_apart:
                defined.append(row["kl_to_optimum_over_reference"])
        median = m["kl_to_optimum_over_reference"]["median"]
        assert (median is None) == (not defined) and m["kl_to_optimum_over_reference"]["states"] == len(defined)
    for by_w in summary["rules"].values():
        assert len(by_w) == 3
        for entry in by_w.values():
            assert math.isfinite(entry["j_star_minus_j"]["mean"]) and math.isfinite(entry["j_star_minus_j"]["se"])
    assert (tmp_path / JSON_FILE).exists() and (tmp_path / PLOT_FILE).exists()
    assert "ink" in format_diagnose(summary)


def test_kl_to_the_optimum_is_bias_corrected():
    """The plug-in KL(fit || q) of a q that IS the optimum is the fit's noise, ~ D / (2 ESS) nats; the jackknife
    correction removes it: over independent fits its mean is 0 within its standard error, the plug-in's is not."""
    d, n, groups_n, beta = 16, 2000, 20, 1.0
    c = torch.full((d,), 0.05, dtype=torch.float64)  # linear reward c.z: the optimum is N(c / beta, 1)
    corrected, plug_in = [], []
    for seed in range(40):
        g = torch.Generator().manual_seed(seed)
        half = torch.randn(n, d, generator=g, dtype=torch.float64)
        z = torch.cat([half, -half])
        groups = torch.cat([torch.arange(n) % groups_n] * 2)
        fit = fit_optimum(z, z @ c, beta, groups, groups_n)
        kl, loo = fit.kl_to(c / beta, torch.ones(d, dtype=torch.float64))
        assert loo.shape == (groups_n,)
        corrected.append(float(kl))
        plug_in.append(float(gaussian_kl(fit.raw_mean, fit.raw_var, c / beta, torch.ones(d, dtype=torch.float64))))
    mean_c = sum(corrected) / len(corrected)
    se_c = (sum((k - mean_c) ** 2 for k in corrected) / (len(corrected) - 1) / len(corrected)) ** 0.5
    mean_p = sum(plug_in) / len(plug_in)
    assert abs(mean_c) < 3 * se_c, (mean_c, se_c)
    # the plug-in bias per element: the mean's (variance 1 / ESS, KL curvature 1 / 2) plus the variance's
    # (variance 2 / ESS, curvature 1 / 4): d / ESS in all
    assert mean_p > 10 * abs(mean_c) and mean_p == pytest.approx(d / fit.ess, rel=0.3)
