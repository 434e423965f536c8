"""Where the step trainers take their training states from: the policy's, the reference's or both trajectories."""

from __future__ import annotations

import pytest
import torch

from msdda.alignment.errors import AlignmentError
from msdda.alignment.step_rl import StepRLConfig, StepRLTrainer
from msdda.tasks.gaussian import OracleDenoiser, OraclePolicy, gaussian_bundle


def _reward(x, cond=None):
    return -(x * x).sum(-1)


_reward.differentiable = True


def _trainer(tmp_path, policy, task, **cfg):
    config = StepRLConfig(trajectories=6, states_per_trajectory=3, num_inference_steps=10, seed=3, **cfg)
    return StepRLTrainer(policy, OracleDenoiser(task), task.scheduler, _reward, config, out=tmp_path,
                         sample_shape=(2,), cond_sampler=lambda n, g: None, null_cond=None, clip_samples=False)


def _moved_policy(task):
    policy = OraclePolicy(task)
    with torch.no_grad():
        policy.shift.fill_(3.0)  # far from the reference: its trajectories are visibly elsewhere
    return policy


def test_reference_states_are_the_reference_trajectories(tmp_path):
    task = gaussian_bundle().base.task
    as_reference = _trainer(tmp_path / "a", OraclePolicy(task), task).sample_states(0)  # fresh head = reference
    from_reference = _trainer(tmp_path / "b", _moved_policy(task), task, state_source="reference").sample_states(0)
    torch.testing.assert_close(from_reference.x, as_reference.x, rtol=1e-12, atol=1e-12)
    assert torch.equal(from_reference.t, as_reference.t)
    on_policy = _trainer(tmp_path / "c", _moved_policy(task), task).sample_states(0)
    assert (on_policy.x - as_reference.x).abs().max() > 1.0


def test_mixed_states_take_half_from_each(tmp_path):
    task = gaussian_bundle().base.task
    mixed = _trainer(tmp_path, _moved_policy(task), task, state_source="mixed")
    states = mixed.sample_states(0)
    assert states.x.shape == (18, 2) and states.t.shape == (18,)
    # the policy's trajectories (first 3) drift towards its shifted means, the reference's (last 3) do not
    policy_rows, reference_rows = states.x[:9], states.x[9:]
    assert policy_rows.mean() > reference_rows.mean() + 1.0


def test_antithetic_draws_are_paired(tmp_path):
    with pytest.raises(AlignmentError, match="samples=3: antithetic draws come in pairs"):
        StepRLConfig(antithetic=True, samples=3)
    task = gaussian_bundle().base.task
    batch = _trainer(tmp_path, OraclePolicy(task), task, antithetic=True, samples=4).collect(0)
    torch.testing.assert_close(batch.noise[:, 2:], -batch.noise[:, :2], rtol=0, atol=0)


def test_unknown_source_is_refused_and_old_configs_load_on_policy():
    with pytest.raises(AlignmentError, match="state_source='fused'; choose one of policy, reference, mixed"):
        StepRLConfig(state_source="fused")
    doc = StepRLConfig().to_dict()
    doc.pop("state_source")
    assert StepRLConfig.from_dict(doc).state_source == "policy"


