"""The per-objective variance head: a zero table leaves the kernel as it is, buckets index timesteps, files
round-trip through safetensors, and bad input is refused with the reason."""

from __future__ import annotations

import pytest
import torch

from msdda.core.schedule import KernelScheduler, KernelSchedulerConfig
from msdda.models.variance_head import (
    TimestepVarianceHead,
    VarianceHeadError,
    load_variance_head,
    save_variance_head,
    with_variance_offsets,
)


def test_zero_head_is_the_reference_kernel_and_buckets_index_timesteps():
    sched = KernelScheduler(KernelSchedulerConfig(kind="ddim", eta=1.0))
    sched.set_timesteps(10)
    head = TimestepVarianceHead(1000, 3, buckets=4)
    x, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    t = int(sched.timesteps[2])
    plain = sched.kernel(eps, t, x)
    zero = sched.kernel(with_variance_offsets(eps, head(torch.tensor([t, t]))), t, x)
    assert torch.equal(zero.mean, plain.mean) and torch.equal(zero.var, torch.broadcast_to(plain.var, zero.var.shape))
    with torch.no_grad():
        head.log_var.copy_(torch.arange(12.0).reshape(4, 3))
    rows = head(torch.tensor([0, 249, 250, 999]))
    assert rows.tolist() == [[0, 1, 2], [0, 1, 2], [3, 4, 5], [9, 10, 11]]  # bucket = t * 4 // 1000


def test_file_round_trip_and_refusals(tmp_path):
    head = TimestepVarianceHead(1000, 4, buckets=8)
    with torch.no_grad():
        head.log_var.normal_()
    save_variance_head(head, tmp_path)
    back = load_variance_head(tmp_path)
    assert back.config() == head.config() and torch.equal(back.log_var, head.log_var)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "variance_head.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(VarianceHeadError, match="is not a variance head file"):
        load_variance_head(tmp_path / "bad")
    assert torch.equal(head(torch.tensor([1000.0])), head(torch.tensor([999])))  # flow's sigma = 1: the last bucket
    with pytest.raises(VarianceHeadError, match="outside"):
        head(torch.tensor([1000.5]))
    with pytest.raises(VarianceHeadError, match="buckets=2000 exceeds"):
        TimestepVarianceHead(1000, 4, buckets=2000)
    with pytest.raises(VarianceHeadError, match="must be"):
        with_variance_offsets(torch.zeros(2, 4, 3, 3), torch.zeros(2, 3))
