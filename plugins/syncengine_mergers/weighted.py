"""Weighted-average mergers. The sum/normalise arithmetic is shared (``syncengine.merger.MergeBuffer``)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from syncengine.errors import ConfigError
from syncengine.merger import Merger, MergerConfig
from syncengine.views import View


class AverageMerger(Merger):
    """Every position of every view counts the same (MultiDiffusion, Eq. 12 of the SyncDiffusion paper)."""

    def window_weight(self, view: View) -> torch.Tensor:
        return torch.ones(1, 1, *view.latent_size)


@dataclass
class GaussianConfig(MergerConfig):
    sigma: float = 0.1  # standard deviation as a fraction of the window size (Mixture of Diffusers: var 0.01)


def gaussian_profile(n: int, sigma: float) -> torch.Tensor:
    """A Gaussian bump over ``n`` positions centred on the window, unnormalised (only ratios matter)."""
    pos = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    return torch.exp(-((pos - 0.5) ** 2) / (2 * sigma**2)).to(torch.float32)


class GaussianMerger(Merger):
    """Window centres weigh more than edges, which softens seams between windows (Mixture of Diffusers)."""

    Config = GaussianConfig

    def __init__(self, config=None):
        super().__init__(config)  # the Plugin base checks target (a closed set)
        if not (self.config.sigma > 0 and math.isfinite(self.config.sigma)):
            raise ConfigError("merger.sigma", f"must be a positive number, got {self.config.sigma}")

    def window_weight(self, view: View) -> torch.Tensor:
        h, w = view.latent_size
        s = self.config.sigma
        return (gaussian_profile(h, s)[:, None] * gaussian_profile(w, s)[None, :])[None, None]
