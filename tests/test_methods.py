"""The method planner: one registry of names, one default target beta, the same plan from every entry point."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch

import msdda
from msdda.evaluation.sweep import SweepConfig, build_method, supported_methods
from msdda.evaluation.tasks import get_task_bundle
from msdda.sampling import DBMPA, DBMPALS, MSDDA, RGG, CoDe, SingleModel
from msdda.sampling.methods import (
    REFERENCE,
    MethodPlan,
    MethodSpec,
    PlanError,
    default_beta,
    get_method,
    method_names,
    plan_method,
    register_method,
    registered_methods,
    resolve_exponents,
)

ROOT = Path(msdda.__file__).parent


@pytest.fixture(scope="module")
def oracle():
    # betas 0.5 and 2: the default target beta then differs from any single beta_k
    bundle = get_task_bundle("gaussian")
    bundle.betas = {"objective_1": 0.5, "objective_2": 2.0}
    return bundle


def test_default_beta_is_the_weighted_mean_of_the_betas_and_drops_the_reference(oracle):
    w = {"objective_1": 0.25, "objective_2": 0.75}
    assert default_beta(w, oracle.betas) == pytest.approx(0.25 * 0.5 + 0.75 * 2.0)
    a, beta = resolve_exponents(w, oracle.betas)
    assert math.fsum(a) == pytest.approx(1.0) and beta == pytest.approx(1.625)
    assert a == pytest.approx([0.25 * 0.5 / 1.625, 0.75 * 2.0 / 1.625])
    plan = plan_method("msdda", oracle, w)
    assert isinstance(plan.rule, MSDDA) and not plan.uses_reference
    assert plan.record["exponents"] == pytest.approx(dict(zip(w, a, strict=True)))
    # an explicit beta brings the reference in with a_0 = 1 - sum a_k
    explicit = plan_method("msdda", oracle, w, beta=1.0)
    assert explicit.uses_reference and explicit.reference is oracle.reference
    assert explicit.record["exponents"][REFERENCE] == pytest.approx(1 - (0.125 + 1.5))
    # weights summing to s < 1: KL-strength control, the reference takes 1 - s whatever the betas
    half = plan_method("msdda", oracle, {"objective_1": 0.5, "objective_2": 0.0})
    assert half.record["exponents"][REFERENCE] == pytest.approx(0.5)


def test_sweep_demo_and_pipeline_build_the_same_exponents(oracle):
    """The sweep (build_method), the digits demo and MSDDAPipeline all call plan_method with beta=None."""
    w = {"objective_1": 0.3, "objective_2": 0.7}
    from_sweep = build_method("msdda", oracle, w, SweepConfig(task="gaussian"), list(w))
    direct = plan_method("msdda", oracle, w)
    assert from_sweep.rule.exponents == direct.rule.exponents
    assert from_sweep.record["beta"] == direct.record["beta"] == pytest.approx(0.3 * 0.5 + 0.7 * 2.0)
    # the pipeline's objective store plans with skip_zero_weights=True: same exponents for non-zero weights
    skipped = plan_method("msdda", oracle, w, skip_zero_weights=True)
    assert skipped.rule.exponents == direct.rule.exponents


def test_pipeline_plans_the_same_exponents_as_the_sweep():
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    import inspect

    from msdda.pipelines import sd

    # MSDDAPipeline.__call__ leaves beta to the planner (None) and passes the call's betas through
    assert inspect.signature(sd.MSDDAPipeline.__call__).parameters["beta"].default is None
    source = inspect.getsource(sd.MSDDAPipeline.__call__)
    assert "plan_method(" in source and "exponents_from_preferences" not in source


def test_every_method_plans_on_a_task_and_the_registry_lists_it():
    bundle = get_task_bundle("gaussian")
    w = {"objective_1": 0.5, "objective_2": 0.5}
    rules = {
        "base": SingleModel,
        "single:objective_1": SingleModel,
        "msdda": MSDDA,
        "db-mpa": DBMPA,
        "db-mpa-ls": DBMPALS,
        "code": CoDe,
        "rgg": RGG,
    }
    for method, rule_type in rules.items():
        plan = plan_method(method, bundle, w)
        assert isinstance(plan, MethodPlan) and isinstance(plan.rule, rule_type), method
        assert plan.record["method"] == method
    assert set(method_names(with_arguments=False)) == {s.name for s in registered_methods()}
    assert "single:<objective>" in method_names()
    assert supported_methods(bundle) == ["base", "msdda", "db-mpa", "db-mpa-ls", "code", "rgg"]  # no soup here
    assert plan_method("rgg", bundle, w).rule.scale == bundle.rgg_scale
    assert plan_method("rgg", bundle, w, options={"scale": 3.0}).rule.scale == 3.0
    assert plan_method("code", bundle, w, options={"num_candidates": 2}).rule.num_candidates == 2


def test_mixtures_give_the_reference_the_remainder():
    bundle = get_task_bundle("gaussian")
    plan = plan_method("db-mpa", bundle, {"objective_1": 0.5, "objective_2": 0.3})
    assert plan.rule.reference_weight == pytest.approx(0.2) and plan.uses_reference
    ls = plan_method("db-mpa-ls", bundle, {"objective_1": 0.5, "objective_2": 0.3})
    assert ls.rule.reference_weight == pytest.approx(0.2)
    out = msdda.sample(
        ls.models, bundle.scheduler, ls.rule, reference=ls.reference, shape=(4, 2), dtype=torch.float64, progress=False
    )
    assert out.samples.shape == (4, 2) and torch.isfinite(out.samples).all()


@pytest.mark.parametrize(
    ("method", "weights", "kw", "pattern"),
    [
        ("magic", {"objective_1": 1.0}, {}, "unknown method 'magic'"),
        ("single", None, {}, "unknown method 'single'"),
        ("single:nope", None, {}, "unknown objective 'nope'"),
        ("msdda", None, {}, "needs weights"),
        ("msdda", {"objective_1": 0.5, "zzz": 0.5}, {}, r"unknown objective\(s\) \['zzz'\]"),
        ("msdda", {"objective_1": "a"}, {}, "weight objective_1='a' is not a number"),
        ("msdda", {"objective_1": float("nan")}, {}, "is not finite"),
        ("msdda", {"objective_1": 0.5, REFERENCE: 0.2}, {}, "must sum to 1"),
        ("msdda", {"objective_1": 1.0}, {"beta": -1.0}, "must be > 0"),
        ("msdda", {"objective_1": 1.0}, {"betas": {"nope": 1.0}}, r"betas name unknown objective\(s\) \['nope'\]"),
        ("msdda", {"objective_1": 1.0}, {"options": {"x": 1}}, "takes no options"),
        ("msdda", {"objective_1": -0.5, "objective_2": -0.5}, {}, "pass an explicit beta"),
        ("db-mpa-ls", {"objective_1": 0.7, "objective_2": 0.6}, {}, "negative probability"),
        ("rewarded-soup", {"objective_1": 1.0}, {}, "no parameters|has none"),
        ("code", {"objective_1": 1.0}, {"options": {"bogus": 1}}, "not valid for 'code'"),
        ("rgg", {"objective_1": 1.0}, {"options": {"model": "zzz"}}, "model='zzz'"),
        ("msdda", {"objective_1": 1.0}, {"options": [1]}, "pass a mapping"),
    ],
)
def test_plan_errors_name_the_value(method, weights, kw, pattern):
    with pytest.raises(PlanError, match=pattern):
        plan_method(method, get_task_bundle("gaussian"), weights, **kw)


def test_adding_a_method_is_one_registration():
    def build(req):
        first = next(iter(req.weights))
        return MethodPlan(req.method, [req.objective_set.aligned[first]], SingleModel(), None)

    register_method(MethodSpec("first-weighted", build, "the first named objective alone", "1 model per step"))
    try:
        bundle = get_task_bundle("gaussian")
        plan = plan_method("first-weighted", bundle, {"objective_2": 1.0, "objective_1": 0.0})
        assert plan.models == [bundle.aligned["objective_2"]]
        assert "first-weighted" in method_names() and get_method("first-weighted")[0].weighted
        with pytest.raises(PlanError, match="already registered"):
            register_method(MethodSpec("first-weighted", build, "again", "-"))
    finally:
        from msdda.sampling import methods

        methods._REGISTRY.pop("first-weighted")


def _string_constants(tree: ast.AST) -> list[str]:
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.FunctionDef | ast.ClassDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                docstrings.add(id(body[0].value))
    return [
        n.value
        for n in ast.walk(tree)
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings
    ]


def test_each_method_name_string_is_defined_in_exactly_one_module():
    """Method names are literals only where the method (or its step rule) is defined; everything else imports
    them. ("base" also names the digits base model's folder and "msdda" the program: not method names.)"""
    names = [s.name for s in registered_methods()]
    where: dict[str, set[str]] = {n: set() for n in names}
    for path in ROOT.rglob("*.py"):
        rel = str(path.relative_to(ROOT))
        for value in _string_constants(ast.parse(path.read_text())):
            if value in where:
                where[value].add(rel)
    folder_names = {"tasks/digits/bundle.py", "tasks/digits/training.py", "evaluation/digits_demo.py", "pipelines/cli.py"}
    where["base"] -= folder_names  # the digits base model's folder ("base") and the CLI's config key
    where["base"] -= {"pipelines/objectives.py", "evaluation/digits_variance.py"}  # reserved adapter name, a key
    where["base"] -= {"cli.py", "pipelines/sd_task.py", "pipelines/sd_align.py"}  # the sd options key (--base)
    where["msdda"] -= {"cli.py"}  # the program's name (prog_name="msdda")
    where["step-rl"] -= {"cli.py", "tasks/digits/training.py", "tasks/gaussian.py", "evaluation/digits_demo.py", "pipelines/sd_align.py"}  # also the step-RL trainer's name
    bad = {n: sorted(m) for n, m in where.items() if len(m) != 1}
    assert not bad, f"method names defined in more than one module (or none): {bad}"


def test_pipeline_methods_come_from_the_registry():
    pytest.importorskip("diffusers")
    from msdda.pipelines import METHODS

    assert list(METHODS) == method_names()


def test_sample_works_on_its_own_scheduler_copy():
    bundle = get_task_bundle("gaussian")
    before = bundle.scheduler.timesteps.clone()
    plan = plan_method("msdda", bundle, {"objective_1": 0.5, "objective_2": 0.5})
    msdda.sample(plan.models, bundle.scheduler, plan.rule, shape=(2, 2), num_inference_steps=7, progress=False)
    assert torch.equal(bundle.scheduler.timesteps, before)


def test_rewarded_soup_option_average_reaches_a_builder_that_takes_it():
    import copy

    bundle = copy.copy(get_task_bundle("gaussian"))
    calls = []
    model = bundle.reference
    bundle.soup = lambda weights: calls.append(("plain", dict(weights))) or model
    w = {"objective_1": 0.4, "objective_2": 0.6}
    plain = plan_method("rewarded-soup", bundle, w)
    delta = plan_method("rewarded-soup", bundle, w, options={"average": "delta"})
    assert calls == [("plain", w), ("plain", w)] and delta.record["soup_average"] == "delta"
    assert "soup_average" not in plain.record
    for options, pattern in [
        ({"average": "factors"}, "interpolates full parameters"),
        ({"average": "mean"}, r"average='mean'; choose one of \('delta', 'factors'\)"),
        ({"scale": 1}, "takes only the option 'average'"),
    ]:
        with pytest.raises(PlanError, match=pattern):
            plan_method("rewarded-soup", bundle, w, options=options)

    def lora_builder(weights, average="delta"):
        calls.append((average, dict(weights)))
        return model

    bundle.soup = lora_builder
    plan = plan_method("rewarded-soup", bundle, w, options={"average": "factors"})
    assert calls[-1] == ("factors", w) and plan.record == {"method": "rewarded-soup", "weights": w, "soup": w,
                                                          "soup_average": "factors"}
