"""A small digit classifier: the judge behind the digits "alignment" reward.

Input: [B, 1, 8, 8] images in [-1, 1]; output: [B, 10] logits. Trained with light augmentation (Gaussian
pixel noise and one-pixel shifts) so that it scores slightly imperfect generated samples sensibly, not
only clean scans. SiLU activations keep its input gradients smooth for reward-gradient guidance.

Weights are stored in the one model-folder format (``model.safetensors`` plus ``config.json``, see
msdda.models.io), like every model the package trains.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from msdda.config import JSONConfig
from msdda.models.io import (
    CONFIG_FILE,
    WEIGHTS_FILE,  # noqa: F401  (re-exported: the file names of a classifier folder)
    CheckpointError,
    from_pretrained,
    read_config_document,
    save_pretrained,
)
from msdda.tasks.digits.data import IMAGE_SHAPE, NUM_CLASSES, DigitsTaskError, split_digits

logger = logging.getLogger(__name__)

MODEL_TYPE = "msdda.digits_classifier"
TASK = "digits"
_CREATE_HINT = "save a classifier there with save_classifier() or create the default one with `msdda train-classifier`"
DEFAULT_SPLIT_SEED = 0
"""The default classifier is trained on the train part of ``split_digits(seed=0)``; its held-out
part is never seen in training, so tests and reports can measure accuracy on it."""


class ClassifierLoadError(DigitsTaskError, CheckpointError):
    """Classifier files are missing, unreadable, corrupt or do not match their config."""


@dataclass
class DigitsClassifierConfig(JSONConfig):
    """Architecture of :class:`DigitsClassifier`; round-trips through to_dict/from_dict.

    Attributes:
        channels: widths of the three conv layers (8x8, then 4x4, then 2x2 after strided convs).
        num_classes: number of output logits.
    """

    config_error = DigitsTaskError

    channels: tuple[int, int, int] = (16, 32, 64)
    num_classes: int = NUM_CLASSES

    def __post_init__(self) -> None:
        self.channels = tuple(int(c) for c in self.channels)  # type: ignore[assignment]
        if len(self.channels) != 3 or any(c <= 0 for c in self.channels):
            raise DigitsTaskError(f"DigitsClassifierConfig.channels must be three positive ints, got {self.channels!r}")
        if self.num_classes <= 1:
            raise DigitsTaskError(f"DigitsClassifierConfig.num_classes must be > 1, got {self.num_classes!r}")


class DigitsClassifier(nn.Module):
    """Conv net: [B, 1, 8, 8] in [-1, 1] -> [B, num_classes] logits."""

    def __init__(self, config: DigitsClassifierConfig | None = None) -> None:
        super().__init__()
        cfg = config if config is not None else DigitsClassifierConfig()
        self.config = cfg
        c1, c2, c3 = cfg.channels
        self.conv1 = nn.Conv2d(IMAGE_SHAPE[0], c1, 3, padding=1)  # 8x8
        self.conv2 = nn.Conv2d(c1, c2, 3, stride=2, padding=1)  # -> 4x4
        self.conv3 = nn.Conv2d(c2, c3, 3, stride=2, padding=1)  # -> 2x2
        self.head = nn.Linear(c3 * 4, cfg.num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, 1, 8, 8] in [-1, 1] -> logits [B, num_classes]."""
        if x.ndim != 4 or tuple(x.shape[1:]) != IMAGE_SHAPE:
            raise DigitsTaskError(f"DigitsClassifier expects [B, 1, 8, 8] images, got shape {list(x.shape)}")
        h = F.silu(self.conv1(x))
        h = F.silu(self.conv2(h))
        h = F.silu(self.conv3(h))
        return self.head(h.flatten(1))


def _augment(x: Tensor, gen: torch.Generator, noise_std_max: float, shift_prob: float) -> Tensor:
    """Random one-pixel shifts (background -1 fills the gap) and per-image Gaussian noise.

    x: [B, 1, 8, 8]. The noise std of each image is uniform in [0, noise_std_max], applied to half the
    batch, so the classifier stays accurate on clean images while tolerating sampler noise.
    """
    b = x.shape[0]
    if shift_prob > 0:
        padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
        shift = torch.randint(0, 3, (b, 2), generator=gen)
        keep = torch.rand(b, generator=gen) >= shift_prob
        shift[keep] = 1  # offset 1 in the padded image is the unshifted crop
        # Gather each image's 8x8 window with index arithmetic (one op for the whole batch).
        rows = (shift[:, 0, None] + torch.arange(8))[:, :, None].expand(b, 8, 8)
        cols = (shift[:, 1, None] + torch.arange(8))[:, None, :].expand(b, 8, 8)
        batch = torch.arange(b)[:, None, None].expand(b, 8, 8)
        x = padded[batch, 0, rows, cols].unsqueeze(1)
    if noise_std_max > 0:
        std = torch.rand(b, 1, 1, 1, generator=gen) * noise_std_max
        std = std * (torch.rand(b, 1, 1, 1, generator=gen) < 0.5)
        x = x + std * torch.randn(x.shape, generator=gen)
    return x


