"""Objectives of the Stable Diffusion pipeline: LoRA adapters on the one base UNet, or full UNets.

A LoRA objective lives *inside* the base UNet as a named peft adapter; `AdapterSwitch` activates exactly
one adapter for one forward pass and disables them all afterwards, so memory stays one UNet plus the
adapters and the base weights are never written. A full-UNet objective is a separate
`UNet2DConditionModel` with the base's architecture.

Accepted sources (see `resolve_objective`):
* the name of an adapter already loaded into the base UNet (`unet.peft_config`);
* a diffusers-format LoRA: a `.safetensors` file, or a folder holding `pytorch_lora_weights.safetensors`
  (what `StableDiffusionPipeline.save_lora_weights` writes; kohya/A1111 keys are converted by diffusers);
* a peft-format LoRA folder: `adapter_config.json` + `adapter_model.safetensors` (what
  `PeftModel.save_pretrained` writes);
* a full UNet: a folder with a UNet `config.json` (+ safetensors weights), a pipeline folder (its `unet/`
  is used), or an `nn.Module` (a UNet2DConditionModel instance).
Pickled checkpoints (`.bin`, `.pt`, `.pth`, `.ckpt`) are refused: unpickling runs arbitrary code.
"""

from __future__ import annotations

import copy
import json
import logging
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from msdda.pipelines._deps import dtype_kwargs, require
from msdda.pipelines.conditioning import AddedConditions, unet_inputs
from msdda.pipelines.errors import AdapterError, ObjectiveError
from msdda.sampling.methods import SOUP_AVERAGES

logger = logging.getLogger(__name__)

RESERVED_NAMES = ("reference", "base")
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_\-]*$")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_DIFFUSERS_LORA_FILE = "pytorch_lora_weights.safetensors"
_PEFT_CONFIG_FILE = "adapter_config.json"
_PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")


@dataclass(frozen=True)
class Objective:
    """One single-objective model as the pipeline holds it.

    name: the objective's name (a key of `weights`). kind: "lora" (an adapter inside the base UNet) or
    "unet" (a separate full UNet). adapter: the peft adapter name (LoRA only). unet: the full UNet
    (kind "unet" only). source: where it came from (a path, "adapter:<name>" or "module"), for records.
    variance_head: the objective's `TimestepVarianceHead` when its LoRA folder holds variance_head.safetensors
    (trained by `msdda align --task sd --variance-head`): its kernels then have a variance of their own.
    """

    name: str
    kind: str
    source: str
    adapter: str | None = None
    unet: nn.Module | None = None
    variance_head: nn.Module | None = None


def check_objective_name(name: Any) -> str:
    """Validate an objective name: non-empty, letters/digits/'_'/'-', not 'reference' or 'base'."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ObjectiveError(
            f"objective name {name!r} is not valid; use letters, digits, '_' and '-' (no dots), e.g. 'aesthetic'"
        )
    if name in RESERVED_NAMES:
        raise ObjectiveError(
            f"objective name {name!r} is reserved ('reference' is the base UNet with adapters disabled); "
            "choose another name"
        )
    return name


# ----- adapter switching ------------------------------------------------------------------------------


class AdapterSwitch:
    """Turns the peft LoRA layers of one UNet on for exactly one adapter, or off.

    The layer list is collected once (call `refresh` after adapters are added or removed), so a switch
    costs a pass over the LoRA layers only, not over every module of the UNet. Adapter weights are frozen
    (requires_grad False: this is inference). peft's public `set_adapter`/`enable_adapters` also re-set
    requires_grad on every adapter weight at each call, which costs about as much as a small UNet forward;
    when the installed peft keeps the switch state in `_active_adapter` / `_disable_adapters` (checked by
    a probe through its public properties) those two are set directly, else the public methods are used.
    """

    def __init__(self, unet: nn.Module) -> None:
        self.unet = unet
        self.layers: list[Any] = []
        self.fast = False
        self.refresh()

    def refresh(self) -> None:
        """Re-collect the UNet's peft tuner layers (after loading or deleting adapters); freeze adapters."""
        try:
            from peft.tuners.tuners_utils import BaseTunerLayer
        except ImportError:  # no peft: no adapters can be loaded, so there is nothing to switch
            self.layers = []
            return
        self.layers = [m for m in self.unet.modules() if isinstance(m, BaseTunerLayer)]
        for layer in self.layers:
            layer.set_adapter(layer.active_adapters, inference_mode=True)  # public; freezes every adapter
        self.fast = bool(self.layers) and self._probe()

    def _probe(self) -> bool:
        layer = self.layers[0]
        if not (hasattr(layer, "_active_adapter") and hasattr(layer, "_disable_adapters")):
            return False
        saved = (layer._active_adapter, layer._disable_adapters)
        try:
            layer._active_adapter, layer._disable_adapters = ["__msdda_probe__"], False
            ok = list(layer.active_adapters) == ["__msdda_probe__"] and layer.disable_adapters is False
            layer._disable_adapters = True
            return ok and layer.disable_adapters is True
        except Exception:
            return False
        finally:
            layer._active_adapter, layer._disable_adapters = saved

    def disable(self) -> None:
        """Disable every adapter: the UNet computes with its base weights only."""
        if self.fast:
            for layer in self.layers:
                layer._disable_adapters = True
            return
        for layer in self.layers:
            if not layer.disable_adapters:
                layer.enable_adapters(False)

    def enable(self, adapter: str | list[str]) -> None:
        """Make `adapter` the only active adapter on every layer (layers without it use base weights); a list
        makes all of them active (what a mixed-adapter batch needs, so diffusers' LoRA `scale` scales each)."""
        names = [adapter] if isinstance(adapter, str) else list(adapter)
        if self.fast:
            for layer in self.layers:
                layer._active_adapter = names
                layer._disable_adapters = False
            return
        for layer in self.layers:
            layer.enable_adapters(True)
            layer.set_adapter(adapter, inference_mode=True)

    def delete(self, adapter: str) -> None:
        """Delete `adapter` from the UNet (layers first point at another adapter, so peft has nothing to warn)."""
        peft_config = getattr(self.unet, "peft_config", None) or {}
        if adapter not in peft_config:
            return
        others = [a for a in peft_config if a != adapter]
        for layer in self.layers:
            if adapter in layer.active_adapters and others:
                layer.set_adapter(others[0], inference_mode=True)
        self.unet.delete_adapters(adapter)
        self.refresh()
        self.disable()

    def any_enabled(self) -> bool:
        """True when some layer still has its adapters enabled."""
        return any(not layer.disable_adapters for layer in self.layers)

    @contextmanager
    def active(self, adapter: str | None) -> Iterator[None]:
        """Within the block only `adapter` is active (None: none is); on exit every adapter is disabled."""
        if adapter is None:
            self.disable()
        else:
            self.enable(adapter)
        try:
            yield
        finally:
            self.disable()


