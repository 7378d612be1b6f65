"""LPIPS sync loss (the paper's default: LPIPS-VGG), via the ``lpips`` package."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from syncengine.errors import ConfigError
from syncengine.sync_loss import SyncLoss

from .backbones import RANDOM_NOTICE, backbone_errors

log = logging.getLogger(__name__)


@dataclass
class LPIPSConfig:
    net: str = "vgg"  # vgg (paper), alex, squeeze
    backbone: str = "pretrained"  # pretrained (ImageNet, from torchvision's cache) | random (smoke runs only)


class LPIPSLoss(SyncLoss):
    """LPIPS with the anchor's normalised features computed once per sync step (``prepare_target``)."""

    Config = LPIPSConfig

    def __init__(self, config: LPIPSConfig | None = None):
        super().__init__(config)
        import lpips

        c = self.config
        if c.net not in ("vgg", "alex", "squeeze"):
            raise ConfigError("sync.loss.net", f"{c.net!r} is not vgg, alex or squeeze")
        if c.backbone not in ("pretrained", "random"):
            raise ConfigError("sync.loss.backbone", f"{c.backbone!r} is not pretrained or random")
        if c.backbone == "random":
            log.warning("lpips/%s: %s", c.net, RANDOM_NOTICE)
        with backbone_errors(c.net, c.backbone == "pretrained"), torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # a random backbone must still be the same one every run (reproducible outputs)
            self.model = lpips.LPIPS(net=c.net, pnet_rand=c.backbone == "random", verbose=False)
        self.model.requires_grad_(False).eval()
        self._lpips = lpips

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        m = self.model
        outs = m.net.forward(m.scaling_layer(images))
        return [self._lpips.normalize_tensor(o) for o in outs]

    def prepare_target(self, anchor: torch.Tensor) -> list[torch.Tensor]:
        self.model.to(anchor.device)
        return self.features(anchor)

    def forward(self, images: torch.Tensor, target: list[torch.Tensor]) -> torch.Tensor:
        self.model.to(images.device)
        total = 0
        for lin, feat, ref in zip(self.model.lins, self.features(images), target):
            total = total + self._lpips.spatial_average(lin((feat - ref) ** 2), keepdim=True)
        return total.reshape(-1)
