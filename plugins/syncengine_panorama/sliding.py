"""Sliding-window tiler (MultiDiffusion / SyncDiffusion panoramas)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from syncengine.errors import ConfigError
from syncengine.tiler import Tiler
from syncengine.views import CanvasSpec, CropView


@dataclass
class SlidingConfig:
    window: int = 512  # window width in pixels (and height unless window_height is set)
    stride: int = 128  # horizontal stride in pixels (paper: 128 = 16 latents)
    window_height: Optional[int] = None
    stride_height: Optional[int] = None  # vertical stride; default: stride
    loop: bool = False  # wrap horizontally: the right edge continues at the left (seamless 360° strips)


def window_starts(length: int, window: int, stride: int, loop: bool = False) -> list[int]:
    """Start offsets along one axis. Without loop the last window is snapped to the edge so the axis is covered;
    with loop, windows start every ``stride`` and wrap past the end."""
    if loop:
        return [k * stride for k in range(math.ceil(length / stride))]
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] + window < length:
        starts.append(length - window)
    return starts


class SlidingTiler(Tiler):
    """Windows on a regular grid: a 1D strip when the canvas is one window high (or wide), else a 2D grid."""

    Config = SlidingConfig

    @property
    def periodic_width(self) -> bool:
        return self.config.loop

    def _sizes(self) -> tuple[int, int, int, int]:
        """Window and stride in pixels, ``(window_h, window_w, stride_h, stride_w)``: the height ones default to
        the width ones. Options only: the canvas does not enter."""
        c = self.config
        return (c.window_height or c.window, c.window, c.stride_height or c.stride, c.stride)

    def validate(self, canvas: CanvasSpec) -> None:
        f = canvas.latent_factor
        win_h, win_w, st_h, st_w = self._sizes()
        c = self.config
        keys = {"window": c.window, "stride": c.stride, "window_height": c.window_height,
                "stride_height": c.stride_height}
        for key, value in keys.items():
            if value is None:
                continue
            if value <= 0:
                raise ConfigError(f"tiler.{key}", f"must be positive, got {value}")
            if value % f:
                raise ConfigError(f"tiler.{key}", f"{value} px is not a multiple of the latent factor {f}")
        for key, win, stride in (("window", win_w, st_w), ("window_height", win_h, st_h)):
            if stride > win:
                raise ConfigError(
                    f"tiler.{'stride' if key == 'window' else 'stride_height'}",
                    f"stride {stride} px is larger than the window {win} px and would leave gaps; use at most {win}",
                )
        if win_w > canvas.width:
            raise ConfigError("tiler.window", f"window {win_w} px is wider than the canvas ({canvas.width} px)")
        if win_h > canvas.height:
            raise ConfigError(
                "tiler.window_height" if self.config.window_height else "tiler.window",
                f"window height {win_h} px is taller than the canvas ({canvas.height} px)",
            )

    def views(self, canvas: CanvasSpec) -> list[CropView]:
        self.validate(canvas)
        f = canvas.latent_factor
        win_h, win_w, st_h, st_w = (v // f for v in self._sizes())
        H, W = canvas.latent_height, canvas.latent_width
        rows = window_starts(H, win_h, st_h)
        cols = window_starts(W, win_w, st_w, loop=self.config.loop)
        wrap = W if self.config.loop else None
        return [
            CropView(i * len(cols) + j, top=top, left=left, height=win_h, width=win_w, canvas_width=wrap)
            for i, top in enumerate(rows)
            for j, left in enumerate(cols)
        ]
