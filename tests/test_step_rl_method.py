"""The "step-rl" method: one policy per w trained by multi-objective step-level RL, cached by key, in the planner,
the train-step-rl command, sweeps, reports and the diagnostic. Tiny configs (2 trainer steps) keep it fast."""

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import TINY, tiny_model
from msdda.alignment.step_rl import StepRLConfig
from msdda.cli import app
from msdda.evaluation.diagnose import DiagnoseConfig, run_diagnose
from msdda.evaluation.report import compute_metrics, write_report
from msdda.evaluation.store import SweepError, read_rows
from msdda.evaluation.sweep import SweepConfig, run_sweep, supported_methods
from msdda.evaluation.tasks import get_task_bundle
from msdda.models.io import save_pretrained
from msdda.sampling.methods import STEP_RL, MissingPolicyError, PlanError, plan_method
from msdda.tasks.digits import step_rl as digits_step_rl
from msdda.tasks.digits.step_rl import DigitsStepRLPolicies
from msdda.tasks.digits.training import MODEL_TYPE, digits_train_config
from msdda.tasks.policy_cache import POLICY_FILE

TINY_TRAIN = {"steps": 2, "trajectories": 2, "eval_samples": 2, "num_inference_steps": 5}
HALF = {"ink": 0.5, "symmetry": 0.5}


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def counted(monkeypatch):
    """Wrap the digits trainer: count its calls and keep each trained in-memory model."""
    calls = []
    real = digits_step_rl.align_digits

    def wrapped(*args, **kwargs):
        result = real(*args, **kwargs)
        calls.append(result)
        return result

    monkeypatch.setattr(digits_step_rl, "align_digits", wrapped)
    return calls


def _tiny_dirs(root: Path, trainer: str = "hard", beta: float = 0.05, train_seconds: float = 12.5):
    """A tiny base and two 'aligned' folders (tiny models) whose metadata says how they were trained."""
    from msdda.alignment import training_scheduler_config
    from msdda.core import KernelScheduler

    sched = KernelScheduler(training_scheduler_config()).config.to_dict()
    dirs = {}
    for i, name in enumerate(["base", "ink", "symmetry"]):
        meta = {}
        if name != "base":
            cfg = digits_train_config(trainer, name, beta=beta, **TINY_TRAIN)
            meta = {"dpo_config": cfg.to_dict(), "trainer": trainer, "train_seconds": train_seconds * (i + 1)}
        d = root / name
        save_pretrained(
            tiny_model(i),
            d,
            model_type=MODEL_TYPE,
            task="digits",
            architecture=TINY.to_dict(),
            scheduler=sched,
            metadata=meta,
        )
        dirs[name] = d
    return dirs


def _policies(root: Path, **kw) -> DigitsStepRLPolicies:
    dirs = _tiny_dirs(root / "models", **{k: kw.pop(k) for k in ("trainer", "beta", "train_seconds") if k in kw})
    kw.setdefault("cache_dir", root / "cache")
    kw.setdefault("shipped", root / "shipped-absent")
    return DigitsStepRLPolicies(
        dirs["base"], {o: dirs[o] for o in ("ink", "symmetry")}, {"ink": 0.05, "symmetry": 0.05}, progress=False, **kw
    )


def test_planner_refuses_step_rl_without_weighted_policy():
    bundle = get_task_bundle("gaussian")
    assert not hasattr(bundle, "weighted_policy") or bundle.weighted_policy is None
    with pytest.raises(PlanError, match="task 'gaussian' has no step-RL policies"):
        plan_method(STEP_RL, bundle, {"objective_1": 0.5, "objective_2": 0.5})
    assert STEP_RL not in supported_methods(bundle)
    with pytest.raises(SweepError, match="no step-RL policies"):
        run_sweep(SweepConfig(task="gaussian", methods=[STEP_RL]), "/nonexistent/never", lambda c: bundle)


