"""Tiny random SD3 models for the sd3 tests, built in code and saved locally (loaded through the engine's loader)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

if importlib.util.find_spec("syncengine_sd3") is None:  # an editable install made before the package existed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins"))

SEQ = 8  # T5 tokens: the tests need the path, not the length


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory) -> Path:
    """A tiny random SD3 pipeline folder (fixed shift 3, as SD3.5 ships)."""
    from syncengine_sd3.tiny import build_tiny_sd3

    return build_tiny_sd3(tmp_path_factory.mktemp("models") / "tiny-sd3", seed=0)


@pytest.fixture(scope="session")
def tiny_sd3_dynamic(tmp_path_factory) -> Path:
    """The same model with a resolution-dependent shift (``use_dynamic_shifting``: ``mu`` from the window size)."""
    from syncengine_sd3.tiny import build_tiny_sd3

    return build_tiny_sd3(tmp_path_factory.mktemp("models") / "tiny-sd3-dyn", seed=0, dynamic_shifting=True)


@pytest.fixture
def sd3_spec(tiny_sd3, tmp_path):
    """A small, fast spec dict on the tiny SD3 (tests override what they need, section by section)."""

    def make(**sections):
        spec = {
            "canvas": {"height": 64, "width": 160},
            "tiler": {"name": "sliding", "window": 64, "stride": 32},
            "merger": {"name": "average"},
            "denoiser": {"name": "sd3", "pretrained": str(tiny_sd3), "max_sequence_length": SEQ},
            "sync": {"loss": {"name": "lpips", "net": "alex", "backbone": "random"}, "weight": 0.0},
            "sampler": {"scheduler": "flow_euler", "steps": 3, "guidance_scale": 5.0, "view_batch_size": 2},
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
