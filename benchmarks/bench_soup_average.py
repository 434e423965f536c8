"""How far apart the two Rewarded-Soups averages of LoRA adapters are, on a tiny SD-shaped UNet.

Two adapters of one configuration (rank 4, alpha 8 on to_q/to_k/to_v/to_out.0, factors drawn independently
from N(0, 0.3^2), as the pipeline tests do) on a UNet2DConditionModel built from config. For each weight
vector (w, 1 - w): msdda.pipelines.build_lora_soup with average="delta" (dW = sum_k w_k s B_k A_k) and
average="factors" (dW = s (sum_k w_k B_k)(sum_k w_k A_k)). Reported: ||dW_delta - dW_factors||_F /
||dW_delta||_F over all adapted layers, and the largest difference of one UNet forward (noise prediction at
t = 500 on a random latent and prompt embedding) between the two soups, next to the output's std. Also the
factor soup against a UNet holding one adapter whose A and B were averaged by hand (should be ~1e-6).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_soup_average.py [--weights 0.3,0.5]
"""

from __future__ import annotations

import argparse
import copy

import torch


def _unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        norm_num_groups=8,
        attention_head_dim=4,
    ).eval()


def _delta(layer, adapter: str) -> torch.Tensor:
    a, b = layer.lora_A[adapter].weight.double(), layer.lora_B[adapter].weight.double()
    return layer.scaling[adapter] * (b.flatten(1) @ a.flatten(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default="0.3,0.5", help="comma-separated w of the first adapter")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from peft import LoraConfig
    from peft.tuners.lora import LoraLayer

    from msdda.pipelines import build_lora_soup

    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    base = _unet()
    unet = copy.deepcopy(base)
    for name, seed in (("f1", 21), ("f2", 22)):
        unet.add_adapter(copy.deepcopy(cfg), adapter_name=name)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for pname, p in unet.named_parameters():
                if f"lora_A.{name}." in pname or f"lora_B.{name}." in pname:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    g = torch.Generator().manual_seed(1)
    x, emb = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 5, 16, generator=g)
    t = torch.tensor([500])
    for w in (float(v) for v in args.weights.split(",")):
        weights = {"f1": w, "f2": 1.0 - w}
        build_lora_soup(unet, weights, "delta", average="delta")
        build_lora_soup(unet, weights, "factors", average="factors")
        num = den = 0.0
        layers = [(n, m) for n, m in unet.named_modules() if isinstance(m, LoraLayer)]
        outs = {}
        with torch.no_grad():
            for _, layer in layers:
                d, f = _delta(layer, "delta"), _delta(layer, "factors")
                num += float((d - f).pow(2).sum())
                den += float(d.pow(2).sum())
            for soup in ("delta", "factors"):
                unet.set_adapter(soup)
                outs[soup] = unet(x, t, emb).sample
            hand = copy.deepcopy(base)
            hand.add_adapter(copy.deepcopy(cfg), adapter_name="hand")
            for name, layer in layers:
                target = hand.get_submodule(name)
                for part in ("lora_A", "lora_B"):
                    avg = sum(v * getattr(layer, part)[k].weight for k, v in weights.items())
                    getattr(target, part)["hand"].weight.copy_(avg)
            by_hand = hand(x, t, emb).sample
        unet.delete_adapters(["delta", "factors"])
        diff = float((outs["delta"] - outs["factors"]).abs().max())
        print(
            f"w = ({w:g}, {1 - w:g}): ||dW_delta - dW_factors||_F / ||dW_delta||_F = {(num / den) ** 0.5:.3f} over "
            f"{len(layers)} layers; one forward: max |delta - factors| = {diff:.3f} (output std "
            f"{float(outs['delta'].std()):.3f}); factors vs hand-averaged factors: "
            f"{float((outs['factors'] - by_hand).abs().max()):.1e}"
        )


if __name__ == "__main__":
    main()
