"""Denoiser: a pretrained diffusion model behind one small face.

The sampler never touches UNets, text encoders or VAEs directly: it asks a denoiser to encode prompts, to predict the
model output for a batch of views (classifier-free guidance inside), and to decode latents to images. Anything a
particular model needs per view (a ControlNet condition crop, a camera) comes from ``View.context``.
"""
from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Mapping, NamedTuple, Sequence

import torch

from .plugin import Plugin
from .views import CanvasSpec, View

if TYPE_CHECKING:  # config and sampler import this module
    from .config import ResolvedSpec
    from .sampler import Request


@dataclass(frozen=True)
class Step:
    """Where the sampler is: ``index`` in ``[0, total)``, and the scheduler's timestep."""

    index: int
    total: int
    timestep: torch.Tensor

    @property
    def fraction(self) -> float:
        """Progress in [0, 1): used for options given as fractions of the steps (control start/end, bootstrapping)."""
        return self.index / max(self.total, 1)


class PromptEmbedding(NamedTuple):
    """A prompt's text embeddings for classifier-free guidance, as the CFG families (SD and its kin) encode them.

    Named so readers say which branch they take; still a tuple, so ``negative, positive = ...`` unpacks it.
    """

    negative: torch.Tensor  # the negative (unconditional) prompt's, ``[1, tokens, dim]``
    positive: torch.Tensor  # the prompt's


@dataclass
class Conditioning:
    """One view's text conditioning: opaque embeddings from :meth:`Denoiser.encode_prompt` (a
    :class:`PromptEmbedding` for the CFG families) plus its guidance scale."""

    embedding: Any
    guidance_scale: float


@dataclass(frozen=True)
class RequestContext:
    """Per-request conditioning made by :meth:`Denoiser.prepare_request` and passed to every ``predict`` of that
    request (as diffusers passes conditions as call arguments, k-diffusion as ``extra_args``).

    It lives outside the denoiser so that preparing one request cannot change another's, and so that conditioning
    hooks compose: each hook adds its own named part (:meth:`with_part`) instead of overriding a shared attribute.
    """

    parts: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "parts", MappingProxyType(dict(self.parts)))  # read-only: contexts are shared values

    def with_part(self, name: str, value: Any) -> RequestContext:
        """A new context with ``name`` added; two hooks claiming one name is a bug, so it raises."""
        if name in self.parts:
            raise ValueError(f"request context already has a part named {name!r}")
        return RequestContext({**self.parts, name: value})

    def get(self, name: str, default: Any = None) -> Any:
        return self.parts.get(name, default)

    def __getitem__(self, name: str) -> Any:
        return self.parts[name]

    def __contains__(self, name: object) -> bool:
        return name in self.parts


NO_CONTEXT = RequestContext()  # the context of a denoiser without per-request conditioning (and the default)


class Denoiser(Plugin):
    """A pretrained latent (or pixel) diffusion model.

    Contract for implementers:
    - ``latent_factor``/``latent_channels``: pixels per latent and latent channels (SD: 8 and 4).
    - ``prediction_type``: what the network outputs, ``"epsilon"``, ``"v_prediction"``, ``"sample"`` or (rectified
      flows) ``"flow_prediction"``; the sampler converts with :mod:`syncengine.parameterization`.
    - ``make_scheduler(name)`` returns a fresh diffusers scheduler configured for this model.
    - ``predict(latents, step, conds, views, context)`` runs the network on a batch of views ``[B, C, h, w]`` and
      returns its output with classifier-free guidance applied; ``context`` is what :meth:`prepare_request` returned
      for the request (per-request conditioning lives there, never on the denoiser). It must be differentiable
      w.r.t. ``latents`` when grad is enabled (the sync step needs it) and must not depend on batch composition
      (results cannot change with the view batch size), unless it sets ``joint_views`` (below).
    - ``joint_views``: True where a prediction depends on the other views of its batch (MVDiffusion); the sync step
      then keeps its views in one batch by default.
    - ``decode(latents)`` returns images in ``[-1, 1]`` (not clamped), differentiably.
    """

    section = "denoiser"  # error keys of its options (closed sets checked by the Plugin base)
    latent_factor: int = 8
    latent_channels: int = 4
    prediction_type: str = "epsilon"
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32
    joint_views: bool = False

    @property
    def default_window(self) -> int:
        """The model's native image size in pixels (a tiler's default window)."""
        return 512

    @abstractmethod
    def make_scheduler(self, name: str, **options: Any): ...

    def set_timesteps(self, scheduler: Any, steps: int, views: Sequence[View]) -> None:
        """Set a fresh scheduler's timesteps for a request over ``views``. Flow models with a resolution-dependent
        shift (FLUX) compute it here from one view's size: each window is sampled as the model was trained, whatever
        the canvas."""
        scheduler.set_timesteps(steps, device=self.device)

    @abstractmethod
    def encode_prompt(self, prompt: str, negative_prompt: str = "") -> Any: ...

    @abstractmethod
    def predict(
        self,
        latents: torch.Tensor,
        step: Step,
        conds: Sequence[Conditioning],
        views: Sequence[View],
        context: RequestContext = NO_CONTEXT,
    ) -> torch.Tensor: ...

    @abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` in ``[-1, 1]`` -> latents (deterministic: the distribution's mean). Optional: only
        plugins that compose images into latents (region bootstrapping, image inputs) need it."""
        raise NotImplementedError(f"{type(self).__name__} cannot encode images")

    def decode_for_sync(self, latents: torch.Tensor) -> torch.Tensor:
        """The decoder the sync loss differentiates through; a model may offer a cheaper one (TAESD)."""
        return self.decode(latents)

    def sync_image_size(self, latent_size: tuple[int, int]) -> tuple[int, int]:
        """Pixel size of :meth:`decode_for_sync`'s image for a window of ``latent_size``, known without decoding: a
        sharded run allocates the anchor's image on every rank before its owner broadcasts it."""
        return (latent_size[0] * self.latent_factor, latent_size[1] * self.latent_factor)

    def decode_final(self, latents: torch.Tensor, tiled: bool = False) -> torch.Tensor:
        """Decode the finished canvas (no gradient); ``tiled`` bounds memory for very wide canvases."""
        with torch.no_grad():
            return self.decode(latents)

    @classmethod
    def check_run(cls, spec: ResolvedSpec, views: Sequence[View]) -> None:
        """Validation before any weights load, given the resolved spec and the tiler's views: a denoiser with needs
        on them (all views in one batch, cameras on every view) raises :class:`ConfigError` here. None by default."""

    def prepare_request(self, request: Request, canvas: CanvasSpec) -> RequestContext:
        """Called once per request before sampling (e.g. to load and crop a condition image); returns the request's
        context for ``predict``. A subclass adds its part to ``super().prepare_request(...)``'s context, so hooks of
        several classes combine. Empty by default."""
        return NO_CONTEXT

    def request_images(self, context: RequestContext) -> dict[str, torch.Tensor]:
        """Images of a prepared request (its ``context``) to save next to its output for inspection (e.g. the fitted
        condition image): ``{suffix: [3, H, W] in [0, 1]}``, written as ``<name>.<suffix>.png``."""
        return {}

    def describe(self) -> dict[str, Any]:
        """What the JSON sidecar records about the model (names, revisions), beyond the spec."""
        return {}
