"""The ``regions`` tiler: a background prompt plus regions with their own prompts, each bounded by a mask.

MultiDiffusion's layout-to-image on the sliding windows of a panorama. Every sliding window gives one *background*
view (weight ``1 - clamp(sum of masks, 0, 1)``, the background prompt, sync group ``background``) and, per region
whose mask it touches, one *region* view (weight = the region's mask, its prompt, sync group ``region-<k>`` when the
region syncs). Any merger multiplies these weights into its own and normalises by their sum, so at each position
the regions share the canvas in proportion to their masks and the background fills the rest; windows whose weight is
all zero are skipped.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Dict, List, Literal, Optional

import torch

from syncengine.errors import ConfigError
from syncengine.view_schedule import MovingViews, ViewSchedule
from syncengine.views import CanvasSpec, CropView, View
from syncengine_panorama.shifted import ShiftedConfig, ShiftedTiler
from syncengine_panorama.sliding import SlidingConfig, SlidingTiler

from .masks import MaskConfig, feather, hex_color, layout_colors, load_mask, parse_color, to_latents
from .views import Backgrounds, RegionView


@dataclass
class RegionConfig:
    mask: MaskConfig = field(default_factory=MaskConfig)  # where the region is (png, rect or layout + color)
    prompt: Optional[str] = None  # the region's prompt (required)
    negative_prompt: Optional[str] = None  # default: the request's
    guidance_scale: Optional[float] = None  # default: sampler.guidance_scale
    seed: Optional[int] = None  # redraw the initial noise inside the region from this seed; null: the request's
    sync: bool = False  # synchronize this region's windows with each other (SyncDiffusion within the region)


@dataclass
class RegionsConfig(SlidingConfig):
    regions: List[RegionConfig] = field(default_factory=list)  # each: a mask, its prompt and options (keys below)
    layout: Optional[str] = None  # colour-coded layout image; with `prompts`, one region per colour
    prompts: Dict[str, str] = field(default_factory=dict)  # layout colour -> prompt ("#ff0000": "a red car")
    layout_background: Optional[str] = None  # layout colour left to the background (every other colour needs a prompt)
    feather: float = 0.0  # Gaussian blur of every mask, sigma in pixels: soft region edges
    bootstrap: float = 0.2  # fraction of the steps a region is composed over a random solid colour (MultiDiffusion)
    background: bool = True  # background views fill what the regions leave; false: the regions must cover the canvas
    background_prompt: Optional[str] = None  # default: the request's prompt
    background_negative_prompt: Optional[str] = None  # default: the request's
    windows: Literal["sliding", "shifted"] = "sliding"  # shifted: non-overlapping, moved every step (no stride)

    # The user's words, never interpolated by OmegaConf (as requests' prompts): `${oc.env:HOME}` stays that text.
    literal_text: ClassVar[tuple[str, ...]] = ("regions.prompt", "regions.negative_prompt", "prompts",
                                               "background_prompt", "background_negative_prompt")


@dataclass
class Region:
    """A region fitted to one canvas: its options, its pixel mask (feathered) and its latent weight."""

    key: str
    config: RegionConfig
    pixels: torch.Tensor  # [H, W] in [0, 1]
    latents: torch.Tensor  # [1, 1, H/f, W/f]


class RegionsTiler(SlidingTiler):
    """Region-mask layouts: per-region prompts composed into one image (MultiDiffusion layouts + SyncDiffusion)."""

    Config = RegionsConfig

    def __init__(self, config=None):
        super().__init__(config)
        self._fitted: dict[tuple, list[Region]] = {}
        self._backgrounds = Backgrounds()

    # --------------------------------------------------------------------------------------------------- regions

    def _specs(self, canvas: CanvasSpec) -> list[tuple[str, RegionConfig]]:
        """The regions as given, then one per colour of the ``layout`` + ``prompts`` shorthand."""
        c = self.config
        out = [(f"tiler.regions.{k}", r) for k, r in enumerate(c.regions)]
        if c.prompts and c.layout is None:
            raise ConfigError("tiler.layout", "tiler.prompts maps layout colours to prompts; give the layout image")
        if c.layout is None:
            return out
        if not c.prompts:
            raise ConfigError("tiler.prompts", f"map the colours of {c.layout} to prompts ('#ff0000': 'a red car')")
        present = layout_colors(c.layout, "tiler.layout", canvas.height * canvas.width)
        background = parse_color(c.layout_background, "tiler.layout_background") if c.layout_background else None
        named: dict[tuple[int, int, int], str] = {}
        for color, prompt in c.prompts.items():
            rgb = parse_color(color, f"tiler.prompts.{color}")
            if rgb in named:
                raise ConfigError(f"tiler.prompts.{color}", f"colour {hex_color(rgb)} is given twice")
            if rgb not in present:
                raise ConfigError(f"tiler.prompts.{color}", f"colour {hex_color(rgb)} is not in {c.layout}")
            named[rgb] = color
            out.append((f"tiler.prompts.{color}", RegionConfig(MaskConfig(layout=c.layout, color=color), prompt)))
        for rgb, count in sorted(present.items(), key=lambda item: -item[1]):
            if rgb not in named and rgb != background:
                raise ConfigError("tiler.prompts", f"colour {hex_color(rgb)} ({count} px of {c.layout}) has no prompt; "
                                  "add it to tiler.prompts or set tiler.layout_background to it")
        return out

    def regions(self, canvas: CanvasSpec) -> list[Region]:
        """The regions fitted to the canvas (validated; cached per canvas)."""
        key = (canvas.height, canvas.width, canvas.latent_factor)
        if key not in self._fitted:
            self._fitted[key] = self._fit(canvas)
        return self._fitted[key]

    def _fit(self, canvas: CanvasSpec) -> list[Region]:
        c = self.config
        if not 0 <= c.bootstrap <= 1:
            raise ConfigError("tiler.bootstrap", f"a fraction of the steps in [0, 1], got {c.bootstrap}")
        if c.feather < 0:
            raise ConfigError("tiler.feather", f"must be >= 0 px, got {c.feather}")
        specs = self._specs(canvas)
        if not specs:
            raise ConfigError("tiler.regions", "no regions: give tiler.regions or a tiler.layout with tiler.prompts")
        out = []
        for key, r in specs:
            if not isinstance(r.prompt, str) or not r.prompt.strip():
                where = f"{key}.prompt" if key.startswith("tiler.regions") else key
                raise ConfigError(where, "missing or empty prompt")
            if r.guidance_scale is not None and r.guidance_scale < 0:
                raise ConfigError(f"{key}.guidance_scale", f"must be >= 0, got {r.guidance_scale}")
            where = f"{key}.mask" if key.startswith("tiler.regions") else key
            mask = load_mask(r.mask, canvas.height, canvas.width, where)
            if not bool((mask > 0).any()):
                raise ConfigError(where, f"the mask is empty on the {canvas.height}x{canvas.width} px canvas "
                                  "(after resizing and thresholding)")
            mask = feather(mask, c.feather, wrap=c.loop)
            out.append(Region(key, r, mask, to_latents(mask, canvas.latent_factor)))
        if not c.background:
            total = sum(r.latents for r in out)
            empty = (total <= 0).nonzero()
            if len(empty):
                row, col = (int(v) * canvas.latent_factor for v in empty[0, 2:])
                raise ConfigError("tiler.background", f"with the background off the regions must cover the canvas; "
                                  f"the weights sum to 0 at pixel (row {row}, col {col}) and {len(empty) - 1} more "
                                  "latents")
        return out

    def background_weight(self, canvas: CanvasSpec) -> torch.Tensor:
        """``[1, 1, H/f, W/f]``: what the regions leave, ``1 - clamp(sum of masks, 0, 1)`` pooled to latents."""
        regions = self.regions(canvas)
        covered = torch.stack([r.pixels for r in regions]).sum(0).clamp(0, 1)
        return to_latents(1 - covered, canvas.latent_factor)

    # ------------------------------------------------------------------------------------------------ the tiler

    def validate(self, canvas: CanvasSpec) -> None:
        if self.config.windows == "shifted":  # the shifted tiler's rules: no stride
            self.shifted.validate(canvas)
        else:
            super().validate(canvas)
        self.regions(canvas)

    def initial_noise(self, noise: torch.Tensor, canvas: CanvasSpec, seed: int) -> torch.Tensor:
        """Inside a region with its own seed (where its latent mask is >= 0.5), the noise that seed draws for the
        whole canvas: a region's noise does not depend on its shape, and the rest of the canvas keeps the request's."""
        for region in self.regions(canvas):
            if region.config.seed is None:
                continue
            generator = torch.Generator("cpu").manual_seed(int(region.config.seed))
            own = torch.randn(canvas.latent_shape(), generator=generator)
            noise = torch.where(region.latents.to(noise.device) >= 0.5, own.to(noise), noise)
        return noise

    def views(self, canvas: CanvasSpec) -> list[View]:
        return self.views_of(super().views(canvas), canvas)

    @property
    def shifted(self) -> ShiftedTiler:
        """The shifted tiler with these windows, whose grids ``windows: shifted`` uses."""
        c = self.config
        return ShiftedTiler(ShiftedConfig(c.window, c.window_height, c.loop))

    def view_schedule(self, canvas: CanvasSpec, seed: int) -> ViewSchedule:
        """Sliding windows: the same views every step. Shifted windows (SpotDiffusion): each step's grid of
        non-overlapping windows, as the ``shifted`` tiler's, each giving its background and region views."""
        if self.config.windows == "sliding":
            return super().view_schedule(canvas, seed)
        self.validate(canvas)
        shifted = self.shifted
        return MovingViews(lambda step: self.views_of(shifted.windows_at(canvas, seed, step), canvas), canvas)

    def views_of(self, windows: list[CropView], canvas: CanvasSpec) -> list[View]:
        """The background and region views of ``windows``: one per window and layer that has weight in it."""
        c = self.config
        views: list[View] = []

        def crop(window: CropView, cls, weight, context, **extra):
            views.append(cls(len(views), top=window.top, left=window.left, height=window.height, width=window.width,
                             canvas_width=window.canvas_width, weight=weight, context=context, **extra))

        if c.background:
            bg = self.background_weight(canvas)
            context = {"sync_group": "background"}
            if c.background_prompt is not None:
                context["prompt"] = c.background_prompt
            if c.background_negative_prompt is not None:
                context["negative_prompt"] = c.background_negative_prompt
            for window in windows:
                weight = window.extract(bg)
                if bool((weight > 0).any()):
                    crop(window, CropView, weight, dict(context))
        for k, region in enumerate(self.regions(canvas)):
            r = region.config
            context = {"prompt": r.prompt, "sync_group": f"region-{k}" if r.sync else None, "region": k}
            if r.negative_prompt is not None:
                context["negative_prompt"] = r.negative_prompt
            if r.guidance_scale is not None:
                context["guidance_scale"] = r.guidance_scale
            for window in windows:
                weight = window.extract(region.latents)
                if bool((weight > 0).any()):
                    crop(window, RegionView, weight, dict(context), bootstrap=c.bootstrap,
                         backgrounds=self._backgrounds)
        return views