def test_trainable_trains_only_the_named_parameters(tmp_path):
    """trainable=["offset_head"]: the digits trunk and its noise prediction stay the reference's exactly."""
    from msdda.tasks.digits.network import DigitsDenoiser, DigitsDenoiserConfig, with_kernel_offsets
    from msdda.tasks.digits.training import digits_scheduler

    torch.manual_seed(0)
    arch = DigitsDenoiserConfig(base_channels=8, channel_mult=(1, 2), num_groups=4)
    reference = DigitsDenoiser(arch)
    for p in reference.parameters():
        torch.nn.init.normal_(p, std=0.05)
    policy = with_kernel_offsets(reference)
    before = {k: v.clone() for k, v in policy.state_dict().items()}

    def ink(x0, cond=None):
        return x0.flatten(1).mean(1)

    ink.differentiable = True
    config = StepRLConfig(steps=3, lr=1e-2, trajectories=2, states_per_trajectory=2, num_inference_steps=5,
                          checkpoint_every=3, log_every=3, eval_samples=2, trainable=["offset_head"])
    StepRLTrainer(policy, reference, digits_scheduler(), ink, config, out=tmp_path, sample_shape=(1, 8, 8),
                  cond_sampler=lambda n, g: torch.randint(0, 10, (n,), generator=g),
                  null_cond=torch.tensor([10])).train()
    after = policy.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(k.startswith("offset_head.") for k in moved)
    x, t, c = torch.randn(2, 1, 8, 8), torch.tensor([900, 20]), torch.tensor([3, 4])
    assert torch.equal(policy(x, t, c)[:, :2], reference(x, t, c))


def test_trainable_names_are_checked(tmp_path):
    with pytest.raises(AlignmentError, match="trainable=\\[\\] must be None"):
        StepRLConfig(trainable=[])
    with pytest.raises(AlignmentError, match="exclude each other"):
        StepRLConfig(trainable=["offset_head"], lora=True)
    task = gaussian_bundle().base.task
    with pytest.raises(AlignmentError, match=r"\['nope'\] name no parameter of the policy \(top-level: "):
        _trainer(tmp_path, OraclePolicy(task), task, trainable=["nope"])


def test_recipes_build_the_documented_configs():
    from msdda.alignment.dpo import DPOConfig
    from msdda.evaluation import digits_demo

    sym = digits_demo.recipe_config("symmetry")
    assert isinstance(sym, DPOConfig) and sym.labels == "hard" and digits_demo.recipe_offset_head("symmetry") == {}
    # the demo's rewards: step-RL of the offset head alone, one recipe but for beta
    for name, beta in (("ink", 0.05), ("template", 0.0625), ("contrast", 0.05)):
        cfg = digits_demo.recipe_config(name, seed=3)
        assert isinstance(cfg, StepRLConfig)
        assert digits_demo.recipe_offset_head(name) == {"kernel_offsets": True, "offset_head_ranges": [200, 600]}
        assert (cfg.reward, cfg.beta, cfg.seed, cfg.trainable, cfg.state_weights, cfg.lr_schedule) == (
            name, beta, 3, ["offset_head"], "inverse_variance", "cosine")
        assert (cfg.samples, cfg.antithetic, cfg.steps, cfg.lr, cfg.estimator) == (32, True, 600, 3e-3, "reparam")
    assert isinstance(digits_demo.recipe_config("smoothness"), DPOConfig)  # no recipe: Bradley-Terry DPO


def test_importance_sampled_optimum_matches_the_closed_form():
    """Linear reward c.x on N(m, v): p* = N(m + v c / beta, v); the self-normalised fit recovers it."""
    from msdda.alignment.step_rl import importance_sampled_optimum

    g = torch.Generator().manual_seed(0)
    n, k, d, beta = 3, 20000, 4, 0.5
    m = torch.randn(n, d, generator=g, dtype=torch.float64)
    v = torch.full((n, d), 0.3, dtype=torch.float64)
    c = torch.tensor([0.2, -0.1, 0.05, 0.0], dtype=torch.float64)
    draws = m[:, None] + v.sqrt()[:, None] * torch.randn(n, k, d, generator=g, dtype=torch.float64)
    fit = importance_sampled_optimum(draws, draws @ c, beta)
    torch.testing.assert_close(fit.mean, m + v * c / beta, atol=0.02, rtol=0)
    torch.testing.assert_close(fit.var, v, atol=0.02, rtol=0)
    with pytest.raises(AlignmentError, match="samples=1: the moment estimator needs >= 2"):
        StepRLConfig(estimator="moment", samples=1)
