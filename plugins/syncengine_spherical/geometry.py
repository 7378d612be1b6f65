"""Equirectangular <-> perspective geometry in pure torch.

Conventions (all angles in radians inside, degrees at the API where named ``*_deg``):
- World axes: x right, y up, z forward. Longitude 0 looks along +z, longitude +90° along +x.
- Direction of (lon, lat): (cos(lat) sin(lon), sin(lat), cos(lat) cos(lon)).
- Equirectangular image [H, W=2H]: column j has lon = (j + 0.5) / W * 360° - 180° (left edge -180°, right +180°),
  row i has lat = 90° - (i + 0.5) / H * 180° (top row is the north pole). Pixel centres, i.e. grid_sample with
  align_corners=False, so normalised x = lon / 180°, y = -lat / 90°.
- Perspective camera: yaw turns right (towards +lon), pitch turns up (towards +lat), roll turns clockwise as seen by
  the camera. Rotation R = R_y(yaw) @ R_x(-pitch) @ R_z(-roll) maps camera rays to world. Image pixel (u, v) centre
  ray is ((u + 0.5 - w/2) / f, -(v + 0.5 - h/2) / f, 1) with f = (w/2) / tan(fov/2) (fov is horizontal).
"""
from __future__ import annotations

import math

import torch


def rotation(yaw_deg: float, pitch_deg: float, roll_deg: float = 0.0) -> torch.Tensor:
    """Camera-to-world rotation (3x3, float64) for the conventions in the module docstring."""
    y, p, r = (math.radians(a) for a in (yaw_deg, pitch_deg, roll_deg))
    ry = torch.tensor([[math.cos(y), 0, math.sin(y)], [0, 1, 0], [-math.sin(y), 0, math.cos(y)]], dtype=torch.float64)
    rx = torch.tensor([[1, 0, 0], [0, math.cos(p), math.sin(p)], [0, -math.sin(p), math.cos(p)]], dtype=torch.float64)
    rz = torch.tensor([[math.cos(r), math.sin(r), 0], [-math.sin(r), math.cos(r), 0], [0, 0, 1]], dtype=torch.float64)
    return ry @ rx @ rz


