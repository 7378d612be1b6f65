"""Tiny random FLUX pipelines for the flux tests, built once per session and loaded through the engine's loader."""
from __future__ import annotations

from pathlib import Path

import pytest

T5_LENGTH = 32  # the tests' T5 sequence: FLUX's 512 only makes the tiny runs slower


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory) -> Path:
    """A dev-like tiny FLUX (guidance embedding), saved with save_pretrained."""
    from syncengine_flux.tiny import build_tiny_flux

    return build_tiny_flux(tmp_path_factory.mktemp("models") / "tiny-flux-dev", seed=0, guidance_embeds=True)


@pytest.fixture(scope="session")
def tiny_flux_schnell(tmp_path_factory) -> Path:
    """A schnell-like tiny FLUX (no guidance embedding)."""
    from syncengine_flux.tiny import build_tiny_flux

    return build_tiny_flux(tmp_path_factory.mktemp("models") / "tiny-flux-schnell", seed=1, guidance_embeds=False)


@pytest.fixture
def flux_spec(tiny_flux, tmp_path):
    """A small, fast spec dict on the tiny FLUX (tests override what they need)."""

    def make(**sections):
        spec = {
            "canvas": {"height": 64, "width": 160},
            "tiler": {"name": "sliding", "window": 64, "stride": 32},
            "merger": {"name": "average"},
            "denoiser": {"name": "flux", "pretrained": str(tiny_flux), "max_sequence_length": T5_LENGTH},
            "sync": {"loss": {"name": "lpips", "net": "alex", "backbone": "random"}, "weight": 0.0},
            "sampler": {"scheduler": "flow_euler", "steps": 3, "guidance_scale": 3.5, "view_batch_size": 2},
            "requests": [{"prompt": "a photo of a mountain", "seed": 0, "name": "img"}],
            "runtime": {"accelerator": "cpu", "devices": 1, "output_dir": str(tmp_path / "out"), "progress": False},
        }
        for key, value in sections.items():
            if isinstance(value, dict) and isinstance(spec.get(key), dict):
                spec[key] = {**spec[key], **value}
            else:
                spec[key] = value
        return spec

    return make
