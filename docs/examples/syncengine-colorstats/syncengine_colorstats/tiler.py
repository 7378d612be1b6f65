"""A tiler that places exactly ``count`` windows, evenly spread from the left edge to the right edge.

The sliding tiler fixes the stride and lets the number of windows follow from the canvas width; this one fixes the
number of windows (a fixed compute budget) and lets the overlap follow.
"""
from __future__ import annotations

from dataclasses import dataclass

from syncengine.errors import ConfigError
from syncengine.tiler import Tiler
from syncengine.views import CanvasSpec, CropView


@dataclass
class EvenConfig:
    window: int = 512  # square window size in pixels
    count: int = 4  # number of windows across the canvas width


class EvenTiler(Tiler):
    """``count`` square windows of one row, the first at the left edge and the last at the right edge."""

    Config = EvenConfig

    def validate(self, canvas: CanvasSpec) -> None:
        c, f = self.config, canvas.latent_factor
        if c.window <= 0 or c.window % f:
            raise ConfigError("tiler.window", f"{c.window} px is not a positive multiple of the latent factor {f}")
        if c.window > canvas.width or c.window != canvas.height:
            raise ConfigError("tiler.window", f"window {c.window} px must equal the canvas height ({canvas.height}) "
                              f"and fit its width ({canvas.width})")
        if c.count < 1 or (c.count == 1 and c.window != canvas.width):
            raise ConfigError("tiler.count", f"{c.count} window(s) cannot cover {canvas.width} px; use more")
        if c.count * c.window < canvas.width:
            raise ConfigError("tiler.count", f"{c.count} windows of {c.window} px leave gaps in {canvas.width} px")

    def views(self, canvas: CanvasSpec) -> list[CropView]:
        self.validate(canvas)
        f = canvas.latent_factor
        w, W, n = self.config.window // f, canvas.latent_width, self.config.count
        lefts = [round(k * (W - w) / (n - 1)) if n > 1 else 0 for k in range(n)]
        return [CropView(i, top=0, left=left, height=w, width=w) for i, left in enumerate(lefts)]
