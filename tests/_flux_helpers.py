"""Tiny random FLUX pipelines for the flux tests, built once per session and loaded through the engine's loader."""
from __future__ import annotations

from pathlib import Path

import pytest
from _specs import spec_maker

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
    return spec_maker({"name": "flux", "pretrained": str(tiny_flux), "max_sequence_length": T5_LENGTH},
                      {"scheduler": "flow_euler", "guidance_scale": 3.5}, tmp_path)
