"""SDXL's extra UNet inputs carried inside the one condition tensor the sampler passes around.

The sampler, classifier-free guidance (cond and null rows concatenated along dim 0), the step rules and the
batched K-objective call (rows repeated per objective) all move ONE condition tensor per row. SDXL's UNet
also needs `added_cond_kwargs = {"text_embeds": pooled [B, P], "time_ids": [B, T]}`. Rather than teach every
one of those mechanisms a second argument, `AddedConditions` packs pooled embeddings and time ids into
trailing tokens of the prompt embeddings, `[B, L, D] -> [B, L + n, D]`, and the UNet denoiser unpacks them
right before its UNet call. Whatever is done to the rows of the packed tensor (cat, repeat, expand, split)
is then done to all three inputs alike, so nothing upstream changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from msdda.pipelines.errors import PipelineError


@dataclass(frozen=True)
class AddedConditions:
    """The layout of SDXL's added conditions inside a packed condition tensor.

    text_embeds_dim: P, the pooled text embedding's width (1280 for SDXL: text_encoder_2's projection_dim).
    time_ids_dim: T, the number of size/crop conditioning values (6 for SDXL: original size, crop top-left,
      target size).
    The pooled embedding and the time ids (P + T values) are laid out flat over n = ceil((P + T) / D) extra
    tokens of width D (the prompt embeddings' width), zero-padded: for SDXL (D = 2048, P + T = 1286) one token.
    Several tokens serve narrower models (e.g. D = 1280 with P = 1280), so no width is refused.
    """

    text_embeds_dim: int
    time_ids_dim: int

    def tokens(self, width: int) -> int:
        """n, the number of trailing tokens for prompt embeddings of width D = `width`."""
        return -(-(self.text_embeds_dim + self.time_ids_dim) // width)

    def pack(self, prompt_embeds: Tensor, text_embeds: Tensor, time_ids: Tensor) -> Tensor:
        """[B, L, D] prompt embeddings, [B, P] pooled embeddings, [B, T] time ids -> [B, L + n, D] (the
        prompt embeddings' dtype and device; diffusers also casts the time ids to that dtype)."""
        if prompt_embeds.dim() != 3:
            raise PipelineError(f"prompt_embeds have shape {tuple(prompt_embeds.shape)}; expected [B, L, D]")
        b, _, width = prompt_embeds.shape
        expected = (
            ("pooled text embeddings", text_embeds, self.text_embeds_dim),
            ("time ids", time_ids, self.time_ids_dim),
        )
        for what, value, dim in expected:
            if tuple(value.shape) != (b, dim):
                raise PipelineError(
                    f"the {what} have shape {tuple(value.shape)}; this UNet needs {(b, dim)} (one row per image of "
                    "the prompt embeddings); pass pooled embeddings from the same text encoder as the prompt's"
                )
        n = self.tokens(width)
        flat = torch.cat([text_embeds, time_ids], dim=1).to(prompt_embeds.device, prompt_embeds.dtype)
        flat = torch.nn.functional.pad(flat, (0, n * width - flat.shape[1]))
        return torch.cat([prompt_embeds, flat.view(b, n, width)], dim=1)

    def unpack(self, cond: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """[B, L + n, D] -> (prompt embeddings [B, L, D], pooled [B, P], time ids [B, T])."""
        if not isinstance(cond, Tensor) or cond.dim() != 3:
            raise PipelineError(
                f"an SDXL condition must be a packed tensor [B, L + n, D], got "
                f"{tuple(cond.shape) if isinstance(cond, Tensor) else type(cond).__name__}; build it with "
                "AddedConditions.pack(prompt_embeds, pooled_prompt_embeds, time_ids)"
            )
        n = self.tokens(cond.shape[-1])
        if cond.shape[1] <= n:
            raise PipelineError(
                f"the condition has {cond.shape[1]} token(s) but its added conditions alone take {n}; it was not "
                "packed by AddedConditions.pack"
            )
        flat = cond[:, -n:].reshape(cond.shape[0], -1)
        p = self.text_embeds_dim
        return cond[:, :-n], flat[:, :p], flat[:, p : p + self.time_ids_dim]

    def unet_inputs(self, cond: Tensor) -> dict[str, Any]:
        """The UNet keywords for a packed condition: encoder_hidden_states and added_cond_kwargs."""
        embeds, text_embeds, time_ids = self.unpack(cond)
        added = {"text_embeds": text_embeds, "time_ids": time_ids}
        return {"encoder_hidden_states": embeds, "added_cond_kwargs": added}


def unet_inputs(conditions: AddedConditions | None, cond: Tensor) -> dict[str, Any]:
    """The UNet keywords for condition `cond`: the prompt embeddings themselves (SD, conditions None) or the
    unpacked SDXL inputs."""
    if conditions is None:
        return {"encoder_hidden_states": cond}
    return conditions.unet_inputs(cond)
