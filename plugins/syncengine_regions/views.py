"""Region views and MultiDiffusion's bootstrapping.

For the first ``bootstrap`` fraction of the steps a region's window is composed over a random solid-colour
background, noised to the current step, before the model sees it:
``x * m + (sqrt(a) * bg + sqrt(1 - a) * n) * (1 - m)``. The model then cannot explain the region's content by the
surroundings, so a tight mask gets an object that fills it (MultiDiffusion, section 4.2).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from syncengine.views import CropView, InputContext

PALETTE_SIZE = 16  # solid colours per request; each is encoded once per window size


def derive_seed(*parts: int) -> int:
    """A 32-bit seed from integers (the request seed, a view index, a step): independent streams per part tuple."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


class Backgrounds:
    """The bootstrapping backgrounds of one request: a seeded palette of solid colours, their latents (encoded
    lazily with the denoiser, cached per window size) and the per-view, per-step draws."""

    def __init__(self, palette: int = PALETTE_SIZE):
        self.palette = palette
        self._latents: dict[tuple, torch.Tensor] = {}

    def colors(self, seed: int) -> torch.Tensor:
        """``[palette, 3]`` RGB colours in ``[0, 1]``."""
        return torch.rand(self.palette, 3, generator=torch.Generator("cpu").manual_seed(derive_seed(seed)))

    def draw(self, seed: int, view: int, step: int, shape: tuple[int, ...]) -> tuple[int, torch.Tensor]:
        """The palette index and the ``shape`` noise a view uses at a step (reproducible from the three)."""
        g = torch.Generator("cpu").manual_seed(derive_seed(seed, view, step))
        index = int(torch.randint(self.palette, (1,), generator=g))
        return index, torch.randn(shape, generator=g)

    def latent(self, denoiser: Any, seed: int, index: int, height: int, width: int) -> torch.Tensor:
        """The clean latent ``[1, C, height, width]`` of palette colour ``index`` (an image of that colour, encoded)."""
        key = (id(denoiser), seed, index, height, width)
        if key not in self._latents:
            f = denoiser.latent_factor
            color = self.colors(seed)[index] * 2 - 1
            image = color.view(1, 3, 1, 1).expand(1, 3, height * f, width * f).contiguous()
            with torch.no_grad():
                self._latents[key] = denoiser.encode(image).float().cpu()
        return self._latents[key]


@dataclass
class RegionView(CropView):
    """A window of one region: ``weight`` is the region's mask cropped to the window, ``context`` its prompt."""

    bootstrap: float = 0.0  # compose over a random background while step.fraction < bootstrap
    backgrounds: Backgrounds | None = None

    def prepare_input(self, x: torch.Tensor, inputs: InputContext) -> torch.Tensor:
        if self.backgrounds is None or self.weight is None or inputs.step.fraction >= self.bootstrap:
            return x
        m = self.weight.to(device=x.device, dtype=x.dtype)
        if bool((m >= 1).all()):
            return x  # nothing around the region to replace
        seed = inputs.seed
        index, noise = self.backgrounds.draw(seed, self.index, inputs.step.index, tuple(x.shape))
        bg = self.backgrounds.latent(inputs.denoiser, seed, index, *self.latent_size)
        noisy = inputs.level.noised(bg.to(x), noise.to(x))
        return x * m + noisy * (1 - m)
