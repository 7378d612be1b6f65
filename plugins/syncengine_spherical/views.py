"""A perspective view of an equirectangular canvas: extract = projection, scatter_add = its exact adjoint."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from syncengine.views import View

from . import geometry

SAMPLING = ("bilinear", "nearest")


@dataclass
class ProjectedView(View):
    """``grid`` is the precomputed grid_sample grid [1, h, w, 2] (see `geometry.equirect_to_perspective_grid`).

    ``sampling``: ``bilinear`` (default) prefilters rows near the poles (`geometry.pole_filter`) then interpolates, so
    every canvas pixel gets covered; ``nearest`` copies one canvas pixel per view pixel (SyncTweedies' remap), which
    round-trips a view exactly when the canvas is finer than the view, but leaves uncovered pixels between samples.

    Scattering ones yields the per-pixel sampling density, so the standard merger (sum of weighted contributions
    divided by summed weights) normalises projected views exactly as it does crops.
    """

    grid: torch.Tensor = field(default=None)
    sampling: str = "bilinear"

    @property
    def latent_size(self) -> tuple[int, int]:
        return (self.grid.shape[1], self.grid.shape[2])

    def extract(self, canvas: torch.Tensor) -> torch.Tensor:
        grid = self.grid.to(canvas.device)
        if self.sampling == "nearest":
            return geometry.sample_perspective(canvas, grid, "nearest")
        return geometry.sample_perspective(geometry.pole_filter(canvas), grid)

    def scatter_add(self, window: torch.Tensor, out: torch.Tensor) -> None:
        out += geometry.adjoint(self.extract, window.to(out.device, out.dtype), tuple(out.shape[-2:]))

    def extract_noise(self, noise: torch.Tensor) -> torch.Tensor:
        """This view's initial x_T for x0 merging: a nearest-neighbour projection of the canvas noise. Each sample is
        one canvas sample, so N(0, 1) (bilinear interpolation averages neighbours: variance ~0.5); where the view is
        finer than the canvas, neighbouring samples repeat, so give the canvas at least the views' resolution."""
        return geometry.sample_perspective(noise, self.grid.to(noise.device), "nearest")
