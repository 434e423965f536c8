"""Batched K-model evaluation (msdda.models.batched): equal to the sequential path, and falls back cleanly."""

import logging

import pytest
import torch

import msdda
from msdda import DBMPA, DBMPALS, MSDDA, KernelScheduler, KernelSchedulerConfig, SingleModel
from msdda.models import BatchingError, ClassifierFreeGuidance, StackedDenoisers, StackedGuidance, can_stack
from msdda.models import batched as batched_mod
from msdda.tasks.digits.network import DigitsDenoiser, DigitsDenoiserConfig
from msdda.tasks.gaussian import GaussianTask, OracleDenoiser

NULL = 10


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny convolutions: a second intra-op thread buys nothing, and on a busy 2-core machine OpenMP threads
    # waiting for each other make every forward tens of times slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _scheduler() -> KernelScheduler:
    # The digits schedule (DDPM, epsilon, learned_range variance), spelled out so this test stands alone.
    return KernelScheduler(
        KernelSchedulerConfig(
            kind="ddpm",
            beta_schedule="linear",
            beta_start=0.0001,
            beta_end=0.02,
            prediction_type="epsilon",
            variance_type="learned_range",
            clip_sample=True,
            timestep_spacing="leading",
        )
    )


def _digits_models(k: int, config: DigitsDenoiserConfig | None = None, seed: int = 0) -> list[DigitsDenoiser]:
    """K digits-sized denoisers with different random weights (the zero-initialised layers perturbed too)."""
    torch.manual_seed(seed)
    models = []
    for _ in range(k):
        m = DigitsDenoiser(config).eval()
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.03 * torch.randn_like(p))
        models.append(m)
    return models


