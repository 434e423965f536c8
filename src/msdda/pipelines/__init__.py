"""Layer 7 ("faces"): Stable Diffusion (1.x / 2.x, SDXL, SD3), PixArt, DiT and FLUX through diffusers, with LoRA
adapters or full models as objectives.

Importing this package needs only torch; diffusers, peft and transformers are imported when a pipeline or
reward model is built, and their absence raises `MissingDependencyError` naming the install line.
See docs/stable_diffusion.md.
"""

from msdda.pipelines.dit import MSDDADiTPipeline
from msdda.pipelines.errors import (
    AdapterError,
    MissingDependencyError,
    ObjectiveError,
    PipelineError,
    RewardModelError,
)
from msdda.pipelines.flux import MSDDAFluxPipeline
from msdda.pipelines.objectives import AdapterSwitch, Objective, UNetDenoiser, build_lora_soup, check_lora_shapes
from msdda.pipelines.pixart import MSDDAPixArtPipeline, MSDDAPixArtPipelineOutput
from msdda.pipelines.sd import METHODS, MSDDAPipeline, MSDDAPipelineOutput
from msdda.pipelines.sd3 import MSDDASD3Pipeline
from msdda.pipelines.sdxl import MSDDAXLPipeline

__all__ = [
    "METHODS",
    "MSDDADiTPipeline",
    "MSDDAFluxPipeline",
    "AdapterError",
    "AdapterSwitch",
    "MSDDAPipeline",
    "MSDDAPipelineOutput",
    "MSDDAPixArtPipeline",
    "MSDDAPixArtPipelineOutput",
    "MSDDASD3Pipeline",
    "MSDDAXLPipeline",
    "MissingDependencyError",
    "Objective",
    "ObjectiveError",
    "PipelineError",
    "RewardModelError",
    "UNetDenoiser",
    "build_lora_soup",
    "check_lora_shapes",
]
