"""Fusion cost vs one model evaluation (goal: fusion < 1% of a UNet forward).

Times one `fuse_gaussians` call on an 8x4x64x64 latent for K = 2, 4, 8 kernels (scalar variances, as
DDPM/DDIM fixed-variance schedulers give, and per-element variances, as learned-variance models give) and
divides by the time of one forward of a small diffusers UNet2DConditionModel on the same latent.

    .venv/bin/python benchmarks/bench_fusion.py [--repeats 20]
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
from diffusers import UNet2DConditionModel

from msdda import fuse_gaussians


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.manual_seed(0)
    shape = (8, 4, 64, 64)
    # The smallest SD-shaped UNet we could call "a model": attention only at the 32x32 level (full
    # 64x64 self-attention would make the model 10x slower and the ratio flatteringly small).
    unet = UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
    ).eval()
    latent = torch.randn(shape)
    text = torch.randn(shape[0], 8, 32)
    t = torch.full((shape[0],), 500)
    with torch.no_grad():
        unet_s = best_time(lambda: unet(latent, t, encoder_hidden_states=text), max(3, args.repeats // 4))
    params = sum(p.numel() for p in unet.parameters())
    print(f"machine: {platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"small UNet2DConditionModel ({params / 1e6:.2f} M params) forward on {shape}: {unet_s * 1e3:.1f} ms")
    print(f"{'K':>3} {'variances':>12} {'fusion ms':>10} {'ratio':>8}")
    for k in (2, 4, 8):
        means = [torch.randn(shape) for _ in range(k)]
        w = [1.0 / k] * k
        scalar = [0.01 + 0.001 * i for i in range(k)]
        per_element = [0.01 + torch.rand(shape) for _ in range(k)]
        for label, variances in (("scalar", scalar), ("per-element", per_element)):
            s = best_time(lambda v=variances, m=means, w=w: fuse_gaussians(m, v, w), args.repeats)
            print(f"{k:>3} {label:>12} {s * 1e3:>10.2f} {s / unet_s:>8.2%}")


if __name__ == "__main__":
    main()