class _Counting:
    """Counts calls of StackedDenoisers.__call__ (to see which path sample() took)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        original = StackedDenoisers.__call__

        def wrapped(stacked, *args, **kwargs):
            self.calls += 1
            return original(stacked, *args, **kwargs)

        monkeypatch.setattr(StackedDenoisers, "__call__", wrapped)


def _run(models, rule, batch_models, **kw):
    b = 6
    common = dict(
        shape=(b, 1, 8, 8),
        cond=torch.arange(b) % 10,
        guidance_scale=3.0,
        null_cond=torch.tensor([NULL]),
        num_inference_steps=10,
        seed=0,
        progress=False,
    )
    common.update(kw)
    return msdda.sample(models, _scheduler(), rule, batch_models=batch_models, **common)


@pytest.mark.parametrize(
    "rule", [MSDDA([0.3, 0.3, 0.4]), DBMPA([0.2, 0.5, 0.3]), SingleModel(1)], ids=["msdda", "db-mpa", "single"]
)
def test_batched_equals_sequential_with_cfg(rule, monkeypatch):
    models = _digits_models(3)
    seq = _run(models, rule, False)
    spy = _Counting(monkeypatch)
    bat = _run(models, rule, True)
    assert spy.calls == 10  # one stacked call (cond + uncond together) per step
    torch.testing.assert_close(bat.samples, seq.samples, rtol=0, atol=1e-5)
    assert bat.model_evals == seq.model_evals == 10 * 3 * 2
    # Auto: one by one on CPU (faster there), batched when allowed on CPU or on an accelerator.
    assert torch.equal(_run(models, rule, None).samples, seq.samples) and spy.calls == 10
    monkeypatch.setattr(batched_mod, "AUTO_BATCH_ON_CPU", True)
    assert torch.equal(_run(models, rule, None).samples, bat.samples) and spy.calls == 20


def test_a_rule_that_selects_one_model_skips_the_stacked_call(monkeypatch):
    """DB-MPA-LS evaluates only the model it drew: no K-model stacked call, 1 model (x2 for CFG) per step."""
    models = _digits_models(3)
    seq = _run(models, DBMPALS([0.2, 0.5, 0.3]), False)
    spy = _Counting(monkeypatch)
    bat = _run(models, DBMPALS([0.2, 0.5, 0.3]), True)
    assert spy.calls == 0
    assert torch.equal(bat.samples, seq.samples)
    assert bat.model_evals == seq.model_evals == 10 * 1 * 2


def test_batched_outputs_match_per_model_calls_without_and_with_guidance():
    models = _digits_models(2)
    x, t, cond = torch.randn(5, 1, 8, 8), torch.full((5,), 700), torch.tensor([0, 3, 5, 9, 10])
    stacked = StackedDenoisers(models)
    with torch.no_grad():
        for out, m in zip(stacked(x, t, cond), models, strict=True):
            torch.testing.assert_close(out, m(x, t, cond), rtol=0, atol=1e-5)
        # Tensor null condition: one call on the 2B batch; None: two stacked calls. Both equal per-model CFG.
        for null in (torch.tensor([NULL]), None):
            guided = StackedGuidance(stacked, 2.5, null)(x, t, cond)
            for out, m in zip(guided, models, strict=True):
                assert out.shape == (5, 2, 8, 8)
                torch.testing.assert_close(out, ClassifierFreeGuidance(m, 2.5, null)(x, t, cond), rtol=0, atol=1e-5)


def test_oracle_denoisers_use_the_sequential_path(monkeypatch):
    monkeypatch.setattr(batched_mod, "AUTO_BATCH_ON_CPU", True)
    task = GaussianTask.default(dim=2, num_objectives=2)
    models = [OracleDenoiser(task, 0), OracleDenoiser(task, 1)]
    spy = _Counting(monkeypatch)
    kw = dict(shape=(4, 2), dtype=torch.float64, seed=0, progress=False, num_inference_steps=5)
    rule = MSDDA([0.5, 0.5])
    auto = msdda.sample(models, task.scheduler, rule, **kw)
    seq = msdda.sample(models, task.scheduler, rule, batch_models=False, **kw)
    assert spy.calls == 0
    assert torch.equal(auto.samples, seq.samples) and auto.model_evals == seq.model_evals == 10
    # the oracle's models are parameter-free modules (their kernels are closed forms): nothing to stack
    with pytest.raises(BatchingError, match="\\(OracleDenoiser\\) have no parameters or buffers to stack"):
        msdda.sample(models, task.scheduler, rule, batch_models=True, **kw)


@pytest.mark.parametrize(
    "other, reason",
    [
        (lambda: DigitsDenoiser(DigitsDenoiserConfig(base_channels=8, num_groups=4)).eval(), "different"),
        (lambda: DigitsDenoiser(DigitsDenoiserConfig(max_period=500.0)).eval(), "attribute 'config' differs"),
        (lambda: DigitsDenoiser().train(), "attribute 'training' differs"),
        (lambda: msdda.models.ModuleDenoiser(DigitsDenoiser().eval()), "is a ModuleDenoiser, model 0 a DigitsDenoiser"),
    ],
    ids=["widths", "config", "training-flag", "class"],
)
def test_mismatched_architectures_fall_back_or_raise(other, reason, monkeypatch):
    models = [_digits_models(1)[0], other()]
    ok, why = can_stack(models)
    assert not ok and reason in why
    monkeypatch.setattr(batched_mod, "AUTO_BATCH_ON_CPU", True)
    spy = _Counting(monkeypatch)
    rule = MSDDA([0.5, 0.5])
    auto = _run(models, rule, None, num_inference_steps=2)
    seq = _run(models, rule, False, num_inference_steps=2)
    assert spy.calls == 0 and torch.equal(auto.samples, seq.samples)
    with pytest.raises(BatchingError, match=f"cannot evaluate the 2 models as one batched call: .*{reason}.*batch_models=False"):
        _run(models, rule, True, num_inference_steps=2)


def test_parameterless_and_training_mode_dropout_are_not_stacked():
    class Scale(torch.nn.Module):  # behaviour in a plain attribute, no weights: nothing to stack
        def __init__(self, a: float) -> None:
            super().__init__()
            self.a = a

        def forward(self, x, t, cond=None):
            return self.a * x

    ok, why = can_stack([Scale(1.0), Scale(2.0)])
    assert not ok and "no parameters or buffers" in why
    drop = [DigitsDenoiser(DigitsDenoiserConfig(dropout=0.1)) for _ in range(2)]  # training mode
    ok, why = can_stack(drop)
    assert not ok and "Dropout" in why and ".eval()" in why
    assert can_stack([m.eval() for m in drop]) == (True, "")


def test_stacked_weights_follow_in_place_updates_and_refresh():
    models = _digits_models(2)
    x, t, cond = torch.randn(3, 1, 8, 8), torch.full((3,), 400), torch.tensor([1, 2, 10])
    stacked = StackedDenoisers(models)
    with torch.no_grad():
        models[1].conv_out.bias.add_(1.0)  # version counter moves: seen on the next call
        torch.testing.assert_close(stacked(x, t, cond)[1], models[1](x, t, cond), rtol=0, atol=1e-5)
        models[0].load_state_dict(models[1].state_dict())
        torch.testing.assert_close(stacked(x, t, cond)[0], models[1](x, t, cond), rtol=0, atol=1e-5)
        models[0].conv_out.bias.data.add_(1.0)  # .data bypasses the version counter: stale until refresh()
        assert not torch.allclose(stacked(x, t, cond)[0], models[0](x, t, cond))
        stacked.refresh()
        torch.testing.assert_close(stacked(x, t, cond)[0], models[0](x, t, cond), rtol=0, atol=1e-5)


class _DataDependent(torch.nn.Module):
    """Branches on a weight's value: fine one model at a time, impossible under vmap."""

    def __init__(self, w: float) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(w))

    def forward(self, x, t, cond=None):
        return x * self.w if self.w > 0 else -x


