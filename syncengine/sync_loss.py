"""SyncLoss: the perceptual distance that SyncDiffusion descends (Eq. 14 of the paper)."""
from __future__ import annotations

from abc import abstractmethod
from typing import Any

import torch
from torch import nn

from .plugin import Plugin


class SyncLoss(Plugin, nn.Module):
    """Distance between each view's decoded x0 prediction and the anchor's.

    Contract for implementers:
    - Images come in ``[-1, 1]``, shape ``[B, 3, H, W]``.
    - ``prepare_target(anchor)`` runs once per sync step without gradient (the anchor side of the loss: features,
      Gram matrices); its result is passed to every call of ``forward``.
    - ``forward(images, target)`` returns one loss per image, ``[B]``; the sampler sums them, so each view's
      gradient is exactly the gradient of its own loss.
    """

    section = "sync.loss"  # error keys of its options (closed sets checked by the Plugin base)

    def __init__(self, config: Any = None):
        Plugin.__init__(self, config)
        nn.Module.__init__(self)

    @abstractmethod
    def prepare_target(self, anchor: torch.Tensor) -> Any: ...

    @abstractmethod
    def forward(self, images: torch.Tensor, target: Any) -> torch.Tensor: ...
