"""Built-in rewards for the embedded digits task: images [B, 1, 8, 8] in [-1, 1].

- ``alignment``: log-probability of the prompted class under the shipped DigitsClassifier (nats, <= 0).
- ``ink``: mean intensity mapped to [0, 1] (0 = all background -1, 1 = all ink +1).
- ``symmetry``: left-right mirror similarity in [0, 1] (1 = perfectly mirror-symmetric).
- ``template``: minus the mean squared distance to the prompted class's mean training image (<= 0; concave
  in x0, so its step optimum shrinks the kernel's variance, not only its mean).
- ``contrast``: mean(x0^2) in [0, 1] (1 = every pixel saturated at -1 or +1; convex).
- ``smoothness``: minus the mean squared difference between horizontally and vertically adjacent pixels
  (<= 0; concave, and at odds with contrast).
All are differentiable w.r.t. x0; msdda.tasks.rewards registers them by name. docs/digits.md gives each
one's figures on the base model's samples and why the demo fuses ink with template.
"""

from __future__ import annotations

import copy
import functools
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from msdda.core.rewards import RewardError
from msdda.tasks.digits.classifier import (
    ClassifierLoadError,
    DigitsClassifier,
    default_classifier_dir,
    load_classifier,
    train_and_save_default_classifier,
)
from msdda.tasks.digits.data import IMAGE_SHAPE, NULL_CLASS, NUM_CLASSES, split_digits

__all__ = [
    "AlignmentReward",
    "ContrastReward",
    "InkReward",
    "SmoothnessReward",
    "SymmetryReward",
    "TemplateReward",
    "class_mean_images",
    "clear_classifier_cache",
    "default_classifier_dir",
    "load_default_classifier",
    "train_and_save_default_classifier",
]


def _check_images(x0: Tensor, name: str, exact: bool) -> None:
    if not isinstance(x0, Tensor):
        raise RewardError(f"reward {name!r} expects x0 as a torch.Tensor, got {type(x0).__name__}")
    if exact and (x0.ndim != 4 or tuple(x0.shape[1:]) != IMAGE_SHAPE):
        raise RewardError(f"reward {name!r} expects digits x0 of shape [B, 1, 8, 8], got {list(x0.shape)}")
    if not exact and x0.ndim < 2:
        raise RewardError(f"reward {name!r} expects images x0 of shape [B, ..., W], got {list(x0.shape)}")


def _check_cond(cond: Any, batch: int, name: str, device: torch.device) -> Tensor:
    """cond must be [batch] integer class labels 0..9; RewardError naming the first bad index otherwise."""
    if cond is None:
        raise RewardError(
            f"reward {name!r} needs the prompted class labels cond [B] (0..9); got None. "
            "Unconditional samples have no class to compare with"
        )
    cond = torch.as_tensor(cond, device=device)
    if cond.shape != (batch,) or cond.dtype.is_floating_point or cond.dtype == torch.bool:
        raise RewardError(
            f"reward {name!r} expects cond as an integer tensor of shape [{batch}], "
            f"got dtype {cond.dtype} shape {list(cond.shape)}"
        )
    bad = torch.nonzero((cond < 0) | (cond >= NUM_CLASSES), as_tuple=False).flatten().tolist()
    if bad:
        i = bad[0]
        what = "the null (unconditional) class" if int(cond[i]) == NULL_CLASS else "out of range"
        raise RewardError(
            f"reward {name!r} needs class labels in 0..{NUM_CLASSES - 1}; cond at batch index {i} is "
            f"{int(cond[i])} ({what}); {len(bad)} bad index(es) in total: {bad[:8]}"
        )
    return cond.long()


@functools.lru_cache(maxsize=8)
def _load_frozen(path: str) -> DigitsClassifier:
    model = load_classifier(path)
    # Frozen: reward gradients should flow to the samples only, never accumulate in the judge.
    model.requires_grad_(False)
    return model


def clear_classifier_cache() -> None:
    """Forget cached classifiers, e.g. after rewriting weights on disk in the same process."""
    _load_frozen.cache_clear()


