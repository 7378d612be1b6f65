"""A sync loss that matches colour statistics: cheap, needs no weights, keeps the views' palettes together.

Perceptual losses (LPIPS) compare structure and texture through a network; this one compares only the mean and the
standard deviation of each colour channel, after average pooling away the fine detail. It is a useful baseline and
the smallest complete example of the SyncLoss contract.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from syncengine.errors import ConfigError
from syncengine.sync_loss import SyncLoss


@dataclass
class ColorStatsConfig:
    pool: int = 8  # average-pool size in px before the statistics (ignores texture finer than this)
    std_weight: float = 1.0  # weight of the standard-deviation term relative to the mean term


class ColorStatsLoss(SyncLoss):
    """Squared distance between per-channel means and standard deviations of each view and the anchor."""

    Config = ColorStatsConfig

    def __init__(self, config: ColorStatsConfig | None = None):
        super().__init__(config)
        if self.config.pool < 1:  # options are typed by the schema; ranges are checked here, naming the key
            raise ConfigError("sync.loss.pool", f"must be >= 1, got {self.config.pool}")
        if self.config.std_weight < 0:
            raise ConfigError("sync.loss.std_weight", f"must be >= 0, got {self.config.std_weight}")

    def stats(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.avg_pool2d(images, self.config.pool) if self.config.pool > 1 else images
        flat = x.flatten(2)  # [B, 3, N]
        return flat.mean(-1), flat.std(-1)

    def prepare_target(self, anchor: torch.Tensor):
        # Runs once per sync step without gradient: the anchor's side of the loss.
        return self.stats(anchor)

    def forward(self, images: torch.Tensor, target) -> torch.Tensor:
        mean, std = self.stats(images)
        t_mean, t_std = target
        return ((mean - t_mean) ** 2).sum(1) + self.config.std_weight * ((std - t_std) ** 2).sum(1)  # [B]
