"""Canvas and views: the data that tilers hand to the sampler.

A *canvas* is one latent tensor ``[1, C, H, W]`` (H, W in latents). A *view* is what one pass of the pretrained model
sees: it knows how to *extract* its window-shaped latent from the canvas and how to *scatter* a window-shaped tensor
back (the adjoint of extract) into canvas-sized buffers. Views carry per-view context for the denoiser (a prompt, a
condition crop, a camera) so that interfaces never need to change for a new plugin family.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch


def plain(value: Any) -> Any:
    """Request inputs as plain dicts and lists: they come from the spec as OmegaConf containers (possibly inside
    dicts and lists), which plugins should not have to know about. Everything else is returned as it is."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return [plain(v) for v in value] if isinstance(value, (list, tuple)) else value


@dataclass(frozen=True)
class CanvasSpec:
    """Size of the canvas in pixels, and the latent geometry of the denoiser that will fill it."""

    height: int
    width: int
    latent_factor: int = 8
    latent_channels: int = 4

    @property
    def latent_height(self) -> int:
        return self.height // self.latent_factor

    @property
    def latent_width(self) -> int:
        return self.width // self.latent_factor

    def latent_shape(self, batch: int = 1) -> tuple[int, int, int, int]:
        return (batch, self.latent_channels, self.latent_height, self.latent_width)


@dataclass
class View(ABC):
    """One window of the canvas.

    ``context`` holds per-view inputs that some denoisers need. Keys used by the built-ins: ``prompt``,
    ``negative_prompt`` and ``guidance_scale`` (the view's own, replacing the request's: regions), ``control``
    (condition crops, for ControlNet), ``camera`` (for multi-view denoisers), ``sync_group``. ``weight`` is the
    view's own weight in window space (a region mask, a density correction); ``None`` means all ones. Mergers
    multiply it with their own weighting.
    """

    index: int
    context: dict[str, Any] = field(default_factory=dict, kw_only=True)
    weight: torch.Tensor | None = field(default=None, kw_only=True)

    @property
    @abstractmethod
    def latent_size(self) -> tuple[int, int]:
        """(height, width) of the window in latents."""

    @abstractmethod
    def extract(self, canvas: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` canvas -> ``[B, C, h, w]`` window (differentiable)."""

    @abstractmethod
    def scatter_add(self, window: torch.Tensor, out: torch.Tensor) -> None:
        """Add a window-shaped ``[B, C', h, w]`` tensor into a canvas-shaped buffer in place (adjoint of extract)."""

    def extract_noise(self, noise: torch.Tensor) -> torch.Tensor:
        """This view's initial x_T from the canvas noise when views keep their own states (``merger.target: x0``).
        Crops read the canvas; a projection should resample so the noise keeps unit variance (nearest neighbour)."""
        return self.extract(noise)

    def prepare_input(self, x: torch.Tensor, inputs: "InputContext") -> torch.Tensor:
        """The model input of this view at this step, given the window read from the canvas. Identity by default;
        a view may compose its window over something else first (region bootstrapping does)."""
        return x


@dataclass(frozen=True)
class InputContext:
    """What :meth:`View.prepare_input` may use: the step, its noise level (``level.noised(x0, noise)`` brings a clean
    latent to this step, for diffusion and flow models alike), the denoiser (to encode images) and the request's seed
    (for reproducible per-view randomness)."""

    step: Any
    level: Any  # parameterization.NoiseLevel
    denoiser: Any
    seed: int


@dataclass
class CropView(View):
    """An axis-aligned crop, optionally wrapping around the canvas width (loop panoramas).

    ``top``/``left`` are in latents; columns past the right edge wrap to column 0 when the tiler loops.
    """

    top: int = 0
    left: int = 0
    height: int = 64
    width: int = 64
    canvas_width: int | None = None  # set when the view may wrap horizontally

    @property
    def latent_size(self) -> tuple[int, int]:
        return (self.height, self.width)

    @property
    def wraps(self) -> bool:
        return self.canvas_width is not None and self.left + self.width > self.canvas_width

    @property
    def box(self) -> tuple[int, int, int, int]:
        """(top, bottom, left, right) in latents; ``right`` may exceed the canvas width when the view wraps."""
        return (self.top, self.top + self.height, self.left, self.left + self.width)

    def columns(self) -> torch.Tensor:
        cols = torch.arange(self.left, self.left + self.width)
        return cols % self.canvas_width if self.canvas_width is not None else cols

    def extract(self, canvas: torch.Tensor) -> torch.Tensor:
        rows = canvas[..., self.top : self.top + self.height, :]
        if not self.wraps:
            return rows[..., self.left : self.left + self.width]
        return rows.index_select(-1, self.columns().to(canvas.device))

    def scatter_add(self, window: torch.Tensor, out: torch.Tensor) -> None:
        rows = out[..., self.top : self.top + self.height, :]
        if not self.wraps:
            rows[..., self.left : self.left + self.width] += window
        else:
            rows.index_add_(-1, self.columns().to(out.device), window)
