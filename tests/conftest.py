"""Fixtures shared by test files: a tiny digits denoiser saved as a model folder."""

from pathlib import Path

import pytest
import torch

from msdda.alignment import training_scheduler_config
from msdda.core import KernelScheduler
from msdda.models.io import save_pretrained
from msdda.tasks.digits import DigitsDenoiser, DigitsDenoiserConfig
from msdda.tasks.digits.training import MODEL_TYPE

TINY = DigitsDenoiserConfig(base_channels=8, channel_mult=(1, 2), time_embed_dim=16, num_groups=4)


def tiny_model(seed: int = 0) -> DigitsDenoiser:
    """A tiny digits denoiser with a non-trivial output (the last conv is zero-initialised otherwise)."""
    torch.manual_seed(seed)
    m = DigitsDenoiser(TINY)
    with torch.no_grad():
        m.conv_out.weight.normal_(0, 0.05)
    return m.eval()


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tiny_base")
    sched = KernelScheduler(training_scheduler_config())
    save_pretrained(
        tiny_model(),
        d,
        model_type=MODEL_TYPE,
        task="digits",
        architecture=TINY.to_dict(),
        scheduler=sched.config.to_dict(),
    )
    return d


@pytest.fixture(autouse=True)
def _isolated_policy_cache(tmp_path_factory, monkeypatch) -> None:
    """Step-RL policies a user trained into ~/.cache/msdda must never leak into a test's results."""
    monkeypatch.setenv("MSDDA_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "msdda-cache"))


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module (tiny models: threads cost more than they give), restored after."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
