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


def equirect_directions(h: int, w: int) -> torch.Tensor:
    """World directions [h, w, 3] (float64) through the pixel centres of an equirectangular image."""
    lon = (torch.arange(w, dtype=torch.float64) + 0.5) / w * 2 * math.pi - math.pi
    lat = math.pi / 2 - (torch.arange(h, dtype=torch.float64) + 0.5) / h * math.pi
    la, lo = torch.meshgrid(lat, lon, indexing="ij")
    return lonlat_to_direction(lo, la)


def perspective_to_equirect_grid(canvas_hw: tuple[int, int], h: int, w: int, fov_deg: float, yaw_deg: float,
                                 pitch_deg: float, roll_deg: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse mapping: a grid [1, H, W, 2] that samples a perspective view at each equirectangular pixel, and
    the mask [1, 1, H, W] of the pixels the view sees (1) or not (0)."""
    cam = equirect_directions(*canvas_hw) @ rotation(yaw_deg, pitch_deg, roll_deg)  # world -> camera (R^T d)
    f = (w / 2) / math.tan(math.radians(fov_deg) / 2)
    z = cam[..., 2].clamp_min(1e-9)
    u, v = cam[..., 0] / z * f + w / 2, -cam[..., 1] / z * f + h / 2
    mask = (cam[..., 2] > 0) & (u >= 0) & (u <= w) & (v >= 0) & (v <= h)
    grid = torch.stack([u / w * 2 - 1, v / h * 2 - 1], dim=-1).clamp(-2, 2)
    return grid.unsqueeze(0).float(), mask[None, None].float()


def equirect_from_perspective(view: torch.Tensor, canvas_hw: tuple[int, int], fov_deg: float, yaw_deg: float,
                              pitch_deg: float, roll_deg: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Unproject a perspective view [B, C, h, w] onto an equirectangular canvas by inverse mapping (not the adjoint:
    every covered pixel gets an interpolated value): returns (image, mask)."""
    grid, mask = perspective_to_equirect_grid(canvas_hw, view.shape[-2], view.shape[-1], fov_deg, yaw_deg, pitch_deg,
                                              roll_deg)
    grid, mask = grid.to(view.device, view.dtype), mask.to(view.device, view.dtype)
    out = torch.nn.functional.grid_sample(view, grid.expand(view.shape[0], -1, -1, -1), mode="bilinear",
                                          padding_mode="border", align_corners=False)
    return out * mask, mask.expand(view.shape[0], 1, -1, -1)


def cube_faces(equirect: torch.Tensor, size: int) -> dict[str, torch.Tensor]:
    """The six 90° faces [B, C, size, size] of an equirectangular tensor, in `CUBE_FACES` order."""
    return {name: sample_perspective(equirect, equirect_to_perspective_grid(size, size, 90.0, yaw, pitch).to(
        equirect.device)) for name, (yaw, pitch) in CUBE_FACES.items()}


def equirect_from_cube(faces: dict[str, torch.Tensor], height: int) -> torch.Tensor:
    """Equirectangular [B, C, height, 2*height] from six faces: each pixel reads the one face whose axis is closest
    to its direction (the cube's faces partition the sphere, so there are no seams to blend)."""
    d = equirect_directions(height, 2 * height)
    names = list(CUBE_FACES)
    axes = torch.stack([rotation(*CUBE_FACES[n])[:, 2] for n in names])  # each face's viewing direction
    owner = (d @ axes.T).argmax(dim=-1)
    out = None
    for k, name in enumerate(names):
        face = faces[name]
        grid, _ = perspective_to_equirect_grid((height, 2 * height), face.shape[-2], face.shape[-1], 90.0,
                                               *CUBE_FACES[name])
        grid = grid.to(face.device, face.dtype).expand(face.shape[0], -1, -1, -1)
        sampled = torch.nn.functional.grid_sample(face, grid, mode="bilinear", padding_mode="border",
                                                  align_corners=False)
        part = sampled * (owner == k).to(face.device, face.dtype)
        out = part if out is None else out + part
    return out


DICE = {"up": (0, 1), "left": (1, 0), "front": (1, 1), "right": (1, 2), "back": (1, 3), "down": (2, 1)}
"""Cube-cross ("dice") layout, 3 rows x 4 columns of faces: (row, column) of each face. The up face's bottom edge
meets the front face's top edge, the down face's top edge its bottom edge (faces as `cube_faces` renders them)."""


def cube_dice(faces: dict[str, torch.Tensor]) -> torch.Tensor:
    """The six faces in the dice layout [B, C, 3s, 4s]; empty cells are 0."""
    s = faces["front"].shape[-1]
    out = faces["front"].new_zeros(*faces["front"].shape[:-2], 3 * s, 4 * s)
    for name, (row, col) in DICE.items():
        out[..., row * s : (row + 1) * s, col * s : (col + 1) * s] = faces[name]
    return out


def cube_horizon(faces: dict[str, torch.Tensor]) -> torch.Tensor:
    """The six faces side by side [B, C, s, 6s] in `CUBE_FACES` order (front, right, back, left, up, down)."""
    return torch.cat([faces[name] for name in CUBE_FACES], dim=-1)