class UNetRestorePoint:
    """What a UNet's adapter bookkeeping looked like before the pipeline touched it, to put it back exactly.

    Recorded: the train/eval flag, which modules were peft tuner layers, the peft_config keys, each tuner
    layer's active adapters and disabled flag, and every parameter's requires_grad. `restore` (after the
    pipeline deleted the adapters it added) unwraps every tuner layer that was a plain module before (so the
    state_dict keys are the original ones again, `x.base_layer.weight` -> `x.weight`, same tensors), drops a
    peft_config the UNet did not have and resets the rest. The base weights are never written, so their
    values need no copy.
    """

    def __init__(self, unet: nn.Module) -> None:
        self.training = unet.training
        self.had_peft_config = "peft_config" in vars(unet)
        self.peft_loaded = vars(unet).get("_hf_peft_config_loaded", _MISSING)
        self.tuner_layers: dict[str, tuple[list[str], bool]] = {}
        for name, module in unet.named_modules():
            if _is_tuner_layer(module):
                self.tuner_layers[name] = (list(module.active_adapters), bool(module.disable_adapters))
        self.requires_grad = {name: p.requires_grad for name, p in unet.named_parameters()}

    def added_tuner_layers(self, unet: nn.Module) -> list[str]:
        """Names of the tuner layers that were plain modules when the restore point was taken."""
        return [n for n, m in unet.named_modules() if _is_tuner_layer(m) and n not in self.tuner_layers]

    def restore(self, unet: nn.Module) -> None:
        """Put the bookkeeping back; call after deleting every adapter added since the restore point."""
        for name in self.added_tuner_layers(unet):
            layer = unet.get_submodule(name)
            if getattr(layer, "lora_A", None):
                raise AdapterError(
                    f"layer {name!r} still holds adapters {sorted(layer.lora_A)} that were added after the pipeline "
                    "was built; delete them (unet.delete_adapters) before release()"
                )
            parent_name, _, child = name.rpartition(".")
            setattr(unet.get_submodule(parent_name) if parent_name else unet, child, layer.get_base_layer())
        if not self.had_peft_config and "peft_config" in vars(unet) and not unet.peft_config:
            del unet.peft_config
        if self.peft_loaded is _MISSING:
            vars(unet).pop("_hf_peft_config_loaded", None)
        else:
            unet._hf_peft_config_loaded = self.peft_loaded
        for name, (active, disabled) in self.tuner_layers.items():
            layer = unet.get_submodule(name)
            if active and all(a in getattr(layer, "lora_A", {a: None}) for a in active):
                layer.set_adapter(active)
            layer.enable_adapters(not disabled)
        for name, p in unet.named_parameters():
            if name in self.requires_grad:
                p.requires_grad_(self.requires_grad[name])
        unet.train(self.training)


_MISSING = object()


def _is_tuner_layer(module: nn.Module) -> bool:
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return False
    return isinstance(module, BaseTunerLayer)


