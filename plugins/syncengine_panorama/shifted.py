"""Shifted-window tiler (SpotDiffusion, Frolov et al., WACV 2025): non-overlapping windows, moved at every step.

MultiDiffusion overlaps its windows so that neighbours agree on their shared pixels: a canvas position is denoised
``window / stride`` times per step. Shifted windows denoise each position once per step, and move the window grid by
a random offset at every step, so that a seam of one step lies inside a window at the next: the seams average out
over the steps instead of within each step. With ``loop`` the grid wraps around the canvas width (every position is
covered exactly once, seamless 360° strips); without it the windows at the two edges are clamped inside the canvas
and overlap their neighbours there. Vertically, windows never wrap (a sky does not continue below the ground).

The offsets are drawn from the request's seed and the step alone, so every rank of a sharded run, every view batch
size and every rerun builds the same windows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

from syncengine.errors import ConfigError
from syncengine.tiler import Tiler
from syncengine.view_schedule import FixedViews, MovingViews, ViewSchedule
from syncengine.views import CanvasSpec, CropView


@dataclass
class ShiftedConfig:
    window: int = 512  # window width in pixels (and height unless window_height is set)
    window_height: Optional[int] = None
    loop: bool = False  # wrap horizontally: the right edge continues at the left (seamless 360° strips)
    shift: bool = True  # false: the same non-overlapping grid at every step (tiles; seams stay where they are)


def shifted_starts(length: int, window: int, shift: int, wrap: bool) -> list[int]:
    """Non-overlapping window starts along one axis, the grid offset by ``shift`` (``0 <= shift < window``).
    ``wrap``: windows continue past the end at 0 (the last overlaps the first when ``window`` does not divide
    ``length``). Otherwise the partial windows at the edges are clamped inside the axis."""
    if wrap:
        return [(shift + k * window) % length for k in range(math.ceil(length / window))]
    starts = set(range(shift, length - window + 1, window))
    starts.add(0)
    starts.add(length - window)
    return sorted(starts)


def step_shift(seed: int, step: int, window_h: int, window_w: int, height: int, width: int) -> tuple[int, int]:
    """The grid offset (rows, columns) in latents of one step of one request: uniform over ``[0, window)`` per
    axis (every distinct grid), none vertically when the canvas is one window high. A function of (seed, step)."""
    rng = np.random.default_rng([int(seed) % 2**63, int(step), 0x5EED])
    dr = int(rng.integers(window_h)) if height > window_h else 0
    dc = int(rng.integers(window_w)) if width > window_w else 0
    return dr, dc


def shifted_windows(canvas: CanvasSpec, window_h: int, window_w: int, shift: tuple[int, int], loop: bool
                    ) -> list[CropView]:
    """The crops of one grid, row-major; sizes in latents."""
    H, W = canvas.latent_height, canvas.latent_width
    rows = shifted_starts(H, window_h, shift[0], wrap=False)
    cols = shifted_starts(W, window_w, shift[1], wrap=loop)
    wrap = W if loop else None
    return [CropView(i * len(cols) + j, top=top, left=left, height=window_h, width=window_w, canvas_width=wrap)
            for i, top in enumerate(rows) for j, left in enumerate(cols)]


def check_window(key: str, value: int | None, canvas: CanvasSpec, extent: int, name: str) -> None:
    """A window size in pixels: positive, a multiple of the latent factor, at most the canvas ``extent``."""
    if value is None:
        return
    if value <= 0:
        raise ConfigError(f"tiler.{key}", f"must be positive, got {value}")
    if value % canvas.latent_factor:
        raise ConfigError(f"tiler.{key}", f"{value} px is not a multiple of the latent factor {canvas.latent_factor}")
    if value > extent:
        raise ConfigError(f"tiler.{key}", f"window {name} {value} px is larger than the canvas's ({extent} px)")


class ShiftedTiler(Tiler):
    """Non-overlapping windows whose grid moves by a seeded random offset at every step (``shift: false``: tiles)."""

    Config = ShiftedConfig

    @property
    def periodic_width(self) -> bool:
        return self.config.loop

    def window_latents(self, canvas: CanvasSpec) -> tuple[int, int]:
        c, f = self.config, canvas.latent_factor
        return (c.window_height or c.window) // f, c.window // f

    def validate(self, canvas: CanvasSpec) -> None:
        c = self.config
        check_window("window", c.window, canvas, canvas.width, "width")
        check_window("window_height" if c.window_height else "window", c.window_height or c.window, canvas,
                     canvas.height, "height")

    def views(self, canvas: CanvasSpec) -> list[CropView]:
        """The unshifted grid (what validation and ``shift: false`` use)."""
        self.validate(canvas)
        return shifted_windows(canvas, *self.window_latents(canvas), (0, 0), self.config.loop)

    def windows_at(self, canvas: CanvasSpec, seed: int, step: int) -> list[CropView]:
        """The grid of one step of a request with ``seed`` (what other tilers reuse: regions' ``windows: shifted``)."""
        h, w = self.window_latents(canvas)
        H, W = canvas.latent_height, canvas.latent_width
        offset = step_shift(seed, step, h, w, H, W) if self.config.shift else (0, 0)
        return shifted_windows(canvas, h, w, offset, self.config.loop)

    def view_schedule(self, canvas: CanvasSpec, seed: int) -> ViewSchedule:
        if not self.config.shift:
            return FixedViews(self.views(canvas))
        self.validate(canvas)
        return MovingViews(lambda step: self.windows_at(canvas, seed, step), canvas)
