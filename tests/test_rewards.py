"""Rewards: protocol, validation, the differentiability default, registry, and the built-in digits rewards."""

from __future__ import annotations

import textwrap

import pytest
import torch

import msdda
import msdda.core
import msdda.rewards
from msdda.core.rewards import (
    DEFAULT_DIFFERENTIABLE,
    CheckedReward,
    FunctionReward,
    Reward,
    RewardError,
    is_differentiable,
    reward_name,
    validate_reward_output,
)
from msdda.errors import MSDDAError
from msdda.pipelines.errors import PipelineError, RewardModelError
from msdda.sampling import RGG, CoDe, StepRuleError
from msdda.tasks import rewards as reward_registry
from msdda.tasks.digits import DigitsClassifier, split_digits
from msdda.tasks.digits.rewards import AlignmentReward, InkReward, SymmetryReward
from msdda.tasks.gaussian import GaussianTask, OracleDenoiser
from msdda.tasks.rewards import available_rewards, get_reward, register_reward

# ---------------------------------------------------------------------------------- hand-built images


def _const(value: float, b: int = 2) -> torch.Tensor:
    return torch.full((b, 1, 8, 8), value)


def _one_corner_pixel() -> torch.Tensor:
    x = _const(-1.0, 1)
    x[0, 0, 0, 0] = 1.0
    return x


def test_ink_values() -> None:
    ink = InkReward()
    torch.testing.assert_close(ink(_const(-1.0), None), torch.zeros(2))
    torch.testing.assert_close(ink(_const(1.0), None), torch.ones(2))
    torch.testing.assert_close(ink(_const(0.0), None), torch.full((2,), 0.5))
    half = _const(-1.0, 1)
    half[..., :4] = 1.0  # left half inked
    torch.testing.assert_close(ink(half, None), torch.tensor([0.5]))
    torch.testing.assert_close(ink(_one_corner_pixel(), None), torch.tensor([1 / 64]))


def test_symmetry_values() -> None:
    sym = SymmetryReward()
    g = torch.Generator().manual_seed(0)
    left = torch.rand(3, 1, 8, 4, generator=g) * 2 - 1
    mirrored = torch.cat([left, left.flip(-1)], dim=-1)
    torch.testing.assert_close(sym(mirrored, None), torch.ones(3))
    # One inked corner pixel: |x - flip(x)| = 2 at two of 64 pixels -> 1 - (4/64)/2 = 0.96875.
    torch.testing.assert_close(sym(_one_corner_pixel(), None), torch.tensor([0.96875]))
    # Left half background, right half ink: every pixel differs from its mirror by 2 -> 0.
    halves = _const(-1.0, 1)
    halves[..., 4:] = 1.0
    torch.testing.assert_close(sym(halves, None), torch.tensor([0.0]))
    # Values stay in [0, 1] for images in [-1, 1].
    v = sym(torch.rand(64, 1, 8, 8, generator=g) * 2 - 1, None)
    assert float(v.min()) >= 0.0 and float(v.max()) <= 1.0


def test_ink_and_symmetry_gradients() -> None:
    x = (torch.rand(2, 1, 8, 8) * 2 - 1).requires_grad_(True)
    InkReward()(x, None).sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 1 / 128))  # d/dx of mean((x+1)/2) over 64 px
    x.grad = None
    SymmetryReward()(x, None).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    # Moving each pixel toward its mirror image increases symmetry: the gradient points that way.
    direction = x.detach().flip(-1) - x.detach()
    assert float((x.grad * direction).sum()) > 0


def test_builtins_satisfy_protocol() -> None:
    for r in (InkReward(), SymmetryReward(), AlignmentReward(classifier=DigitsClassifier())):
        assert isinstance(r, Reward)
        assert r.differentiable is True
    assert {InkReward.name, SymmetryReward.name, AlignmentReward.name} == {"ink", "symmetry", "alignment"}


# ------------------------------------------------------------------------------------------ alignment


def test_alignment_prefers_the_right_class() -> None:
    split = split_digits(seed=0)
    x, y = split.holdout_images, split.holdout_labels
    reward = get_reward("alignment")
    right = reward(x, y)
    wrong = reward(x, (y + 1) % 10)
    assert right.shape == (x.shape[0],)
    assert float(right.max()) <= 0.0  # log-probabilities
    assert float(right.mean()) > -0.1  # p(true class) ~ 0.9+ on average
    assert float(wrong.mean()) < -5.0
    assert float((right - wrong).mean()) > 5.0


