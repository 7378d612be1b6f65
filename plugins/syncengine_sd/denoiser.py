"""The ``stable-diffusion`` denoiser: SD 1.x/2.x through diffusers, classifier-free guidance inside.

LCM-distilled UNets (``unet.config.time_cond_proj_dim`` set: LCM_Dreamshaper_v7, lcm-sdxl) were distilled from
guided sampling: they take the guidance scale as an embedding (``timestep_cond``) and run the prompt's branch only,
as diffusers' pipelines do. The embedding enters through :meth:`StableDiffusionDenoiser.unet_kwargs`, so conditioning
hooks (ControlNet) compose with it unchanged.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Optional, Sequence

import torch

from syncengine.denoiser import NO_CONTEXT, Conditioning, Denoiser, PromptEmbedding, RequestContext, Step
from syncengine.schedulers import check_diffusion_scheduler, check_few_step_count, make_scheduler
from syncengine.views import View

from .loading import TINY_MODEL, check_device, check_tokenizer, hub_kwargs, load_pipeline, torch_device, torch_dtype
from .sync_decoding import SyncDecoding, check_sync_decode_scale

if TYPE_CHECKING:
    from syncengine.config import ResolvedSpec

log = logging.getLogger(__name__)

GUIDANCE = "sd.guidance"  # the per-call context part of a guidance-embedding UNet: each row's guidance scale (CPU)


@dataclass
class StableDiffusionConfig:
    pretrained: str = "stabilityai/stable-diffusion-2-base"  # hub id, local diffusers folder, or .safetensors/.ckpt
    dtype: str = "auto"  # auto: float16 on CUDA, float32 on CPU
    device: str = "auto"
    revision: Optional[str] = None
    variant: Optional[str] = None  # e.g. fp16
    single_file_config: Optional[str] = None  # diffusers folder/hub id whose configs fit a single-file checkpoint
    prediction_type: Optional[Literal["epsilon", "v_prediction"]] = None  # override the scheduler's
    gradient_checkpointing: bool = False  # recompute UNet activations in the sync backward: less memory, more time
    sync_vae: Optional[str] = None  # a cheaper decoder for the sync loss only (AutoencoderTiny folder/hub id)
    sync_decode_scale: float = 1.0  # resize x0 latents by this before the sync decode (0.5: 4x fewer pixels)

    def __post_init__(self):
        if self.device != "auto":  # at validation: `cuda` on a machine without CUDA is a config error, before loading
            check_device(self.device, "denoiser.device")


class StableDiffusionDenoiser(SyncDecoding, Denoiser):
    """Stable Diffusion UNet + CLIP text encoder + VAE, from any source diffusers can load."""

    Config = StableDiffusionConfig
    pipeline_class_name = "StableDiffusionPipeline"

    def __init__(self, config: StableDiffusionConfig | None = None):
        super().__init__(config)
        c = self.config
        check_sync_decode_scale(c.sync_decode_scale)
        self.device = torch_device(c.device)
        self.dtype = torch_dtype(c.dtype, self.device)
        self.is_tiny = c.pretrained == TINY_MODEL
        if self.is_tiny:
            log.warning(TINY_MODEL + ": " + __import__("syncengine_sd.tiny", fromlist=["x"]).TINY_NOTICE)
        self.pipe = self._load_pipeline()
        check_tokenizer(self.pipe.tokenizer, c.pretrained)
        self.pipe.to(self.device)
        for module in (self.pipe.unet, self.pipe.vae, self.pipe.text_encoder):
            module.requires_grad_(False)
            module.eval()
        if c.gradient_checkpointing:
            self.pipe.unet.enable_gradient_checkpointing()
        self.unet = self.pipe.unet
        self.vae = self.pipe.vae
        self.scheduler_config = dict(self.pipe.scheduler.config)
        if c.prediction_type:
            self.scheduler_config["prediction_type"] = c.prediction_type
        self.prediction_type = self.scheduler_config.get("prediction_type", "epsilon")
        self.latent_channels = self.unet.config.in_channels
        self.latent_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.guidance_embedding = self.unet.config.get("time_cond_proj_dim")  # LCM-distilled UNets embed the scale
        self.sync_decoder = self.load_sync_decoder()

    # ----------------------------------------------------------------------------------------------------- loading

    def _pipeline_class(self):
        import diffusers

        return getattr(diffusers, self.pipeline_class_name)

    def _load_pipeline(self):
        c = self.config
        kwargs: dict[str, Any] = hub_kwargs(c)
        if c.single_file_config:
            kwargs["single_file_config"] = c.single_file_config
        return load_pipeline(self._pipeline_class(), c.pretrained, self.dtype, **kwargs)

    @classmethod
    def check_run(cls, spec: ResolvedSpec, views: Sequence[View]) -> None:
        """Before any weights load: a diffusion scheduler (a flow one would sample garbage)."""
        s = spec.config.sampler
        check_diffusion_scheduler(str(s.scheduler), dict(s.scheduler_options or {}), spec.config.denoiser.name)

    @property
    def default_window(self) -> int:
        return int(self.unet.config.sample_size) * self.latent_factor

    def describe(self) -> dict[str, Any]:
        out = {"pretrained": self.config.pretrained, "prediction_type": self.prediction_type,
               "dtype": str(self.dtype).replace("torch.", ""), "device": str(self.device)}
        if self.is_tiny:
            out["warning"] = "random weights (built-in tiny model)"
        return out

    # --------------------------------------------------------------------------------------------------- inference

    def make_scheduler(self, name: str, **options: Any):
        return make_scheduler(name, self.scheduler_config, **options)

    def set_timesteps(self, scheduler: Any, steps: int, views: Sequence[View]) -> None:
        check_few_step_count(scheduler, steps)
        super().set_timesteps(scheduler, steps, views)

    def encode_prompt(self, prompt: str, negative_prompt: str = "") -> PromptEmbedding:
        if negative_prompt and self.guidance_embedding is not None:
            log.warning("negative prompt %r ignored: this UNet embeds the guidance scale (LCM-distilled), it has no "
                        "unconditional branch to steer", negative_prompt)
        positive, negative = self.pipe.encode_prompt(
            prompt, self.device, 1, True, negative_prompt=negative_prompt or None
        )
        return PromptEmbedding(negative=negative, positive=positive)

    def unet_forward(
        self,
        latents: torch.Tensor,
        step: Step,
        hidden: torch.Tensor,
        views: Sequence[View],
        cond_mask: torch.Tensor,
        context: RequestContext = NO_CONTEXT,
    ) -> torch.Tensor:
        """One UNet call, with the keyword arguments of :meth:`unet_kwargs`. ``cond_mask`` flags rows that are
        conditional (True) or unconditional (False) in the CFG batch. A denoiser whose network is not diffusers'
        UNet call (MVDiffusion's multi-view UNet) overrides this and passes :meth:`unet_kwargs` on."""
        kwargs = self.unet_kwargs(latents, step, hidden, views, cond_mask, context)
        return self.unet(latents, step.timestep, encoder_hidden_states=hidden, **kwargs).sample

    def unet_kwargs(
        self,
        latents: torch.Tensor,
        step: Step,
        hidden: torch.Tensor,
        views: Sequence[View],
        cond_mask: torch.Tensor,
        context: RequestContext = NO_CONTEXT,
    ) -> dict[str, Any]:
        """Extra keyword arguments of the UNet call for this batch: the hook conditioning composes through. A family
        adds its own (SDXL: ``added_cond_kwargs``), a conditioning adds its part to ``super().unet_kwargs(...)``'s
        (ControlNet: residuals), each reading its per-request part of ``context``. SD: a guidance-embedding UNet's
        ``timestep_cond``, from the rows' scales that :meth:`predict` put in the call's context."""
        scales = context.get(GUIDANCE)
        if scales is None or self.guidance_embedding is None:
            return {}
        # diffusers' embedding of (scale - 1) (the Imagen CFG form), computed on the CPU as its pipelines do
        embedding = self.pipe.get_guidance_scale_embedding(scales - 1, embedding_dim=self.guidance_embedding)
        return {"timestep_cond": embedding.to(latents.device, latents.dtype)}

    def predict(
        self,
        latents: torch.Tensor,
        step: Step,
        conds: Sequence[Conditioning],
        views: Sequence[View],
        context: RequestContext = NO_CONTEXT,
    ) -> torch.Tensor:
        x = latents.to(self.dtype)
        scales = torch.tensor([c.guidance_scale for c in conds], dtype=torch.float32)  # CPU: read on the host
        embeds = [PromptEmbedding(*c.embedding) for c in conds]  # also accepts a hand-built (negative, positive)
        positive = torch.cat([e.positive for e in embeds])
        if self.guidance_embedding is not None:  # the scale is embedded per row: the prompt's branch only
            mask = torch.ones(len(conds), dtype=torch.bool, device=x.device)
            call = context.with_part(GUIDANCE, scales)
            return self.unet_forward(x, step, positive, views, mask, call).float()
        if bool((scales <= 1).all()):  # no guidance: conditional branch only (as diffusers does)
            mask = torch.ones(len(conds), dtype=torch.bool, device=x.device)
            return self.unet_forward(x, step, positive, views, mask, context).float()
        negative = torch.cat([e.negative for e in embeds])
        n = x.shape[0]
        mask = torch.cat([torch.zeros(n, dtype=torch.bool), torch.ones(n, dtype=torch.bool)]).to(x.device)
        out = self.unet_forward(torch.cat([x, x]), step, torch.cat([negative, positive]), list(views) * 2, mask,
                                 context)
        uncond, cond = out.float().chunk(2)
        g = scales.to(x.device).view(-1, 1, 1, 1)
        return uncond + g * (cond - uncond)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents.to(self.dtype) / self.vae.config.scaling_factor).sample.float()

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        posterior = self.vae.encode(images.to(self.device, self.dtype)).latent_dist
        return (posterior.mean * self.vae.config.scaling_factor).float()

    def decode_final(self, latents: torch.Tensor, tiled: bool = False) -> torch.Tensor:
        if tiled:
            self.vae.enable_tiling()
        try:
            with torch.no_grad():
                return self.decode(latents)
        finally:
            if tiled:
                self.vae.disable_tiling()
