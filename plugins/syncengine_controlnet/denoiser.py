"""The ``controlnet`` denoiser: Stable Diffusion plus one or more ControlNets, each window conditioned on its crop.

Per request the condition images are loaded (a ready condition, or a photo through a preprocessor plugin), fitted to
the canvas and kept canvas-sized in the request's context (part ``"controlnet"``, not on the denoiser); every UNet
call then gives each row of the batch the crop under its view (:func:`.conditions.condition_crop`). The residuals
enter the UNet call through the ``unet_kwargs`` hook of :class:`ControlNetConditioning`, a mixin, so the same
conditioning combines with another denoiser that calls its UNet with ``unet_kwargs`` (MVDiffusion, SDXL). The sync
step's x0 prediction goes through the same ``predict``, so it is conditioned the same way (phi_theta(x_t, t, c_i) in
the paper). The arithmetic follows diffusers' ``StableDiffusionControlNetPipeline``: residuals scaled by ``scale``,
summed over ControlNets, applied only between the ``start`` and ``end`` fractions of the steps, and in guess mode
computed for the conditional rows only, with diffusers' per-block scaling.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, List, Literal, Optional, Sequence

import torch

from syncengine.denoiser import NO_CONTEXT, RequestContext, Step
from syncengine.errors import ConfigError, SyncEngineError
from syncengine.views import CanvasSpec, View
from syncengine_sd.denoiser import StableDiffusionConfig, StableDiffusionDenoiser
from syncengine_sd.loading import torch_device

from .conditions import condition_crop, fit_to_canvas, load_image, request_sources, to_tensor
from .loading import check_compatible, load_controlnet
from .preprocessors import build_preprocessor

if TYPE_CHECKING:
    from syncengine.sampler import Request

@dataclass
class ControlNetUnit:
    """One ControlNet with its condition image and how strongly and when it applies."""

    model: str = ""  # a ControlNet for the base model: hub id, local diffusers folder, or .safetensors file
    scale: float = 1.0  # conditioning scale of its residuals; 0 gives exactly the plain stable-diffusion result
    start: float = 0.0  # fraction of the steps after which control starts (diffusers control_guidance_start)
    end: float = 1.0  # fraction of the steps after which control stops (diffusers control_guidance_end)
    image: Optional[str] = None  # default image file; a request's inputs override it
    input: Optional[str] = None  # key of requests[].inputs holding this ControlNet's image; default: inputs.control
    preprocessor: Any = None  # null: the image is a ready condition; else a name (canny) or {name: canny, ...options}
    revision: Optional[str] = None  # hub revision of the ControlNet
    variant: Optional[str] = None  # e.g. fp16
    single_file_config: Optional[str] = None  # diffusers ControlNet folder/hub id whose config fits a single file


@dataclass
class ControlNetOptions:
    """The ControlNet options, for any family's config: ``@dataclass class C(ControlNetOptions, FamilyConfig)``."""

    controlnets: List[ControlNetUnit] = field(default_factory=list)  # one entry per ControlNet (see docs/controlnet.md)
    guess_mode: bool = False  # control only the conditional rows of the CFG batch, residuals scaled 0.1..1 by depth
    resize: Literal["error", "stretch", "crop", "pad"] = "error"  # a condition of another aspect ratio than the canvas
    aspect_tolerance: float = 0.01  # relative aspect-ratio difference that is resized without complaint
    save_condition: bool = True  # save each fitted condition image next to the output (<name>.control.png)

    def __post_init__(self):
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:  # the family's own checks (e.g. the device)
            parent()
        if not self.controlnets:
            raise ConfigError("denoiser.controlnets", "empty: give at least one ControlNet trained for the base "
                              "model, e.g. [{model: <hub id or folder>, preprocessor: canny}] (docs/controlnet.md)")
        if self.aspect_tolerance < 0:
            raise ConfigError("denoiser.aspect_tolerance", f"must be >= 0, got {self.aspect_tolerance}")
        for i, unit in enumerate(self.controlnets):
            key = f"denoiser.controlnets.{i}"
            if not unit.model:
                raise ConfigError(f"{key}.model", "missing: a hub id, local folder or .safetensors file")
            if not 0.0 <= unit.start < unit.end <= 1.0:
                raise ConfigError(f"{key}.start", f"need 0 <= start < end <= 1, got start={unit.start}, end={unit.end}")
            build_preprocessor(unit.preprocessor, f"{key}.preprocessor")  # name and options, no weights