def test_key_changes_with_w_betas_and_config_but_not_bookkeeping(tmp_path):
    pol = _policies(tmp_path)
    _, cfg, key = pol.resolve(HALF, 0.05)
    assert cfg.reward == "0.5*ink+0.5*symmetry" and cfg.reward_weights == [0.5, 0.5] and cfg.beta == 0.05
    assert cfg.steps == 2 and cfg.trajectories == 2  # copied from the aligned models' config
    # zero weights do not name another policy; another w, beta, objective beta or trainer setting does
    assert pol.resolve({"ink": 0.5, "symmetry": 0.5}, 0.05)[2].digest == key.digest
    assert pol.resolve({"symmetry": 0.5, "ink": 0.5}, 0.05)[2].digest == key.digest  # canonical order
    assert pol.resolve({"ink": 0.25, "symmetry": 0.75}, 0.05)[2].digest != key.digest
    assert pol.resolve(HALF, 0.07)[2].digest != key.digest
    other_betas = dataclasses.replace(key, betas=(0.05, 0.1))
    assert other_betas.digest != key.digest
    for field, value in (("log_every", 1), ("checkpoint_every", 1), ("keep_checkpoints", 5)):
        changed = dataclasses.replace(key, trainer_config={**key.trainer_config, field: value})
        assert changed.digest == key.digest, field
    for field, value in (("steps", 3), ("lr", 1e-4), ("seed", 1), ("samples", 8)):
        changed = dataclasses.replace(key, trainer_config={**key.trainer_config, field: value})
        assert changed.digest != key.digest, field
    assert dataclasses.replace(key, kernel_offsets=True).digest != key.digest
    ranged = dataclasses.replace(key, kernel_offsets=True, offset_head_ranges=(200, 600))
    assert ranged.digest != dataclasses.replace(key, kernel_offsets=True).digest
    assert "offset_head_ranges" not in key.inputs()  # one head: the key is what it was before ranges existed
    assert dataclasses.replace(ranged, offset_head_x0=True).digest != ranged.digest
    assert "offset_head_x0" not in ranged.inputs()  # unset: keys of the shipped policies are unchanged
    assert pol.with_options(trainer_overrides={"steps": 3}).resolve(HALF, 0.05)[2].digest != key.digest
    assert pol.with_options(trainer_overrides={"log_every": 1}).resolve(HALF, 0.05)[2].digest == key.digest
    # the digest is sha256 of the canonical JSON of the inputs (recomputed here independently)
    import hashlib

    text = json.dumps(key.inputs(), sort_keys=True, separators=(",", ":"))
    assert key.digest == hashlib.sha256(text.encode()).hexdigest() and key.short == key.digest[:16]
    assert key.inputs()["weights"] == ["0.5", "0.5"] and "log_every" not in key.inputs()["trainer_config"]


# StepRLConfig's defaults when policy keys reached KEY_VERSION 2. Keys leave out fields at their default, so a
# changed default would silently match policies trained with the old one: bump KEY_VERSION and this snapshot.
KEY_V2_DEFAULTS = {
    "reward": "ink", "beta": 0.05, "steps": 200, "lr": 2e-05, "lr_schedule": "constant", "trajectories": 8,
    "states_per_trajectory": 4, "guidance_scale": 2.0, "num_inference_steps": 50, "grad_clip": 1.0, "seed": 0,
    "checkpoint_every": 50, "keep_checkpoints": 2, "log_every": 25, "eval_samples": 40, "eval_seed": 12345,
    "lora": False, "lora_rank": 8, "lora_alpha": 16.0, "lora_targets": ["conv1", "conv2", "emb"], "data_shards": 1,
    "state_source": "policy", "trainable": None, "estimator": "auto", "samples": 4, "reward_weights": None,
    "state_weights": "uniform", "antithetic": False,
}


def test_key_leaves_out_defaults_so_new_options_keep_old_keys(tmp_path):
    from msdda.alignment.step_rl import StepRLConfig
    from msdda.tasks.policy_cache import KEY_VERSION

    defaults = StepRLConfig().to_dict()
    assert KEY_VERSION == 2
    assert {k: defaults[k] for k in KEY_V2_DEFAULTS} == KEY_V2_DEFAULTS, "a default changed: bump KEY_VERSION"
    _, _, key = _policies(tmp_path).resolve(HALF, 0.05)
    # an option the config did not have, at its default, leaves the key as it was; any other value changes it
    added = dataclasses.replace(key, trainer_config={**key.trainer_config, "new_option": 1},
                                config_defaults={**key.config_defaults, "new_option": 1})
    assert added.digest == key.digest
    assert dataclasses.replace(added, trainer_config={**added.trainer_config, "new_option": 2}).digest != key.digest
    assert "antithetic" not in key.inputs()["trainer_config"] and key.inputs()["key_version"] == 2
    # without known defaults every field counts (and the key differs)
    assert dataclasses.replace(key, config_defaults={}).digest != key.digest


