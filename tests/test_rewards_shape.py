"""The template, contrast and smoothness rewards of the digits task: values on hand-built images, gradients
against closed forms, curvature signs, conditions and input errors."""

from __future__ import annotations

import pytest
import torch

from msdda.core.rewards import RewardError
from msdda.tasks.digits import class_mean_images, split_digits
from msdda.tasks.digits.rewards import ContrastReward, SmoothnessReward, TemplateReward
from msdda.tasks.rewards import get_reward


def _const(value: float, b: int = 2) -> torch.Tensor:
    return torch.full((b, 1, 8, 8), value)


def test_class_means_are_the_train_split_means() -> None:
    split = split_digits(seed=0)
    means = class_mean_images()
    assert means.shape == (10, 1, 8, 8)
    for c in (0, 7):
        torch.testing.assert_close(means[c], split.train_images[split.train_labels == c].mean(0))
    means[0] += 1  # a copy: the reward's templates are not changed by the caller
    torch.testing.assert_close(class_mean_images()[0], split.train_images[split.train_labels == 0].mean(0))


def test_template_values_and_gradient() -> None:
    reward = TemplateReward()
    means = class_mean_images()
    cond = torch.tensor([3, 8])
    torch.testing.assert_close(reward(means[cond], cond), torch.zeros(2))
    x = means[cond] + 0.5  # every pixel 0.5 away
    torch.testing.assert_close(reward(x, cond), torch.full((2,), -0.25))
    # Another class's template scores -mean((m_a - m_b)^2).
    expected = -(means[3] - means[8]).square().mean()
    torch.testing.assert_close(reward(means[torch.tensor([8])], torch.tensor([3])), expected[None])
    x = torch.randn(2, 1, 8, 8, requires_grad=True)
    reward(x, cond).sum().backward()
    torch.testing.assert_close(x.grad, -2 * (x.detach() - means[cond]) / 64)


def test_template_is_concave_contrast_convex() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(2, 4, 1, 8, 8, generator=g) * 2 - 1
    cond = torch.arange(4)
    mid = (a + b) / 2
    t, c = TemplateReward(), ContrastReward()
    assert bool((t(mid, cond) >= (t(a, cond) + t(b, cond)) / 2).all())
    assert bool((c(mid) <= (c(a) + c(b)) / 2).all())


def test_contrast_values() -> None:
    reward = ContrastReward()
    torch.testing.assert_close(reward(_const(0.0)), torch.zeros(2))
    torch.testing.assert_close(reward(_const(-1.0)), torch.ones(2))
    torch.testing.assert_close(reward(_const(0.5)), torch.full((2,), 0.25))


def test_smoothness_values() -> None:
    reward = SmoothnessReward()
    torch.testing.assert_close(reward(_const(0.7)), torch.zeros(2))
    stripes = _const(-1.0, 1)
    stripes[..., ::2] = 1.0  # vertical stripes: every horizontal neighbour differs by 2, vertical ones by 0
    torch.testing.assert_close(reward(stripes), torch.tensor([-(4.0 + 0.0) / 2]))
    checker = _const(-1.0, 1)
    checker[..., ::2, ::2] = 1.0
    checker[..., 1::2, 1::2] = 1.0
    torch.testing.assert_close(reward(checker), torch.tensor([-4.0]))


def test_registry_builds_the_new_rewards() -> None:
    x = torch.zeros(3, 1, 8, 8)
    cond = torch.tensor([0, 1, 2])
    for name in ("template", "contrast", "smoothness"):
        out = get_reward(name)(x, cond)
        assert out.shape == (3,) and out.dtype == torch.float32


def test_template_errors_name_the_fix() -> None:
    reward = TemplateReward()
    with pytest.raises(RewardError, match="needs the prompted class labels"):
        reward(_const(0.0), None)
    with pytest.raises(RewardError, match="batch index 1 is 10 \\(the null"):
        reward(_const(0.0), torch.tensor([0, 10]))
    with pytest.raises(RewardError, match="shape \\[B, 1, 8, 8\\]"):
        reward(torch.zeros(2, 1, 4, 4), torch.tensor([0, 1]))
    with pytest.raises(RewardError, match="templates must have shape"):
        TemplateReward(torch.zeros(3, 1, 8, 8))
    with pytest.raises(RewardError, match="H, W >= 2"):
        SmoothnessReward()(torch.zeros(2, 8))