def test_alignment_is_differentiable() -> None:
    split = split_digits(seed=0)
    x = split.holdout_images[:8].clone().requires_grad_(True)
    target = (split.holdout_labels[:8] + 3) % 10
    reward = AlignmentReward()
    reward(x, target).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    # The classifier is frozen: no gradient accumulates in it.
    assert all(p.grad is None and not p.requires_grad for p in reward.classifier.parameters())
    # A small step along the gradient raises the reward (first-order check).
    with torch.no_grad():
        before = reward(x, target)
        after = reward(x + 1e-3 * x.grad.sign(), target)
    assert float((after - before).mean()) > 0


def test_alignment_input_errors() -> None:
    reward = AlignmentReward(classifier=DigitsClassifier())
    x = torch.zeros(3, 1, 8, 8)
    with pytest.raises(RewardError, match="needs the prompted class labels"):
        reward(x, None)
    with pytest.raises(RewardError, match=r"batch index 2 is 10 \(the null"):
        reward(x, torch.tensor([1, 2, 10]))
    with pytest.raises(RewardError, match="batch index 0 is -1"):
        reward(x, torch.tensor([-1, 2, 3]))
    with pytest.raises(RewardError, match=r"shape \[B, 1, 8, 8\]"):
        reward(torch.zeros(3, 64), torch.tensor([1, 2, 3]))
    with pytest.raises(RewardError, match="integer tensor"):
        reward(x, torch.tensor([1.0, 2.0, 3.0]))


def test_alignment_explicit_classifier_and_missing_weights(tmp_path) -> None:
    torch.manual_seed(0)
    clf = DigitsClassifier().eval()
    reward = AlignmentReward(classifier=clf)
    x = torch.zeros(2, 1, 8, 8)
    expected = torch.log_softmax(clf(x), dim=1)[torch.arange(2), torch.tensor([4, 7])]
    torch.testing.assert_close(reward(x, torch.tensor([4, 7])), expected)
    missing = AlignmentReward(classifier_dir=tmp_path / "empty")
    with pytest.raises(RewardError, match="msdda train-classifier") as info:
        missing(x, torch.tensor([4, 7]))
    assert str(tmp_path / "empty") in str(info.value)
    with pytest.raises(RewardError, match="not both"):
        AlignmentReward(classifier=clf, classifier_dir=tmp_path)


# -------------------------------------------------------------------------------------- validation


def test_validate_reward_output_names_the_batch_index() -> None:
    values = torch.tensor([0.1, 0.2, 0.3, float("nan"), 0.5])
    with pytest.raises(RewardError, match=r"'r'.*batch index 3 \(nan\)"):
        validate_reward_output(values, 5, "r")
    values = torch.tensor([float("inf"), 0.0, float("-inf")])
    with pytest.raises(RewardError, match=r"index 0 \(inf\), index 2 \(-inf\)"):
        validate_reward_output(values, 3, "r")
    ok = torch.tensor([1.0, 2.0])
    assert validate_reward_output(ok, 2, "r") is ok


def test_validate_reward_output_names_shapes_and_types() -> None:
    with pytest.raises(RewardError, match=r"returned shape \[4, 1\], expected \[4\]"):
        validate_reward_output(torch.zeros(4, 1), 4, "r")
    with pytest.raises(RewardError, match=r"returned shape \[3\], expected \[4\]"):
        validate_reward_output(torch.zeros(3), 4, "r")
    with pytest.raises(RewardError, match="must return a torch.Tensor"):
        validate_reward_output([1.0, 2.0], 2, "r")
    with pytest.raises(RewardError, match="floating-point"):
        validate_reward_output(torch.tensor([1, 2]), 2, "r")
    assert issubclass(RewardError, MSDDAError) and issubclass(RewardError, ValueError)


