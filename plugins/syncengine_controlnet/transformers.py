"""The ``controlnet-sd3`` and ``controlnet-flux`` denoisers: SD3 / FLUX with transformer ControlNets, each window
conditioned on its own crop of the condition.

Transformer ControlNets read the condition as VAE latents (SD3, FLUX InstantX-style; FLUX packs them 2x2 like the
image tokens) or as pixels (FLUX XLabs-style, an ``input_hint_block``), and return one sample per transformer block
that the family's transformer adds to its hidden states. The samples enter the transformer call through the family's
``transformer_kwargs`` hook, as SD's residuals enter ``unet_kwargs``; the condition images come from the same
request context and crops as the UNet ControlNets (:class:`ControlNetConditioning`). The arithmetic follows
diffusers' ``StableDiffusion3ControlNetPipeline`` and ``FluxControlNetPipeline``, with one deliberate difference: the
condition is encoded to the posterior MEAN, not a draw from it, so a view's condition is the same at every step and
overlapping views see the same latents where their crops agree (the pipelines' draw is unseeded).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, List, Optional, Sequence

import torch

from syncengine.denoiser import NO_CONTEXT, RequestContext, Step
from syncengine.errors import ConfigError
from syncengine.views import CanvasSpec, CropView, View
from syncengine_flux.denoiser import FluxConfig, FluxDenoiser
from syncengine_flux.packing import pack
from syncengine_sd.loading import torch_device
from syncengine_sd3.denoiser import SD3Config, SD3Denoiser

from .conditions import condition_crop
from .denoiser import ControlNetConditioning, ControlNetOptions, ControlNetUnit, control_scale
from .loading import load_controlnet
from .preprocessors import build_preprocessor

if TYPE_CHECKING:
    from syncengine.config import ResolvedSpec
    from syncengine.sampler import Request

SD3_EXAMPLE = "InstantX/SD3-Controlnet-Canny"
FLUX_EXAMPLE = "InstantX/FLUX.1-dev-Controlnet-Canny"


@dataclass
class TransformerControlNetOptions(ControlNetOptions):
    """The ControlNet options for a transformer family; guess mode does not exist there (diffusers' SD3 and FLUX
    ControlNet pipelines have none), so it is refused at validation."""

    def __post_init__(self):
        super().__post_init__()
        if self.guess_mode:
            raise ConfigError("denoiser.guess_mode", "SD3 and FLUX ControlNets have no guess mode (neither have "
                                                     "diffusers' pipelines); remove it")


# ------------------------------------------------------------------------------------------------------- loading


def check_fits(net, transformer, names: Sequence[str], ref: str, base: str, key: str) -> None:
    """A ControlNet for another base model fails inside the transformer with a shape error: say it here."""
    for name in names:
        mine = getattr(net, name, None) if name == "inner_dim" else net.config.get(name)
        theirs = getattr(transformer, name, None) if name == "inner_dim" else transformer.config.get(name)
        if isinstance(mine, list):
            mine, theirs = tuple(mine), tuple(theirs or ())
        if mine is not None and theirs is not None and mine != theirs:
            raise ConfigError(key, f"ControlNet {ref!r} does not fit the base model {base!r} ({name} {mine} vs "
                                   f"{theirs}); use a ControlNet trained for this base")


# --------------------------------------------------------------------------------------------------------- mixin


class TransformerControlNetConditioning(ControlNetConditioning):
    """Mixin: ControlNet block samples in the transformer call's keyword arguments (the family's
    ``transformer_kwargs``). A family mixin below fills the hook; this one loads the nets, keeps a per-request cache
    of each view's encoded condition and reuses :class:`ControlNetConditioning`'s condition images and crops."""

    LATENTS_PART = "controlnet_latents"  # per request: {(unit, view key): encoded condition crop [1, C, h, w]}
    controlnet_class = ""  # the diffusers class name
    example = ""
    fit_names: tuple[str, ...] = ()

    def __init__(self, config: TransformerControlNetOptions | None = None):
        from importlib import import_module

        c = config if config is not None else self.Config()
        self.preprocessors = [build_preprocessor(u.preprocessor, f"denoiser.controlnets.{i}.preprocessor")
                              for i, u in enumerate(c.controlnets)]
        for p in self.preprocessors:  # cheap failures before the multi-GB base model
            if p is not None:
                p.load(torch_device(c.device))
        super(ControlNetConditioning, self).__init__(c)  # the family; ControlNetConditioning loads UNet ControlNets
        cls = getattr(import_module("diffusers"), self.controlnet_class)
        self.controlnets = []
        for i, unit in enumerate(c.controlnets):
            key = f"denoiser.controlnets.{i}.model"
            net = load_controlnet(unit.model, key, self.dtype, unit.revision, unit.variant, unit.single_file_config,
                                  model_class=cls, example=self.example)
            check_fits(net, self.transformer, self.fit_names, unit.model, c.pretrained, key)
            self.adopt(net, key)
            net.to(self.device).requires_grad_(False).eval()
            if c.gradient_checkpointing:
                net.enable_gradient_checkpointing()
            self.controlnets.append(net)

    @classmethod
    def check_run(cls, spec: ResolvedSpec, views: Sequence[View]) -> None:
        """Before any weights load: the family's checks, and views whose condition crop is defined (crop views, or
        views with ``extract_image``), so a 360° tiler is one line here, not an error after the model loaded."""
        super().check_run(spec, views)
        for view in views:
            if not isinstance(view, CropView) and not callable(getattr(view, "extract_image", None)):
                raise ConfigError("tiler.name", f"{spec.config.denoiser.name} conditions each view on its crop of the "
                                                f"condition image; {type(view).__name__} views (tiler "
                                                f"{spec.config.tiler.name}) have no crop: use a sliding or regions "
                                                "tiler")

    def adopt(self, net, key: str) -> None:
        """Family-specific checks and fixes of a loaded net (SD3.5 Large's borrow the transformer's patch embedding)."""

    def prepare_request(self, request: Request, canvas: CanvasSpec) -> RequestContext:
        return super().prepare_request(request, canvas).with_part(self.LATENTS_PART, {})

    def latent_shift(self, net) -> float:
        """What is subtracted from the VAE's latents before scaling (the VAE's shift unless the family says not)."""
        return float(self.vae.config.shift_factor or 0.0)

    def condition_latents(self, unit: int, views: Sequence[View], context: RequestContext) -> torch.Tensor:
        """``[B, C, h, w]``: each view's crop of ControlNet ``unit``'s condition, encoded by the VAE as the pipelines
        do (``[-1, 1]`` pixels, ``(z - shift) * scale``), once per view and request (cached in ``context``)."""
        conditions, cache = context.get(self.CONTROLNET_PART), context.get(self.LATENTS_PART)
        if conditions is None or cache is None:
            from syncengine.errors import SyncEngineError

            raise SyncEngineError("the ControlNet denoiser has no condition images: call prepare_request first and "
                                  "pass its context to predict")
        shift, scaling = self.latent_shift(self.controlnets[unit]), self.vae.config.scaling_factor
        out = []
        for view in views:
            key = (unit, view.index, getattr(view, "box", None), tuple(view.latent_size))
            if key not in cache:
                crop = condition_crop(view, conditions[unit], self.latent_factor)[None]
                with torch.no_grad():
                    mean = self.vae.encode((crop * 2 - 1).to(self.device, self.vae.dtype)).latent_dist.mean
                cache[key] = (mean - shift) * scaling
            out.append(cache[key])
        return torch.cat(out).to(self.dtype)

    def active(self, step: Step):
        """``(index, net, scale)`` of every ControlNet active at ``step``; a scale-0 one is skipped, so the call is
        exactly the family's."""
        for k, (unit, net) in enumerate(zip(self.config.controlnets, self.controlnets)):
            scale = control_scale(unit, step)
            if scale != 0.0:
                yield k, net, scale


