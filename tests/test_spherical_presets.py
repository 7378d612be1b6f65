"""The spherical presets validate as written and run end to end when shrunk onto the tiny model."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from syncengine.api import generate
from syncengine.config import PRESETS_DIR, resolve

PRESETS = {"spherical-sd2-perspective": 10, "spherical-sd2-cubemap": 6, "spherical-demo": 10}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_validates_as_written(preset):
    resolved = resolve(PRESETS_DIR / f"{preset}.yaml")
    tiler = resolved.build("tiler")
    tiler.validate(resolved.canvas)
    assert len(tiler.views(resolved.canvas)) == PRESETS[preset]
    assert resolved.canvas.width == 2 * resolved.canvas.height


@pytest.mark.parametrize("preset", ["spherical-sd2-perspective", "spherical-sd2-cubemap"])
def test_preset_runs_shrunk(preset, tiny_sd, tmp_path):
    out = tmp_path / "out"
    summary = generate(str(PRESETS_DIR / f"{preset}.yaml"), [
        "canvas.height=64", "canvas.width=128", "tiler.window=32", f"denoiser.pretrained={tiny_sd}",
        "sync.loss.net=alex", "sync.loss.backbone=random", "sync.weight=5", "sampler.steps=1",
        "runtime.accelerator=cpu", "runtime.progress=false", f"runtime.output_dir={out}"])
    assert not summary.failed
    (png,) = [p for p in out.glob("*.png") if p.stem.count(".") == 0]
    with Image.open(png) as im:
        assert im.size == (128, 64) and "equirectangular" in im.info["XML:com.adobe.xmp"]
    meta = json.loads(png.with_suffix(".json").read_text())
    assert meta["spec"]["merger"]["target"] == "x0" and meta["stats"]["sync_steps"] == 1
    assert {"face-front", "dice"} <= set(meta["extra_images"]) == set(meta["projection"]["exports"])
    assert all((out / name).exists() for name in meta["extra_images"].values())