def load_default_classifier(classifier_dir: str | os.PathLike[str] | None = None) -> DigitsClassifier:
    """Load (once, then cached) the frozen classifier from ``classifier_dir`` or the shipped location.

    Raises RewardError saying how to create the weights if they are missing or invalid.
    """
    path = Path(classifier_dir) if classifier_dir is not None else default_classifier_dir()
    try:
        return _load_frozen(str(path.resolve()))
    except ClassifierLoadError as exc:
        raise RewardError(
            f"alignment reward cannot load the digits classifier from {path}: {exc}. Create the weights with "
            "`msdda train-classifier` (or msdda.tasks.digits.classifier.train_and_save_default_classifier()), "
            "or pass a classifier explicitly: AlignmentReward(classifier=...)"
        ) from exc


class AlignmentReward:
    """log p(cond | x0) under a DigitsClassifier: x0 [B, 1, 8, 8], cond [B] int64 in 0..9 -> [B] nats.

    The classifier is either given or loaded lazily from ``classifier_dir`` (default: the shipped weights)
    on first call. Unconditional samples (cond None or the null class 10) have no prompted class and
    raise RewardError.
    """

    name: str = "alignment"
    differentiable: bool = True

    def __init__(
        self,
        classifier: DigitsClassifier | None = None,
        classifier_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        if classifier is not None and classifier_dir is not None:
            raise RewardError("AlignmentReward takes either classifier or classifier_dir, not both")
        self._classifier = classifier
        self._classifier_dir = classifier_dir
        self._per_device: dict[torch.device, DigitsClassifier] = {}

    @property
    def classifier(self) -> DigitsClassifier:
        """The classifier in use (loads the weights on first access)."""
        if self._classifier is None:
            self._classifier = load_default_classifier(self._classifier_dir)
        return self._classifier

    def _on(self, device: torch.device) -> DigitsClassifier:
        clf = self.classifier
        if next(clf.parameters()).device == device:
            return clf
        if device not in self._per_device:
            # Copy, so moving to an accelerator does not move a classifier other rewards share.
            self._per_device[device] = copy.deepcopy(clf).to(device)
        return self._per_device[device]

    def __call__(self, x0: Tensor, cond: Tensor | None) -> Tensor:
        """x0: [B, 1, 8, 8] in [-1, 1]; cond: [B] class labels 0..9 -> [B] float32 log-probabilities."""
        _check_images(x0, self.name, exact=True)
        cond = _check_cond(cond, x0.shape[0], self.name, x0.device)
        clf = self._on(x0.device)
        logp = F.log_softmax(clf(x0.to(torch.float32)), dim=1)
        return logp.gather(1, cond.long()[:, None]).squeeze(1)

    def __repr__(self) -> str:
        src = (
            "explicit classifier"
            if self._classifier_dir is None and self._classifier is not None
            else (str(self._classifier_dir or default_classifier_dir()))
        )
        return f"AlignmentReward({src})"


class InkReward:
    """Mean ink: mean over pixels of (x0 + 1) / 2. x0 [B, ...] in [-1, 1] -> [B] in [0, 1]."""

    name: str = "ink"
    differentiable: bool = True

    def __call__(self, x0: Tensor, cond: Tensor | None = None) -> Tensor:
        """x0: [B, ...] in [-1, 1]; cond ignored -> [B] float32 in [0, 1]."""
        _check_images(x0, self.name, exact=False)
        return ((x0.to(torch.float32) + 1.0) * 0.5).flatten(1).mean(dim=1)

    def __repr__(self) -> str:
        return "InkReward()"


class SymmetryReward:
    """Left-right mirror similarity: 1 - mean |x0 - flip_W(x0)| / 2. x0 [B, ..., W] in [-1, 1] -> [B] in [0, 1].

    Flipping is along the last (width) axis. |a - b| <= 2 for pixels in [-1, 1], hence the range.
    """

    name: str = "symmetry"
    differentiable: bool = True

    def __call__(self, x0: Tensor, cond: Tensor | None = None) -> Tensor:
        """x0: [B, ..., W] in [-1, 1]; cond ignored -> [B] float32 in [0, 1]."""
        _check_images(x0, self.name, exact=False)
        x = x0.to(torch.float32)
        return 1.0 - (x - x.flip(-1)).abs().flatten(1).mean(dim=1) * 0.5

    def __repr__(self) -> str:
        return "SymmetryReward()"


@functools.lru_cache(maxsize=1)
def _class_means() -> Tensor:
    split = split_digits(seed=0)
    return torch.stack([split.train_images[split.train_labels == c].mean(0) for c in range(NUM_CLASSES)])


def class_mean_images() -> Tensor:
    """[10, 1, 8, 8] float32: the mean training image of each class (the train split of `split_digits(0)`)."""
    return _class_means().clone()


class TemplateReward:
    """-mean over pixels of (x0 - mean image of the prompted class)^2: x0 [B, 1, 8, 8], cond [B] -> [B] in [-4, 0].

    Concave (each pixel's curvature is -2/64), so its step optimum narrows the kernel's variance, most at
    large t where the Tweedie estimate is most sensitive to x_t (docs/digits.md), where the linear ``ink``
    only shifts the mean.
    """

    name: str = "template"
    differentiable: bool = True

    def __init__(self, templates: Tensor | None = None) -> None:
        if templates is not None and tuple(templates.shape) != (NUM_CLASSES, *IMAGE_SHAPE):
            raise RewardError(
                f"TemplateReward templates must have shape [{NUM_CLASSES}, 1, 8, 8], got {list(templates.shape)}"
            )
        self._templates = templates

    def __call__(self, x0: Tensor, cond: Tensor | None) -> Tensor:
        """x0: [B, 1, 8, 8] in [-1, 1]; cond: [B] class labels 0..9 -> [B] float32."""
        _check_images(x0, self.name, exact=True)
        labels = _check_cond(cond, x0.shape[0], self.name, x0.device)
        templates = (self._templates if self._templates is not None else _class_means()).to(x0.device)
        return (x0.to(torch.float32) - templates[labels]).square().flatten(1).mean(dim=1).neg()

    def __repr__(self) -> str:
        return "TemplateReward()"


class ContrastReward:
    """mean(x0^2): x0 [B, ...] in [-1, 1] -> [B] in [0, 1] (1 = every pixel at -1 or +1)."""

    name: str = "contrast"
    differentiable: bool = True

    def __call__(self, x0: Tensor, cond: Tensor | None = None) -> Tensor:
        """x0: [B, ...] in [-1, 1]; cond ignored -> [B] float32 in [0, 1]."""
        _check_images(x0, self.name, exact=False)
        return x0.to(torch.float32).square().flatten(1).mean(dim=1)

    def __repr__(self) -> str:
        return "ContrastReward()"


class SmoothnessReward:
    """-(mean squared difference of horizontal neighbours + that of vertical neighbours) / 2.

    x0 [B, ..., H, W] in [-1, 1] -> [B] in [-4, 0] (0 = a constant image).
    """

    name: str = "smoothness"
    differentiable: bool = True

    def __call__(self, x0: Tensor, cond: Tensor | None = None) -> Tensor:
        """x0: [B, ..., H, W] in [-1, 1] (H, W >= 2); cond ignored -> [B] float32."""
        _check_images(x0, self.name, exact=False)
        if x0.ndim < 3 or x0.shape[-1] < 2 or x0.shape[-2] < 2:
            raise RewardError(f"reward 'smoothness' needs images [B, ..., H, W] with H, W >= 2, got {list(x0.shape)}")
        x = x0.to(torch.float32)
        dx = (x[..., :, 1:] - x[..., :, :-1]).square().flatten(1).mean(dim=1)
        dy = (x[..., 1:, :] - x[..., :-1, :]).square().flatten(1).mean(dim=1)
        return -(dx + dy) * 0.5

    def __repr__(self) -> str:
        return "SmoothnessReward()"