def _add(a: list[torch.Tensor] | None, b: list[torch.Tensor] | None) -> list[torch.Tensor] | None:
    if a is None or b is None:
        return a if b is None else list(b)
    return [x + y for x, y in zip(a, b)]


# ------------------------------------------------------------------------------------------------------------ SD3


@dataclass
class ControlNetSD3Config(TransformerControlNetOptions, SD3Config):
    """SD3's options plus the ControlNet ones (``controlnets``: SD3 / SD3.5 ControlNets, e.g. InstantX's Canny)."""

    pretrained: str = "stabilityai/stable-diffusion-3-medium-diffusers"  # the base of InstantX/SD3-Controlnet-Canny


class ControlNetSD3Conditioning(TransformerControlNetConditioning):
    """SD3's ``transformer_kwargs`` plus ``block_controlnet_hidden_states``, as StableDiffusion3ControlNetPipeline
    computes them: the CFG batch's rows, each with its own text (none for SD3.5 Large's ControlNets) and pooled
    projection (zeros for InstantX's, which also read latents without the VAE's shift)."""

    controlnet_class = "SD3ControlNetModel"
    example = SD3_EXAMPLE
    fit_names = ("in_channels", "patch_size", "inner_dim", "pooled_projection_dim")

    def adopt(self, net, key: str) -> None:
        if net.config.get("use_pos_embed", True) is False:  # as the pipeline: the transformer's patch embedding
            net.pos_embed = net._get_pos_embed_from_transformer(self.transformer).to(self.dtype)

    def latent_shift(self, net) -> float:
        return 0.0 if net.config.force_zeros_for_pooled_projection else super().latent_shift(net)

    def transformer_kwargs(
        self,
        latents: torch.Tensor,
        step: Step,
        hidden: torch.Tensor,
        pooled: torch.Tensor,
        views: Sequence[View],
        cond_mask: torch.Tensor,
        context: RequestContext = NO_CONTEXT,
    ) -> dict[str, Any]:
        kwargs = super().transformer_kwargs(latents, step, hidden, pooled, views, cond_mask, context)
        samples = None
        timestep = step.timestep.to(latents.device).expand(latents.shape[0])
        for k, net, scale in self.active(step):
            text = hidden if net.config.joint_attention_dim is not None else None
            net_pooled = torch.zeros_like(pooled) if net.config.force_zeros_for_pooled_projection else pooled
            out = net(hidden_states=latents, timestep=timestep, encoder_hidden_states=text,
                      pooled_projections=net_pooled, controlnet_cond=self.condition_latents(k, views, context),
                      conditioning_scale=scale, return_dict=False)[0]
            samples = _add(samples, out)
        if samples is None:
            return kwargs
        return {**kwargs, "block_controlnet_hidden_states": _add(kwargs.get("block_controlnet_hidden_states"),
                                                                 samples)}


