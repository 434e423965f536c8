"""DDPO's weight-free JPEG rewards: values against PIL directly, their sign on flat vs noisy images, errors."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from msdda.core.rewards import is_differentiable
from msdda.pipelines.errors import RewardModelError
from msdda.pipelines.rewards import jpeg_compressibility, jpeg_incompressibility


def _pil_kb(array: np.ndarray, quality: int = 95) -> float:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=quality)
    return len(buf.getvalue()) / 1000.0


def test_jpeg_sizes_equal_pil_and_rank_flat_above_noise():
    gen = torch.Generator().manual_seed(0)
    flat = torch.full((1, 3, 32, 32), 0.5)
    noise = torch.rand((1, 3, 32, 32), generator=gen)
    images = torch.cat([flat, noise])
    comp, incomp = jpeg_compressibility(), jpeg_incompressibility()
    c = comp(images, ["a", "b"])
    expected = [_pil_kb((x.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()) for x in images]
    assert c.tolist() == pytest.approx([-e for e in expected], abs=1e-6)
    assert torch.equal(incomp(images), -c)
    assert c[0] > c[1]  # the flat image compresses to the smaller file: the higher compressibility
    assert c.dtype == torch.float32 and c.shape == (2,)
    assert not is_differentiable(comp) and not is_differentiable(incomp)  # RGG refuses them


def test_jpeg_reward_errors():
    with pytest.raises(RewardModelError, match=r"must be \[B, 3, H, W\]"):
        jpeg_compressibility()(torch.zeros(3, 8, 8))
    with pytest.raises(RewardModelError, match="NaN or infinite"):
        jpeg_compressibility()(torch.full((1, 3, 8, 8), float("nan")))
    with pytest.raises(RewardModelError, match="quality=0"):
        jpeg_compressibility(quality=0)