@torch.no_grad()
def accuracy(model: DigitsClassifier, images: Tensor, labels: Tensor, batch_size: int = 1024) -> float:
    """Fraction of images whose argmax logit equals the label. images [N,1,8,8], labels [N]."""
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, images.shape[0], batch_size):
        pred = model(images[i : i + batch_size]).argmax(dim=1)
        correct += int((pred == labels[i : i + batch_size]).sum())
    model.train(was_training)
    return correct / max(1, images.shape[0])


def train_classifier(
    images: Tensor,
    labels: Tensor,
    *,
    epochs: int = 40,
    seed: int = 0,
    batch_size: int = 64,
    lr: float = 3e-3,
    noise_std_max: float = 0.3,
    shift_prob: float = 0.3,
    config: DigitsClassifierConfig | None = None,
    num_threads: int | None = 1,
    progress: bool = True,
) -> DigitsClassifier:
    """Train a DigitsClassifier with AdamW and a cosine learning-rate schedule.

    Args:
        images: [N, 1, 8, 8] float in [-1, 1].
        labels: [N] int64 in 0..num_classes-1.
        epochs: passes over the data.
        seed: seeds weight initialisation, shuffling and augmentation; same seed, same weights.
        batch_size: images per step.
        lr: peak learning rate.
        noise_std_max: largest std of the Gaussian noise augmentation (pixel units of the [-1, 1] range).
        shift_prob: probability that an image is shifted by up to one pixel in each direction.
        config: architecture; default DigitsClassifierConfig().
        num_threads: torch intra-op threads while training (restored afterwards; None leaves the setting
            alone). The default 1 is deliberate: these convs are too small to gain from threads, and on a
            2-core machine shared with other processes 2 threads measured ~10x slower (50 s vs 5 s).
            The setting is process-wide for the duration of the call.
        progress: show a tqdm progress bar over epochs.
    Returns:
        The trained model, in eval mode.
    """
    if images.ndim != 4 or tuple(images.shape[1:]) != IMAGE_SHAPE:
        raise DigitsTaskError(f"train_classifier expects images [N, 1, 8, 8], got {list(images.shape)}")
    if labels.shape != (images.shape[0],):
        raise DigitsTaskError(f"train_classifier expects labels of shape [{images.shape[0]}], got {list(labels.shape)}")
    if epochs < 1 or batch_size < 1:
        raise DigitsTaskError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
    if num_threads is not None and num_threads < 1:
        raise DigitsTaskError(f"num_threads must be >= 1 or None, got {num_threads}")
    previous_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        return _train_loop(images, labels, epochs, seed, batch_size, lr, noise_std_max, shift_prob, config, progress)
    finally:
        torch.set_num_threads(previous_threads)


