"""The toy world: procedural landscapes whose whole scene shares one of a few discrete global looks.

A look (day, sunset, night, snow) is a palette and a time of day: sky gradient, light, ground colour, sun / moon /
stars / snow caps. It is global on purpose: every window of a scene shows it in its sky and its ground, so a model
that samples windows independently (MultiDiffusion far apart) picks looks independently, and a panorama whose
windows disagree is visibly incoherent. Local variety (mountain ridges, hills, clouds, trees, where the sun or moon
stands) depends on the seed and on the horizontal position, so windows at different x differ. Shapes are smooth
bands and simple soft-edged figures, which a small model learns in minutes.

Geometry is in units of the scene height (``u = x / H``, ``v = y / H``), so a scene looks the same at any
resolution and a crop of a wide scene is rendered directly, without rendering the whole scene.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

LOOKS: tuple[str, ...] = ("day", "sunset", "night", "snow")

PLAIN_PROMPT = "a landscape"
PLAIN_FRACTION = 1 / 3  # share of training prompts that say only PLAIN_PROMPT, whatever the look

PROMPTS: dict[str, tuple[str, ...]] = {
    "day": ("a landscape on a sunny day", "a green landscape under a blue sky", "mountains at noon"),
    "sunset": ("a landscape at sunset", "mountains under an orange evening sky", "a landscape at dusk"),
    "night": ("a landscape at night", "mountains under a starry sky", "a moonlit landscape"),
    "snow": ("a snowy landscape", "snowy mountains in winter", "a winter landscape under a grey sky"),
}


@dataclass(frozen=True)
class Palette:
    """The colours that make a look; every part of a scene of that look is painted from them."""

    sky_top: tuple[float, float, float]
    horizon: tuple[float, float, float]
    mountain: tuple[float, float, float]
    caps: tuple[float, float, float] | None  # snow caps on the far ridge
    ground: tuple[float, float, float]
    ground_low: tuple[float, float, float]
    tree: tuple[float, float, float]
    cloud: tuple[float, float, float]
    cloud_alpha: float
    light: tuple[float, float, float] | None  # sun or moon disc
    light_height: tuple[float, float]  # v range of its centre
    light_radius: float
    glow: float  # strength of a wide halo around the light (a low sun)
    stars: int  # stars per unit of scene width


PALETTES: dict[str, Palette] = {
    "day": Palette(
        sky_top=(0.22, 0.48, 0.88), horizon=(0.62, 0.80, 0.96), mountain=(0.42, 0.52, 0.68), caps=None,
        ground=(0.36, 0.66, 0.26), ground_low=(0.24, 0.50, 0.17), tree=(0.10, 0.34, 0.12),
        cloud=(1.0, 1.0, 1.0), cloud_alpha=0.9, light=(1.0, 0.97, 0.78), light_height=(0.10, 0.25),
        light_radius=0.06, glow=0.0, stars=0),
    "sunset": Palette(
        sky_top=(0.36, 0.20, 0.46), horizon=(1.0, 0.58, 0.28), mountain=(0.42, 0.24, 0.36), caps=None,
        ground=(0.32, 0.22, 0.20), ground_low=(0.20, 0.13, 0.14), tree=(0.13, 0.07, 0.10),
        cloud=(0.96, 0.50, 0.46), cloud_alpha=0.85, light=(1.0, 0.78, 0.36), light_height=(0.36, 0.46),
        light_radius=0.10, glow=0.35, stars=0),
    "night": Palette(
        sky_top=(0.02, 0.03, 0.10), horizon=(0.10, 0.16, 0.36), mountain=(0.04, 0.05, 0.11), caps=None,
        ground=(0.06, 0.12, 0.13), ground_low=(0.03, 0.06, 0.07), tree=(0.01, 0.02, 0.03),
        cloud=(0.26, 0.28, 0.40), cloud_alpha=0.6, light=(0.95, 0.95, 0.84), light_height=(0.10, 0.28),
        light_radius=0.05, glow=0.0, stars=10),
    "snow": Palette(
        sky_top=(0.60, 0.65, 0.74), horizon=(0.86, 0.88, 0.91), mountain=(0.52, 0.56, 0.64), caps=(0.97, 0.97, 1.0),
        ground=(0.94, 0.95, 0.98), ground_low=(0.84, 0.86, 0.92), tree=(0.20, 0.32, 0.30),
        cloud=(0.76, 0.78, 0.82), cloud_alpha=0.9, light=None, light_height=(0.0, 0.0),
        light_radius=0.0, glow=0.0, stars=0),
}


@dataclass(frozen=True)
class SceneParams:
    """Everything random about one scene, drawn once from its seed; rendering any crop of it is deterministic."""

    width_units: float
    tint: np.ndarray  # [3] per-scene colour multiplier near 1: scenes of one look are not identical
    far: np.ndarray  # [K, 3] (amplitude, frequency, phase) of the far ridge
    near: np.ndarray  # [K, 3] of the near hills
    far_base: float
    near_base: float
    light: tuple[float, float]  # (u, v) of the sun / moon centre
    clouds: np.ndarray  # [C, 4] (u, v, rx, ry)
    trees: np.ndarray  # [T, 3] (u, half width, height)
    stars: np.ndarray  # [S, 3] (u, v, brightness)


def _check_look(look: str) -> Palette:
    if look not in PALETTES:
        raise ValueError(f"unknown look {look!r}; the toy world has {', '.join(LOOKS)}")
    return PALETTES[look]


def draw_scene(seed: int, look: str, width_units: float) -> SceneParams:
    """The random layout of a scene ``width_units`` heights wide (counts of clouds, trees, stars scale with it)."""
    pal = _check_look(look)
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, LOOKS.index(look)])
    w = max(float(width_units), 1e-3)

    def ridge(amps: tuple[float, ...], freqs: tuple[float, ...]) -> np.ndarray:
        a = np.array(amps) * rng.uniform(0.7, 1.3, len(amps))
        f = np.array(freqs) * rng.uniform(0.8, 1.25, len(freqs))
        return np.stack([a, f, rng.uniform(0, 2 * math.pi, len(amps))], axis=1)

    n_clouds = rng.poisson(1.6 * w) + 1
    clouds = np.stack([rng.uniform(-0.3, w + 0.3, n_clouds), rng.uniform(0.06, 0.32, n_clouds),
                       rng.uniform(0.10, 0.26, n_clouds), rng.uniform(0.025, 0.055, n_clouds)], axis=1)
    n_trees = rng.poisson(3.0 * w)
    trees = np.stack([rng.uniform(-0.1, w + 0.1, n_trees), rng.uniform(0.025, 0.045, n_trees),
                      rng.uniform(0.07, 0.14, n_trees)], axis=1).reshape(-1, 3)
    n_stars = pal.stars * int(math.ceil(w))
    stars = np.stack([rng.uniform(0, w, n_stars), rng.uniform(0.02, 0.5, n_stars),
                      rng.uniform(0.5, 1.0, n_stars)], axis=1).reshape(-1, 3)
    return SceneParams(
        width_units=w,
        tint=rng.uniform(0.92, 1.08, 3),
        far=ridge((0.07, 0.04, 0.015), (0.35, 0.9, 2.2)),
        near=ridge((0.03, 0.015), (0.25, 0.7)),
        far_base=float(rng.uniform(0.46, 0.54)),
        near_base=float(rng.uniform(0.70, 0.76)),
        light=(float(rng.uniform(0.1, max(w - 0.1, 0.1))), float(rng.uniform(*pal.light_height))),
        clouds=clouds, trees=trees, stars=stars)


def _col(rgb: tuple[float, float, float], tint: torch.Tensor) -> torch.Tensor:
    return (torch.tensor(rgb, dtype=torch.float32) * tint).view(3, 1, 1)


def _ridge(u: torch.Tensor, base: float, waves: np.ndarray, peaked: bool) -> torch.Tensor:
    """Height profile ``v(u)`` of a ridge: sums of sines, folded (``-|sin|``) into peaks for mountains."""
    v = torch.full_like(u, base)
    for a, f, p in waves:
        s = torch.sin(2 * math.pi * f * u + p)
        v = v - a * (1.0 - 2.0 * s.abs()) if peaked else v - a * s
    return v


def render_crop(params: SceneParams, look: str, height: int, left: int, width: int) -> torch.Tensor:
    """Pixels ``[3, height, width]`` of a scene from column ``left``: the same pixels the whole scene has there."""
    pal = _check_look(look)
    H = float(height)
    edge = 1.0 / H  # soft edges one pixel wide: smooth enough to learn, sharp enough to read
    tint = torch.tensor(params.tint, dtype=torch.float32)
    u = (torch.arange(width, dtype=torch.float32) + left + 0.5) / H  # [W]
    v = ((torch.arange(height, dtype=torch.float32) + 0.5) / H).view(-1, 1)  # [H, 1]
    uu = u.view(1, -1)

    # sky: a vertical gradient from the top colour to the horizon colour
    t = (v / 0.62).clamp(0, 1)
    img = _col(pal.sky_top, tint) * (1 - t) + _col(pal.horizon, tint) * t
    img = img.expand(3, height, width).clone()

    def paint(alpha: torch.Tensor, colour: torch.Tensor) -> None:
        nonlocal img
        img = img * (1 - alpha) + colour * alpha

    if params.stars.size:
        for su, sv, b in params.stars:
            x, y = int(su * H) - left, int(sv * H)
            if 0 <= x < width and 0 <= y < height:
                img[:, y, x] = torch.maximum(img[:, y, x], torch.full((3,), float(b)))

    if pal.light is not None:
        lu, lv = params.light
        d = torch.sqrt((uu - lu) ** 2 + (v - lv) ** 2)
        if pal.glow:
            paint((pal.glow * torch.exp(-((d / (3 * pal.light_radius)) ** 2))).unsqueeze(0), _col(pal.light, tint))
        paint(((pal.light_radius - d) / edge + 0.5).clamp(0, 1).unsqueeze(0), _col(pal.light, tint))

    if len(params.clouds):
        cu, cv, rx, ry = (torch.tensor(params.clouds[:, i], dtype=torch.float32).view(-1, 1, 1) for i in range(4))
        keep = ((cu + rx) * H + 1 >= left) & ((cu - rx) * H - 1 <= left + width)  # soft edges reach 1/2 px out
        if keep.any():
            cu, cv, rx, ry = cu[keep.view(-1)], cv[keep.view(-1)], rx[keep.view(-1)], ry[keep.view(-1)]
            r = torch.sqrt(((uu - cu) / rx) ** 2 + ((v - cv) / ry) ** 2)  # [C, H, W]
            a = ((1 - r) * ry / edge + 0.5).clamp(0, 1).amax(0)
            paint((pal.cloud_alpha * a).unsqueeze(0), _col(pal.cloud, tint))

    far = _ridge(uu, params.far_base, params.far, peaked=True)  # [1, W]
    mountain = ((v - far) / edge + 0.5).clamp(0, 1)
    paint(mountain.unsqueeze(0), _col(pal.mountain, tint))
    if pal.caps is not None:
        high = ((params.far_base - 0.03 - far) / 0.01).clamp(0, 1)  # only the taller peaks carry snow
        cap = mountain * ((far + 0.05 - v) / edge + 0.5).clamp(0, 1) * high
        paint(cap.unsqueeze(0), _col(pal.caps, tint))

    near = _ridge(uu, params.near_base, params.near, peaked=False)
    ground = ((v - near) / edge + 0.5).clamp(0, 1)
    depth = ((v - near) / (1.0 - params.near_base + 0.05)).clamp(0, 1)
    ground_col = _col(pal.ground, tint) * (1 - depth) + _col(pal.ground_low, tint) * depth
    img = img * (1 - ground) + ground_col * ground

    if len(params.trees):
        tu = torch.tensor(params.trees[:, 0], dtype=torch.float32)
        keep = ((tu + 0.05) * H + 1 >= left) & ((tu - 0.05) * H - 1 <= left + width)  # 0.05 > any half width
        if keep.any():
            trees = torch.tensor(params.trees[keep.numpy()], dtype=torch.float32)
            tu, hw, th = (trees[:, i].view(-1, 1, 1) for i in range(3))
            base = _ridge(tu.view(-1, 1), params.near_base, params.near, peaked=False).view(-1, 1, 1) + 0.02
            top = base - th
            frac = ((v - top) / th).clamp(0, 1)  # 0 at the tip, 1 at the base
            inside = (hw * frac - (uu - tu).abs()) / edge + 0.5
            a = (inside.clamp(0, 1) * ((v - top) / edge + 0.5).clamp(0, 1) * ((base - v) / edge + 0.5).clamp(0, 1))
            paint(a.amax(0).unsqueeze(0), _col(pal.tree, tint))

    return img.clamp(0, 1).contiguous()


def render_scene(seed: int, look: str, height: int, width: int) -> torch.Tensor:
    """One whole scene ``[3, height, width]`` in [0, 1], float32: every part shares ``look``; local variety
    depends on ``seed`` and position, so windows at different x differ."""
    params = draw_scene(seed, look, width / height)
    return render_crop(params, look, height, 0, width)


SCENE_WIDTHS = 4  # training crops come from scenes this many crop sizes wide


def sample_training_batch(seed: int, n: int, size: int) -> tuple[torch.Tensor, list[str], list[str]]:
    """``n`` square crops ``[n, 3, size, size]`` in [0, 1] from random scenes (random look, random crop position of a
    scene ``SCENE_WIDTHS`` sizes wide), their looks, and a prompt for each: ``PLAIN_PROMPT`` about a third of the
    time (it covers every look), a phrase of the crop's look otherwise."""
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 0x70E])
    images = torch.empty(n, 3, size, size)
    looks: list[str] = []
    prompts: list[str] = []
    for i in range(n):
        look = LOOKS[int(rng.integers(len(LOOKS)))]
        params = draw_scene(int(rng.integers(2**31)), look, SCENE_WIDTHS)
        left = int(rng.integers(0, (SCENE_WIDTHS - 1) * size + 1))
        images[i] = render_crop(params, look, size, left, size)
        looks.append(look)
        plain = rng.random() < PLAIN_FRACTION
        phrases = PROMPTS[look]
        prompts.append(PLAIN_PROMPT if plain else phrases[int(rng.integers(len(phrases)))])
    return images, looks, prompts


def save_examples(folder: Path, height: int = 96, width: int = 512, seed: int = 0) -> list[Path]:
    """One PNG strip per look (for docs/toy-world.md): ``<look>.png``."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for look in LOOKS:
        img = render_scene(seed, look, height, width)
        arr = (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        path = folder / f"{look}.png"
        Image.fromarray(arr).save(path, optimize=True)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m syncengine_toy.world", description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=Path, required=True, help="folder for one example strip per look")
    parser.add_argument("--height", type=int, default=96)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for path in save_examples(args.examples, args.height, args.width, args.seed):
        print(path)


if __name__ == "__main__":
    main()