def test_train_once_then_load_from_cache_with_identical_outputs(tmp_path, counted):
    pol = _policies(tmp_path)
    first = pol(HALF, 0.05)
    assert len(counted) == 1 and first.train_seconds > 0
    _, cfg, key = pol.resolve(HALF, 0.05)
    folder = tmp_path / "cache" / key.short
    record = json.loads((folder / POLICY_FILE).read_text())
    assert record["key"] == key.digest == first.key and record["train_seconds"] == first.train_seconds
    assert record["aligned_trainer"] == "hard" and "StepRLConfig defaults" in record["config_source"]
    assert not (folder / "checkpoints").exists() and not list((tmp_path / "cache").glob(".*.partial"))
    saved = json.loads((folder / "config.json").read_text())["metadata"]["dpo_config"]
    assert StepRLConfig.from_dict(saved) == cfg  # trained with exactly the config the key names
    # a fresh process-level object finds it on disk: no training, the same weights and outputs
    again = pol.with_options()(HALF, 0.05)
    assert len(counted) == 1 and again.key == first.key and again.train_seconds == first.train_seconds
    trained = counted[0].model
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    t, c = torch.tensor([900, 400, 10]), torch.tensor([1, 3, 10])
    with torch.no_grad():
        assert torch.equal(trained(x, t, c), again.model(x, t, c))
    assert pol.ensure(HALF, 0.05).status == "cache"
    # the planner records what the sweep and the report need
    plan = plan_method(STEP_RL, _Set(pol), HALF)
    assert plan.models == [first.model] and plan.record["beta"] == pytest.approx(0.05)
    assert plan.record["policy"] == key.digest and plan.record["train_seconds"] == first.train_seconds


class _Set:
    """A minimal ObjectiveSet around a weighted-policy provider."""

    objectives = ["ink", "symmetry"]
    aligned = {"ink": None, "symmetry": None}
    rewards: dict = {}
    soup = None
    rgg_scale = 1.0
    reference = None
    name = "tiny"

    def __init__(self, provider):
        self.weighted_policy = provider

    def beta_of(self, objective):
        return 0.05


def test_train_false_names_the_command(tmp_path, counted):
    pol = _policies(tmp_path, train=False)
    with pytest.raises(MissingPolicyError) as info:
        pol({"ink": 0.25, "symmetry": 0.75}, 0.05)
    msg = str(info.value)
    assert "msdda train-step-rl --task digits --objectives ink,symmetry --weights 0.25,0.75" in msg
    assert f"--cache-dir {tmp_path / 'cache'}" in msg and not counted
    with pytest.raises(MissingPolicyError):  # through the planner's option too
        plan_method(STEP_RL, _Set(pol.with_options(train=True)), HALF, options={"train": False})
    assert not counted


def test_one_hot_reuses_a_step_rl_aligned_model_only_at_its_beta(tmp_path, counted):
    marker = torch.nn.Identity()
    pol = _policies(tmp_path, trainer=STEP_RL, aligned={"ink": marker})
    got = pol({"ink": 1.0, "symmetry": 0.0}, 0.05)
    assert got.model is marker and got.key == str(tmp_path / "models" / "ink") and got.train_seconds == 25.0
    assert not counted
    pol({"ink": 1.0}, 0.1)  # another beta: that policy must be trained
    assert len(counted) == 1
    hard = _policies(tmp_path / "hard", aligned={"ink": marker})  # aligned by DPO: not the step-RL policy
    assert hard({"ink": 1.0}, 0.05).model is not marker and len(counted) == 2


def test_cli_trains_then_reports_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("MSDDA_CACHE_DIR", str(tmp_path / "unused"))
    runner = CliRunner()
    args = [
        "train-step-rl",
        "--objectives",
        "ink,template",
        "--weights",
        "0.5,0.5",
        "--cache-dir",
        str(tmp_path / "c"),
        "--steps",
        "2",
        "--trajectories",
        "2",
        "--eval-samples",
        "2",
        "--num-inference-steps",
        "5",
        "--quiet",
    ]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    line = [r for r in first.stdout.splitlines() if r.startswith("ink=0.5")][0]
    assert line.split()[-1] == "trained" and float(line.split()[-2]) > 0
    second = runner.invoke(app, [*args, "--out", str(tmp_path / "copy")])
    assert second.exit_code == 0, second.output
    line2 = [r for r in second.stdout.splitlines() if r.startswith("ink=0.5")][0]
    assert line2.split()[-1] == "cached" and line2.split()[-3] == line.split()[-3]  # the same key
    key = line.split()[-3]
    copied = json.loads((tmp_path / "copy" / POLICY_FILE).read_text())
    assert copied["key"].startswith(key) and (tmp_path / "copy" / "model.safetensors").is_file()
    assert not (tmp_path / "unused").exists()
    bad = runner.invoke(app, ["train-step-rl", "--weights", "0.5,0.5", "--weights", "1,0", "--out", "x"])
    assert bad.exit_code != 0 and "exactly one --weights" in bad.output


