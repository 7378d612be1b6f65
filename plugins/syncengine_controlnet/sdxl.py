"""The ``controlnet-sdxl`` denoiser: SDXL with ControlNets, the ControlNet mixin on the SDXL family.

Nothing here but the composition: SDXL's ``unet_kwargs`` carry its added conditions (pooled text, per-view
micro-conditioning), which :class:`ControlNetConditioning` hands to its ControlNets before adding their residuals.
"""
from __future__ import annotations

from dataclasses import dataclass

from syncengine_sdxl.denoiser import StableDiffusionXLConfig, StableDiffusionXLDenoiser

from .denoiser import ControlNetConditioning, ControlNetOptions


@dataclass
class ControlNetSDXLConfig(ControlNetOptions, StableDiffusionXLConfig):
    """SDXL's options plus the ControlNet ones (``controlnets``: SDXL ControlNets, e.g. the SDXL Canny one)."""


class ControlNetSDXLDenoiser(ControlNetConditioning, StableDiffusionXLDenoiser):
    """SDXL with ControlNets; each view is conditioned on its own crop of the canvas-sized condition."""

    Config = ControlNetSDXLConfig
