"""Tiler: cuts a canvas into the views a pretrained model can denoise."""
from __future__ import annotations

from abc import abstractmethod

import torch

from .plugin import Plugin
from .view_schedule import FixedViews, ViewSchedule
from .views import CanvasSpec, View


class Tiler(Plugin):
    """From a canvas, the list of views that cover it.

    Contract for implementers:
    - ``validate(canvas)`` raises :class:`~syncengine.errors.ConfigError` for options that cannot work with this
      canvas (window larger than canvas, ...). It runs before any model loads.
    - ``views(canvas)`` returns views whose union covers every canvas position the output needs (a position no view
      covers keeps its initial noise). The order is stable: view indices are used for the anchor and for sharding.
    - ``view_schedule(canvas, seed)`` gives the views of every step. By default ``views(canvas)`` at every step
      (merge weights and shares computed once); a tiler whose views move from step to step (``shifted``) returns a
      :class:`~syncengine.view_schedule.MovingViews`, deterministic in the seed so that every rank builds the same.
    - Views in the same ``context["sync_group"]`` (default ``"default"``) are synchronized against one anchor;
      ``context["sync_group"] = None`` excludes a view from synchronization.
    """

    section = "tiler"  # error keys of its options (closed sets checked by the Plugin base)

    @property
    def periodic_width(self) -> bool:
        """True when the canvas wraps horizontally (loop panoramas, 360° equirectangular): decoding pads across the
        seam so the left and right edges match."""
        return False

    def initial_noise(self, noise: torch.Tensor, canvas: CanvasSpec, seed: int) -> torch.Tensor:
        """The canvas's initial noise, given the request's (drawn once from its seed). Identity by default; a tiler
        may redraw parts of it (a region with its own seed), deterministically from ``seed``."""
        return noise

    def finish_output(self, image: torch.Tensor, canvas: CanvasSpec) -> tuple[dict[str, torch.Tensor], dict]:
        """Extra outputs of a finished image ``[3, H, W]`` in [0, 1]: ``({suffix: image}, metadata)``, the images
        written as ``<name>.<suffix>.png``, metadata keys ``xmp`` (a packet embedded in the PNG) and ``sidecar``
        (extra JSON keys). None by default; the 360° tilers add cube faces and the viewer metadata."""
        return {}, {}

    @abstractmethod
    def validate(self, canvas: CanvasSpec) -> None: ...

    @abstractmethod
    def views(self, canvas: CanvasSpec) -> list[View]: ...

    def view_schedule(self, canvas: CanvasSpec, seed: int) -> ViewSchedule:
        """The views of each step of a request with this ``seed``: the same views at every step by default."""
        return FixedViews(self.views(canvas))
