"""A pipeline: the plugins of one resolved spec, assembled, running requests from seed to decoded image.

This is what to compute, free of where (Lightning decides devices and processes, see ``lightning_module``) and of side
effects (writing files, see ``outputs``).
"""
from __future__ import annotations

import dataclasses
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .collective import Collective
from .config import ResolvedSpec, request_spec
from .denoiser import Denoiser
from .errors import ConfigError, SyncEngineError
from .sampler import JointSampler, Request, SamplerOptions
from .sync import SyncSchedule
from .views import CanvasSpec


@dataclass
class Generated:
    """One finished request: the image, its latents, and everything the sidecar records."""

    request: Request
    index: int
    image: torch.Tensor  # [3, H, W] in [0, 1]
    latents: torch.Tensor
    spec: dict
    stats: dict[str, Any]
    timings: dict[str, float]
    model: dict[str, Any] = field(default_factory=dict)
    extra_images: dict[str, torch.Tensor] = field(default_factory=dict)  # suffix -> [3, H, W] in [0, 1]
    metadata: dict[str, Any] = field(default_factory=dict)  # "xmp": packet for the PNG; "sidecar": extra JSON keys


@dataclass
class Failed:
    """A request that could not run; the run goes on with the others."""

    request: Request
    index: int
    error: str


def slug(text: str, limit: int = 40) -> str:
    s = re.sub(r"[^a-zA-Z0-9]+", "-", text.lower()).strip("-")
    return s[:limit].rstrip("-") or "image"


def requests_of(resolved: ResolvedSpec) -> list[Request]:
    out = []
    for i, r in enumerate(resolved.config.requests):
        name = r.name or f"{i:03d}-{slug(r.prompt)}-s{r.seed}"
        out.append(Request(r.prompt, r.negative_prompt, int(r.seed), name, r.inputs))
    return out


def sync_batch_size(configured: int | None, device: torch.device | str, joint_views: bool = False) -> int | None:
    """``sync.batch_size``, where unset: the view batch on an accelerator (one backward fills it), one view at a time
    on a CPU, where a batch does the same arithmetic with a larger working set (measured 6-20% slower, twice the
    memory; docs/performance.md). A denoiser with ``joint_views`` keeps the view batch (its views attend to each
    other)."""
    if configured is not None or joint_views:
        return configured
    return 1 if torch.device(device).type == "cpu" else None


def loaded_canvas(canvas: CanvasSpec, denoiser: Denoiser) -> CanvasSpec:
    """The canvas in the loaded model's latent geometry. Validation sizes it from the denoiser class (SD: 8x, 4
    channels), before any weights load; a model whose VAE has another factor or channel count (read from its config
    at load time) gets its own, or a one-line error when the canvas does not divide by its factor."""
    f, channels = int(denoiser.latent_factor), int(denoiser.latent_channels)
    if (f, channels) == (canvas.latent_factor, canvas.latent_channels):
        return canvas
    for key, value in (("height", canvas.height), ("width", canvas.width)):
        if value % f:
            raise ConfigError(f"canvas.{key}", f"{value} is not divisible by this model's latent factor {f}; use a "
                                               f"multiple of {f}")
    return dataclasses.replace(canvas, latent_factor=f, latent_channels=channels)


def decode_canvas(denoiser: Denoiser, latents: torch.Tensor, periodic: bool, tiled: bool) -> torch.Tensor:
    """Latents -> image in [0, 1]. Periodic canvases are decoded with wrapped padding so the seam is continuous."""
    pad = 0
    if periodic:
        pad = min(8, latents.shape[-1])
        latents = torch.cat([latents[..., -pad:], latents, latents[..., :pad]], dim=-1)
    image = denoiser.decode_final(latents, tiled=tiled)
    if pad:
        f = denoiser.latent_factor
        image = image[..., pad * f : -pad * f]
    return (image.float() / 2 + 0.5).clamp(0, 1)


def note(progress: Any, text: str) -> None:
    """Tell the progress callback what a long phase without steps is doing (``progress.note(text)``, if it has one)."""
    callback = getattr(progress, "note", None)
    if callback is not None:
        callback(text)


