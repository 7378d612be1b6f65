"""Output folders for gallery tests, written directly (PNG + sidecar with the keys syncengine.outputs writes), so the
page tests need no model: a weight sweep, a loop strip, a 360° panorama, a ControlNet run and an evaluation report."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

PROMPT = "a photo of a mountain range at twilight"


def spec(**over) -> dict:
    base = {"canvas": {"height": 64, "width": 256}, "tiler": {"name": "sliding", "window": 64, "stride": 32,
                                                              "loop": False},
            "sync": {"weight": 20, "decay": 0.95}, "sampler": {"steps": 2, "scheduler": "ddim"},
            "runtime": {"output_dir": "x"}}
    for key, value in over.items():
        section, leaf = key.split("__")
        base[section] = {**base[section], leaf: value}
    return base


def rainbow(height: int, width: int, phase: float = 0.0) -> np.ndarray:
    """Colour varies with the column (longitude) and the row: any change of view changes the pixels."""
    x = np.linspace(0, 2 * np.pi, width, endpoint=False)[None, :] + phase
    y = np.linspace(0, np.pi, height)[:, None]
    rgb = np.stack(np.broadcast_arrays(np.sin(x) * np.sin(y), np.sin(x + 2.1) * np.cos(y), np.sin(3 * x + 4.2) + 0 * y),
                   -1)
    return ((rgb + 1) * 127.5).clip(0, 255).astype(np.uint8)


def write_output(folder: Path, name: str, spec_: dict, prompt: str = PROMPT, seed: int = 0, size=(64, 256),
                 extra: dict | None = None, extra_images: dict[str, np.ndarray] | None = None,
                 phase: float = 0.0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rainbow(*size, phase)).save(folder / f"{name}.png")
    extras = {}
    for suffix, pixels in (extra_images or {}).items():
        Image.fromarray(pixels).save(folder / f"{name}.{suffix}.png")
        extras[suffix] = f"{name}.{suffix}.png"
    meta = {"name": name, "image": f"{name}.png",
            "request": {"index": 0, "prompt": prompt, "negative_prompt": "", "seed": seed, "inputs": {}},
            "seed": seed, "spec": spec_, "model": {}, "timings_s": {"sample": 1.25, "total": 2.5},
            "stats": {"views": 7}, "versions": {"syncengine": "0.1.0"},
            **({"extra_images": extras} if extras else {}), **(extra or {})}
    (folder / f"{name}.json").write_text(json.dumps(meta))
    return folder / f"{name}.png"


def sample_outputs(root: Path) -> dict[str, Path]:
    """A sweep over sync.weight (same prompt and seed), a loop, an equirectangular panorama, a ControlNet run and
    ``evaluation/metrics.json`` for the sweep."""
    sweep = [root / "sweep" / f"sync.weight={w}" for w in (0, 20)]
    for w, folder in zip((0, 20), sweep):
        write_output(folder, "panorama", spec(sync__weight=w), phase=w / 10)
    write_output(root / "loop", "loop", spec(tiler__loop=True), prompt="a seamless loop", size=(64, 512))
    projection = {"projection": {"type": "equirectangular", "width": 512, "height": 256,
                                 "exports": {"face-front": {"yaw": 0.0}}}}
    write_output(root / "sphere", "sphere", spec(), prompt="a forest clearing", size=(256, 512), extra=projection)
    edge = np.zeros((64, 256, 3), np.uint8)
    edge[:, ::16] = 255
    write_output(root / "control", "canny", spec(), prompt="a city", extra_images={"control": edge})
    evaluation = root / "evaluation"
    evaluation.mkdir()
    runs = [{"name": f.name, "folder": str(f), "metrics": {"intra_lpips": 0.5 - i / 10, "fid": None}}
            for i, f in enumerate(sweep)]
    (evaluation / "metrics.json").write_text(json.dumps({"metrics": {}, "options": {}, "runs": runs}))
    return {"sweep0": sweep[0], "sweep1": sweep[1], "loop": root / "loop", "sphere": root / "sphere",
            "control": root / "control", "evaluation": evaluation}
