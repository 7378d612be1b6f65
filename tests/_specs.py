"""The small, fast spec every family's tests start from: one place for its shape and its override rule."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable


def spec_maker(denoiser: dict[str, Any], sampler: dict[str, Any], tmp_path: Path) -> Callable[..., dict]:
    """``make(**sections)`` -> a spec dict on ``denoiser``; a dict section given to ``make`` updates the default
    section key by key, anything else replaces it."""

    def make(**sections):
        spec = {
            "canvas": {"height": 64, "width": 160},
            "tiler": {"name": "sliding", "window": 64, "stride": 32},
            "merger": {"name": "average"},
            "denoiser": dict(denoiser),
            "sync": {"loss": {"name": "lpips", "net": "alex", "backbone": "random"}, "weight": 0.0},
            "sampler": {"steps": 3, "view_batch_size": 2, **sampler},
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
