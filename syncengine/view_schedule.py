"""Which views denoise at each step: the same ones every step (sliding windows, projections) or new ones every step
(shifted windows, SpotDiffusion).

A tiler hands the sampler a :class:`ViewSchedule` (:meth:`~syncengine.tiler.Tiler.view_schedule`). The sampler asks
:attr:`ViewSchedule.moving` once: fixed views have their merge weights, shares and sync groups computed once per
request, as before; moving views have them recomputed at every step (cheap: a scatter of window weights). Every rank
of a sharded run builds the same schedule from the request's seed, so a step's views, and each rank's balanced share
of them, agree without communication.

The anchor of a sync group (Algorithm 1, line 2) is named by :func:`resolve_anchor` for fixed views (the paper's
``N // 2``). Views that move have no fixed centre view, so the anchor is the view that holds the anchor *position*
at that step (:meth:`MovingViews.anchor`): the canvas centre for ``center``, its first or last column for ``first``
and ``last``.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, Sequence

from .errors import ConfigError
from .views import CanvasSpec, CropView, View


def resolve_anchor(anchor: int | str, members: Sequence[View]) -> View:
    """The anchor among a sync group's views: ``center`` (paper: N // 2), ``first``, ``last`` or a view index (groups
    that do not hold that view use their centre; an index no group holds is an error, ``check_anchor_index``)."""
    if anchor == "center":
        return members[len(members) // 2]
    if anchor == "first":
        return members[0]
    if anchor == "last":
        return members[-1]
    for view in members:
        if view.index == int(anchor):
            return view
    return members[len(members) // 2]  # a group without that view (region layouts): its centre


class ViewSchedule(ABC):
    """The views of each step of one request."""

    moving: bool = False  # False: :meth:`at` returns the same views at every step

    @abstractmethod
    def at(self, step: int) -> list[View]:
        """The views of step ``step`` (0-based), in a stable order: indices ``0..N-1`` name them within the step."""

    def anchor(self, anchor: int | str, members: Sequence[View]) -> View:
        """The anchor of one sync group at one step."""
        return resolve_anchor(anchor, members)


class FixedViews(ViewSchedule):
    """The same views at every step: what every tiler gives unless it overrides ``view_schedule``."""

    def __init__(self, views: Sequence[View]):
        self.views = list(views)

    def at(self, step: int) -> list[View]:
        return self.views


class MovingViews(ViewSchedule):
    """New views at every step, made by ``make(step)`` (deterministic: every rank calls it with the same step and
    gets the same views). The views of the last step asked for are kept, so asking twice builds them once."""

    moving = True

    def __init__(self, make: Callable[[int], list[View]], canvas: CanvasSpec):
        self.make, self.canvas = make, canvas
        self._step: int | None = None
        self._views: list[View] = []

    def at(self, step: int) -> list[View]:
        if step != self._step:
            self._step, self._views = step, self.make(step)
        return self._views

    def anchor(self, anchor: int | str, members: Sequence[View]) -> View:
        """The member holding the anchor position at this step; a group that does not reach it (a region's views)
        takes the member whose centre is nearest to it. Views other than crops keep :func:`resolve_anchor`."""
        if isinstance(anchor, int) or (isinstance(anchor, str) and anchor.isdigit()):
            raise ConfigError("sync.anchor", f"view index {anchor} names no view here: this tiler moves its views "
                                             "every step; use center, first or last")
        if not all(isinstance(v, CropView) for v in members):
            return resolve_anchor(anchor, members)
        H, W = self.canvas.latent_height, self.canvas.latent_width
        row = H // 2
        col = {"center": W // 2, "first": 0, "last": W - 1}[anchor]
        return min(members, key=lambda v: _distance(v, row, col))


def _distance(view: CropView, row: int, col: int) -> float:
    """0 when the crop holds (row, col); otherwise the distance from the crop's centre (wrapping columns when the
    crop wraps)."""
    top, bottom, left, right = view.box
    dc = col - left
    if view.canvas_width is not None:
        dc %= view.canvas_width
    if top <= row < bottom and 0 <= dc < right - left:
        return 0.0
    centre_r, centre_c = (top + bottom - 1) / 2, (left + right - 1) / 2
    dx = abs(col - centre_c)
    if view.canvas_width is not None:
        dx = min(dx % view.canvas_width, view.canvas_width - dx % view.canvas_width)
    return 1.0 + ((row - centre_r) ** 2 + dx**2) ** 0.5