def test_checked_reward_validates() -> None:
    def bad(x0: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        out = x0.flatten(1).mean(1)
        out[1] = float("nan")
        return out

    checked = get_reward(FunctionReward(bad, name="bad", differentiable=False))
    assert isinstance(checked, CheckedReward) and checked.name == "bad"
    with pytest.raises(RewardError, match="'bad'.*batch index 1"):
        checked(torch.zeros(3, 1, 8, 8), None)
    with pytest.raises(RewardError, match="batch size 3"):
        checked(torch.zeros(3, 1, 8, 8), torch.zeros(2))
    assert CheckedReward(checked).inner is checked.inner  # no double wrapping


# ---------------------------------------------------------------------------------------- registry


def test_available_and_get_builtin_rewards() -> None:
    names = available_rewards()
    assert {"alignment", "ink", "symmetry"} <= set(names)
    ink = get_reward("ink")
    assert isinstance(ink, CheckedReward) and ink.name == "ink" and ink.differentiable
    torch.testing.assert_close(ink(_const(1.0, 3), None), torch.ones(3))


def test_unknown_reward_lists_valid_names() -> None:
    with pytest.raises(RewardError, match="unknown reward 'inkk'; valid names are .*alignment, contrast, ink, smoothness, symmetry, template"):
        get_reward("inkk")


def test_register_reward_and_errors() -> None:
    name = "test_constant_reward"

    class Const:
        differentiable = False

        def __init__(self, value: float = 1.0) -> None:
            self.value = value
            self.name = name

        def __call__(self, x0: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
            return torch.full((x0.shape[0],), self.value)

    try:
        register_reward(name, Const)
        assert name in available_rewards()
        torch.testing.assert_close(get_reward(name, value=2.5)(torch.zeros(2, 1, 8, 8), None), torch.full((2,), 2.5))
        with pytest.raises(RewardError, match="already registered"):
            register_reward(name, lambda: Const(3.0))
        register_reward(name, lambda: Const(3.0), overwrite=True)
        torch.testing.assert_close(get_reward(name)(torch.zeros(1, 1, 8, 8), None), torch.tensor([3.0]))
        with pytest.raises(RewardError, match="cannot build reward"):
            get_reward(name, nonsense=1)
    finally:
        reward_registry._REGISTRY.pop(name, None)
    with pytest.raises(RewardError, match="without ':'"):
        register_reward("mod:fn", Const)


def test_module_function_spec(tmp_path, monkeypatch) -> None:
    (tmp_path / "my_user_rewards.py").write_text(
        textwrap.dedent(
            """
            import torch

            def brightness(x0, cond):
                return x0.flatten(1).mean(1)

            def smooth(x0, cond):
                return -(x0[..., 1:] - x0[..., :-1]).square().flatten(1).mean(1)
            smooth.differentiable = True

            def count(x0, cond):
                return (x0 > 0).flatten(1).float().sum(1)
            count.differentiable = False

            def broken(x0, cond):
                return torch.zeros(x0.shape[0], 2)

            NOT_CALLABLE = 3
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    r = get_reward("my_user_rewards:brightness")
    # A plain function without the attribute gets the one default (msdda.core.rewards.is_differentiable).
    assert r.name == "my_user_rewards:brightness" and r.differentiable is DEFAULT_DIFFERENTIABLE is True
    torch.testing.assert_close(r(_const(0.25, 2), None), torch.full((2,), 0.25))
    assert get_reward("my_user_rewards:smooth").differentiable is True
    assert get_reward("my_user_rewards:count").differentiable is False
    named = get_reward("my_user_rewards:brightness", name="bright", differentiable=False)
    assert named.name == "bright" and named.differentiable is False
    assert get_reward("my_user_rewards:count", differentiable=True).differentiable is True  # the option wins
    with pytest.raises(RewardError, match=r"returned shape \[2, 2\], expected \[2\]"):
        get_reward("my_user_rewards:broken")(_const(0.0), None)
    with pytest.raises(RewardError, match="has no attribute 'missing'"):
        get_reward("my_user_rewards:missing")
    with pytest.raises(RewardError, match="not a callable reward"):
        get_reward("my_user_rewards:NOT_CALLABLE")
    with pytest.raises(RewardError, match="cannot import module 'no_such_module_xyz'"):
        get_reward("no_such_module_xyz:f")
    # A class in a spec is instantiated; built-ins are reachable this way too.
    sym = get_reward("msdda.tasks.digits.rewards:SymmetryReward")
    assert sym.name == "symmetry"
    torch.testing.assert_close(sym(_const(1.0), None), torch.ones(2))


# ------------------------------------------------------------------------------ one layer, one default


def test_one_public_path_one_error_type() -> None:
    # The user-facing path msdda.rewards re-exports the same objects; nothing is redefined there.
    assert msdda.rewards.get_reward is get_reward and msdda.rewards.InkReward is InkReward
    assert msdda.rewards.RewardError is msdda.core.RewardError is RewardError
    assert msdda.rewards.validate_reward_output is msdda.core.validate_reward_output
    # The pipelines' reward error is a RewardError too, and still a PipelineError for old callers.
    assert issubclass(RewardModelError, RewardError) and issubclass(RewardModelError, PipelineError)


class _Plain:
    def __call__(self, x0: torch.Tensor, cond: object = None) -> torch.Tensor:
        return x0.flatten(1).sum(1)


class _Declared(_Plain):
    name = "declared"

    def __init__(self, differentiable: object) -> None:
        self.differentiable = differentiable


def test_is_differentiable_has_one_default() -> None:
    assert DEFAULT_DIFFERENTIABLE is True
    assert is_differentiable(_Plain()) is True  # no attribute: the default
    assert is_differentiable(lambda x0, cond: x0.sum(1)) is True
    assert is_differentiable(_Declared(None)) is True  # None means "not declared"
    assert is_differentiable(_Declared(False)) is False
    assert is_differentiable(_Declared(True)) is True
    # Every wrapper reads it the same way.
    assert CheckedReward(_Plain()).differentiable is True
    assert CheckedReward(_Declared(False)).differentiable is False
    assert FunctionReward(_Plain(), name="p").differentiable is True
    assert FunctionReward(_Declared(False), name="d").differentiable is False
    assert FunctionReward(_Declared(False), name="d", differentiable=True).differentiable is True


def test_reward_name() -> None:
    assert reward_name(_Declared(True)) == "declared"
    assert reward_name(_Plain(), "reward 1") == "reward 1"
    assert reward_name(_Plain()) == "_Plain"
    assert CheckedReward(_Plain()).name == "_Plain"
    assert isinstance(_Plain(), Reward)  # the protocol needs only the call


def test_validate_reward_output_error_subclass_and_messages() -> None:
    class Custom(RewardError):
        pass

    with pytest.raises(Custom, match=r"reward 'r' returned shape \[3\], expected \[4\] for a batch of 4"):
        validate_reward_output(torch.zeros(3), 4, "r", error=Custom)
    values = torch.full((12,), float("nan"))
    with pytest.raises(RewardError, match=r"index 7 \(nan\) and 4 more; check the samples") as info:
        validate_reward_output(values, 12, "r")
    assert "index 8" not in str(info.value)  # at most eight indices are listed


TASK = GaussianTask.default(dim=2, num_objectives=2, seed=0)


def _sample(rule: object) -> torch.Tensor:
    return msdda.sample([OracleDenoiser(TASK, None)], TASK.scheduler, rule, shape=(8, 2), dtype=torch.float64,
                        num_inference_steps=4, seed=0, progress=False).samples


def _wrong_shape(x0: torch.Tensor, cond: object = None) -> torch.Tensor:
    return torch.zeros(x0.shape[0], 1, dtype=x0.dtype)


def _nan_at_2(x0: torch.Tensor, cond: object = None) -> torch.Tensor:
    out = TASK.step_reward(0, x0).clone()
    out[2] = float("nan")
    return out


def test_guided_rules_validate_rewards_with_the_one_validator() -> None:
    # Same type and message as validate_reward_output, whichever rule calls the reward.
    for rule in (CoDe([_wrong_shape], [1.0], num_candidates=2, block_size=1), RGG([_wrong_shape], [1.0])):
        with pytest.raises(RewardError, match=r"reward 'reward 0' returned shape \[8, 1\], expected \[8\]"):
            _sample(rule)
    named = FunctionReward(_nan_at_2, name="nan-at-2")
    with pytest.raises(RewardError, match=r"reward 'nan-at-2' returned non-finite values at batch index 2 \(nan\)"):
        _sample(CoDe([named], [1.0], num_candidates=2, block_size=1))


def test_rgg_default_is_safe_for_undeclared_non_differentiable_rewards() -> None:
    def detached(x0: torch.Tensor, cond: object = None) -> torch.Tensor:
        return TASK.step_reward(0, x0.detach())

    rule = RGG([detached], [1.0])  # no attribute: assumed differentiable, so it is accepted here ...
    with pytest.raises(StepRuleError, match="no gradient w.r.t. x_t .* mark such a reward `differentiable = False`"):
        _sample(rule)  # ... and refused with the cause at the first step
    detached.differentiable = False  # type: ignore[attr-defined]
    with pytest.raises(StepRuleError, match="RGG needs differentiable rewards; 'reward 0' is not"):
        RGG([detached], [1.0])
