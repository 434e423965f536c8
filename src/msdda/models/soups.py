"""Rewarded Soups: one model whose parameters interpolate the single-objective models'.

theta = sum_k w_k theta_k over every floating-point parameter and buffer (integer buffers, e.g. step
counters, are taken from the first model). For LoRA adapters the interpolation is of the low-rank updates
dW = sum_k w_k B_k A_k (see msdda.pipelines), not of A and B separately; `build_lora_soup(average="factors")`
offers the factor average as well, for reproducing baselines that used it.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
from torch import nn

from msdda.errors import MSDDAError


class SoupError(MSDDAError):
    """Models cannot be interpolated (different architectures, bad weights)."""


def rewarded_soup(modules: Sequence[nn.Module], weights: Sequence[float]) -> nn.Module:
    """A new module (a deep copy of the first) with parameters sum_k w_k theta_k. Inputs are unchanged."""
    if not modules:
        raise SoupError("no models to interpolate; pass one module per objective")
    w = [float(x) for x in weights]
    if len(w) != len(modules):
        raise SoupError(f"{len(w)} weights for {len(modules)} models; pass one weight per model")
    for i, x in enumerate(w):
        if not math.isfinite(x):
            raise SoupError(f"weight {i} is {x}; weights must be finite")
    states = [m.state_dict() for m in modules]
    keys = list(states[0])
    for i, s in enumerate(states[1:], start=1):
        if list(s) != keys:
            missing = sorted(set(keys) ^ set(s))[:5]
            raise SoupError(
                f"model {i} has different parameters than model 0 (e.g. {missing}); the same architecture is needed"
            )
        for k in keys:
            if s[k].shape != states[0][k].shape:
                raise SoupError(
                    f"parameter {k!r} has shape {tuple(s[k].shape)} in model {i} "
                    f"but {tuple(states[0][k].shape)} in model 0"
                )
    soup = copy.deepcopy(modules[0])
    mixed = {}
    for k in keys:
        if states[0][k].is_floating_point():
            mixed[k] = sum(wi * s[k].to(torch.float64) for wi, s in zip(w, states, strict=True)).to(states[0][k].dtype)
        else:
            mixed[k] = states[0][k].clone()
    soup.load_state_dict(mixed)
    return soup