def _digits_with_tiny_policies(tmp_path, **kw):
    bundle = get_task_bundle("digits", {"objectives": ["ink", "template"]})
    bundle.weighted_policy = bundle.weighted_policy.with_options(
        cache_dir=tmp_path / "cache", trainer_overrides=TINY_TRAIN, progress=False, **kw
    )
    return bundle


def test_sweep_rows_carry_training_seconds_and_the_report_sums_them(tmp_path):
    bundle = _digits_with_tiny_policies(tmp_path)
    grid = [{"ink": 0.25, "template": 0.75}, {"ink": 0.5, "template": 0.5}]
    cfg = SweepConfig(
        task="digits",
        objectives=["ink", "template"],
        methods=[STEP_RL, "msdda"],
        weights=grid,
        prompts=[3],
        batch_size=2,
        steps=3,
        save_samples=False,
    )
    # train_policies=False with an empty cache: refused before any folder is made, naming the command
    with pytest.raises(SweepError, match="msdda train-step-rl --task digits"):
        run_sweep(dataclasses.replace(cfg, train_policies=False), tmp_path / "refused", lambda c: bundle)
    assert not (tmp_path / "refused").exists()
    run_sweep(cfg, tmp_path / "run", lambda c: bundle, progress=False)
    rows = read_rows(tmp_path / "run")
    step = [r for r in rows if r["method"] == STEP_RL]
    assert len(step) == 4 and all(r["train_seconds"] > 0 and len(r["policy"]) == 64 for r in step)
    per_w = {json.dumps(r["weights"], sort_keys=True): r["train_seconds"] for r in step}
    assert len(per_w) == 2
    shipped = {
        o: json.loads((Path(bundle.weighted_policy.aligned_dirs[o]) / "config.json").read_text())["metadata"][
            "train_seconds"
        ]
        for o in ("ink", "template")
    }
    fused = [r for r in rows if r["method"] == "msdda"]
    assert all(r["aligned_train_seconds"] == pytest.approx(sum(shipped.values())) for r in fused)
    cost = compute_metrics(tmp_path / "run")["cost"]
    assert cost[STEP_RL]["training_seconds"] == pytest.approx(math.fsum(per_w.values()))
    assert cost["msdda"]["training_seconds"] == pytest.approx(sum(shipped.values()))
    page = write_report(tmp_path / "run")["html"].read_text()
    for m in (STEP_RL, "msdda"):
        want = f"{cost[m]['training_seconds']:.4g}"
        assert f'data-method="{m}" data-key="training_seconds">{want}</td>' in page
    assert "training (s)" in page and "one model per w" in page
    assert STEP_RL in supported_methods(bundle) and STEP_RL not in supported_methods(bundle, include_training=False)
    # config.json does not hold train_policies: a resume may flip it (the policies are cached now)
    assert "train_policies" not in json.loads((tmp_path / "run" / "config.json").read_text())
    again = run_sweep(dataclasses.replace(cfg, train_policies=False), tmp_path / "run", lambda c: bundle)
    assert again.units_run == 0


def test_diagnose_scores_the_policy_trained_at_each_weight(tmp_path):
    bundle = _digits_with_tiny_policies(tmp_path)
    cfg = DiagnoseConfig(
        objectives=("ink", "template"),
        weights=({"ink": 0.5, "template": 0.5},),
        prompt_indices=(3,),
        timesteps=(900,),
        num_inference_steps=10,
        draws=64,
        kernel_draws=8,
        jackknife_groups=4,
    )
    # default methods: step-rl is added, but a missing policy is skipped (not trained) unless asked
    skipped = run_diagnose(bundle, config=cfg, progress=False)
    assert STEP_RL not in skipped["rules"] and "train-step-rl" in skipped["skipped"][STEP_RL]
    named = dataclasses.replace(cfg, methods=("msdda", STEP_RL))
    summary = run_diagnose(bundle, config=named, progress=False)
    policy = bundle.weighted_policy(dict(cfg.weights[0]), 0.05625).model  # the default beta: 0.5 * 0.05 + 0.5 * 0.0625
    same = run_diagnose(
        bundle, config=dataclasses.replace(cfg, methods=("msdda",)), policies={"p": policy}, progress=False
    )
    label = "ink=0.5,template=0.5"
    got = summary["rules"][STEP_RL][label]["j_star_minus_j"]
    want = same["rules"]["policy:p"][label]["j_star_minus_j"]
    assert got["mean"] == pytest.approx(want["mean"], rel=1e-12) and math.isfinite(got["mean"])
    assert summary["skipped"] == {}
