"""Style loss (Gatys et al.): distance between Gram matrices of VGG features."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import List

import torch

from syncengine.errors import ConfigError
from syncengine.sync_loss import SyncLoss

from .backbones import vgg_features

log = logging.getLogger(__name__)

# Indices of the ReLU outputs in torchvision's VGG ``features``.
VGG_LAYERS = {
    "vgg16": {"relu1_2": 3, "relu2_2": 8, "relu3_3": 15, "relu4_3": 22, "relu5_3": 29},
    "vgg19": {"relu1_2": 3, "relu2_2": 8, "relu3_4": 17, "relu4_4": 26, "relu5_4": 35},
}
RANDOM_STYLE_NOTICE = ("RANDOM backbone weights (seeded): the Gram matrices of random features measure colour and "
                       "texture statistics, not ImageNet's (the fast, shifted-sync and demo presets use them on "
                       "purpose)")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class StyleConfig:
    net: str = "vgg16"  # vgg16 (shares its weights file with LPIPS-VGG) or vgg19 (Gatys et al.)
    layers: List[str] = field(default_factory=lambda: ["relu1_2", "relu2_2", "relu3_3", "relu4_3"])
    backbone: str = "pretrained"  # pretrained | random (smoke runs only)


def gram(features: torch.Tensor) -> torch.Tensor:
    """Normalised Gram matrix ``F F^T / (C H W)`` per image: ``[B, C, C]``."""
    b, c, h, w = features.shape
    f = features.reshape(b, c, h * w)
    return f @ f.transpose(1, 2) / (c * h * w)


class StyleLoss(SyncLoss):
    """Sum over layers of the mean squared difference between Gram matrices."""

    Config = StyleConfig

    def __init__(self, config: StyleConfig | None = None):
        super().__init__(config)
        c = self.config
        if c.net not in VGG_LAYERS:
            raise ConfigError("sync.loss.net", f"{c.net!r} is not one of {', '.join(VGG_LAYERS)}")
        unknown = [name for name in c.layers if name not in VGG_LAYERS[c.net]]
        if unknown or not c.layers:
            raise ConfigError("sync.loss.layers", f"{unknown or 'empty'}: choose from {', '.join(VGG_LAYERS[c.net])}")
        if c.backbone not in ("pretrained", "random"):
            raise ConfigError("sync.loss.backbone", f"{c.backbone!r} is not pretrained or random")
        if c.backbone == "random":  # Gram matrices of random features still carry colour and texture statistics
            log.warning("style/%s: %s", c.net, RANDOM_STYLE_NOTICE)
        self.taps = sorted(VGG_LAYERS[c.net][name] for name in c.layers)
        self.vgg = vgg_features(c.net, random=c.backbone == "random")[: self.taps[-1] + 1]
        self.vgg.requires_grad_(False).eval()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def grams(self, images: torch.Tensor) -> list[torch.Tensor]:
        self.to(images.device)
        x = ((images + 1) / 2 - self.mean) / self.std
        out = []
        for i, layer in enumerate(self.vgg):
            x = layer(x)
            if i in self.taps:
                out.append(gram(x))
        return out

    def prepare_target(self, anchor: torch.Tensor) -> list[torch.Tensor]:
        return self.grams(anchor)

    def forward(self, images: torch.Tensor, target: list[torch.Tensor]) -> torch.Tensor:
        total = 0
        for g, ref in zip(self.grams(images), target):
            total = total + ((g - ref) ** 2).mean(dim=(1, 2))
        return total