class UNetDenoiser:
    """A Denoiser over latents: `(x_t [B, 4, h, w], t LongTensor [B], cond=prompt_embeds [B, L, D]) -> eps`.

    conditions: for SDXL UNets, the layout of the pooled embeddings and time ids packed as trailing tokens of
    `cond` (msdda.pipelines.conditioning.AddedConditions); they are unpacked into the UNet's
    added_cond_kwargs right before each call. None (SD): cond is the prompt embeddings themselves.

    unet: the UNet2DConditionModel to call. adapter: the LoRA adapter to activate for the pass (None with a
    `switch`: the base weights, adapters disabled). cross_attention_kwargs: passed to every UNet call as
    diffusers does (e.g. {"scale": 0.5} scales the active LoRA adapter). The output has the UNet's
    out_channels (the scheduler's prediction_type says whether it is epsilon, x0 or v); with a
    `variance_head` it is [B, 3C]: the prediction and the kernel offsets (d_mean = 0, the head's d_logvar(t)).
    """

    def __init__(
        self,
        unet: nn.Module,
        *,
        name: str,
        adapter: str | None = None,
        switch: AdapterSwitch | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        variance_head: nn.Module | None = None,
        conditions: AddedConditions | None = None,
    ):
        self.unet = unet
        self.conditions = conditions
        self.name = name
        self.adapter = adapter
        self.switch = switch
        self.cross_attention_kwargs = cross_attention_kwargs
        self.variance_head = variance_head
        self.forwards = 0  # UNet forwards, counted in samples (a CFG pass of batch 2B counts 2B)

    def finish(self, out: Tensor, t: Tensor) -> Tensor:
        """The denoiser's output from the UNet's `out` at timesteps t: with a variance head, the kernel
        offsets appended (the one place they are added, for the one-by-one and the batched calls alike)."""
        if self.variance_head is None:
            return out
        from msdda.models.variance_head import with_variance_offsets

        return with_variance_offsets(out, self.variance_head(t))

    def __call__(self, x_t: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        if not isinstance(cond, Tensor):
            raise AdapterError(
                f"objective {self.name!r}: cond must be the prompt embeddings tensor [B, L, D], "
                f"got {type(cond).__name__}"
            )
        self.forwards += x_t.shape[0]
        kwargs = {"cross_attention_kwargs": self.cross_attention_kwargs} if self.cross_attention_kwargs else {}
        kwargs.update(unet_inputs(self.conditions, cond))
        if self.switch is None:
            return self.finish(self.unet(x_t, t, return_dict=False, **kwargs)[0], t)
        with self.switch.active(self.adapter):
            out = self.unet(x_t, t, return_dict=False, **kwargs)[0]
        return self.finish(out, t)

    def batch_evaluator(
        self, members: Sequence[Any], *, required: bool, guidance_scale: float | None, null_cond: Any
    ) -> UNetBatch | None:
        """The sampler's batched evaluator for `members` (UNetDenoisers; see UNetBatch.build)."""
        return UNetBatch.build(members, required=required, guidance_scale=guidance_scale, null_cond=null_cond)


# ----- batched evaluation -----------------------------------------------------------------------------

BASE_ROWS = "__base__"  # peft's adapter name for rows that use the base weights only (adapters off)


def _route_rows_hook(names: list[str], module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    # What peft's own `_adapter_names_pre_forward_hook` does for a PeftModel: each LoRA layer gets the
    # per-row adapter names and runs `_mixed_batch_forward`.
    kwargs["adapter_names"] = names
    return args, kwargs


@contextmanager
def mixed_adapter_rows(switch: AdapterSwitch, names: list[str]) -> Iterator[None]:
    """Within the block, row i of every UNet forward uses adapter names[i] ("__base__": none).

    A diffusers UNet with injected adapters is not a PeftModel, so peft's `adapter_names=` forward argument
    is not available on it; the same pre-forward hook peft registers is put on every LoRA layer instead.
    The adapters named are made active (so a cross_attention_kwargs "scale" scales each of them, as it
    scales the one active adapter of a sequential call). On exit, also after an error, the hooks are removed
    and every adapter is disabled again, so the UNet computes exactly as before.
    """
    adapters = sorted({n for n in names if n != BASE_ROWS})
    handles = []
    try:
        if adapters:  # rows of the base weights only: nothing to route, the adapters stay off
            switch.enable(adapters)
            hook = partial(_route_rows_hook, names)
            handles = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in switch.layers]
        else:
            switch.disable()
        yield
    finally:
        for handle in handles:
            handle.remove()
        switch.disable()


def _describe(members: Sequence[Any], index: int) -> str:
    return repr(getattr(members[index], "name", f"model {index}"))


def mixed_batch_problem(dens: Sequence[UNetDenoiser]) -> str | None:
    """Why these denoisers (adapters of one UNet, or its base weights) cannot share one mixed-adapter UNet
    call, or None when they can. Checked: the UNet is in eval mode, every tuner layer is a peft LoRA layer
    (not LoHa/LoKr/...), none has merged (fused) adapters, no adapter used is DoRA or another LoRA variant
    (peft's mixed batches refuse DoRA; aLoRA etc. need extra inputs), no adapter is literally named
    '__base__', and every denoiser passes the same cross_attention_kwargs (one UNet call takes one; a LoRA
    `scale` that differs per objective cannot be mixed)."""
    first = dens[0]
    unet, switch = first.unet, first.switch
    if unet.training:
        return "the UNet is in training mode (peft mixes adapters at inference only); call unet.eval()"
    for d in dens[1:]:
        if d.conditions != first.conditions:
            return (
                f"objectives {first.name!r} and {d.name!r} unpack their conditions differently ({first.conditions!r} "
                f"vs {d.conditions!r}); one UNet call takes one layout"
            )
        if d.cross_attention_kwargs != first.cross_attention_kwargs:
            return (
                f"objectives {first.name!r} and {d.name!r} pass different cross_attention_kwargs "
                f"({first.cross_attention_kwargs!r} vs {d.cross_attention_kwargs!r}); one UNet call takes one, "
                "so give every objective the same (e.g. the same LoRA scale)"
            )
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return "peft is not importable"
    used = {d.adapter for d in dens if d.adapter is not None}
    if BASE_ROWS in used:
        return f"an adapter is named {BASE_ROWS!r}, peft's name for the base weights in a mixed batch; rename it"
    seen: set[str] = set()
    for layer in switch.layers:
        if not isinstance(layer, LoraLayer):
            return f"the UNet holds a {type(layer).__name__} tuner layer; peft mixes LoRA adapters only"
        if layer.merged:
            return (
                f"a LoRA layer ({type(layer.get_base_layer()).__name__}) has adapters merged into its weights "
                f"{list(layer.merged_adapters)}; call unet.unfuse_lora() first"
            )
        for a in used & set(layer.lora_A):
            seen.add(a)
            if layer.use_dora.get(a, False):
                return f"adapter {a!r} uses DoRA, which peft's mixed-adapter batches do not support"
            variant = getattr(layer, "lora_variant", {}).get(a)
            if variant is not None:
                return f"adapter {a!r} is a LoRA variant ({type(variant).__name__}); batched here: plain LoRA only"
    missing = sorted(used - seen)
    if missing:
        return f"adapter(s) {missing} are on no LoRA layer of the UNet"
    return None


class UNetBatch:
    """Evaluates the sampler's UNetDenoisers at one (x_t [B, 4, h, w], t [B], cond [B, L, D]) in few UNet calls.

    members: the K objectives, then the reference when the rule uses it. They are grouped once:
    * adapter groups: the members on one UNet that holds peft LoRA layers (LoRA objectives, the soup, the
      reference = base weights) run as ONE forward of batch n*B (2nB with CFG: per member its cond rows,
      then its uncond rows), row i routed to its member's adapter by peft's mixed-adapter batches
      (`mixed_adapter_rows`). Equal to the sequential calls up to float rounding of the larger batch.
    * a vmap group: members that are separate plain UNets of one architecture (full-UNet objectives; the
      base when it holds no adapters) run as one torch.func.vmap call over their stacked weights
      (msdda.models.batched.StackedDenoisers; K copies of their weights live while the sampler runs). On CPU
      vmap has no batching rule for scaled-dot-product attention and loops over the models there.
    * the rest (one member per UNet) one call each, exactly as sequentially.
    `evaluate(x_t, t, cond, indices)` runs just those members (a rule's subset); `__call__` runs all.
    Outputs are guided as ClassifierFreeGuidance would guide each member (guidance_scale not None), and
    each UNetDenoiser's `forwards` grows as in its own calls. A failure at run time (not an input error)
    abandons batching for good with a warning (required=False) or raises BatchingError (required=True).
    """

    includes_reference = False  # set by msdda.models.batched.stack_for_sampling

    def __init__(
        self,
        members: Sequence[UNetDenoiser],
        groups: list[tuple[str, list[int]]],
        *,
        guidance_scale: float | None,
        null_cond: Any,
        required: bool,
    ) -> None:
        self.members = list(members)
        self.groups = groups  # (kind "adapters" | "vmap" | "alone", member indices), in member order
        self.guidance_scale = guidance_scale
        self.null_cond = null_cond
        self.required = required
        self.failure: str | None = None  # why batching was abandoned (required=False only)
        self._stacked: dict[int, Any] = {}  # group number -> StackedDenoisers (built lazily)

    @property
    def num_models(self) -> int:
        return len(self.members)

    @property
    def unet_calls_per_step(self) -> int:
        """UNet calls (vmapped calls count one) when every member is evaluated."""
        return sum(len(idx) if kind == "alone" else 1 for kind, idx in self.groups)

    # ----- building ---------------------------------------------------------------------------------------
    @classmethod
    def build(
        cls, members: Sequence[Any], *, required: bool, guidance_scale: float | None, null_cond: Any
    ) -> UNetBatch | None:
        """The evaluator, or None for the sequential path (required=False: batching would not pay: on CPU
        unless msdda.models.batched.AUTO_BATCH_ON_CPU, or no UNet call would be saved, or the members cannot
        be batched, said in a debug log). required=True: BatchingError naming the reason instead, also when
        the members need more than one UNet call per step (e.g. a full-UNet objective beside LoRA ones)."""
        from msdda.models import batched as batched_mod

        def refuse(reason: str) -> None:
            if required:
                raise batched_mod.BatchingError(
                    f"cannot evaluate the {len(members)} objectives in one batched UNet call: {reason}. Pass "
                    "batch_models=False (one by one) or None (batch where it pays, else one by one)"
                )
            logger.debug("evaluating the %d objectives one by one: %s", len(members), reason)

        bad = [i for i, m in enumerate(members) if not isinstance(m, UNetDenoiser)]
        if bad:
            refuse(f"{_describe(members, bad[0])} is a {type(members[bad[0]]).__name__}, not a UNet objective")
            return None
        if guidance_scale is not None and not (isinstance(null_cond, Tensor)):
            refuse("classifier-free guidance needs the negative prompt embeddings as a tensor")
            return None
        groups, notes = cls._group(members)
        device = next(members[0].unet.parameters()).device
        batch = cls(members, groups, guidance_scale=guidance_scale, null_cond=null_cond, required=required)
        if required:
            if notes:
                refuse(notes[0])
            if len(groups) > 1:
                a, b = groups[0][1][0], groups[1][1][0]
                refuse(
                    f"{_describe(members, a)} and {_describe(members, b)} run on different UNets (LoRA adapters "
                    "of the base UNet, full-UNet objectives of another architecture or with adapters of their own)"
                )
            return batch
        for note in notes:
            logger.debug("objectives evaluated one by one: %s", note)
        if not batched_mod.auto_batch_allowed(device):
            refuse("on CPU the one-by-one UNet calls are about as fast (see docs/benchmarks.md)")
            return None
        if batch.unet_calls_per_step == len(members):
            refuse("no two objectives share a UNet call (each runs on a UNet of its own, or cannot be batched)")
            return None
        return batch

    @staticmethod
    def _group(members: Sequence[UNetDenoiser]) -> tuple[list[tuple[str, list[int]]], list[str]]:
        """Groups of member indices (in member order) and, for members that could have shared a call but
        cannot, the reasons (those members are then "alone" groups)."""
        from msdda.models.batched import can_stack

        by_unet: dict[int, list[int]] = {}
        for i, m in enumerate(members):
            by_unet.setdefault(id(m.unet), []).append(i)
        groups: list[tuple[str, list[int]]] = []
        notes: list[str] = []
        plain: list[int] = []
        for idx in by_unet.values():
            dens = [members[i] for i in idx]
            switch = dens[0].switch
            has_adapters = switch is not None and bool(switch.layers)
            if has_adapters and len(idx) > 1 and all(d.switch is switch for d in dens):
                problem = mixed_batch_problem(dens)
                if problem is None:
                    groups.append(("adapters", idx))
                    continue
                notes.append(problem)
            elif not has_adapters and len(idx) == 1 and not _holds_tuner_layers(dens[0].unet):
                plain.append(idx[0])
                continue
            groups += [("alone", [i]) for i in idx]
        if len(plain) > 1:
            ok, reason = _same_unet_config([members[i] for i in plain])
            if ok:
                ok, reason = can_stack([_PlainUNet(members[i]) for i in plain], ignore_attributes=_CONFIG_ATTRS)
            if ok:
                groups.append(("vmap", plain))
            else:
                notes.append(f"the full-UNet objectives cannot be vmapped together: {reason}")
                groups += [("alone", [i]) for i in plain]
        elif plain:
            groups.append(("alone", plain))
        groups.sort(key=lambda g: g[1][0])
        return groups, notes

    # ----- evaluating -------------------------------------------------------------------------------------
    def __call__(self, x_t: Tensor, t: Tensor, cond: Any = None) -> list[Tensor]:
        """Every member's (guided) output [B, C, h, w], in member order."""
        return self.evaluate(x_t, t, cond, range(len(self.members)))

    def evaluate(self, x_t: Tensor, t: Tensor, cond: Any, indices: Sequence[int]) -> list[Tensor]:
        """The (guided) outputs of members `indices`, in that order: each group's requested members in one
        call (a vmap group only when all its members are requested), the rest one by one."""
        indices = list(indices)
        if not isinstance(cond, Tensor):
            raise AdapterError(
                f"objective {self.members[indices[0]].name!r}: cond must be the prompt embeddings tensor [B, L, D], "
                f"got {type(cond).__name__}"
            )
        out: dict[int, Tensor] = {}
        wanted = set(indices)
        for number, (kind, idx) in enumerate(self.groups):
            mine = [i for i in idx if i in wanted]
            if not mine:
                continue
            if self.failure is None and kind == "adapters" and len(mine) > 1:
                results = self._guarded(self._mixed, mine, x_t, t, cond)
            elif self.failure is None and kind == "vmap" and mine == idx:
                results = self._guarded(self._vmapped, mine, x_t, t, cond, number=number)
            else:
                results = None
            if results is None:
                results = [self._one(i, x_t, t, cond) for i in mine]
            out.update(zip(mine, results, strict=True))
        return [out[i] for i in indices]

    def _guarded(self, fn: Any, mine: list[int], *args: Any, **kwargs: Any) -> list[Tensor] | None:
        from msdda.errors import MSDDAError
        from msdda.models.batched import BatchingError

        try:
            return fn(mine, *args, **kwargs)
        except MSDDAError as exc:
            if not isinstance(exc, BatchingError) or self.required:
                raise
            cause = str(exc)
        except Exception as exc:
            cause = f"{type(exc).__name__}: {exc}"
            if self.required:
                names = ", ".join(_describe(self.members, i) for i in mine)
                raise BatchingError(
                    f"the batched UNet call of objectives {names} failed ({cause}); pass batch_models=False "
                    "(one by one) or None (falls back by itself)"
                ) from exc
        self.failure = cause
        logger.warning("batched UNet evaluation abandoned (%s); evaluating the objectives one by one", cause)
        return None

    def _rows(self, x_t: Tensor, t: Tensor, cond: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One member's input rows: (x, t, cond), with CFG [x; x], [t; t], [cond; null] (ClassifierFreeGuidance's)."""
        if self.guidance_scale is None:
            return x_t, t, cond
        from msdda.models.denoiser import _concat_cond

        return torch.cat([x_t, x_t]), torch.cat([t, t]), _concat_cond(cond, self.null_cond)

    def _guide(self, outs: Sequence[Tensor], x_t: Tensor) -> list[Tensor]:
        if self.guidance_scale is None:
            return list(outs)
        from msdda.models.denoiser import combine_guidance

        b = x_t.shape[0]
        return [combine_guidance(o[:b], o[b:], self.guidance_scale, x_t.shape[1]) for o in outs]

    def _mixed(self, mine: list[int], x_t: Tensor, t: Tensor, cond: Tensor) -> list[Tensor]:
        dens = [self.members[i] for i in mine]
        x1, t1, c1 = self._rows(x_t, t, cond)
        rows = x1.shape[0]
        names = [d.adapter or BASE_ROWS for d in dens for _ in range(rows)]
        first = dens[0]
        kwargs = {"cross_attention_kwargs": first.cross_attention_kwargs} if first.cross_attention_kwargs else {}
        n = len(dens)
        kwargs.update(unet_inputs(first.conditions, c1.repeat(n, *([1] * (c1.dim() - 1)))))
        with mixed_adapter_rows(first.switch, names):
            out = first.unet(x1.repeat(n, *([1] * (x1.dim() - 1))), t1.repeat(n), return_dict=False, **kwargs)[0]
        for d in dens:
            d.forwards += rows
        return self._guide([d.finish(o, t1) for d, o in zip(dens, out.split(rows), strict=True)], x_t)

    def _vmapped(self, mine: list[int], x_t: Tensor, t: Tensor, cond: Tensor, *, number: int) -> list[Tensor]:
        from msdda.models.batched import StackedDenoisers

        stacked = self._stacked.get(number)
        if stacked is None:
            stacked = StackedDenoisers([_PlainUNet(self.members[i]) for i in mine], ignore_attributes=_CONFIG_ATTRS)
            self._stacked[number] = stacked
        x1, t1, c1 = self._rows(x_t, t, cond)
        outs = stacked(x1, t1, c1)
        for i in mine:
            self.members[i].forwards += x1.shape[0]
        return self._guide([self.members[i].finish(o, t1) for i, o in zip(mine, outs, strict=True)], x_t)

    def _one(self, i: int, x_t: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        """Member i on its own, exactly as the sequential path calls it."""
        den = self.members[i]
        if self.guidance_scale is None:
            return den(x_t, t, cond)
        from msdda.models.denoiser import ClassifierFreeGuidance

        return ClassifierFreeGuidance(den, self.guidance_scale, self.null_cond)(x_t, t, cond)


# diffusers keeps a model's config in `_internal_dict`, with bookkeeping (file path, version, which values
# were defaults) beside the architecture; _same_unet_config compares the architecture part instead.
_CONFIG_ATTRS = frozenset({"_internal_dict"})


def _config_values(module: nn.Module) -> dict[str, Any]:
    config = dict(getattr(module, "_internal_dict", None) or {})
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items() if not k.startswith("_")}


def _same_unet_config(dens: Sequence[UNetDenoiser]) -> tuple[bool, str]:
    """Whether every submodule's diffusers config (file bookkeeping and tuple/list aside) is the same."""
    first = dict(dens[0].unet.named_modules())
    for d in dens[1:]:
        for name, sub in d.unet.named_modules():
            other = first.get(name)
            if other is None:
                continue  # can_stack reports the different module trees
            a, b = _config_values(other), _config_values(sub)
            if a != b:
                key = next(k for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k))
                where = f"submodule {name!r}" if name else "the UNet"
                return False, f"{d.name!r}'s {where} has config {key}={b.get(key)!r}, {dens[0].name!r}'s {a.get(key)!r}"
    return True, ""


