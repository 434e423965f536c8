"""Rewards: protocol, validation, registry, and the built-in digits rewards on hand-built images."""

from __future__ import annotations

import textwrap

import pytest
import torch

from msdda.errors import MSDDAError
from msdda.rewards import (
    AlignmentReward,
    CheckedReward,
    InkReward,
    Reward,
    RewardError,
    SymmetryReward,
    available_rewards,
    get_reward,
    register_reward,
    validate_reward_output,
)
from msdda.rewards import base as reward_base
from msdda.tasks.digits import DigitsClassifier, split_digits

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

    checked = get_reward(reward_base.FunctionReward(bad, name="bad", differentiable=False))
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
    with pytest.raises(RewardError, match="unknown reward 'inkk'; valid names are .*alignment, ink, symmetry"):
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
        reward_base._REGISTRY.pop(name, None)
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

            def broken(x0, cond):
                return torch.zeros(x0.shape[0], 2)

            NOT_CALLABLE = 3
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    r = get_reward("my_user_rewards:brightness")
    assert r.name == "my_user_rewards:brightness" and r.differentiable is False
    torch.testing.assert_close(r(_const(0.25, 2), None), torch.full((2,), 0.25))
    assert get_reward("my_user_rewards:smooth").differentiable is True
    named = get_reward("my_user_rewards:brightness", name="bright", differentiable=True)
    assert named.name == "bright" and named.differentiable is True
    with pytest.raises(RewardError, match=r"returned shape \[2, 2\], expected \[2\]"):
        get_reward("my_user_rewards:broken")(_const(0.0), None)
    with pytest.raises(RewardError, match="has no attribute 'missing'"):
        get_reward("my_user_rewards:missing")
    with pytest.raises(RewardError, match="not a callable reward"):
        get_reward("my_user_rewards:NOT_CALLABLE")
    with pytest.raises(RewardError, match="cannot import module 'no_such_module_xyz'"):
        get_reward("no_such_module_xyz:f")
    # A class in a spec is instantiated; built-ins are reachable this way too.
    sym = get_reward("msdda.rewards.digits:SymmetryReward")
    assert sym.name == "symmetry"
    torch.testing.assert_close(sym(_const(1.0), None), torch.ones(2))
