"""The example layout of the preset ``configs/regions-demo.yaml`` and the docs, drawn in code so it can be
regenerated and checked: ``python -m syncengine_regions.layouts configs/layouts/balloons.png``.

Layouts are tiny (one pixel per 8 canvas pixels here): the tiler resizes them to the canvas. They are drawn without
antialiasing, so every pixel is exactly one of the named colours.
"""
from __future__ import annotations

import sys
from pathlib import Path

DEMO_COLORS = {
    "#ffffff": None,  # background (sky): the background prompt
    "#ff0000": "a red hot-air balloon",
    "#0000ff": "a calm blue lake",
    "#00ff00": "a green meadow with wild flowers",
}


def demo_layout(height: int = 32, width: int = 96):
    """A wide layout: a meadow along the bottom, a lake in it, two balloons in the sky."""
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (width, height), "#ffffff")
    d = ImageDraw.Draw(im)
    d.rectangle([0, height * 3 // 4, width - 1, height - 1], fill="#00ff00")
    d.rectangle([width * 5 // 8, height * 3 // 4, width * 7 // 8 - 1, height - 1], fill="#0000ff")
    for cx in (width // 6, width // 2):
        r = height // 6
        d.ellipse([cx - r, height // 5, cx + r, height // 5 + 2 * r], fill="#ff0000")
    return im


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    path = Path(argv[0] if argv else "configs/layouts/balloons.png")
    path.parent.mkdir(parents=True, exist_ok=True)
    demo_layout().save(path)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