def _holds_tuner_layers(unet: nn.Module) -> bool:
    return any(_is_tuner_layer(m) for m in unet.modules())


class _PlainUNet(nn.Module):
    """One full-UNet objective as an nn.Module `(x_t, t, cond) -> eps`, so StackedDenoisers can vmap several.
    Its UNet is a submodule (stacked weight by weight); cross_attention_kwargs is compared by can_stack."""

    def __init__(self, den: UNetDenoiser) -> None:
        super().__init__()
        self.unet = den.unet
        self.cross_attention_kwargs = dict(den.cross_attention_kwargs) if den.cross_attention_kwargs else None
        self.conditions = den.conditions  # compared by can_stack like any plain attribute

    def forward(self, x_t: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        kwargs = {"cross_attention_kwargs": self.cross_attention_kwargs} if self.cross_attention_kwargs else {}
        return self.unet(x_t, t, return_dict=False, **kwargs, **unet_inputs(self.conditions, cond))[0]


# ----- loading ----------------------------------------------------------------------------------------


def _refuse_pickle(path: Path, objective: str) -> None:
    raise AdapterError(
        f"objective {objective!r}: {path} is a pickled checkpoint; msdda never unpickles files (unpickling can "
        "run arbitrary code). Convert it once to safetensors, e.g. `safetensors.torch.save_file("
        "torch.load(path, weights_only=True), 'pytorch_lora_weights.safetensors')`, and pass that file"
    )


def _base_layer(module: nn.Module) -> nn.Module:
    get = getattr(module, "get_base_layer", None)
    return get() if callable(get) else module


def check_lora_shapes(unet: nn.Module, state_dict: Mapping[str, Tensor], objective: str, source: str) -> dict[str, int]:
    """Check a peft-keyed LoRA state dict (`<module>.lora_A.weight`, ...) against the base UNet.

    Every targeted module must exist and be an nn.Linear or nn.Conv2d whose input/output sizes match
    lora_A [r, in(, kh, kw)] and lora_B [out, r(, 1, 1)]. Runs before anything is injected, so a
    mismatching adapter (trained for another base) leaves the UNet untouched.
    Returns {module name: rank}. Raises AdapterError naming the module, both shapes and the fix.
    """
    pairs: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, value in state_dict.items():
        m = _LORA_KEY.match(key)
        if m is not None:
            pairs.setdefault(m["module"], {})[m["which"]] = tuple(value.shape)
    if not pairs:
        raise AdapterError(
            f"objective {objective!r} ({source}): no LoRA weights (keys ending in lora_A.weight / lora_B.weight) "
            f"found among {len(state_dict)} keys, e.g. {list(state_dict)[:3]}; pass a LoRA saved by diffusers or peft"
        )
    ranks: dict[str, int] = {}
    hint = "use an adapter trained for this base model (e.g. an SD 1.5 LoRA with an SD 1.5 checkpoint)"
    for name, ab in sorted(pairs.items()):
        a, b = ab.get("A"), ab.get("B")
        if a is None or b is None:
            raise AdapterError(
                f"objective {objective!r} ({source}): module {name!r} has lora_{'A' if a else 'B'} but no "
                f"lora_{'B' if a else 'A'}; the adapter file is incomplete"
            )
        try:
            module = _base_layer(unet.get_submodule(name))
        except AttributeError:
            raise AdapterError(
                f"objective {objective!r} ({source}): the adapter targets module {name!r}, which this base UNet "
                f"does not have, so it was trained for another base architecture; {hint}"
            ) from None
        if isinstance(module, nn.Linear):
            expected_a: tuple[int, ...] = (a[0], module.in_features)
            expected_b: tuple[int, ...] = (module.out_features, a[0])
            what = f"Linear(in={module.in_features}, out={module.out_features})"
        elif isinstance(module, nn.Conv2d):
            expected_a = (a[0], module.in_channels // module.groups, *module.kernel_size)
            expected_b = (module.out_channels, a[0], 1, 1)
            what = f"Conv2d(in={module.in_channels}, out={module.out_channels}, kernel={tuple(module.kernel_size)})"
        else:
            raise AdapterError(
                f"objective {objective!r} ({source}): module {name!r} is a {type(module).__name__}; LoRA objectives "
                "may adapt nn.Linear and nn.Conv2d layers only"
            )
        if a != expected_a or b != expected_b:
            raise AdapterError(
                f"objective {objective!r} ({source}): the adapter does not fit this base model: module {name!r} "
                f"is {what} here, so lora_A should be {list(expected_a)} and lora_B {list(expected_b)}, but the "
                f"adapter has lora_A {list(a)} and lora_B {list(b)}; {hint}"
            )
        ranks[name] = a[0]
    return ranks


def _find_lora_file(path: Path, objective: str) -> Path:
    if path.is_file():
        if path.suffix in _PICKLE_SUFFIXES:
            _refuse_pickle(path, objective)
        if path.suffix != ".safetensors":
            raise AdapterError(
                f"objective {objective!r}: {path} is not a .safetensors file; pass a LoRA saved as safetensors"
            )
        return path
    preferred = path / _DIFFUSERS_LORA_FILE
    if preferred.is_file():
        return preferred
    files = sorted(path.glob("*.safetensors"))
    if len(files) == 1:
        return files[0]
    if not files:
        pickled = sorted(p for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        if pickled:
            _refuse_pickle(pickled[0], objective)
        raise AdapterError(
            f"objective {objective!r}: {path} holds no LoRA weights; expected {_DIFFUSERS_LORA_FILE} (diffusers), "
            f"{_PEFT_CONFIG_FILE} + {_PEFT_WEIGHTS_FILE} (peft), or a UNet folder with config.json"
        )
    raise AdapterError(
        f"objective {objective!r}: {path} holds several .safetensors files {[f.name for f in files]}; pass the "
        "LoRA file itself"
    )


def _classify(path: Path) -> str:
    """'peft', 'unet', 'pipeline' or 'diffusers-lora' for a source path."""
    if path.is_dir():
        if (path / _PEFT_CONFIG_FILE).is_file():
            return "peft"
        if (path / "model_index.json").is_file() and (path / "unet").is_dir():
            return "pipeline"
        config = path / "config.json"
        if config.is_file():
            try:
                cls = json.loads(config.read_text()).get("_class_name", "")
            except (OSError, json.JSONDecodeError):
                cls = ""
            if "UNet" in cls:
                return "unet"
    return "diffusers-lora"


def _cleanup_adapter(unet: nn.Module, adapter: str) -> None:
    if adapter in (getattr(unet, "peft_config", None) or {}):
        try:
            unet.delete_adapters(adapter)
        except Exception:  # best effort: the original error is the one to report
            logger.warning("could not remove the partly loaded adapter %r", adapter, exc_info=True)


def load_lora(unet: nn.Module, path: Path, adapter: str, objective: str, *, prefix: str = "unet") -> None:
    """Load a diffusers- or peft-format LoRA from `path` into `unet` as adapter `adapter` (disabled after).

    The shapes are checked against the UNet first (`check_lora_shapes`); a LoRA that also adapts the
    text encoder is refused (the prompt embeddings are shared by all objectives). prefix: the key prefix of
    the network's weights in a diffusers-format file ("unet"; "transformer" for SD3, whose transformer has
    the same PeftAdapterMixin `load_lora_adapter`).
    """
    require("peft", "LoRA objectives")
    diffusers = require("diffusers", "LoRA objectives")
    if adapter in (getattr(unet, "peft_config", None) or {}):
        raise ObjectiveError(
            f"objective {objective!r}: the base UNet already has an adapter named {adapter!r}; pass that name as "
            "the objective's source to use it, or choose another objective name"
        )
    source = str(path)
    if _classify(path) == "peft":
        _load_peft_lora(unet, path, adapter, objective)
        return
    file = _find_lora_file(path, objective)
    try:
        state_dict, network_alphas, metadata = diffusers.StableDiffusionPipeline.lora_state_dict(
            str(file.parent),
            weight_name=file.name,
            use_safetensors=True,
            local_files_only=True,
            return_lora_metadata=True,
        )
    except Exception as exc:
        raise AdapterError(f"objective {objective!r}: could not read LoRA weights from {file}: {exc}") from exc
    text_keys = [k for k in state_dict if k.startswith(("text_encoder", "lora_te"))]
    if text_keys:
        raise AdapterError(
            f"objective {objective!r} ({source}): the LoRA also adapts the text encoder ({len(text_keys)} keys, "
            f"e.g. {text_keys[0]!r}); objectives share one prompt encoding, so only UNet LoRAs are supported "
            "(DPOK/DDPO LoRAs are UNet-only); save the UNet part alone"
        )
    key_prefix = prefix if any(k.startswith(f"{prefix}.") for k in state_dict) else None
    peft_keys = {k.removeprefix(f"{prefix}."): v for k, v in state_dict.items()}
    if not any("lora_A" in k for k in peft_keys):
        peft_keys = diffusers.utils.convert_unet_state_dict_to_peft(peft_keys)
    check_lora_shapes(unet, peft_keys, objective, source)
    try:
        unet.load_lora_adapter(
            state_dict,
            prefix=key_prefix,
            network_alphas=network_alphas,
            metadata=metadata,
            adapter_name=adapter,
        )
    except Exception as exc:
        _cleanup_adapter(unet, adapter)
        raise AdapterError(f"objective {objective!r}: loading the LoRA from {file} failed: {exc}") from exc


def _load_peft_lora(unet: nn.Module, path: Path, adapter: str, objective: str) -> None:
    peft = require("peft", "LoRA objectives")
    from safetensors.torch import load_file

    weights = path / _PEFT_WEIGHTS_FILE
    if not weights.is_file():
        pickled = path / "adapter_model.bin"
        if pickled.is_file():
            _refuse_pickle(pickled, objective)
        raise AdapterError(f"objective {objective!r}: {path} has {_PEFT_CONFIG_FILE} but no {_PEFT_WEIGHTS_FILE}")
    try:
        config = peft.LoraConfig.from_pretrained(str(path))
    except Exception as exc:
        raise AdapterError(
            f"objective {objective!r}: {path / _PEFT_CONFIG_FILE} is not a LoRA config ({exc}); only LoRA adapters "
            "are supported"
        ) from exc
    state_dict = {k.removeprefix("base_model.model."): v for k, v in load_file(str(weights)).items()}
    check_lora_shapes(unet, state_dict, objective, str(path))
    config.inference_mode = True
    try:
        with warnings.catch_warnings():  # peft warns whenever a second adapter is injected: expected here
            warnings.filterwarnings("ignore", message=".*Already found a `peft_config`.*")
            unet.add_adapter(config, adapter_name=adapter)
        result = peft.set_peft_model_state_dict(unet, state_dict, adapter_name=adapter)
    except Exception as exc:
        _cleanup_adapter(unet, adapter)
        raise AdapterError(f"objective {objective!r}: loading the peft LoRA from {path} failed: {exc}") from exc
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if unexpected:
        _cleanup_adapter(unet, adapter)
        raise AdapterError(
            f"objective {objective!r}: {len(unexpected)} LoRA weights in {path} matched no layer (e.g. "
            f"{unexpected[0]!r}); the adapter does not fit this base model"
        )


def _check_unet_compatible(base: nn.Module, other: nn.Module, objective: str, source: str) -> None:
    # the addition_* keys: SDXL's pooled-embedding and time-id conditioning (None on SD 1.x / 2.x)
    keys = (
        "in_channels",
        "out_channels",
        "cross_attention_dim",
        "sample_size",
        "addition_embed_type",
        "addition_time_embed_dim",
        "projection_class_embeddings_input_dim",
    )
    for key in keys:
        mine, theirs = base.config.get(key), getattr(other, "config", {}).get(key)
        if mine != theirs:
            raise AdapterError(
                f"objective {objective!r} ({source}): the UNet has {key}={theirs!r} but the base has {mine!r}, so it "
                "was trained for another base model; pass a fine-tune of this base"
            )


def load_full_unet(base_unet: nn.Module, path: Path, objective: str) -> nn.Module:
    """Load a full UNet objective (folder with config.json, or a pipeline folder's unet/) like the base."""
    diffusers = require("diffusers", "full-UNet objectives")
    folder = path / "unet" if _classify(path) == "pipeline" else path
    if not any(folder.glob("*.safetensors")):
        if any(p.suffix in _PICKLE_SUFFIXES for p in folder.iterdir()):
            _refuse_pickle(next(p for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES), objective)
        raise AdapterError(f"objective {objective!r}: {folder} has a UNet config but no .safetensors weights")
    try:
        unet = diffusers.UNet2DConditionModel.from_pretrained(
            str(folder), use_safetensors=True, local_files_only=True, **dtype_kwargs(diffusers, base_unet.dtype)
        )
    except Exception as exc:
        raise AdapterError(f"objective {objective!r}: could not load the UNet from {folder}: {exc}") from exc
    _check_unet_compatible(base_unet, unet, objective, str(folder))
    return unet.to(base_unet.device).eval()


def resolve_objective(base_unet: nn.Module, name: str, source: Any, *, lora_prefix: str = "unet") -> Objective:
    """Turn one objective source (adapter name, path or UNet module) into an Objective, loading as needed.

    LoRA sources are loaded into `base_unet` under the objective's name and left disabled (lora_prefix: see
    load_lora's prefix).
    """
    check_objective_name(name)
    loaded = getattr(base_unet, "peft_config", None) or {}
    if isinstance(source, nn.Module):
        if source is base_unet:
            raise ObjectiveError(
                f"objective {name!r} is the base UNet itself; use method='base' or weight 'reference' instead"
            )
        _check_unet_compatible(base_unet, source, name, "module")
        return Objective(name=name, kind="unet", source="module", unet=source.eval())
    if isinstance(source, str) and source in loaded:
        return Objective(name=name, kind="lora", source=f"adapter:{source}", adapter=source)
    if not isinstance(source, str | Path):
        raise ObjectiveError(
            f"objective {name!r}: source {type(source).__name__} is not supported; pass a path, the name of an "
            "adapter loaded into the base UNet, or a UNet2DConditionModel"
        )
    path = Path(source).expanduser()
    if not path.exists():
        raise ObjectiveError(
            f"objective {name!r}: {source!r} is neither an existing path nor an adapter loaded into the base UNet "
            f"(loaded adapters: {sorted(loaded)}); check the path"
        )
    kind = _classify(path)
    if kind in ("unet", "pipeline"):
        return Objective(name=name, kind="unet", source=str(path), unet=load_full_unet(base_unet, path, name))
    load_lora(base_unet, path, name, name, prefix=lora_prefix)
    return Objective(name=name, kind="lora", source=str(path), adapter=name, variance_head=_variance_head_of(path))


def _variance_head_of(path: Path) -> nn.Module | None:
    """The variance head saved beside a LoRA (variance_head.safetensors in its folder), on the UNet's side of
    the call; None when there is none."""
    from msdda.models.variance_head import VARIANCE_HEAD_FILE, load_variance_head

    folder = path if path.is_dir() else path.parent
    head_file = folder / VARIANCE_HEAD_FILE
    return load_variance_head(head_file).eval().requires_grad_(False) if head_file.is_file() else None


# ----- rewarded soups ---------------------------------------------------------------------------------


def build_lora_soup(
    unet: nn.Module, weights: Mapping[str, float], soup: str, *, average: str = "delta"
) -> dict[str, int]:
    """Add adapter `soup` to `unet`, the Rewarded-Soups interpolation of the LoRA adapters in `weights`.

    weights: {adapter name: w_k}; adapters with weight 0 are left out. Per LoRA layer with adapters k
    (A_k [r_k, in], B_k [out, r_k], Conv2d kernels flattened alike; scaling_k = alpha_k / r_k):
    average="delta" (default, exact): delta W = sum_k w_k scaling_k B_k A_k, the interpolation of the
      weight updates. Built as peft's `add_weighted_adapter(combination_type="cat")`: the soup's A is the
      row-concatenation of w_k scaling_k A_k and its B the column-concatenation of B_k, scaling 1, so
      B_soup A_soup equals the sum up to float rounding (rank = sum of the ranks).
    average="factors": delta W = scaling (sum_k w_k B_k)(sum_k w_k A_k), the factors averaged separately
      (as averaging the adapters' state dicts does; Diffusion Blend's released Rewarded-Soups baseline).
      It is not the interpolation of the updates: it adds cross terms w_j w_k B_j A_k and scales with
      (sum_k w_k)^2. It needs every adapter at every soup layer with one rank and one scaling there;
      AdapterError names the layer otherwise. The soup keeps that rank.
    Works for Linear and Conv2d LoRA layers. Returns {module name: soup rank}. The soup is left disabled.
    """
    if average not in SOUP_AVERAGES:
        raise AdapterError(f"rewarded-soup: average={average!r}; choose one of {SOUP_AVERAGES}")
    peft = require("peft", "rewarded-soup over LoRA objectives")
    from peft.tuners.lora import LoraLayer

    active = {a: float(w) for a, w in weights.items() if w != 0.0}
    records: list[tuple[str, Any, list[tuple[str, float]]]] = []
    for module_name, layer in unet.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        present = [(a, w) for a, w in active.items() if a in layer.lora_A]
        if not present:
            continue
        for a, _ in present:
            if layer.use_dora.get(a, False) or getattr(layer, "lora_bias", {}).get(a, False):
                raise AdapterError(
                    f"rewarded-soup: adapter {a!r} uses DoRA or a LoRA bias at {module_name!r}; the exact low-rank "
                    "interpolation supports plain LoRA only; use method='msdda' or 'db-mpa' instead"
                )
        if layer.merged:
            raise AdapterError(
                f"rewarded-soup: layer {module_name!r} has adapters merged into its weights; call "
                "unet.unfuse_lora() first"
            )
        records.append((module_name, layer, present))
    if not records:
        raise AdapterError(f"rewarded-soup: none of the adapters {sorted(active)} is present in the UNet")
    if average == "factors":
        ranks = _factor_ranks(records, active)
    else:
        ranks = {name: sum(layer.r[a] for a, _ in present) for name, layer, present in records}
    return _add_soup_adapter(peft, unet, soup, records, ranks, average)


def _factor_ranks(
    records: list[tuple[str, Any, list[tuple[str, float]]]], active: Mapping[str, float]
) -> dict[str, int]:
    """The soup's rank per layer for the factor average, after checking that the adapters line up there."""
    ranks: dict[str, int] = {}
    for name, layer, present in records:
        missing = sorted(set(active) - {a for a, _ in present})
        if missing:
            raise AdapterError(
                f"rewarded-soup average='factors': adapter(s) {missing} have no LoRA at {name!r} while "
                f"{sorted(a for a, _ in present)} do; averaging factors needs the same target modules in every "
                "adapter; use average='delta' (the exact interpolation of the updates)"
            )
        rank = {a: int(layer.r[a]) for a, _ in present}
        scaling = {a: float(layer.scaling[a]) for a, _ in present}
        if len(set(rank.values())) > 1:
            raise AdapterError(
                f"rewarded-soup average='factors': the adapters have ranks {rank} at {name!r}; averaging factors "
                "needs one rank; use average='delta' (the exact interpolation of the updates)"
            )
        if len(set(scaling.values())) > 1:
            raise AdapterError(
                f"rewarded-soup average='factors': the adapters have scalings (alpha / r) {scaling} at {name!r}; "
                "averaging factors needs one scaling; use average='delta'"
            )
        ranks[name] = next(iter(rank.values()))
    return ranks


def _add_soup_adapter(
    peft: Any,
    unet: nn.Module,
    soup: str,
    records: list[tuple[str, Any, list[tuple[str, float]]]],
    ranks: dict[str, int],
    average: str,
) -> dict[str, int]:
    """Add adapter `soup` (scaling 1, rank ranks[layer]) and fill it: the concatenated, weighted factors
    (average='delta') or the weighted sums of the factors, the scaling folded into A (average='factors')."""
    top = max(ranks.values())
    pattern = {re.escape(name): r for name, r in ranks.items()}
    config = peft.LoraConfig(
        r=top,
        lora_alpha=top,
        target_modules=sorted(ranks),
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        lora_dropout=0.0,
        init_lora_weights=True,
        inference_mode=True,
    )
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*Already found a `peft_config`.*")
            unet.add_adapter(config, adapter_name=soup)
        with torch.no_grad():
            for name, layer, present in records:
                a_soup = layer.lora_A[soup].weight
                b_soup = layer.lora_B[soup].weight
                if layer.r[soup] != ranks[name] or layer.scaling[soup] != 1.0:
                    raise AdapterError(
                        f"rewarded-soup: peft built rank {layer.r[soup]} / scaling {layer.scaling[soup]} at {name!r}, "
                        f"expected rank {ranks[name]} / scaling 1; this peft version is not supported"
                    )
                if average == "delta":
                    a_new = torch.cat([layer.lora_A[a].weight.float() * (w * layer.scaling[a]) for a, w in present])
                    b_new = torch.cat([layer.lora_B[a].weight.float() for a, _ in present], dim=1)
                else:  # one rank and one scaling at this layer (checked by _factor_ranks)
                    scale = layer.scaling[present[0][0]]
                    a_new = scale * sum(w * layer.lora_A[a].weight.float() for a, w in present)
                    b_new = sum(w * layer.lora_B[a].weight.float() for a, w in present)
                a_soup.copy_(a_new.to(a_soup.dtype))
                b_soup.copy_(b_new.to(b_soup.dtype))
    except Exception:
        _cleanup_adapter(unet, soup)
        raise
    return ranks


def base_state_dict(unet: nn.Module) -> dict[str, Tensor]:
    """The base UNet's own weights, keyed as a plain UNet (peft wrappers and adapter weights removed)."""
    out = {}
    for key, value in unet.state_dict().items():
        if "lora_" in key:
            continue
        out[key.replace(".base_layer.", ".")] = value
    return out


def build_unet_soup(base_unet: nn.Module, unets: Mapping[str, nn.Module], weights: Mapping[str, float]) -> nn.Module:
    """A new UNet with theta = theta_base + sum_k w_k (theta_k - theta_base) (computed in float32).

    With weights summing to 1 this is the plain parameter average sum_k w_k theta_k. Costs one extra UNet
    of memory while it lives. Raises AdapterError when a UNet's parameters do not match the base's.
    """
    base = base_state_dict(base_unet)
    first = next(iter(unets.values()))
    soup = copy.deepcopy(first)
    new_state: dict[str, Tensor] = {}
    states = {name: u.state_dict() for name, u in unets.items()}
    for key, value in base.items():
        acc = value.float()
        total = value.float().clone()
        for name, w in weights.items():
            other = states[name].get(key)
            if other is None or other.shape != value.shape:
                raise AdapterError(
                    f"rewarded-soup: objective {name!r} has no parameter {key!r} of shape {list(value.shape)}; "
                    "full-UNet objectives must share the base architecture"
                )
            if w != 0.0:
                total += w * (other.float() - acc)
        new_state[key] = total.to(value.dtype)
    soup.load_state_dict(new_state)
    return soup.eval()