class ControlNetSD3Denoiser(ControlNetSD3Conditioning, SD3Denoiser):
    """SD3 / SD3.5 with ControlNets; each view is conditioned on its own crop of the canvas-sized condition."""

    Config = ControlNetSD3Config


# ----------------------------------------------------------------------------------------------------------- FLUX


@dataclass
class FluxControlNetUnit(ControlNetUnit):
    """A FLUX ControlNet entry; ``mode`` selects the condition type of a ControlNet-Union model."""

    mode: Optional[int] = None  # ControlNet-Union models only: the control mode index (see the model's card)


@dataclass
class ControlNetFluxConfig(TransformerControlNetOptions, FluxConfig):
    """FLUX's options plus the ControlNet ones (``controlnets``: FLUX ControlNets, InstantX- or XLabs-style, or
    ControlNet-Union models with a ``mode`` per entry)."""

    controlnets: List[FluxControlNetUnit] = field(default_factory=list)  # one entry per ControlNet (docs/controlnet.md)

    def __post_init__(self):
        super().__post_init__()
        for i, unit in enumerate(self.controlnets):
            if unit.mode is not None and unit.mode < 0:
                raise ConfigError(f"denoiser.controlnets.{i}.mode", f"must be >= 0, got {unit.mode}")


class ControlNetFluxConditioning(TransformerControlNetConditioning):
    """FLUX's ``transformer_kwargs`` plus ``controlnet_block_samples`` / ``controlnet_single_block_samples``, as
    FluxControlNetPipeline computes them: on the positive prompt, the guidance embedding if the ControlNet has one;
    InstantX-style nets read packed VAE latents, XLabs-style ones (``input_hint_block``) ``[-1, 1]`` pixels and
    repeat their samples over the transformer's blocks. ControlNet-Union models read the entry's ``mode``."""

    controlnet_class = "FluxControlNetModel"
    example = FLUX_EXAMPLE
    fit_names = ("in_channels", "inner_dim", "joint_attention_dim", "pooled_projection_dim")

    def adopt(self, net, key: str) -> None:
        unit = self.config.controlnets[len(self.controlnets)]
        modes, mode_key = net.config.get("num_mode"), key.rsplit(".", 1)[0] + ".mode"
        if modes is None and unit.mode is not None:
            raise ConfigError(mode_key, f"{unit.model!r} is not a ControlNet-Union model (no control modes); remove "
                                        "mode")
        if modes is not None and (unit.mode is None or unit.mode >= modes):
            raise ConfigError(mode_key, f"{unit.model!r} is a ControlNet-Union model with {modes} control modes: set "
                                        f"mode to one of 0..{modes - 1} (its model card lists them)")
        hinted = {n.input_hint_block is not None for n in self.controlnets} | {net.input_hint_block is not None}
        if len(hinted) > 1:
            raise ConfigError(key, "XLabs-style (pixel input) and InstantX-style (latent input) FLUX ControlNets "
                                   "add their samples to different blocks and cannot be mixed")

    def transformer_kwargs(
        self,
        tokens: torch.Tensor,
        step: Step,
        text: torch.Tensor,
        pooled: torch.Tensor,
        scales: torch.Tensor,
        ids: torch.Tensor,
        views: Sequence[View],
        context: RequestContext = NO_CONTEXT,
    ) -> dict[str, Any]:
        kwargs = super().transformer_kwargs(tokens, step, text, pooled, scales, ids, views, context)
        blocks = singles = None
        repeat = False
        t = torch.as_tensor(step.timestep, device=tokens.device).expand(tokens.shape[0]).to(tokens.dtype)
        txt_ids = torch.zeros(text.shape[1], 3, device=tokens.device, dtype=text.dtype)
        for k, net, scale in self.active(step):
            mode = self.config.controlnets[k].mode
            if mode is not None:  # a ControlNet-Union model: one mode per row, as FluxControlNetPipeline's control_mode
                mode = torch.full((tokens.shape[0], 1), mode, dtype=torch.long, device=tokens.device)
            repeat = net.input_hint_block is not None
            if repeat:
                cond = self.crops(k, views, context) * 2 - 1
            else:
                cond = pack(self.condition_latents(k, views, context))
            b, s = net(hidden_states=tokens, controlnet_cond=cond, controlnet_mode=mode, conditioning_scale=scale,
                       timestep=t / 1000, guidance=scales if net.config.guidance_embeds else None,
                       pooled_projections=pooled, encoder_hidden_states=text, txt_ids=txt_ids, img_ids=ids,
                       return_dict=False)
            blocks, singles = _add(blocks, b), _add(singles, s)
        if blocks is None and singles is None:
            return kwargs
        return {**kwargs, "controlnet_block_samples": _add(kwargs.get("controlnet_block_samples"), blocks),
                "controlnet_single_block_samples": _add(kwargs.get("controlnet_single_block_samples"), singles),
                "controlnet_blocks_repeat": repeat}


class ControlNetFluxDenoiser(ControlNetFluxConditioning, FluxDenoiser):
    """FLUX.1 with ControlNets; each view is conditioned on its own crop of the canvas-sized condition."""

    Config = ControlNetFluxConfig
