"""Tilers on an equirectangular latent canvas [1, C, H, 2H]: a perspective ring (MVDiffusion) and a cube map."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from syncengine import registry
from syncengine.errors import ConfigError
from syncengine.tiler import Tiler
from syncengine.views import CanvasSpec

from . import geometry
from .outputs import ExportConfig, check_export, finish
from .views import SAMPLING, ProjectedView


def _check_equirect(canvas: CanvasSpec) -> None:
    if canvas.width != 2 * canvas.height:
        raise ConfigError("canvas", f"an equirectangular canvas is 2:1, got {canvas.height}x{canvas.width}; "
                                    f"set canvas.width to {2 * canvas.height}")


def _check_sampling(sampling: str) -> None:
    if sampling not in SAMPLING:
        raise ConfigError("tiler.sampling", f"{sampling!r} is not one of {', '.join(SAMPLING)}")


def _check_window(window: int, factor: int) -> None:
    """A view is ``window / factor`` latents square: a positive whole number of them."""
    if window <= 0:
        raise ConfigError("tiler.window", f"must be positive, got {window}")
    if window % factor:
        raise ConfigError("tiler.window", f"{window} px is not a multiple of the latent factor {factor}; use "
                                          f"{max(factor, window // factor * factor)}")


def _view(index: int, size: int, fov: float, yaw: float, pitch: float, sampling: str) -> ProjectedView:
    grid = geometry.equirect_to_perspective_grid(size, size, fov, yaw, pitch)
    return ProjectedView(index, grid=grid, sampling=sampling,
                         context={"camera": {"yaw": yaw, "pitch": pitch, "roll": 0.0, "fov": fov}})


class SphericalTiler(Tiler):
    """Shared by the spherical tilers: the ±180° seam wraps, and the finished image gets its 360° outputs."""

    @property
    def periodic_width(self) -> bool:
        return True

    def validate(self, canvas: CanvasSpec) -> None:
        _check_equirect(canvas)
        _check_window(self.config.window, canvas.latent_factor)
        _check_sampling(self.config.sampling)
        check_export(self.config)

    def finish_output(self, image: torch.Tensor, canvas: CanvasSpec):
        """Extra images (exports) and metadata (GPano XMP, projection for the sidecar) of the finished image."""
        cameras = [v.context["camera"] for v in self.views(canvas)]
        name = registry.name_of("tiler", self) or type(self).__name__  # the sidecar records the spec's name
        return finish(image, self.config, cameras, self.config.window, name)


@dataclass
class PerspectiveConfig(ExportConfig):
    window: int = 512  # view size in pixels
    fov: float = 90.0  # horizontal field of view in degrees
    views_per_ring: int = 8  # yaw step = 360 / views_per_ring
    pitches: list[float] = field(default_factory=lambda: [0.0])  # one ring per pitch (degrees)
    poles: bool = False  # add straight-up and straight-down views
    sampling: str = "bilinear"  # bilinear (pole-prefiltered, covers every pixel) | nearest (SyncTweedies remap)


class PerspectiveTiler(SphericalTiler):
    Config = PerspectiveConfig

    def validate(self, canvas: CanvasSpec) -> None:
        super().validate(canvas)
        c = self.config
        if not 0 < c.fov < 180:
            raise ConfigError("tiler.fov", f"must be in (0, 180) degrees, got {c.fov}")
        if c.views_per_ring < 1:  # 0 would silently drop every ring, the horizon included
            raise ConfigError("tiler.views_per_ring", f"must be >= 1, got {c.views_per_ring}")
        for k, pitch in enumerate(c.pitches):
            if not -90 <= pitch <= 90:
                raise ConfigError(f"tiler.pitches.{k}", f"must be in [-90, 90] degrees, got {pitch}")
        if not c.pitches and not c.poles:
            raise ConfigError("tiler.pitches", "no views: give at least one ring pitch (e.g. [0.0]) or poles: true")

    def views(self, canvas: CanvasSpec) -> list[ProjectedView]:
        c, size = self.config, self.config.window // canvas.latent_factor
        cams = [(k * 360.0 / c.views_per_ring, p) for p in c.pitches for k in range(c.views_per_ring)]
        cams += [(0.0, 90.0), (0.0, -90.0)] if c.poles else []
        return [_view(i, size, c.fov, yaw, pitch, c.sampling) for i, (yaw, pitch) in enumerate(cams)]


@dataclass
class CubemapConfig(ExportConfig):
    window: int = 512  # face size in pixels
    sampling: str = "bilinear"  # bilinear (pole-prefiltered, covers every pixel) | nearest (SyncTweedies remap)


class CubemapTiler(SphericalTiler):
    """Six 90° faces in the order of `geometry.CUBE_FACES`; ``context["face"]`` names each."""

    Config = CubemapConfig

    def views(self, canvas: CanvasSpec) -> list[ProjectedView]:
        size = self.config.window // canvas.latent_factor
        out = []
        for i, (name, (yaw, pitch)) in enumerate(geometry.CUBE_FACES.items()):
            v = _view(i, size, 90.0, yaw, pitch, self.config.sampling)
            v.context["face"] = name
            out.append(v)
        return out
