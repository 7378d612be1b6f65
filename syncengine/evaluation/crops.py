"""Window-size crops of a panorama: the units every metric of the paper (section 5.1) compares.

Intra metrics cut the panorama into non-overlapping window-size crops (6 for 512x3072 with 512 px windows) and
compare every pair; CLIP, FID, KID and GIQA look at random window-size crops, as the base model would see them.
"""
from __future__ import annotations

from itertools import combinations

import torch

from ..errors import SyncEngineError


def grid_crops(image: torch.Tensor, window: int, window_height: int | None = None) -> torch.Tensor:
    """Non-overlapping crops ``[N, 3, h, w]`` of an image ``[3, H, W]``, row by row from the top left.

    A remainder narrower than the window (width not a multiple of it) is left out rather than padded, so every
    crop is a real window of the panorama.
    """
    wh = window_height or window
    _, H, W = image.shape
    if window <= 0 or wh <= 0:
        raise SyncEngineError(f"window must be positive, got {wh}x{window}")
    if W < window or H < wh:
        raise SyncEngineError(f"image of {H}x{W} px is smaller than the {wh}x{window} px window; set --window")
    crops = [
        image[:, top : top + wh, left : left + window]
        for top in range(0, H - wh + 1, wh)
        for left in range(0, W - window + 1, window)
    ]
    return torch.stack(crops)


def pairs(n: int) -> list[tuple[int, int]]:
    """Every unordered pair of ``n`` crops: ``n (n - 1) / 2`` of them (15 for 6 crops)."""
    return list(combinations(range(n), 2))


def random_crops(
    image: torch.Tensor, window: int, count: int = 1, generator: torch.Generator | None = None,
    window_height: int | None = None,
) -> torch.Tensor:
    """``count`` window-size crops ``[count, 3, h, w]`` at uniformly random positions (seeded by ``generator``)."""
    wh = window_height or window
    _, H, W = image.shape
    if W < window or H < wh:
        raise SyncEngineError(f"image of {H}x{W} px is smaller than the {wh}x{window} px window; set --window")
    tops = torch.randint(0, H - wh + 1, (count,), generator=generator)
    lefts = torch.randint(0, W - window + 1, (count,), generator=generator)
    return torch.stack([image[:, t : t + wh, left : left + window] for t, left in zip(tops.tolist(), lefts.tolist())])
