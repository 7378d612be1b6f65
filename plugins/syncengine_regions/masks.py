"""Mask sources (PNG, rectangle, colour-coded layout) fitted to the canvas.

A mask is a ``[H, W]`` float tensor in ``[0, 1]`` on the canvas's *pixel* grid; :func:`to_latents` area-pools it to
the latent grid. Resizing happens in pixels first so that a mask drawn at any size lands on the same canvas, and
pooling (not nearest sampling) keeps a mask edge that falls inside a latent as a fractional weight.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from syncengine.config import PRESETS_DIR
from syncengine.errors import ConfigError
from syncengine.images import max_image_pixels, open_image  # noqa: F401 (max_image_pixels: re-exported)


@dataclass
class MaskConfig:
    """One mask source: exactly one of ``png``, ``rect`` or ``layout`` (with ``color``)."""

    png: Optional[str] = None  # grey-scale mask image (any size; alpha or luminance), resized to the canvas
    threshold: Optional[float] = 0.5  # png: binarise at this level after resizing; null keeps the soft mask
    rect: Optional[List[Any]] = None  # [top, left, height, width]: pixels, or fractions when all <= 1 and not all ints
    layout: Optional[str] = None  # colour-coded layout image; the mask is where it has `color`
    color: Optional[str] = None  # layout colour: "#ff0000", "#f00" or a CSS name


def find_file(path: str, key: str) -> Path:
    """A relative path is looked up in the working directory, then in ``configs/`` (so presets run from anywhere)."""
    for candidate in (Path(path), PRESETS_DIR / path):
        if candidate.is_file():
            return candidate
    raise ConfigError(key, f"file not found: {path}")


def parse_color(text: str, key: str) -> tuple[int, int, int]:
    from PIL import ImageColor

    try:
        return ImageColor.getrgb(str(text))[:3]
    except ValueError:
        raise ConfigError(key, f"{text!r} is not a colour; use '#rrggbb', '#rgb' or a CSS colour name") from None


def hex_color(rgb: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def load_image(path: str, key: str, canvas_pixels: int = 0, convert: Callable[[Any], Any] | None = None):
    """The decoded mask/layout image (``convert``-ed, e.g. to an array), or a one-line ConfigError naming ``key`` and
    the file (see :func:`syncengine.images.open_image`: missing, not an image, damaged, too large, unconvertible)."""
    return open_image(find_file(path, key), convert, canvas_pixels, lambda message: ConfigError(key, message))


def grey_levels(im) -> np.ndarray:
    """``[h, w]`` float32 in [0, 1]: the alpha channel when there is one, else the luminance; 16-bit and float
    images keep their full range (``convert("L")`` would clip them at 255 / 1.0)."""
    if im.mode in ("RGBA", "LA", "PA"):
        return np.asarray(im.getchannel("A"), dtype=np.float32) / 255.0
    if im.mode.startswith("I"):  # 16-bit PNG ("I;16") or 32-bit integer: the 16-bit range
        return np.clip(np.asarray(im, dtype=np.float32) / 65535.0, 0, 1)
    if im.mode == "F":
        return np.clip(np.asarray(im, dtype=np.float32), 0, 1)
    return np.asarray(im.convert("L"), dtype=np.float32) / 255.0


def layout_rgb(path: str, key: str, canvas_pixels: int = 0) -> np.ndarray:
    """``[h, w, 3]`` uint8 pixels of a layout image."""
    return load_image(path, key, canvas_pixels, lambda im: np.asarray(im.convert("RGB")))


def layout_colors(path: str, key: str, canvas_pixels: int = 0) -> dict[tuple[int, int, int], int]:
    """``{rgb: pixel count}`` of a layout image."""
    rgb = layout_rgb(path, key, canvas_pixels).reshape(-1, 3)
    colors, counts = np.unique(rgb, axis=0, return_counts=True)
    return {tuple(int(v) for v in c): int(n) for c, n in zip(colors, counts)}


def area_matrix(source: int, target: int) -> torch.Tensor:
    """``[target, source]``: the share of each target cell's interval covered by each source cell (rows sum to 1)."""
    edges_t = torch.arange(target + 1, dtype=torch.float64) * (source / target)
    lo = torch.maximum(edges_t[:-1, None], torch.arange(source, dtype=torch.float64)[None])
    hi = torch.minimum(edges_t[1:, None], torch.arange(1, source + 1, dtype=torch.float64)[None])
    return ((hi - lo).clamp_min(0) * (target / source)).float()