@dataclass
class ControlNetConfig(ControlNetOptions, StableDiffusionConfig):
    pretrained: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # the base model (as for stable-diffusion)
    device: str = "auto"  # auto: cuda when available (the rank's device under Lightning), else cpu
    revision: Optional[str] = None  # hub revision (branch, tag or commit) of the base model


def control_scale(unit: ControlNetUnit, step: Step) -> float:
    """The unit's scale at this step: 0 outside [start, end] (diffusers' ``controlnet_keep``)."""
    i, n = step.index, max(step.total, 1)
    keep = not (i / n < unit.start or (i + 1) / n > unit.end)
    return float(unit.scale) if keep else 0.0


class ControlNetConditioning:
    """Mixin: ControlNet residuals in the UNet call's keyword arguments (:meth:`unet_kwargs`), so they compose with
    any denoiser that runs a diffusers UNet through ``unet_kwargs`` (Stable Diffusion, MVDiffusion, SDXL).

    Put it first in the bases, before the family's denoiser, and its options before the family's config::

        @dataclass
        class MyConfig(ControlNetOptions, MVDiffusionConfig): ...

        class MyDenoiser(ControlNetConditioning, MVDiffusionDenoiser):
            Config = MyConfig

    It needs ``self.unet``, ``self.dtype``, ``self.device`` and ``self.latent_factor`` from the family, and adds its
    part ``"controlnet"`` to the request context.
    """

    CONTROLNET_PART = "controlnet"  # the request context's part: canvas-sized [3, H, W] condition per ControlNet

    def __init__(self, config: ControlNetOptions | None = None):
        c = config if config is not None else self.Config()
        # Cheap failures first: preprocessor weights before the multi-GB base model.
        self.preprocessors = [build_preprocessor(u.preprocessor, f"denoiser.controlnets.{i}.preprocessor")
                              for i, u in enumerate(c.controlnets)]
        for p in self.preprocessors:
            if p is not None:
                p.load(torch_device(c.device))
        super().__init__(c)
        self.controlnets = []
        for i, unit in enumerate(c.controlnets):
            key = f"denoiser.controlnets.{i}.model"
            net = load_controlnet(unit.model, key, self.dtype, unit.revision, unit.variant, unit.single_file_config)
            check_compatible(net, self.unet, unit.model, c.pretrained, key)
            net.to(self.device).requires_grad_(False).eval()
            if c.gradient_checkpointing:
                net.enable_gradient_checkpointing()
            self.controlnets.append(net)

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out["controlnets"] = [
            {"model": u.model, "scale": u.scale, "start": u.start, "end": u.end, "preprocessor": u.preprocessor}
            for u in self.config.controlnets
        ]
        out["guess_mode"] = self.config.guess_mode
        return out

    # ------------------------------------------------------------------------------------------------- conditions

    def prepare_request(self, request: Request, canvas: CanvasSpec) -> RequestContext:
        """Load, preprocess and fit each ControlNet's condition image to the canvas (once per request); they go into
        the returned context next to the parts of the classes after this one in the MRO."""
        units = self.config.controlnets
        inputs = request.inputs
        sources = request_sources(inputs, len(units), [u.input for u in units])
        conditions = []
        for i, (unit, source, pre) in enumerate(zip(units, sources, self.preprocessors)):
            source = source if source is not None else unit.image
            what = f"condition image of denoiser.controlnets.{i}"
            if source is None:
                where = f"requests[].inputs.{unit.input}" if unit.input else "requests[].inputs.control"
                raise SyncEngineError(f"{what} is missing: set {where} to an image file, or "
                                      f"denoiser.controlnets.{i}.image")
            image = load_image(source, what, canvas_pixels=canvas.height * canvas.width)  # the masks' limit rule
            image = fit_to_canvas(image, canvas.height, canvas.width, self.config.resize, self.config.aspect_tolerance,
                                  f"{what} {str(source)!r}")
            if pre is not None:
                image = pre(image)
                if image.size != (canvas.width, canvas.height):
                    raise SyncEngineError(f"preprocessor of denoiser.controlnets.{i} returned a {image.size[0]}x"
                                          f"{image.size[1]} px image for a {canvas.width}x{canvas.height} px input")
            conditions.append(to_tensor(image).to(self.device))
        return super().prepare_request(request, canvas).with_part(self.CONTROLNET_PART, tuple(conditions))

    def request_images(self, context: RequestContext) -> dict[str, torch.Tensor]:
        """The request's fitted condition images (saved next to the output for inspection)."""
        out = super().request_images(context)
        conditions = context.get(self.CONTROLNET_PART)
        if not self.config.save_condition or not conditions:
            return out
        if len(conditions) == 1:
            return {**out, "control": conditions[0].cpu()}
        return {**out, **{f"control-{i}": c.cpu() for i, c in enumerate(conditions)}}

    def crops(self, unit: int, views: Sequence[View], context: RequestContext) -> torch.Tensor:
        """``[B, 3, h*f, w*f]``: each view's crop of ControlNet ``unit``'s condition in the request's ``context``."""
        conditions = context.get(self.CONTROLNET_PART)
        if conditions is None:
            raise SyncEngineError("the controlnet denoiser has no condition images: call prepare_request first and "
                                  "pass its context to predict")
        image = conditions[unit]
        return torch.stack([condition_crop(v, image, self.latent_factor) for v in views]).to(self.dtype)

    # -------------------------------------------------------------------------------------------------- inference

    def unet_kwargs(
        self,
        latents: torch.Tensor,
        step: Step,
        hidden: torch.Tensor,
        views: Sequence[View],
        cond_mask: torch.Tensor,
        context: RequestContext = NO_CONTEXT,
    ) -> dict[str, Any]:
        """The family's keyword arguments plus this step's ControlNet residuals, summed with any already there."""
        kwargs = super().unet_kwargs(latents, step, hidden, views, cond_mask, context)
        residuals = self.controlnet_residuals(latents, step, hidden, views, cond_mask, context,
                                              kwargs.get("added_cond_kwargs"))
        if residuals is None:  # no ControlNet active at this step: exactly the family's call
            return kwargs
        down, mid = residuals
        before = kwargs.get("down_block_additional_residuals")
        if before is not None:
            down = [a + b for a, b in zip(before, down)]
        if kwargs.get("mid_block_additional_residual") is not None:
            mid = kwargs["mid_block_additional_residual"] + mid
        return {**kwargs, "down_block_additional_residuals": down, "mid_block_additional_residual": mid}

    def controlnet_residuals(
        self,
        latents: torch.Tensor,
        step: Step,
        hidden: torch.Tensor,
        views: Sequence[View],
        cond_mask: torch.Tensor,
        context: RequestContext,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
    ) -> tuple[list[torch.Tensor], torch.Tensor] | None:
        """The down-block and mid-block residuals of every ControlNet active at ``step``, summed (None when none is).
        ``added_cond_kwargs`` (SDXL's pooled text and time ids) go to the ControlNets as to the UNet."""
        down: list[torch.Tensor] | None = None
        mid: torch.Tensor | None = None
        for k, (unit, net) in enumerate(zip(self.config.controlnets, self.controlnets)):
            scale = control_scale(unit, step)
            if scale == 0.0:  # exactly the model without this ControlNet (and no wasted forward)
                continue
            guess = bool(self.config.guess_mode or net.config.get("global_pool_conditions", False))
            every = torch.arange(latents.shape[0], device=latents.device)
            rows = torch.nonzero(cond_mask).flatten() if guess else every
            if rows.numel() == 0:
                continue
            row_views = [views[int(r)] for r in rows]
            extra = {}
            if added_cond_kwargs is not None:
                extra["added_cond_kwargs"] = {name: value.index_select(0, rows)
                                              for name, value in added_cond_kwargs.items()}
            d, m = net(
                latents.index_select(0, rows),
                step.timestep,
                encoder_hidden_states=hidden.index_select(0, rows),
                controlnet_cond=self.crops(k, row_views, context),
                conditioning_scale=scale,
                guess_mode=guess,
                return_dict=False,
                **extra,
            )
            if rows.numel() != latents.shape[0]:  # unconditional rows get zero residuals (diffusers' guess mode)
                def spread(x: torch.Tensor) -> torch.Tensor:
                    full = torch.zeros((latents.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
                    return full.index_copy(0, rows, x)

                d, m = [spread(x) for x in d], spread(m)
            down = list(d) if down is None else [a + b for a, b in zip(down, d)]
            mid = m if mid is None else mid + m
        return None if down is None else (down, mid)


class ControlNetDenoiser(ControlNetConditioning, StableDiffusionDenoiser):
    """Stable Diffusion with ControlNets; each view is conditioned on its own crop of the canvas-sized condition."""

    Config = ControlNetConfig