def direction_to_lonlat(d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    d = d / d.norm(dim=-1, keepdim=True)
    return torch.atan2(d[..., 0], d[..., 2]), torch.asin(d[..., 1].clamp(-1, 1))


def lonlat_to_direction(lon: torch.Tensor, lat: torch.Tensor) -> torch.Tensor:
    return torch.stack([lat.cos() * lon.sin(), lat.sin(), lat.cos() * lon.cos()], dim=-1)


def perspective_rays(h: int, w: int, fov_deg: float) -> torch.Tensor:
    """Camera-space rays [h, w, 3] through pixel centres (z = 1)."""
    f = (w / 2) / math.tan(math.radians(fov_deg) / 2)
    u = (torch.arange(w, dtype=torch.float64) + 0.5 - w / 2) / f
    v = -(torch.arange(h, dtype=torch.float64) + 0.5 - h / 2) / f
    vv, uu = torch.meshgrid(v, u, indexing="ij")
    return torch.stack([uu, vv, torch.ones_like(uu)], dim=-1)


def equirect_to_perspective_grid(h: int, w: int, fov_deg: float, yaw_deg: float, pitch_deg: float,
                                 roll_deg: float = 0.0) -> torch.Tensor:
    """grid_sample grid [1, h, w, 2] that samples a perspective view from an equirectangular image."""
    d = perspective_rays(h, w, fov_deg) @ rotation(yaw_deg, pitch_deg, roll_deg).T
    lon, lat = direction_to_lonlat(d)
    return torch.stack([lon / math.pi, -lat / (math.pi / 2)], dim=-1).unsqueeze(0).float()


def perspective_pixel(direction: torch.Tensor, h: int, w: int, fov_deg: float, yaw_deg: float, pitch_deg: float,
                      roll_deg: float = 0.0) -> tuple[float, float] | None:
    """Continuous pixel (u, v) where a world direction lands in a view, or None if it is behind/outside."""
    c = rotation(yaw_deg, pitch_deg, roll_deg).T @ direction.to(torch.float64)
    if c[2] <= 0:
        return None
    f = (w / 2) / math.tan(math.radians(fov_deg) / 2)
    u, v = c[0] / c[2] * f + w / 2, -c[1] / c[2] * f + h / 2
    return (float(u), float(v)) if 0 <= u < w and 0 <= v < h else None


def pole_filter(equirect: torch.Tensor) -> torch.Tensor:
    """Average each row over ``k ~ 1.25/cos(lat)`` neighbouring columns (circularly; rows with ``k = 1`` untouched).

    An equirectangular row at latitude ``lat`` packs its W columns into a circle ``cos(lat)`` times the equator's, so
    near the poles a perspective view samples only a few of them and its adjoint (the scatter) would leave the others
    with zero weight. Prefiltering to the equator's resolution is the antialiasing that sampling needs there; as a
    linear operator it keeps extract and scatter exact adjoints, and every column of every row gets covered.
    """
    h, w = equirect.shape[-2:]
    half = _pole_half_widths(h, w)
    if int(half.max()) == 0:
        return equirect
    m = int(half.max())
    x = equirect.to(torch.float64)
    padded = torch.cat([x[..., w - m :], x, x[..., :m]], dim=-1)
    csum = torch.nn.functional.pad(padded.cumsum(-1), (1, 0))
    cols = torch.arange(w)[None, :] + m
    hi = (cols + half[:, None] + 1).expand(h, w)
    lo = (cols - half[:, None]).expand(h, w)
    shape = (*x.shape[:-2], h, w)
    hi, lo = hi.to(x.device).expand(shape), lo.to(x.device).expand(shape)
    box = (csum.gather(-1, hi) - csum.gather(-1, lo)) / (2 * half[:, None].to(x) + 1)
    rows = (half > 0).to(x.device)[:, None]
    return torch.where(rows, box, x).to(equirect.dtype)


POLE_FILTER_MARGIN = 1.25
"""Box width ``k = round(margin / cos(lat))``: 25% over the equator-equivalent width, so rounding leaves no gap
(measured: cube maps and rings with poles at 8-64 px faces on 16x32 to 128x256 canvases cover every pixel)."""


def _pole_half_widths(h: int, w: int) -> torch.Tensor:
    lat = math.pi / 2 - (torch.arange(h, dtype=torch.float64) + 0.5) / h * math.pi
    k = (POLE_FILTER_MARGIN / lat.cos()).clamp(max=w)
    return ((k - 1) / 2).round().long().clamp(0, (w - 1) // 2)


def sample_perspective(equirect: torch.Tensor, grid: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """Project an equirectangular tensor [B, C, H, 2H] through a precomputed grid (seam wraps by padding a column).

    ``mode``: ``bilinear`` or ``nearest`` (each view pixel copies one canvas pixel, as SyncTweedies remaps)."""
    padded = torch.cat([equirect[..., -1:], equirect, equirect[..., :1]], dim=-1)
    w = equirect.shape[-1]
    g = grid.clone()
    g[..., 0] = g[..., 0] * w / (w + 2)  # the padded image spans one extra pixel each side
    return torch.nn.functional.grid_sample(padded, g.expand(equirect.shape[0], -1, -1, -1).to(equirect.dtype),
                                           mode=mode, padding_mode="border", align_corners=False)


def adjoint(project, view: torch.Tensor, canvas_hw: tuple[int, int]) -> torch.Tensor:
    """Exact adjoint of a linear projection ``project`` (canvas -> view) applied to ``view``, through autograd."""
    x = torch.zeros(view.shape[0], view.shape[1], *canvas_hw, dtype=view.dtype, device=view.device,
                    requires_grad=True)
    with torch.enable_grad():
        (out,) = torch.autograd.grad(project(x), x, grad_outputs=view.detach())
    return out


def scatter_perspective(view: torch.Tensor, grid: torch.Tensor, canvas_hw: tuple[int, int],
                        mode: str = "bilinear") -> torch.Tensor:
    """Exact adjoint of `sample_perspective` (unprojection): <sample(x), y> == <x, scatter(y)> for all x, y.

    Scattering ones gives the per-pixel sampling density, the weight a merger divides by.
    """
    return adjoint(lambda x: sample_perspective(x, grid, mode), view, canvas_hw)


CUBE_FACES = {"front": (0.0, 0.0), "right": (90.0, 0.0), "back": (180.0, 0.0), "left": (-90.0, 0.0),
              "up": (0.0, 90.0), "down": (0.0, -90.0)}
"""Cube face order and (yaw, pitch) in degrees; each face is a 90° FoV perspective view."""