def test_vmap_failure_falls_back_in_auto_and_raises_when_required(caplog, monkeypatch):
    models = [_DataDependent(0.5), _DataDependent(-1.0)]
    assert can_stack(models) == (True, "")
    x, t = torch.randn(2, 1, 3, 3), torch.zeros(2, dtype=torch.long)
    with pytest.raises(BatchingError, match="under torch.func.vmap failed .*batch_models=False"):
        StackedDenoisers(models)(x, t)
    lenient = StackedDenoisers(models, fallback=True)
    with caplog.at_level(logging.WARNING, logger=batched_mod.__name__):
        outs = lenient(x, t)
    assert lenient.failure is not None and "one by one" in caplog.text
    assert torch.equal(outs[0], 0.5 * x) and torch.equal(outs[1], -x)
    # Through sample(): auto falls back (same samples as sequential), True raises.
    kw = dict(shape=(2, 1, 3, 3), num_inference_steps=3, seed=0, progress=False)
    sched = KernelScheduler(KernelSchedulerConfig(kind="ddpm"))
    seq = msdda.sample(models, sched, MSDDA([0.5, 0.5]), batch_models=False, **kw)
    monkeypatch.setattr(batched_mod, "AUTO_BATCH_ON_CPU", True)
    auto = msdda.sample(models, sched, MSDDA([0.5, 0.5]), **kw)
    assert torch.equal(auto.samples, seq.samples) and auto.model_evals == seq.model_evals == 6
    with pytest.raises(BatchingError, match="under torch.func.vmap failed"):
        msdda.sample(models, sched, MSDDA([0.5, 0.5]), batch_models=True, **kw)


def test_model_input_errors_pass_through_unchanged():
    stacked = StackedDenoisers(_digits_models(2))
    with pytest.raises(msdda.errors.MSDDAError, match="expects x_t of shape"):
        stacked(torch.randn(2, 1, 4, 4), torch.zeros(2, dtype=torch.long))
    assert batched_mod.stack_for_sampling(_digits_models(1), None) is None  # one model: nothing to batch
    assert isinstance(batched_mod.stack_for_sampling(_digits_models(1), True), StackedDenoisers)
    with pytest.raises(BatchingError, match="batch_models must be True, False or None"):
        batched_mod.stack_for_sampling(_digits_models(2), "yes")  # type: ignore[arg-type]


def test_models_that_stop_being_stackable_raise_or_fall_back():
    models = _digits_models(2, DigitsDenoiserConfig(dropout=0.1))
    x, t = torch.randn(2, 1, 8, 8), torch.full((2,), 100)
    strict, lenient = StackedDenoisers(models), StackedDenoisers(models, fallback=True)
    for m in models:
        m.train()  # dropout is now random per model: vmap cannot reproduce it
    with pytest.raises(BatchingError, match="can no longer be evaluated as one batched call: .*Dropout"):
        strict(x, t)
    outs = lenient(x, t)  # falls back to one model at a time, for good
    assert lenient.failure is not None and "Dropout" in lenient.failure
    assert len(outs) == 2 and outs[0].shape == (2, 2, 8, 8)
