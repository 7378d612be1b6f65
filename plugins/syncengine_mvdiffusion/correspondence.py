"""Where a pixel of one perspective view lands in another: rotation-only homographies (MVDiffusion, Tang et al. 2023).

Views of a panorama share one centre of projection, so pixel correspondences need no depth: a pixel of view ``s``
maps to view ``d`` through ``H = K_d F R_d^T R_s F K_s^-1`` (``R`` camera-to-world rotations of
:func:`syncengine_spherical.geometry.rotation`, ``F = diag(1, -1, 1)`` because image rows go down while the camera's
y axis goes up). Pixel coordinates here are pixel *indices*: pixel ``k``'s centre is at ``k``, the principal point at
``((W - 1) / 2, (H - 1) / 2)``, as in the official release (its ``cx = (width - 1) / 2``). The third homogeneous
coordinate of ``H @ p`` is the depth of the ray in the destination camera: a correspondence is valid only where it is
positive (the official model only pairs 45° neighbours, where this always holds; arbitrary pairs need the check).

At a feature level of stride ``s`` (image pixels per feature pixel), query feature pixel ``(r, c)`` stands for image
pixel ``(c s + s//2, r s + s//2)``; its correspondence ``x`` becomes the feature coordinate ``x / s - 0.5`` in the
destination, around which the ``k x k`` neighbourhood is sampled bilinearly. Each sample is valid when it lies inside
the destination image, and is described to the attention by its offset from the query, back-projected into the
source view, in feature pixels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from syncengine_spherical.geometry import rotation

FLIP = torch.diag(torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64))


@dataclass(frozen=True)
class Camera:
    """A pinhole camera at the panorama's centre: angles in degrees (conventions of docs/spherical.md), horizontal
    ``fov``, image size in pixels."""

    yaw: float
    pitch: float
    roll: float
    fov: float
    height: int
    width: int

    @classmethod
    def from_context(cls, camera: Mapping[str, Any], height: int, width: int) -> "Camera":
        return cls(float(camera.get("yaw", 0.0)), float(camera.get("pitch", 0.0)), float(camera.get("roll", 0.0)),
                   float(camera["fov"]), int(height), int(width))

    @property
    def focal(self) -> float:
        return (self.width / 2) / math.tan(math.radians(self.fov) / 2)

    def intrinsics(self) -> torch.Tensor:
        f = self.focal
        return torch.tensor([[f, 0, (self.width - 1) / 2], [0, f, (self.height - 1) / 2], [0, 0, 1]],
                            dtype=torch.float64)

    def rotation(self) -> torch.Tensor:
        return rotation(self.yaw, self.pitch, self.roll)


def homography(src: Camera, dst: Camera) -> torch.Tensor:
    """3x3 (float64): homogeneous pixel of ``src`` -> homogeneous pixel of ``dst`` (third coordinate = depth in dst)."""
    return dst.intrinsics() @ FLIP @ dst.rotation().T @ src.rotation() @ FLIP @ torch.linalg.inv(src.intrinsics())


def _apply(h: torch.Tensor, xy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Homographies ``[..., 3, 3]`` applied to points ``[..., P, 2]``: (dehomogenised points, third coordinate)."""
    p = torch.cat([xy, torch.ones_like(xy[..., :1])], dim=-1)
    q = p @ h.transpose(-1, -2)
    return q[..., :2] / q[..., 2:], q[..., 2]


@dataclass(frozen=True)
class Neighbourhood:
    """The ``k*k`` samples of each query at one feature level, for a batch of (source, destination) pairs ``N``.

    ``position``: ``[N, k*k, h, w, 2]`` (x, y) sample positions in the destination's feature map (feature pixel
    indices, the coordinates of ``grid_sample(align_corners=True)``); ``valid``: ``[N, k*k, h, w]``; ``offset``:
    ``[N, k*k, h, w, 2]`` each sample's position back-projected into the source, relative to the query, in feature
    pixels (0 where invalid). Sample order: x offset outer, y offset inner (as the official release).
    """

    position: torch.Tensor
    valid: torch.Tensor
    offset: torch.Tensor


def neighbourhood(forward: torch.Tensor, backward: torch.Tensor, feature_hw: tuple[int, int],
                  image_hw: tuple[int, int], kernel: int = 3) -> Neighbourhood:
    """Sample positions for homographies ``forward`` (src -> dst, ``[N, 3, 3]``) and ``backward`` (dst -> src) at a
    feature level of size ``feature_hw`` of images of size ``image_hw`` (both views the same size)."""
    h, w = feature_hw
    img_h, img_w = image_hw
    sy, sx = img_h // h, img_w // w
    ys = torch.arange(h, dtype=torch.float64) * sy + sy // 2
    xs = torch.arange(w, dtype=torch.float64) * sx + sx // 2
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    query = torch.stack([gx, gy], dim=-1).reshape(1, h * w, 2)  # image pixels of the queries in the source
    hit, depth = _apply(forward.to(torch.float64), query)  # [N, h*w, 2]
    centre = hit / torch.tensor([sx, sy], dtype=torch.float64) - 0.5
    scale = torch.tensor([sx, sy], dtype=torch.float64)
    r = kernel // 2
    positions, valids, offsets = [], [], []
    for dx in range(-r, r + 1):
        for dy in range(-r, r + 1):
            pos = centre + torch.tensor([dx, dy], dtype=torch.float64)
            image = (pos + 0.5) * scale  # the sample in destination image pixels
            valid = ((image[..., 0] > 0) & (image[..., 0] < img_w) & (image[..., 1] > 0) & (image[..., 1] < img_h)
                     & (depth > 0) & torch.isfinite(image).all(-1))
            back, _ = _apply(backward.to(torch.float64), torch.where(valid[..., None], image, 0.0))
            offset = torch.where(valid[..., None], (back - query) / scale, 0.0)
            positions.append(torch.where(valid[..., None], pos, -2.0))  # -2: outside, sampled as zero anyway
            valids.append(valid)
            offsets.append(torch.nan_to_num(offset))
    n = forward.shape[0]
    shape = (n, kernel * kernel, h, w)
    return Neighbourhood(torch.stack(positions, 1).reshape(*shape, 2), torch.stack(valids, 1).reshape(shape),
                         torch.stack(offsets, 1).reshape(*shape, 2))
