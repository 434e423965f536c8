"""The embedded 8x8 digits data set (scikit-learn ships it; nothing is downloaded).

Images are returned as float32 tensors of shape [N, 1, 8, 8] scaled to [-1, 1] (the range diffusion
models are trained in); labels are int64 class indices 0..9.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from msdda.errors import MSDDAError

NUM_CLASSES: int = 10
"""Number of digit classes (0..9)."""

NULL_CLASS: int = NUM_CLASSES
"""Class index meaning "no condition", used for classifier-free guidance (index 10)."""

IMAGE_SHAPE: tuple[int, int, int] = (1, 8, 8)
"""Shape of one image: channels, height, width."""

PIXEL_MAX: float = 16.0
"""Largest raw pixel value in scikit-learn's digits (values are integers 0..16)."""


class DigitsTaskError(MSDDAError):
    """Bad input or invalid state in the embedded digits task (data, networks, classifier)."""


@dataclass(frozen=True)
class DigitsSplit:
    """A deterministic train / held-out split of the digits.

    Attributes:
        train_images: [N_train, 1, 8, 8] float32 in [-1, 1].
        train_labels: [N_train] int64 in 0..9.
        holdout_images: [N_holdout, 1, 8, 8] float32 in [-1, 1].
        holdout_labels: [N_holdout] int64 in 0..9.
    """

    train_images: Tensor
    train_labels: Tensor
    holdout_images: Tensor
    holdout_labels: Tensor


def pixels_to_unit_range(raw: Tensor) -> Tensor:
    """Map raw digit pixels 0..16 to [-1, 1] (0 -> -1, 16 -> 1). Any shape, returns float32."""
    return raw.to(torch.float32) / (PIXEL_MAX / 2.0) - 1.0


@functools.lru_cache(maxsize=1)
def _load_cached() -> tuple[Tensor, Tensor]:
    # sklearn import is deferred: it is slow and only this function needs it.
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = pixels_to_unit_range(torch.as_tensor(bunch.images)).reshape(-1, *IMAGE_SHAPE).contiguous()
    labels = torch.as_tensor(bunch.target, dtype=torch.int64).contiguous()
    return images, labels


def load_digits_tensor() -> tuple[Tensor, Tensor]:
    """Load all 1797 digits.

    Returns:
        images: [N, 1, 8, 8] float32 in [-1, 1] (raw 0..16 scaled linearly).
        labels: [N] int64 class indices 0..9.
    The tensors are fresh copies, so callers may modify them in place.
    """
    images, labels = _load_cached()
    return images.clone(), labels.clone()


def split_digits(seed: int = 0, holdout_fraction: float = 0.2) -> DigitsSplit:
    """Split the digits into train and held-out parts, stratified by class.

    The split depends only on ``seed`` and ``holdout_fraction`` (a permutation drawn from a
    torch.Generator seeded with ``seed``), so the same arguments give the same split on every machine.
    Stratification keeps every class present in both parts at the same proportion.

    Args:
        seed: seed of the permutation.
        holdout_fraction: fraction of each class held out, strictly between 0 and 1.
    """
    if not 0.0 < holdout_fraction < 1.0:
        raise DigitsTaskError(
            f"holdout_fraction must lie strictly between 0 and 1, got {holdout_fraction!r}; "
            "use e.g. 0.2 to hold out 20% of each class."
        )
    images, labels = load_digits_tensor()
    gen = torch.Generator().manual_seed(int(seed))
    train_idx: list[Tensor] = []
    hold_idx: list[Tensor] = []
    for cls in range(NUM_CLASSES):
        idx = torch.nonzero(labels == cls, as_tuple=False).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=gen)]
        n_hold = max(1, round(holdout_fraction * idx.numel()))
        hold_idx.append(idx[:n_hold])
        train_idx.append(idx[n_hold:])
    # Sort indices so the order within each part follows the data set, independent of class order.
    tr = torch.sort(torch.cat(train_idx)).values
    ho = torch.sort(torch.cat(hold_idx)).values
    return DigitsSplit(images[tr], labels[tr], images[ho], labels[ho])