def resize(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``[h, w]`` -> ``[height, width]`` by area coverage: each canvas pixel is the mean of the mask over its
    footprint. Exact both ways (an integer upscale repeats pixels, a downscale averages them) and it keeps the
    covered area; smooth edges come from ``feather``, not from the resampling."""
    if tuple(mask.shape) == (height, width):
        return mask.float()
    out = area_matrix(mask.shape[0], height) @ mask.float() @ area_matrix(mask.shape[1], width).T
    return out.clamp(0, 1)


def _rect(values: List[Any], height: int, width: int, key: str) -> torch.Tensor:
    if len(values) != 4:
        raise ConfigError(key, f"a rect is [top, left, height, width], got {list(values)}")
    try:
        nums = [float(v) for v in values]
    except (TypeError, ValueError):
        raise ConfigError(key, f"a rect holds numbers, got {list(values)}") from None
    if any(v < 0 for v in nums):
        raise ConfigError(key, f"rect values must be >= 0, got {list(values)}")
    fractions = all(v <= 1.0 for v in nums) and not all(isinstance(v, int) for v in values)
    if fractions:
        nums = [nums[0] * height, nums[1] * width, nums[2] * height, nums[3] * width]
    top, left, h, w = (int(round(v)) for v in nums)
    mask = torch.zeros(height, width)
    mask[top : top + h, left : left + w] = 1.0
    return mask


def load_mask(source: MaskConfig, height: int, width: int, key: str) -> torch.Tensor:
    """The source's ``[height, width]`` pixel mask in ``[0, 1]`` (before feathering)."""
    given = [name for name in ("png", "rect", "layout") if getattr(source, name) is not None]
    if len(given) != 1:
        raise ConfigError(key, f"give exactly one of png, rect or layout, got {', '.join(given) or 'none'}")
    if source.rect is not None:
        return _rect(list(source.rect), height, width, key)
    if source.png is not None:
        t = source.threshold
        if t is not None and not 0 < t < 1:
            raise ConfigError(f"{key}.threshold", f"must be in (0, 1) or null (soft mask), got {t}")
        levels = load_image(source.png, f"{key}.png", height * width, grey_levels)
        mask = resize(torch.from_numpy(levels), height, width)
        return (mask >= t).float() if t is not None else mask
    if source.color is None:
        raise ConfigError(f"{key}.color", "a layout mask needs the colour of its region")
    rgb = parse_color(source.color, f"{key}.color")
    pixels = layout_rgb(source.layout, f"{key}.layout", height * width)
    hit = np.all(pixels == np.array(rgb, dtype=pixels.dtype), axis=-1)
    if not hit.any():
        present = ", ".join(hex_color(c) for c in sorted(layout_colors(source.layout, key, height * width))[:8])
        raise ConfigError(f"{key}.color", f"colour {hex_color(rgb)} is not in {source.layout} (it has {present})")
    return (resize(torch.from_numpy(hit.astype(np.float32)), height, width) >= 0.5).float()


def gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-(x**2) / (2 * sigma**2))
    return (k / k.sum()).float()


def feather(mask: torch.Tensor, sigma: float, wrap: bool = False) -> torch.Tensor:
    """Gaussian blur of ``sigma`` pixels: soft edges that blend a region into its surroundings. Edges replicate the
    border (a mask touching the canvas edge stays full there); ``wrap`` blurs across the seam of a loop canvas."""
    if sigma <= 0:
        return mask
    k = gaussian_kernel(sigma)
    r = k.numel() // 2
    x = mask[None, None].float()
    x = F.pad(x, (0, 0, r, r), mode="replicate")
    x = F.conv2d(x, k.view(1, 1, -1, 1))
    if wrap:
        cols = torch.arange(-r, x.shape[-1] + r) % x.shape[-1]
        x = x.index_select(-1, cols)
    else:
        x = F.pad(x, (r, r, 0, 0), mode="replicate")
    x = F.conv2d(x, k.view(1, 1, 1, -1))
    return x[0, 0].clamp(0, 1)


def to_latents(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """``[H, W]`` pixel mask -> ``[1, 1, H/f, W/f]`` latent weight by area pooling (linear: pooled masks still sum
    as the pixel masks do)."""
    return F.avg_pool2d(mask[None, None].float(), factor)