def _train_loop(
    images: Tensor,
    labels: Tensor,
    epochs: int,
    seed: int,
    batch_size: int,
    lr: float,
    noise_std_max: float,
    shift_prob: float,
    config: DigitsClassifierConfig | None,
    progress: bool,
) -> DigitsClassifier:
    """The loop behind train_classifier (arguments already validated)."""
    from tqdm.auto import tqdm

    images = images.to(torch.float32)
    labels = labels.to(torch.int64)
    gen = torch.Generator().manual_seed(int(seed))
    # Weight init draws from the global RNG; fork it so training is reproducible and leaves the
    # caller's global RNG state untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        model = DigitsClassifier(config)
    n = images.shape[0]
    steps_per_epoch = math.ceil(n / batch_size)
    total = epochs * steps_per_epoch
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    model.train()
    t0 = time.perf_counter()
    bar = tqdm(range(epochs), desc="train classifier", disable=None if progress else True, leave=False)
    for epoch in bar:
        perm = torch.randperm(n, generator=gen)
        loss_sum = 0.0
        for i in range(0, n, batch_size):
            idx = perm[i : i + batch_size]
            x = _augment(images[idx], gen, noise_std_max, shift_prob)
            loss = F.cross_entropy(model(x), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += float(loss.detach()) * idx.numel()
        mean_loss = loss_sum / n
        bar.set_postfix(loss=f"{mean_loss:.4f}")
        logger.debug("classifier epoch %d/%d: loss %.4f", epoch + 1, epochs, mean_loss)
    logger.info("trained digits classifier: %d epochs in %.1f s", epochs, time.perf_counter() - t0)
    model.eval()
    return model


def save_classifier(
    model: DigitsClassifier, directory: str | os.PathLike[str], metadata: Mapping[str, Any] | None = None
) -> Path:
    """Save the classifier as a model folder (``model.safetensors`` + ``config.json``, see msdda.models.io).

    ``metadata`` (JSON-serialisable) is stored in config.json under "metadata", e.g. the training seed
    and held-out accuracy. Each file is written to a temp file and renamed. Returns the directory.
    """
    return save_pretrained(
        model, directory, model_type=MODEL_TYPE, task=TASK, architecture=model.config.to_dict(), metadata=metadata
    )


def read_classifier_metadata(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The "metadata" dict stored by save_classifier (empty if none)."""
    return dict(_read_config_doc(Path(directory)).get("metadata") or {})


def _upgrade_legacy(doc: dict[str, Any]) -> dict[str, Any]:
    """Folders written before the one model-folder format held {"model_type", "config", "metadata"}; read
    them as {"model_type", "task", "architecture", "scheduler", "metadata"} (the same classifier)."""
    if "architecture" in doc or doc.get("model_type") != MODEL_TYPE or not isinstance(doc.get("config"), dict):
        return doc
    return {
        "model_type": MODEL_TYPE,
        "task": TASK,
        "architecture": doc["config"],
        "scheduler": {},
        "metadata": doc.get("metadata") or {},
    }


def _read_config_doc(directory: Path) -> dict[str, Any]:
    try:
        doc = _upgrade_legacy(read_config_document(directory))
    except CheckpointError as exc:
        raise ClassifierLoadError(f"classifier config: {exc}; {_CREATE_HINT}") from exc
    if doc.get("model_type") != MODEL_TYPE or not isinstance(doc.get("architecture"), dict):
        raise ClassifierLoadError(
            f"classifier config {directory / CONFIG_FILE} is not a digits classifier config "
            f"(expected a JSON object with model_type={MODEL_TYPE!r} and an 'architecture' object)"
        )
    return doc


def _build(architecture: dict[str, Any]) -> DigitsClassifier:
    return DigitsClassifier(DigitsClassifierConfig.from_dict(architecture))


def load_classifier(directory: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> DigitsClassifier:
    """Load a classifier saved by :func:`save_classifier`; returns it in eval mode on `map_location`.

    Raises ClassifierLoadError (naming the path) if a file is missing, unreadable or corrupt, or if the
    stored tensors do not match the architecture in config.json. Only safetensors are read: never pickle.
    Also reads folders in the layout used before the one model-folder format (a "config" object).
    """
    directory = Path(directory)
    doc = _read_config_doc(directory)
    try:
        model, _ = from_pretrained(
            directory, _build, model_type=MODEL_TYPE, task=TASK, document=doc, device=map_location, freeze=False
        )
    except CheckpointError as exc:
        raise ClassifierLoadError(f"classifier weights: {exc}; {_CREATE_HINT}") from exc
    except (DigitsTaskError, TypeError, ValueError) as exc:  # the architecture itself is invalid (keys, values)
        raise ClassifierLoadError(
            f"classifier config {directory / CONFIG_FILE} has an invalid 'architecture': {exc}"
        ) from exc
    return model


def default_classifier_dir() -> Path:
    """Where the shipped classifier lives: ``<package>/weights/digits/classifier/``."""
    return Path(__file__).resolve().parents[2] / "weights" / "digits" / "classifier"


def train_and_save_default_classifier(
    out_dir: str | os.PathLike[str] | None = None, seed: int = 0, epochs: int = 40, progress: bool = True
) -> Path:
    """Train on the train part of ``split_digits(seed=0)`` and save to ``out_dir``.

    ``out_dir`` defaults to :func:`default_classifier_dir`. The held-out accuracy and seeds are recorded
    in config.json's metadata (no timings, so reruns with the same seed write the same tensors and config).
    Returns the directory.
    """
    split = split_digits(seed=DEFAULT_SPLIT_SEED)
    model = train_classifier(split.train_images, split.train_labels, epochs=epochs, seed=seed, progress=progress)
    acc = accuracy(model, split.holdout_images, split.holdout_labels)
    logger.info("digits classifier held-out accuracy %.4f (%d images)", acc, split.holdout_labels.numel())
    meta = {
        "split_seed": DEFAULT_SPLIT_SEED,
        "train_seed": int(seed),
        "epochs": int(epochs),
        "holdout_accuracy": round(acc, 6),
    }
    return save_classifier(model, out_dir if out_dir is not None else default_classifier_dir(), metadata=meta)
