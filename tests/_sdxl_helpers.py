"""Fixtures for the stable-diffusion-xl tests: a tiny random SDXL pipeline saved locally and loaded through the
engine's loader, and small specs on it."""
from __future__ import annotations

from pathlib import Path

import pytest

PROMPT = "a photo of a mountain"


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> Path:
    """A tiny random SDXL pipeline folder (epsilon prediction, DDIM config), saved with save_pretrained."""
    from syncengine_sdxl.tiny import build_tiny_sdxl_pipeline

    return build_tiny_sdxl_pipeline(tmp_path_factory.mktemp("models") / "tiny-sdxl", seed=0)


@pytest.fixture
def sdxl_spec(tiny_spec, tiny_sdxl):
    """``tiny_spec`` on the tiny SDXL model: 64x160 px canvas, 64 px windows at stride 32, 2 DDIM steps; a given
    ``tiler`` or ``denoiser`` section replaces the default one (denoiser: merged over the model's name and path)."""

    def make(**sections):
        denoiser = {"name": "stable-diffusion-xl", "pretrained": str(tiny_sdxl), **sections.pop("denoiser", {})}
        sampler = {"steps": 2, **sections.pop("sampler", {})}
        tiler = sections.pop("tiler", None)
        spec = tiny_spec(sampler=sampler, **sections)
        spec["denoiser"] = denoiser  # replace: the SD section's keys are not all SDXL's
        if tiler is not None:
            spec["tiler"] = tiler  # replace: another tiler's options are not the sliding tiler's
        return spec

    return make


@pytest.fixture(scope="session")
def tiny_sdxl_lcm(tmp_path_factory) -> Path:
    """The tiny SDXL with a guidance-embedding UNet (``time_cond_proj_dim``), as LCM-distilled SDXL UNets have."""
    from syncengine_sdxl.tiny import build_tiny_sdxl_pipeline

    return build_tiny_sdxl_pipeline(tmp_path_factory.mktemp("models") / "tiny-sdxl-lcm", seed=1,
                                    time_cond_proj_dim=32)
