"""Alignment layer: hybrid loss, step-level DPO loss and gradient, checkpoints, real-interruption resume."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY, tiny_model
from msdda.alignment import (
    AlignmentError,
    BaseTrainConfig,
    CheckpointError,
    DPOConfig,
    check_reward_values,
    dpo_loss,
    hybrid_loss,
    train_diffusion,
    training_scheduler_config,
)
from msdda.alignment.dpo import DPOBatch, DPOTrainer, train_dpo
from msdda.core import GaussianKernel, KernelScheduler
from msdda.models.io import save_pretrained
from msdda.tasks.digits import DigitsDenoiserConfig
from msdda.tasks.digits.training import MODEL_TYPE, align_digits, class_conditions, load_digits_model

REPO = Path(__file__).resolve().parents[1]


def _tiny_dpo(**kw) -> DPOConfig:
    base = dict(reward="ink", beta=0.5, steps=2, lr=1e-3, trajectories=2, states_per_trajectory=2, candidates=3,
                num_inference_steps=4, checkpoint_every=1, log_every=1, eval_samples=4)
    base.update(kw)
    return DPOConfig(**base)


def _ink(x0, cond):
    return ((x0 + 1) / 2).flatten(1).mean(1)


# ------------------------------------------------------------------------------------------ hybrid loss
def _normal_cdf(x):
    return 0.5 * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def test_hybrid_loss_matches_independent_numpy_computation():
    T = 1000
    betas = np.linspace(1e-4, 0.02, T)
    ab = np.cumprod(1 - betas)
    g = torch.Generator().manual_seed(0)
    b = 3
    x0 = (torch.randint(0, 17, (b, 1, 2, 2), generator=g).float() / 8 - 1)
    noise = torch.randn(b, 1, 2, 2, generator=g)
    t = torch.tensor([0, 1, 500])
    out = torch.randn(b, 2, 2, 2, generator=g) * 0.5
    sched = KernelScheduler(training_scheduler_config())
    x_t = sched.add_noise(x0, noise, t)
    loss = hybrid_loss(out, x0, x_t, noise, t, sched, vlb_weight=0.001, data_levels=17)

    X0, XT, N, OUT = (a.double().numpy() for a in (x0, x_t, noise, out))
    mse = np.mean((OUT[:, :1] - N) ** 2)
    vlb = []
    for i, ti in enumerate(t.tolist()):
        a_t = ab[ti]
        a_p = ab[ti - 1] if ti > 0 else 1.0
        beta_t = 1 - a_t / a_p
        post_var = max((1 - a_p) / (1 - a_t) * beta_t, 1e-20)
        frac = (OUT[i, 1:] + 1) / 2
        var = np.exp(frac * np.log(beta_t) + (1 - frac) * np.log(post_var))
        x0_hat = (XT[i] - np.sqrt(1 - a_t) * OUT[i, :1]) / np.sqrt(a_t)
        c0 = np.sqrt(a_p) * beta_t / (1 - a_t)
        ct = np.sqrt(a_t / a_p) * (1 - a_p) / (1 - a_t)
        mean = c0 * x0_hat + ct * XT[i]
        if ti == 0:
            x = X0[i]
            s = np.sqrt(var)
            up = _normal_cdf((x - mean + 1 / 16) / s)
            lo = _normal_cdf((x - mean - 1 / 16) / s)
            p = np.where(x < -0.999, up, np.where(x > 0.999, 1 - lo, up - lo))
            vlb.append(np.mean(-np.log(np.maximum(p, 1e-12))) / math.log(2))
        else:
            q_mean = c0 * X0[i] + ct * XT[i]
            kl = 0.5 * (post_var / var + (q_mean - mean) ** 2 / var - 1 + np.log(var) - np.log(post_var))
            vlb.append(np.mean(kl) / math.log(2))
    vlb = np.array(vlb)
    np.testing.assert_allclose(loss.mse.item(), mse, rtol=1e-5)
    np.testing.assert_allclose(loss.vlb.detach().numpy(), vlb, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(loss.total.item(), mse + 0.001 * T * vlb.mean(), rtol=1e-4)


def test_hybrid_loss_vlb_trains_only_the_variance():
    sched = KernelScheduler(training_scheduler_config())
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(4, 1, 2, 2, generator=g) * 2 - 1
    noise = torch.randn(4, 1, 2, 2, generator=g)
    t = torch.tensor([3, 10, 200, 900])
    x_t = sched.add_noise(x0, noise, t)
    out = torch.randn(4, 2, 2, 2, generator=g).requires_grad_(True)
    loss = hybrid_loss(out, x0, x_t, noise, t, sched)
    loss.vlb.sum().backward()
    assert out.grad[:, :1].abs().max() == 0  # stop-gradient on the mean
    assert out.grad[:, 1:].abs().max() > 0


def test_train_diffusion_is_deterministic_and_config_round_trips():
    cfg = BaseTrainConfig(steps=2, batch_size=8, warmup_steps=1, seed=3)
    assert BaseTrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    images = torch.rand(16, 1, 8, 8) * 2 - 1
    labels = torch.arange(16) % 10
    a, _ = train_diffusion(tiny_model(), images, labels, cfg, null_class=10, progress=False)
    b, _ = train_diffusion(tiny_model(), images, labels, cfg, null_class=10, progress=False)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k
    with pytest.raises(AlignmentError, match="label_dropout"):
        BaseTrainConfig(label_dropout=1.5)


# ------------------------------------------------------------------------------------------ DPO loss
def test_dpo_loss_equals_hand_computation():
    pol = GaussianKernel(torch.tensor([[0.1, -0.2]]), torch.tensor([[0.5, 0.3]]))
    ref = GaussianKernel(torch.tensor([[0.0, 0.0]]), torch.tensor([[0.4, 0.4]]))
    xw, xl = torch.tensor([[0.3, -0.1]]), torch.tensor([[-0.5, 0.6]])

    def logn(x, m, v):
        return sum(-0.5 * ((xi - mi) ** 2 / vi + math.log(2 * math.pi * vi)) for xi, mi, vi in zip(x, m, v, strict=True))

    beta = 0.7
    m_p, v_p, m_r, v_r = [0.1, -0.2], [0.5, 0.3], [0.0, 0.0], [0.4, 0.4]
    h = beta * ((logn([0.3, -0.1], m_p, v_p) - logn([0.3, -0.1], m_r, v_r))
                - (logn([-0.5, 0.6], m_p, v_p) - logn([-0.5, 0.6], m_r, v_r)))
    expected = -math.log(1 / (1 + math.exp(-h)))
    got = dpo_loss(pol.log_prob(xw), ref.log_prob(xw), pol.log_prob(xl), ref.log_prob(xl), beta)
    assert got.shape == (1,)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_dpo_gradient_raises_the_winner_log_ratio():
    ref = GaussianKernel(torch.zeros(1, 3), torch.full((1, 3), 0.5))
    mean = torch.zeros(1, 3, requires_grad=True)
    log_var = torch.full((1, 3), math.log(0.5), requires_grad=True)
    xw, xl = torch.tensor([[0.4, 0.2, -0.1]]), torch.tensor([[-0.6, 0.1, 0.3]])

    def ratios():
        pol = GaussianKernel(mean, log_var.exp())
        return pol.log_prob(xw) - ref.log_prob(xw), pol.log_prob(xl) - ref.log_prob(xl)

    rw0, rl0 = (r.item() for r in ratios())
    assert rw0 == rl0 == 0.0
    opt = torch.optim.SGD([mean, log_var], lr=0.05)
    rw, rl = ratios()
    dpo_loss(rw + ref.log_prob(xw), ref.log_prob(xw), rl + ref.log_prob(xl), ref.log_prob(xl), 1.0).sum().backward()
    opt.step()
    rw1, rl1 = (r.item() for r in ratios())
    assert rw1 > 0 > rl1


# ------------------------------------------------------------------------------------- reward checks
@pytest.mark.parametrize(
    "values, match",
    [
        (torch.zeros(3), r"shape \[3\].*batch of 4"),
        (torch.tensor([0.0, 1.0, float("nan"), 2.0]), "batch index 2"),
        (torch.tensor([0.0, float("inf"), 1.0, 2.0]), "batch index 1"),
        (torch.tensor([0, 1, 2, 3]), "floating-point"),
        ([0.0] * 4, "Tensor"),
    ],
)
def test_reward_values_are_validated(values, match):
    with pytest.raises(AlignmentError, match=match):
        check_reward_values(values, 4, "r")


def test_training_with_a_bad_reward_names_the_batch_index(tiny_base, tmp_path):
    def bad(x0, cond):
        r = _ink(x0, cond)
        r[1] = float("nan")
        return r

    with pytest.raises(AlignmentError, match="batch index 1"):
        align_digits(bad, tmp_path / "run", _tiny_dpo(), base=tiny_base, progress=False)


# --------------------------------------------------------------------------------------- checkpoints
def _trainer(tmp_path, policy, cfg) -> DPOTrainer:
    return DPOTrainer(policy, tiny_model(), KernelScheduler(training_scheduler_config()), _ink, cfg, out=tmp_path,
                      sample_shape=(1, 8, 8), cond_sampler=class_conditions, null_cond=torch.tensor([10]))


def test_checkpoint_round_trip(tmp_path):
    cfg = _tiny_dpo()
    trainer = _trainer(tmp_path, tiny_model(), cfg)
    model, opt, gen = trainer.module, trainer.optimizer, trainer.generators[0]
    model(torch.randn(2, 1, 8, 8), torch.tensor([1, 2]), torch.tensor([0, 1])).square().mean().backward()
    opt.step()
    torch.randn(3, generator=gen)
    path = trainer.save_checkpoint(7, 1.5)
    assert path == tmp_path / "checkpoints" / "step-000007"
    assert not list(path.parent.glob(".tmp*"))

    trainer2 = _trainer(tmp_path, tiny_model(seed=1), cfg)
    model2, opt2, gen2 = trainer2.module, trainer2.optimizer, trainer2.generators[0]
    step, elapsed = trainer2.load_checkpoint(path)
    assert (step, elapsed) == (7, 1.5)
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for pid in s1["state"]:
        for key, val in s1["state"][pid].items():
            assert torch.equal(torch.as_tensor(val), torch.as_tensor(s2["state"][pid][key]))
    assert torch.equal(torch.randn(4, generator=gen), torch.randn(4, generator=gen2))
    with pytest.raises(CheckpointError, match="beta"):
        _trainer(tmp_path, tiny_model(seed=1), _tiny_dpo(beta=0.9)).load_checkpoint(path)


@pytest.mark.parametrize("labels", ["hard", "bt", "listwise"])
def test_dpo_trainer_collects_pairs_and_a_finite_loss(tmp_path, labels):
    trainer = _trainer(tmp_path, tiny_model(), _tiny_dpo(labels=labels))
    batch = trainer.collect(0)
    assert isinstance(batch, DPOBatch) and len(batch.states) == 4  # 2 trajectories x 2 states
    assert batch.x_w.shape == batch.x_l.shape == (4, 1, 8, 8) and batch.logref_w.dtype == torch.float64
    if labels != "hard":  # soft labels keep every candidate: 3 per state
        assert batch.candidates.shape == (4, 3, 1, 8, 8) and batch.rewards.shape == batch.logref.shape == (4, 3)
        rows = torch.arange(4)
        assert torch.equal(batch.candidates[rows, batch.rewards.argmax(1)], batch.x_w)
    trainer.train_guided = trainer.policy_guided  # what `train` builds (DDP-wrapped on several processes)
    out = trainer.loss([batch])
    assert out.loss.ndim == 0 and torch.isfinite(out.loss) and out.loss.requires_grad
    with torch.no_grad():  # as `train` calls it
        stats = trainer.statistics(out)
    assert set(stats) == {"loss", "pair_accuracy", "reward_gap", "logratio_w", "logratio_l", "calibration_slope"}
    assert not any(tmp_path.iterdir())  # nothing is written before train()


def test_dpo_label_rule_is_checked():
    with pytest.raises(AlignmentError, match="labels='soft'.*bt"):
        _tiny_dpo(labels="soft")
    assert DPOConfig().labels == "bt" and DPOConfig.from_dict(DPOConfig(labels="hard").to_dict()).labels == "hard"


def test_loading_another_architecture_or_task_fails_clearly(tiny_base, tmp_path):
    with pytest.raises(CheckpointError, match="base_channels"):
        load_digits_model(tiny_base, expected_architecture=DigitsDenoiserConfig().to_dict())
    other = tmp_path / "other_task"
    save_pretrained(tiny_model(), other, model_type=MODEL_TYPE, task="faces", architecture=TINY.to_dict())
    with pytest.raises(CheckpointError, match="task 'faces'"):
        load_digits_model(other)
    lying = tmp_path / "lying"  # config says default architecture, tensors are tiny
    save_pretrained(tiny_model(), lying, model_type=MODEL_TYPE, task="digits",
                    architecture=DigitsDenoiserConfig().to_dict())
    with pytest.raises(CheckpointError, match="does not match the model architecture"):
        load_digits_model(lying)
    with pytest.raises(CheckpointError, match="not a model directory"):
        load_digits_model(tmp_path / "missing")


def test_dpo_changes_the_policy_and_logs(tiny_base, tmp_path):
    res = align_digits(_ink, tmp_path / "run", _tiny_dpo(), base=tiny_base, progress=False)
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [0, 1, 2]
    assert log[0]["eval_kl_per_step"] == 0.0 and log[-1]["eval_kl_per_step"] > 0
    assert {"loss", "eval_reward", "eval_kl_per_step", "pair_accuracy"} <= set(log[-1])
    ref, _ = load_digits_model(tiny_base)
    assert any(not torch.equal(a, b) for a, b in zip(res.model.state_dict().values(), ref.state_dict().values(), strict=True))
    model, doc = load_digits_model(tmp_path / "run", expected_architecture=TINY.to_dict())
    assert doc["metadata"]["dpo_config"]["beta"] == 0.5


def test_lora_option_trains_adapters_and_saves_a_merged_model(tiny_base, tmp_path):
    res = align_digits(_ink, tmp_path / "lora", _tiny_dpo(lora=True, lora_rank=2, steps=1), base=tiny_base,
                       progress=False)
    ref, _ = load_digits_model(tiny_base)
    assert set(res.model.state_dict()) == set(ref.state_dict())
    load_digits_model(tmp_path / "lora", expected_architecture=TINY.to_dict())


def test_train_dpo_requires_trainable_parameters(tiny_base, tmp_path):
    ref, _ = load_digits_model(tiny_base)
    frozen, _ = load_digits_model(tiny_base)
    with pytest.raises(AlignmentError, match="no trainable parameters"):
        train_dpo(frozen, ref, KernelScheduler(training_scheduler_config()), _ink, _tiny_dpo(), out=tmp_path,
                  sample_shape=(1, 8, 8), cond_sampler=class_conditions, null_cond=torch.tensor([10]))


# ------------------------------------------------------------------------- real-interruption resume
def _align_cmd(base: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "msdda.cli", "align", "--task", "digits", "--reward", "ink", "--beta", "0.5",
            "--steps", "6", "--out", str(out), "--base", str(base), "--lr", "1e-3", "--trajectories", "2",
            "--states", "2", "--candidates", "3", "--checkpoint-every", "2", "--log-every", "2",
            "--eval-samples", "4", "--quiet", *extra]


def test_resume_after_a_real_kill_matches_an_uninterrupted_run(tiny_base, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    full, cut = tmp_path / "full", tmp_path / "cut"
    subprocess.run(_align_cmd(tiny_base, full), check=True, env=env, cwd=REPO, capture_output=True)

    proc = subprocess.Popen(_align_cmd(tiny_base, cut, "--throttle", "0.5"), env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not list((cut / "checkpoints").glob("step-*/state.json")):
        assert proc.poll() is None, "the run ended before its first checkpoint"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (cut / "model.safetensors").exists(), "the run finished before it was killed"

    subprocess.run(_align_cmd(tiny_base, cut, "--resume"), check=True, env=env, cwd=REPO, capture_output=True)
    a = load_file(str(full / "model.safetensors"))
    b = load_file(str(cut / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    assert [json.loads(x)["step"] for x in (cut / "train_log.jsonl").read_text().splitlines()] == [0, 2, 4, 6]


def test_cli_train_base_tiny(tmp_path):
    from typer.testing import CliRunner

    from msdda.cli import app

    res = CliRunner().invoke(app, ["train-base", "--out", str(tmp_path / "b"), "--seed", "1", "--steps", "2",
                                   "--batch-size", "4", "--quiet"])
    assert res.exit_code == 0, res.output
    model, doc = load_digits_model(tmp_path / "b")
    assert doc["metadata"]["train_config"]["seed"] == 1 and doc["metadata"]["kind"] == "base"


def test_shipped_weights_load_and_share_the_base_architecture():
    from msdda.tasks.digits.bundle import SHIPPED_OBJECTIVES
    from msdda.tasks.digits.training import load_digits_models, shipped_dir

    names = ["base", *(f"aligned-{o}" for o in SHIPPED_OBJECTIVES)]
    if not all((shipped_dir(n) / "model.safetensors").exists() for n in names):
        pytest.skip("weights not shipped")
    models, sched = load_digits_models([shipped_dir(n) for n in names])
    assert sched.config.variance_type == "learned_range" and len(models) == 1 + len(SHIPPED_OBJECTIVES)
