"""A compact class-conditional residual U-Net denoiser for 1x8x8 digits.

The network predicts epsilon and (optionally) the improved-DDPM "learned_range" variance value v:
output channel 0 is epsilon, channel 1 is v with interpolation fraction frac = (v + 1) / 2 between
log(beta_tilde_t) and log(beta_t). The final convolution is zero-initialised, so an untrained network
outputs eps = 0 and v = 0 (the geometric mean of the two variance bounds).

Conditioning: a sinusoidal timestep embedding passed through an MLP, plus a learned class embedding with
one extra "null" row (index 10) for classifier-free guidance; the two are added and injected into every
residual block as a per-channel bias.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from msdda.config import JSONConfig
from msdda.tasks.digits.data import NUM_CLASSES, DigitsTaskError


@dataclass
class DigitsDenoiserConfig(JSONConfig):
    """Architecture of :class:`DigitsDenoiser`; round-trips through :meth:`to_dict`/:meth:`from_dict`.

    Attributes:
        in_channels: image channels (1 for digits).
        image_size: side length in pixels; must be divisible by 2**(len(channel_mult) - 1).
        base_channels: width of the first level; level i has base_channels * channel_mult[i] channels.
        channel_mult: width multiplier per resolution level (8x8, 4x4, 2x2 by default).
        num_res_blocks: residual blocks per level, on the way down and again on the way up.
        num_mid_blocks: extra residual blocks at the lowest resolution, between the two paths.
        num_classes: number of real classes; index ``num_classes`` is the null (unconditional) class.
        learned_variance: if True the output has 2 channels (epsilon, v), else 1 (epsilon).
        kernel_offsets: if True two more channels (d_mean, d_logvar) from a zero-initialised head move the
            kernel past what the scheduler's parametrisation reaches (msdda.core.schedule.apply_kernel_offsets):
            aligned models that must reach the step optimum use it; a fresh head leaves the kernel unchanged.
        offset_head_ranges: timestep boundaries b_1 < b_2 < ... splitting [0, 1000) into ranges with a kernel-offset
            head each (t < b_1 to the first, ...); empty (default): one head for every t. Heads of their own keep
            the large, noisy gradients of the first steps out of the last steps' parameters and Adam statistics.
        offset_head_x0: also feed the kernel-offset head the clean estimate x0_hat = clip((x_t - sqrt(1 - ab_t) eps)
            / sqrt(ab_t)) of the digits schedule (msdda.alignment.diffusion.training_scheduler_config): the step
            optimum's mean shift for a reward of x0 is its gradient at x0_hat, which the head otherwise has to
            build from x_t and eps with a t-dependent ratio (1/sqrt(ab_t): 1.2-6 between t = 200 and 600).
        time_embed_dim: width of the time/class embedding.
        time_freq_dim: width of the sinusoidal timestep features fed to the time MLP (even).
        num_groups: GroupNorm groups (each width must be divisible by it).
        dropout: dropout probability inside residual blocks (training only).
        max_period: longest period of the sinusoidal timestep embedding, in timesteps.
    """

    config_error = DigitsTaskError

    in_channels: int = 1
    image_size: int = 8
    # Defaults give ~0.31 M parameters: widths 16 @ 8x8, 32 @ 4x4, 64 @ 2x2. Parameters sit mostly at
    # the low resolutions, where a parameter costs few multiply-adds (a weight of a 3x3 conv is used
    # 64 times per image at 8x8 but 4 times at 2x2), so a batch of 256 stays fast on CPU. For ~30% less
    # CPU time use a width-8 first level: base_channels=8, channel_mult=(1, 4, 8), num_groups=4.
    base_channels: int = 16
    channel_mult: tuple[int, ...] = (1, 2, 4)
    num_res_blocks: int = 1
    num_mid_blocks: int = 0
    num_classes: int = NUM_CLASSES
    learned_variance: bool = True
    kernel_offsets: bool = False
    offset_head_ranges: tuple[int, ...] = ()
    offset_head_x0: bool = False
    time_embed_dim: int = 128
    time_freq_dim: int = 64
    num_groups: int = 8
    dropout: float = 0.0
    max_period: float = 10000.0

    def __post_init__(self) -> None:
        self.channel_mult = tuple(int(m) for m in self.channel_mult)
        self.offset_head_ranges = tuple(int(b) for b in self.offset_head_ranges)
        self.validate()

    def validate(self) -> None:
        """Raise DigitsTaskError naming the bad field if the configuration cannot build a network."""
        positive = ("in_channels", "image_size", "base_channels", "num_classes", "time_embed_dim", "num_groups")
        for name in positive:
            if int(getattr(self, name)) <= 0:
                raise DigitsTaskError(f"DigitsDenoiserConfig.{name} must be positive, got {getattr(self, name)!r}")
        if self.num_res_blocks < 1 or self.num_mid_blocks < 0:
            raise DigitsTaskError(
                f"DigitsDenoiserConfig needs num_res_blocks >= 1 and num_mid_blocks >= 0, got "
                f"{self.num_res_blocks!r} and {self.num_mid_blocks!r}"
            )
        if not self.channel_mult or any(m <= 0 for m in self.channel_mult):
            raise DigitsTaskError(
                f"DigitsDenoiserConfig.channel_mult must be a non-empty tuple of positive ints, got "
                f"{self.channel_mult!r}"
            )
        factor = 2 ** (len(self.channel_mult) - 1)
        if self.image_size % factor:
            raise DigitsTaskError(
                f"DigitsDenoiserConfig.image_size={self.image_size} is not divisible by {factor}, which "
                f"{len(self.channel_mult)} levels (channel_mult={self.channel_mult}) need"
            )
        for m in self.channel_mult:
            if (self.base_channels * m) % self.num_groups:
                raise DigitsTaskError(
                    f"width base_channels*{m}={self.base_channels * m} is not divisible by "
                    f"num_groups={self.num_groups}; pick widths that are multiples of num_groups"
                )
        if self.time_freq_dim <= 0 or self.time_freq_dim % 2:
            raise DigitsTaskError(
                f"DigitsDenoiserConfig.time_freq_dim must be a positive even int, got {self.time_freq_dim!r}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise DigitsTaskError(f"DigitsDenoiserConfig.dropout must be in [0, 1), got {self.dropout!r}")
        bounds = self.offset_head_ranges
        if bounds and (not self.kernel_offsets or list(bounds) != sorted(set(bounds)) or bounds[0] <= 0):
            raise DigitsTaskError(
                f"DigitsDenoiserConfig.offset_head_ranges={list(bounds)} must be increasing positive timesteps, with "
                "kernel_offsets=True (e.g. [200, 600] for heads at t < 200, 200-599 and >= 600)"
            )
        if self.offset_head_x0 and not self.kernel_offsets:
            raise DigitsTaskError(
                "DigitsDenoiserConfig.offset_head_x0=True needs kernel_offsets=True (it is an input of the offset head)"
            )

    @property
    def out_channels(self) -> int:
        """Output channels: 2 (epsilon, v) with learned variance, else 1; 2 more with kernel offsets."""
        base = 2 * self.in_channels if self.learned_variance else self.in_channels
        return base + (2 * self.in_channels if self.kernel_offsets else 0)

    @property
    def null_class(self) -> int:
        """Index of the unconditional class (equal to num_classes)."""
        return self.num_classes


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of timesteps.

    Args:
        t: [B] timesteps (integer or fractional, in units of training timesteps, e.g. 0..999).
        dim: even embedding width.
    Returns:
        [B, dim] float32: cos of the first half of the frequencies, then sin.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.to(torch.float32)[:, None] * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the embedding added as a per-channel bias in between."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, num_groups: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(num_groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, out_ch)
        self.norm2 = nn.GroupNorm(num_groups, out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        # Zero-init the last conv so each block starts as the identity (stable early training).
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """x: [B, in_ch, H, W]; emb: [B, emb_dim] (already passed through SiLU) -> [B, out_ch, H, W]."""
        # In-place ops act only on fresh intermediates whose producers' backward does not need them
        # (GroupNorm saves its input, conv its input); fewer allocations is a measurable CPU speed-up.
        h = self.conv1(F.silu(self.norm1(x), inplace=True))
        h = h.add_(self.emb(emb)[:, :, None, None])
        h = self.conv2(self.dropout(F.silu(self.norm2(h), inplace=True)))
        return h.add_(self.skip(x))


class OffsetHead(nn.Module):
    """The kernel-offset branch of an aligned model: one residual block (time- and class-conditioned) on the
    trunk's last features, x_t, the trunk's own output (eps, variance value) and a learned per-class image,
    then GroupNorm-SiLU-conv to (d_mean, d_logvar), the conv zero-initialised so a fresh head outputs 0.

    The optimum's offsets are d_mean ~ g / beta, the step reward's gradient, which for rewards of x0 is a
    function of x0_hat = (x_t - sqrt(1 - ab) eps) / sqrt(ab): hence x_t and eps as inputs. The block gives the
    offsets the t-dependence that the trunk's features alone do not (a bare conv on them is nearly constant
    in t), so the trunk, and with it the reference's noise prediction, can stay frozen while only this head
    trains (StepTrainerConfig.trainable=["offset_head"])."""

    def __init__(
        self, ch: int, extra: int, out_ch: int, emb_dim: int, num_groups: int, dropout: float, classes: int, pixels: int
    ) -> None:
        super().__init__()
        # A learned image per class (and the null class), one more input channel: the trunk carries the class
        # only as a per-channel bias, and the gradient of a class-dependent reward (e.g. distance to the class's
        # mean image) needs it per pixel.
        self.class_map = nn.Embedding(classes, pixels)
        nn.init.normal_(self.class_map.weight, std=0.1)
        in_ch = ch + extra + 1
        self.block = ResBlock(in_ch, ch, emb_dim, num_groups if in_ch % num_groups == 0 else 1, dropout)
        self.norm = nn.GroupNorm(num_groups, ch)
        self.out = nn.Conv2d(ch, out_ch, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, h: Tensor, extra: Tensor, emb: Tensor, cond: Tensor, t: Tensor | None = None) -> Tensor:
        """t: unused (`emb` carries it); taken so one head and `RangedOffsetHead` are called alike."""
        class_map = self.class_map(cond).to(h.dtype).reshape(h.shape[0], 1, *h.shape[2:])
        return self.out(F.silu(self.norm(self.block(torch.cat([h, extra, class_map], dim=1), emb))))


class RangedOffsetHead(nn.Module):
    """One `OffsetHead` per timestep range (`DigitsDenoiserConfig.offset_head_ranges`); each sample goes to the
    head of its t. Same inputs and output as one OffsetHead, plus t."""

    def __init__(self, boundaries: tuple[int, ...], make_head: Callable[[], OffsetHead]) -> None:
        super().__init__()
        self.register_buffer("boundaries", torch.tensor(boundaries, dtype=torch.float64), persistent=False)
        self.heads = nn.ModuleList([make_head() for _ in range(len(boundaries) + 1)])

    def forward(self, h: Tensor, extra: Tensor, emb: Tensor, cond: Tensor, t: Tensor) -> Tensor:
        which = torch.bucketize(t.double(), self.boundaries, right=True)
        out: Tensor | None = None
        for i, head in enumerate(self.heads):
            rows = (which == i).nonzero().flatten()
            if rows.numel() == 0:
                continue
            part = head(h[rows], extra[rows], emb[rows], cond[rows])
            if out is None:
                out = part.new_zeros((h.shape[0], *part.shape[1:]))
            out = out.index_copy(0, rows, part)
        assert out is not None  # a non-empty batch has rows in some range
        return out


class DigitsDenoiser(nn.Module):
    """Class-conditional residual U-Net for [B, 1, 8, 8] inputs (8x8 -> 4x4 -> 2x2 at default config).

    forward(x_t, t, cond) returns [B, 2, 8, 8] with learned variance (channel 0: epsilon prediction,
    channel 1: learned_range value v, frac = (v + 1) / 2), else [B, 1, 8, 8] (epsilon).
    """

    def __init__(self, config: DigitsDenoiserConfig | None = None) -> None:
        super().__init__()
        cfg = config if config is not None else DigitsDenoiserConfig()
        self.config = cfg
        c, e, g, p = cfg.base_channels, cfg.time_embed_dim, cfg.num_groups, cfg.dropout
        self.time_mlp = nn.Sequential(nn.Linear(cfg.time_freq_dim, e), nn.SiLU(), nn.Linear(e, e))
        # One extra row: the null class for classifier-free guidance.
        self.class_emb = nn.Embedding(cfg.num_classes + 1, e)
        self.conv_in = nn.Conv2d(cfg.in_channels, c, 3, padding=1)

        widths = [c * m for m in cfg.channel_mult]
        # Lean U-Net: one skip connection per level (saved after the level's blocks), so the
        # expensive high-resolution level runs few convolutions; that keeps a batch of 256 fast on CPU.
        self.down_blocks = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        ch = c
        for level, w in enumerate(widths):
            blocks = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResBlock(ch, w, e, g, p))
                ch = w
            self.down_blocks.append(blocks)
            if level < len(widths) - 1:
                # Strided conv halves the resolution while keeping the width.
                self.downsamples.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))

        self.mid_blocks = nn.ModuleList([ResBlock(ch, ch, e, g, p) for _ in range(cfg.num_mid_blocks)])

        self.up_blocks = nn.ModuleList()
        self.upsamples = nn.ModuleList()
        for level in reversed(range(len(widths))):
            w = widths[level]
            if level < len(widths) - 1:
                # A 2x2 stride-2 transposed conv doubles the resolution; its patches do not overlap,
                # so it costs about as much as a 1x1 conv at the higher resolution.
                # It also narrows to this level's width, so the high-resolution blocks stay cheap.
                self.upsamples.append(nn.ConvTranspose2d(ch, w, 2, stride=2))
                ch = w
            blocks = nn.ModuleList()
            in_ch = ch + w  # the skip of this level has width w
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResBlock(in_ch, w, e, g, p))
                in_ch = ch = w
            self.up_blocks.append(blocks)

        self.norm_out = nn.GroupNorm(g, ch)
        offsets = 2 * cfg.in_channels if cfg.kernel_offsets else 0
        self.conv_out = nn.Conv2d(ch, cfg.out_channels - offsets, 3, padding=1)
        # Zero-init: an untrained model predicts eps = 0 and v = 0 (and no kernel offsets).
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)
        # A head of its own, so the base model's weights load unchanged into an aligned model with offsets.
        extra = cfg.in_channels + cfg.out_channels - offsets  # x_t and the trunk's (eps, v)
        if cfg.offset_head_x0:
            from msdda.alignment.diffusion import training_scheduler_config
            from msdda.core.schedule import KernelScheduler

            ab = KernelScheduler(training_scheduler_config()).alphas_cumprod
            # not saved: rebuilt from the schedule, so the weights file holds weights only
            self.register_buffer("x0_coefs", torch.stack([ab.rsqrt(), (1 / ab - 1).sqrt()]), persistent=False)
            extra += cfg.in_channels
        def make_head() -> OffsetHead:
            return OffsetHead(ch, extra, offsets, e, g, p, cfg.num_classes + 1, cfg.image_size**2)

        self.offset_head: OffsetHead | RangedOffsetHead | None = None
        if offsets:
            ranges = cfg.offset_head_ranges
            self.offset_head = RangedOffsetHead(ranges, make_head) if ranges else make_head()

    def _check_inputs(self, x_t: Tensor, t: Tensor | float | int, cond: Tensor | None) -> tuple[Tensor, Tensor]:
        cfg = self.config
        if x_t.ndim != 4 or tuple(x_t.shape[1:]) != (cfg.in_channels, cfg.image_size, cfg.image_size):
            raise DigitsTaskError(
                f"DigitsDenoiser expects x_t of shape [B, {cfg.in_channels}, {cfg.image_size}, "
                f"{cfg.image_size}], got {list(x_t.shape)}"
            )
        b = x_t.shape[0]
        t = torch.as_tensor(t, device=x_t.device)
        if t.ndim == 0:
            t = t.expand(b)
        if t.ndim != 1 or t.shape[0] != b:
            raise DigitsTaskError(f"DigitsDenoiser expects t of shape [{b}] or a scalar, got {list(t.shape)}")
        if cond is None:
            cond = torch.full((b,), cfg.null_class, dtype=torch.long, device=x_t.device)
        else:
            cond = torch.as_tensor(cond, device=x_t.device)
            if cond.ndim == 0:
                cond = cond.expand(b)
            if cond.ndim != 1 or cond.shape[0] != b or cond.dtype.is_floating_point or cond.dtype == torch.bool:
                raise DigitsTaskError(
                    f"DigitsDenoiser expects cond as an integer tensor of shape [{b}] (class 0..{cfg.num_classes - 1}, "
                    f"{cfg.null_class} = unconditional), got dtype {cond.dtype} shape {list(cond.shape)}"
                )
            if b and (int(cond.min()) < 0 or int(cond.max()) > cfg.null_class):
                raise DigitsTaskError(
                    f"DigitsDenoiser class labels must be in 0..{cfg.null_class} ({cfg.null_class} = "
                    f"unconditional), got values in [{int(cond.min())}, {int(cond.max())}]"
                )
            cond = cond.long()
        return t, cond

    def forward(self, x_t: Tensor, t: Tensor | float | int, cond: Tensor | None = None) -> Tensor:
        """Predict noise (and variance value) for noisy images.

        Args:
            x_t: [B, 1, 8, 8] noisy images.
            t: [B] or scalar timesteps in training units (0..999), integer or float.
            cond: [B] int64 class labels 0..9, 10 = unconditional; None means all unconditional.
        Returns:
            [B, 2, 8, 8] (epsilon, v) if learned_variance else [B, 1, 8, 8] (epsilon).
        """
        t, cond = self._check_inputs(x_t, t, cond)
        freqs = timestep_embedding(t, self.config.time_freq_dim, self.config.max_period)
        # Sinusoids are computed in float32 for accuracy, then cast to the weights' dtype (e.g. float64).
        emb = self.time_mlp(freqs.to(self.time_mlp[0].weight.dtype))
        emb = F.silu(emb + self.class_emb(cond))

        h = self.conv_in(x_t)
        skips: list[Tensor] = []
        for level, blocks in enumerate(self.down_blocks):
            for block in blocks:
                h = block(h, emb)
            skips.append(h)
            if level < len(self.downsamples):
                h = self.downsamples[level](h)
        for block in self.mid_blocks:
            h = block(h, emb)
        for i, blocks in enumerate(self.up_blocks):
            if i > 0:
                h = self.upsamples[i - 1](h)
            h = torch.cat([h, skips.pop()], dim=1)
            for block in blocks:
                h = block(h, emb)
        out = self.conv_out(F.silu(self.norm_out(h)))
        if self.offset_head is None:
            return out
        inputs = [x_t.to(out.dtype), out]
        if self.config.offset_head_x0:
            c = self.x0_coefs.to(out.dtype)[:, t.long().clamp(0, self.x0_coefs.shape[1] - 1)]
            eps = out[:, : self.config.in_channels]
            x0 = c[0].view(-1, 1, 1, 1) * x_t.to(out.dtype) - c[1].view(-1, 1, 1, 1) * eps
            inputs.append(x0.clamp(-1, 1))
        offsets = self.offset_head(h, torch.cat(inputs, dim=1), emb, cond, t)
        return torch.cat([out, offsets], dim=1)


def with_kernel_offsets(model: DigitsDenoiser, ranges: Sequence[int] = (), x0_input: bool = False) -> DigitsDenoiser:
    """A copy of `model` with a zero-initialised kernel-offset head (one per timestep range when `ranges` gives
    boundaries, see `DigitsDenoiserConfig.offset_head_ranges`; x0_input: `offset_head_x0`): the same kernel
    until trained."""
    import dataclasses

    cfg = dataclasses.replace(
        model.config, kernel_offsets=True, offset_head_ranges=tuple(ranges), offset_head_x0=bool(x0_input)
    )
    out = DigitsDenoiser(cfg).to(next(model.parameters()).dtype)
    missing, unexpected = out.load_state_dict(model.state_dict(), strict=False)
    if unexpected or any(not k.startswith("offset_head.") for k in missing):
        raise DigitsTaskError(f"cannot add kernel offsets: unexpected {unexpected}, missing {missing}")
    return out


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


__all__ = [
    "DigitsDenoiser",
    "DigitsDenoiserConfig",
    "ResBlock",
    "count_parameters",
    "timestep_embedding",
]
