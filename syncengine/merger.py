"""Merger: combines what the views computed into one canvas tensor.

Every merger computes ``sum_i scatter_i(w_i * x_i) / sum_i scatter_i(w_i)``: a weighted sum over views divided by the
summed weights. A merger only decides the weights ``w_i`` (in window space) and *what* is merged (``target``): the
noisy latents and noise predictions (``xt``, MultiDiffusion/SyncDiffusion) or the Tweedie estimate x0 (``x0``,
SyncTweedies). Keeping the sum and the weight sum as separate buffers is what lets a sharded run all-reduce both and
divide once.
"""
from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import Literal, Sequence

import torch

from .plugin import Plugin
from .views import View


@dataclass
class MergerConfig:
    target: Literal["xt", "x0"] = "xt"  # xt: merge noisy latents and noise predictions; x0: the Tweedie estimate


class Merger(Plugin):
    """Decides each view's weight in window space; the arithmetic lives in :class:`MergeBuffer`."""

    Config = MergerConfig
    section = "merger"  # the Plugin base checks the Literal target when built without a spec

    def __init__(self, config=None):
        super().__init__(config)
        self._cache: dict[int, tuple[View, torch.Tensor]] = {}  # view index -> (that view, its weight)

    @property
    def target(self) -> str:
        return self.config.target

    @abstractmethod
    def window_weight(self, view: View) -> torch.Tensor:
        """``[1, 1, h, w]`` non-negative weight of the view's positions (without ``view.weight``)."""

    def weight(self, view: View, device=None, dtype=torch.float32) -> torch.Tensor:
        """The view's full weight: the merger's window weight times the view's own weight (mask, density)."""
        cached = self._cache.get(view.index)
        if cached is None or cached[0] is not view:  # views that move reuse indices: a new view, a new weight
            w = self.window_weight(view).to(torch.float32)
            if view.weight is not None:
                w = w * view.weight.to(torch.float32)
            cached = self._cache[view.index] = (view, w)
        return cached[1].to(device=device, dtype=dtype)


class MergeBuffer:
    """Canvas-sized weighted sum and weight sum for one merged quantity.

    ``weight``: a weight canvas computed once per set of views (:meth:`weights_of`). Fixed views keep their weights
    for the whole request, so the sampler sums them (and all-reduces them, when sharded) once and shares them between
    buffers; each step then only accumulates (and communicates) the weighted sums."""

    def __init__(self, shape: tuple[int, ...], device=None, dtype=torch.float32, weight: torch.Tensor | None = None):
        self.sum = torch.zeros(shape, device=device, dtype=dtype)
        self.shared_weight = weight is not None
        if weight is None:
            weight = torch.zeros((shape[0], 1, *shape[2:]), device=device, dtype=dtype)
        self.weight = weight

    @staticmethod
    def weights_of(views: Sequence[View], merger: "Merger", shape: tuple[int, ...], device=None) -> torch.Tensor:
        """The summed weights of ``views`` on a canvas of ``shape``: ``[B, 1, H, W]``."""
        out = torch.zeros((shape[0], 1, *shape[2:]), device=device, dtype=torch.float32)
        for view in views:
            w = merger.weight(view, device=device)
            view.scatter_add(w.expand(shape[0], 1, *w.shape[-2:]).to(out.dtype), out)
        return out

    def add(self, view: View, window: torch.Tensor, weight: torch.Tensor) -> None:
        view.scatter_add(window.to(self.sum.dtype) * weight, self.sum)
        if not self.shared_weight:
            view.scatter_add(weight.expand(window.shape[0], 1, *weight.shape[-2:]), self.weight)

    def result(self, fallback: torch.Tensor) -> torch.Tensor:
        """The weighted average; positions no view covered keep ``fallback``."""
        covered = self.weight > 0
        return torch.where(covered, self.sum / self.weight.clamp_min(1e-12), fallback.to(self.sum.dtype))
