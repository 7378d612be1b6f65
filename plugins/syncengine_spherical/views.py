"""A perspective view of an equirectangular canvas: extract = projection, scatter_add = its exact adjoint."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from syncengine.views import View

from . import geometry


@dataclass
class ProjectedView(View):
    """``grid`` is the precomputed grid_sample grid [1, h, w, 2] (see `geometry.equirect_to_perspective_grid`).

    Scattering ones yields the per-pixel sampling density, so the standard merger (sum of weighted contributions
    divided by summed weights) normalises projected views exactly as it does crops.
    """

    grid: torch.Tensor = field(default=None)

    @property
    def latent_size(self) -> tuple[int, int]:
        return (self.grid.shape[1], self.grid.shape[2])

    def extract(self, canvas: torch.Tensor) -> torch.Tensor:
        return geometry.sample_perspective(canvas, self.grid.to(canvas.device))

    def scatter_add(self, window: torch.Tensor, out: torch.Tensor) -> None:
        out += geometry.scatter_perspective(window.to(out.dtype), self.grid.to(out.device, out.dtype),
                                            tuple(out.shape[-2:])).to(out.device)
