"""Per-objective variance heads for fixed-variance models (SD's UNet: eps only).

With a fixed-variance sampler every model's kernel at a step has the same variance, so MSDDA's fusion is a
weighted average of the models' means: DB-MPA (docs/stable_diffusion.md). A variance head gives each objective
a kernel variance of its own: a small zero-initialised table of log-variance offsets, one row per timestep
bucket and one column per latent channel, trained with the objective's LoRA by the step-level trainers. Its
output enters the kernel through `msdda.core.schedule.apply_kernel_offsets` as d_logvar (d_mean = 0: the LoRA
moves the mean), so the kernel variance becomes var * exp(var * d_logvar) and a fresh head leaves the
reference's kernel exactly as it is.

    head = TimestepVarianceHead(num_train_timesteps=1000, channels=4, buckets=50)
    out = with_variance_offsets(eps, head(t))   # [B, 3C, h, w]: eps, d_mean = 0, d_logvar per (t, channel)

Saved beside the LoRA as `variance_head.safetensors` (its shape in the file's metadata); `load_variance_head`
reads it back (safetensors only).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

from msdda.errors import MSDDAError

VARIANCE_HEAD_FILE = "variance_head.safetensors"


class VarianceHeadError(MSDDAError):
    """A variance head file or call that cannot be used (named, with the fix)."""


class TimestepVarianceHead(nn.Module):
    """d_logvar(t) [B, C]: a zero-initialised table [buckets, C], bucket = floor(t * buckets / num_train_timesteps)
    (t = num_train_timesteps, flow matching's sigma = 1, falls in the last bucket).

    Per channel and per timestep bucket only (no dependence on x_t or the prompt): the smallest head that lets
    an objective's kernel variance differ from another's at a step, cheap enough to train beside a LoRA.
    """

    def __init__(self, num_train_timesteps: int = 1000, channels: int = 4, buckets: int = 50) -> None:
        super().__init__()
        for name, v in (("num_train_timesteps", num_train_timesteps), ("channels", channels), ("buckets", buckets)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise VarianceHeadError(f"{name}={v!r} must be a positive integer")
        if buckets > num_train_timesteps:
            raise VarianceHeadError(f"buckets={buckets} exceeds num_train_timesteps={num_train_timesteps}")
        self.num_train_timesteps = int(num_train_timesteps)
        self.buckets = int(buckets)
        self.log_var = nn.Parameter(torch.zeros(int(buckets), int(channels)))

    @property
    def channels(self) -> int:
        return int(self.log_var.shape[1])

    def config(self) -> dict[str, int]:
        return {"num_train_timesteps": self.num_train_timesteps, "channels": self.channels, "buckets": self.buckets}

    def forward(self, t: Tensor) -> Tensor:
        t = torch.as_tensor(t, device=self.log_var.device).double().reshape(-1)
        # DDPM/DDIM timesteps are integers in [0, T); flow matching's are 1000 sigma in (0, T], T itself included
        if t.numel() and (float(t.min()) < 0 or float(t.max()) > self.num_train_timesteps):
            raise VarianceHeadError(
                f"timesteps {t.tolist()[:8]} outside [0, {self.num_train_timesteps}]; the head was built for "
                f"num_train_timesteps={self.num_train_timesteps}"
            )
        bucket = (t * self.buckets / self.num_train_timesteps).floor().long().clamp(max=self.buckets - 1)
        return self.log_var[bucket]


def with_variance_offsets(prediction: Tensor, d_logvar: Tensor) -> Tensor:
    """[B, C, ...] prediction and [B, C] log-variance offsets -> [B, 3C, ...] = (prediction, d_mean = 0,
    d_logvar broadcast over the spatial dimensions): the kernel-offset layout `KernelScheduler.kernel` reads."""
    if d_logvar.shape != prediction.shape[:2]:
        raise VarianceHeadError(
            f"d_logvar {tuple(d_logvar.shape)} must be [B, C] = {tuple(prediction.shape[:2])} for the prediction"
        )
    spatial = (1,) * (prediction.dim() - 2)
    d = d_logvar.to(prediction.dtype).reshape(*d_logvar.shape, *spatial).expand_as(prediction)
    return torch.cat([prediction, torch.zeros_like(prediction), d], dim=1)


def save_variance_head(head: TimestepVarianceHead, folder: str | Path) -> Path:
    """Write `folder/variance_head.safetensors` (the table, its shape in the metadata), atomically."""
    from safetensors.torch import save

    from msdda.atomic import write_bytes_atomic

    path = Path(folder) / VARIANCE_HEAD_FILE
    data = save({"log_var": head.log_var.detach().to("cpu", torch.float32).contiguous()},
                metadata={"msdda_variance_head": json.dumps(head.config())})  # fmt: skip
    write_bytes_atomic(path, data)
    return path


def load_variance_head(path: str | Path) -> TimestepVarianceHead:
    """A head from `variance_head.safetensors` (or the folder holding it); VarianceHeadError if it is not one."""
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        path = path / VARIANCE_HEAD_FILE
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("msdda_variance_head", "null"))
            table = f.get_tensor("log_var")
    except Exception as exc:  # OSError, a JSON error, a missing key, or safetensors' own SafetensorError
        raise VarianceHeadError(f"{path} is not a variance head file ({type(exc).__name__}: {exc})") from None
    if not isinstance(meta, dict) or tuple(table.shape) != (meta.get("buckets"), meta.get("channels")):
        raise VarianceHeadError(f"{path}: the table {tuple(table.shape)} does not match its metadata {meta!r}")
    head = TimestepVarianceHead(int(meta["num_train_timesteps"]), int(meta["channels"]), int(meta["buckets"]))
    with torch.no_grad():
        head.log_var.copy_(table)
    return head


__all__ = [
    "VARIANCE_HEAD_FILE",
    "TimestepVarianceHead",
    "VarianceHeadError",
    "load_variance_head",
    "save_variance_head",
    "with_variance_offsets",
]
