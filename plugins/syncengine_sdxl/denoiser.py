"""The ``stable-diffusion-xl`` denoiser: SDXL (and its distilled Turbo / Lightning / LCM variants) through diffusers.

What SDXL adds to SD 1/2, and where it goes:
- two text encoders and a pooled embedding (:class:`SDXLPromptEmbedding`, from the pipeline's own ``encode_prompt``);
- per-view micro-conditioning, through the ``unet_kwargs`` hook: each window is told its own pixel size and its
  offset on the canvas (``crops_coords_top_left``), as tiling tools condition SDXL's tiles, so a window reads as a
  crop of a larger image rather than a whole picture;
- a VAE that overflows in float16 (:mod:`.vae`).
Loading, dtype/device, gradient checkpointing, ``sync_vae`` and ``sync_decode_scale`` come from the SD denoiser.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, NamedTuple, Optional, Sequence

import torch

from syncengine.denoiser import NO_CONTEXT, Conditioning, RequestContext, Step
from syncengine.errors import ConfigError
from syncengine.views import CropView, View
from syncengine_sd.denoiser import StableDiffusionConfig, StableDiffusionDenoiser
from syncengine_sd.loading import TINY_MODEL, check_tokenizer, load_pipeline

from .vae import load_vae, vae_dtype

ADDED = "sdxl.added"  # the per-call context part: each CFG row's pooled embedding and guidance scale


class SDXLPromptEmbedding(NamedTuple):
    """A prompt's SDXL embeddings: both encoders' hidden states (concatenated) and the second one's pooled output,
    for the negative and the positive prompt."""

    negative: torch.Tensor  # [1, tokens, 2048]
    positive: torch.Tensor
    negative_pooled: torch.Tensor  # [1, 1280]
    positive_pooled: torch.Tensor


class AddedConditions(NamedTuple):
    """Per UNet row of one predict call: the pooled text embedding and (guidance-embedding UNets) the scale."""

    pooled: torch.Tensor  # [rows, dim]
    scales: torch.Tensor  # [rows]


@dataclass
class StableDiffusionXLConfig(StableDiffusionConfig):
    pretrained: str = "stabilityai/stable-diffusion-xl-base-1.0"  # hub id, local diffusers folder, or single file
    vae: Optional[str] = None  # AutoencoderKL replacing the model's (madebyollin/sdxl-vae-fp16-fix: float16-safe)
    original_size: Optional[List[int]] = None  # [height, width] px told to the UNet; default each window's size
    crop_conditioning: bool = True  # crops_coords_top_left = the view's offset on the canvas; false: (0, 0)

    def __post_init__(self):
        super().__post_init__()
        size = self.original_size
        if size is not None and (len(size) != 2 or any(int(s) <= 0 for s in size)):
            raise ConfigError("denoiser.original_size", f"give [height, width] in pixels, got {list(size)}")


class StableDiffusionXLDenoiser(StableDiffusionDenoiser):
    """SDXL UNet + two CLIP text encoders + VAE; per-view size and crop micro-conditioning."""

    Config = StableDiffusionXLConfig
    pipeline_class_name = "StableDiffusionXLPipeline"

    def __init__(self, config: StableDiffusionXLConfig | None = None):
        super().__init__(config)
        pipe = self.pipe
        if pipe.text_encoder_2 is None or pipe.unet.config.addition_embed_type != "text_time":
            raise ConfigError("denoiser.pretrained", f"{self.config.pretrained!r} is not an SDXL base model (two "
                                                     "text encoders, text_time UNet); refiners are not supported")
        check_tokenizer(pipe.tokenizer_2, self.config.pretrained)
        pipe.text_encoder_2.requires_grad_(False).eval()
        # float16 SDXL VAEs overflow: decode (and encode) in float32, as diffusers does; a fixed VAE stays in float16
        self.vae_dtype = vae_dtype(self.vae.config, self.dtype)
        if self.vae.dtype != self.vae_dtype:
            self.vae.to(self.vae_dtype)
        self.guidance_embedding = self.unet.config.time_cond_proj_dim  # LCM-distilled UNets embed the scale

    # ----------------------------------------------------------------------------------------------------- loading

    def _load_pipeline(self):
        c = self.config
        kwargs: dict[str, Any] = {}
        if c.vae:
            kwargs["vae"] = load_vae(c.vae, self.dtype)
        ref = c.pretrained
        if ref == TINY_MODEL:  # the SD tiny model's name, SDXL's own tiny folder
            from .tiny import tiny_sdxl_path

            return load_pipeline(self._pipeline_class(), str(tiny_sdxl_path()), self.dtype, **kwargs)
        for key in ("revision", "variant", "single_file_config"):
            if getattr(c, key):
                kwargs[key] = getattr(c, key)
        return load_pipeline(self._pipeline_class(), ref, self.dtype, **kwargs)

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        if self.config.vae:
            out["vae"] = self.config.vae
        out["vae_dtype"] = str(self.vae_dtype).replace("torch.", "")
        return out

    # --------------------------------------------------------------------------------------------------- inference

    def encode_prompt(self, prompt: str, negative_prompt: str = "") -> SDXLPromptEmbedding:
        # an empty negative prompt is None: SDXL's zeroed unconditional embedding (force_zeros_for_empty_prompt)
        positive, negative, pooled, negative_pooled = self.pipe.encode_prompt(
            prompt, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=True,
            negative_prompt=negative_prompt or None,
        )
        return SDXLPromptEmbedding(negative, positive, negative_pooled, pooled)

    def time_ids(self, views: Sequence[View]) -> torch.Tensor:
        """SDXL's micro-conditioning per view, ``[rows, 6]``: original size, crop offset (top, left) and target size
        in pixels. The window's own size is both sizes (the model was trained on images of the size it makes); a
        crop view's offset is its position on the canvas, other views (projections) sit at (0, 0)."""
        f = self.latent_factor
        rows = []
        for view in views:
            target = [s * f for s in view.latent_size]
            original = [int(s) for s in self.config.original_size] if self.config.original_size else target
            crop = [view.top * f, view.left * f] if self.config.crop_conditioning and isinstance(view, CropView) \
                else [0, 0]
            rows.append(original + crop + target)
        return torch.tensor(rows, dtype=torch.float32)

    def unet_kwargs(
        self,
        latents: torch.Tensor,
        step: Step,
        hidden: torch.Tensor,
        views: Sequence[View],
        cond_mask: torch.Tensor,
        context: RequestContext = NO_CONTEXT,
    ) -> dict[str, Any]:
        kwargs = super().unet_kwargs(latents, step, hidden, views, cond_mask, context)
        added = context.get(ADDED)
        if added is None:
            raise RuntimeError("SDXL's UNet needs pooled text embeddings: call predict(), which adds them to the "
                               "context, rather than unet_forward() directly")
        time_ids = self.time_ids(views).to(latents.device, hidden.dtype)
        kwargs["added_cond_kwargs"] = {"text_embeds": added.pooled, "time_ids": time_ids}
        if self.guidance_embedding is not None:
            # on the CPU: diffusers' embedding builds its frequencies there (a CUDA ``w`` fails, device mismatch)
            embedding = self.pipe.get_guidance_scale_embedding(added.scales.cpu() - 1, self.guidance_embedding)
            kwargs["timestep_cond"] = embedding.to(latents.device, latents.dtype)
        return kwargs

    def predict(
        self,
        latents: torch.Tensor,
        step: Step,
        conds: Sequence[Conditioning],
        views: Sequence[View],
        context: RequestContext = NO_CONTEXT,
    ) -> torch.Tensor:
        x = latents.to(self.dtype)
        scales = torch.tensor([c.guidance_scale for c in conds], dtype=torch.float32)
        embeds = [SDXLPromptEmbedding(*c.embedding) for c in conds]
        positive = torch.cat([e.positive for e in embeds])
        pooled = torch.cat([e.positive_pooled for e in embeds])
        # no guidance (Turbo, Lightning) or guidance embedded in the UNet (LCM): the conditional branch only
        if bool((scales <= 1).all()) or self.guidance_embedding is not None:
            mask = torch.ones(len(conds), dtype=torch.bool, device=x.device)
            call = context.with_part(ADDED, AddedConditions(pooled, scales.to(x.device)))
            return self.unet_forward(x, step, positive, views, mask, call).float()
        negative = torch.cat([e.negative for e in embeds])
        negative_pooled = torch.cat([e.negative_pooled for e in embeds])
        n = x.shape[0]
        mask = torch.cat([torch.zeros(n, dtype=torch.bool), torch.ones(n, dtype=torch.bool)]).to(x.device)
        call = context.with_part(ADDED, AddedConditions(torch.cat([negative_pooled, pooled]),
                                                        torch.cat([scales, scales]).to(x.device)))
        out = self.unet_forward(torch.cat([x, x]), step, torch.cat([negative, positive]), list(views) * 2, mask, call)
        uncond, cond = out.float().chunk(2)
        g = scales.to(x.device).view(-1, 1, 1, 1)
        return uncond + g * (cond - uncond)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents.to(self.vae_dtype) / self.vae.config.scaling_factor).sample.float()

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        posterior = self.vae.encode(images.to(self.device, self.vae_dtype)).latent_dist
        return (posterior.mean * self.vae.config.scaling_factor).float()