class Pipeline:
    """Builds the plugins of a spec once and runs its requests."""

    def __init__(self, resolved: ResolvedSpec, device: torch.device | str | None = None,
                 collective: Collective | None = None):
        self.resolved = resolved
        self.device = device
        self.collective = collective or Collective()
        self._denoiser: Denoiser | None = None
        self._denoiser_section: Any = None
        self._losses: dict[str, Any] = {}

    def denoiser_for(self, spec: ResolvedSpec) -> Denoiser:
        section = spec.to_container()["denoiser"]
        if self._denoiser is None or section != self._denoiser_section:
            config = spec.plugin_configs["denoiser"]
            if self.device is not None and getattr(config, "device", None) == "auto":
                config.device = str(self.device)
            self._denoiser = spec.build("denoiser")
            self._denoiser_section = section
        return self._denoiser

    def loss_for(self, spec: ResolvedSpec, device):
        if spec.config.sync.weight == 0:
            return None
        key = repr(spec.to_container()["sync"]["loss"])
        if key not in self._losses:
            self._losses[key] = spec.build("sync.loss").to(device)
        return self._losses[key]

    def requests(self) -> list[Request]:
        return requests_of(self.resolved)

    def run(self, index: int, progress: Callable[[int, int], None] | None = None) -> Generated:
        """``progress(done, total)`` after each step; it may also have ``views(done, total)`` (after each view batch)
        and ``note(text)`` (the final decode), see ``lightning_module``."""
        request = self.requests()[index]
        spec = request_spec(self.resolved, index)
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        denoiser = self.denoiser_for(spec)
        loss = self.loss_for(spec, denoiser.device)
        timings["load"] = time.perf_counter() - t0
        canvas = loaded_canvas(spec.canvas, denoiser)
        tiler = spec.build("tiler")
        if canvas != spec.canvas:
            tiler.validate(canvas)  # validation saw the class's geometry; the windows must fit the model's
        merger = spec.build("merger")
        cfg = spec.config
        context = denoiser.prepare_request(request, canvas)  # the request's conditioning, kept off the denoiser
        views = tiler.view_schedule(canvas, request.seed)  # fixed views, or views that move from step to step
        sampler = JointSampler(
            denoiser,
            views,
            merger,
            loss,
            SyncSchedule(cfg.sync.weight, cfg.sync.decay, cfg.sync.every, cfg.sync.until),
            SamplerOptions(
                scheduler=cfg.sampler.scheduler,
                steps=cfg.sampler.steps,
                guidance_scale=cfg.sampler.guidance_scale,
                view_batch_size=cfg.sampler.view_batch_size,
                sync_batch_size=sync_batch_size(cfg.sync.batch_size, denoiser.device, denoiser.joint_views),
                anchor=cfg.sync.anchor,
                sync_resolution=cfg.sync.resolution,
                scheduler_options=dict(cfg.sampler.scheduler_options),
            ),
            self.collective,
        )
        t1 = time.perf_counter()
        noise = tiler.initial_noise(sampler.initial_noise(canvas, request.seed), canvas, request.seed)
        result = sampler.sample(request, canvas, progress, noise=noise, context=context)
        timings["sample"] = time.perf_counter() - t1
        t2 = time.perf_counter()
        note(progress, f"decoding {canvas.height}x{canvas.width} canvas")
        image = decode_canvas(denoiser, result.latents, tiler.periodic_width, bool(cfg.runtime.tiled_decode))
        if not bool(torch.isfinite(image).all()):  # clamp() keeps NaN: it would be written as black
            raise SyncEngineError("the decoded image is non-finite (the decoder overflowed); use float32 "
                                  "(denoiser.dtype=float32)")
        timings["decode"] = time.perf_counter() - t2
        images, metadata = tiler.finish_output(image[0].cpu(), canvas)  # e.g. 360°: cube faces, viewer metadata
        extra = {**denoiser.request_images(context), **images}
        timings["total"] = time.perf_counter() - t0
        return Generated(request, index, image[0].cpu(), result.latents.cpu(), spec.to_container(), result.stats,
                         timings, denoiser.describe(), extra, metadata)
