"""The ``sd3`` denoiser: Stable Diffusion 3 / 3.5 (MMDiT, rectified flow) through diffusers' StableDiffusion3Pipeline.

The transformer predicts the flow velocity ``eps - x0`` (``flow_prediction``), so the core's flow conversions and the
flow Euler scheduler drive it; prompts go through the pipeline's own ``encode_prompt`` (CLIP-L, CLIP-G and, unless
``t5: false``, T5), and classifier-free guidance runs inside :meth:`SD3Denoiser.predict` with each branch's pooled
projection, as the pipeline does.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Optional, Sequence

import torch

from syncengine.denoiser import NO_CONTEXT, Conditioning, Denoiser, RequestContext, Step
from syncengine.errors import ConfigError
from syncengine.schedulers import check_flow_scheduler, make_scheduler
from syncengine.views import View
from syncengine_sd.loading import (
    TINY_MODEL,
    _not_found,
    check_device,
    check_tokenizer,
    hub_kwargs,
    load_pipeline,
    torch_device,
    torch_dtype,
)
from syncengine_sd.sync_decoding import SyncDecoding, check_sync_decode_scale
from syncengine_sd.text_encoders import TextEncoderOffload

if TYPE_CHECKING:
    from syncengine.config import ResolvedSpec

log = logging.getLogger(__name__)

PATCH_SIZE = 2  # every SD3 / SD3.5 transformer: window latents must tile into 2x2 patches
MAX_SEQUENCE_LENGTH = 512  # the pipeline's limit for T5 tokens


@dataclass
class SD3Config:
    pretrained: str = "stabilityai/stable-diffusion-3.5-medium"  # hub id, local diffusers folder, or .safetensors
    dtype: str = "auto"  # auto: bfloat16 on CUDA (SD3.5 is published in it), float32 on CPU
    device: str = "auto"
    revision: Optional[str] = None
    variant: Optional[str] = None  # e.g. fp16
    single_file_config: Optional[str] = None  # diffusers folder/hub id whose configs fit a single-file checkpoint
    t5: bool = True  # false: no T5 encoder (about 9 GB less in 16 bit; its tokens are zeros), weaker prompt following
    max_sequence_length: int = 256  # T5 tokens per prompt (at most 512); longer prompts are truncated
    gradient_checkpointing: bool = False  # recompute transformer activations in the sync backward: less memory
    text_encoders_to_cpu: bool = False  # move CLIP-L, CLIP-G and T5 off the accelerator once prompts are encoded
    sync_vae: Optional[str] = None  # a cheaper decoder for the sync loss only (TAESD3: AutoencoderTiny folder/hub id)
    sync_decode_scale: float = 1.0  # resize x0 latents by this before the sync decode (0.5: 4x fewer pixels)

    def __post_init__(self):
        if self.device != "auto":  # at validation: `cuda` on a machine without CUDA is a config error, before loading
            check_device(self.device, "denoiser.device")
        if not 1 <= int(self.max_sequence_length) <= MAX_SEQUENCE_LENGTH:
            raise ConfigError("denoiser.max_sequence_length",
                              f"must be in [1, {MAX_SEQUENCE_LENGTH}], got {self.max_sequence_length}")
        check_sync_decode_scale(self.sync_decode_scale)


class SD3PromptEmbedding(NamedTuple):
    """A prompt's SD3 conditioning for classifier-free guidance: token embeddings (CLIP-L and CLIP-G side by side,
    then T5) and the pooled projections of both CLIPs, per branch."""

    negative: torch.Tensor  # ``[1, 77 + max_sequence_length, joint_attention_dim]``
    positive: torch.Tensor
    negative_pooled: torch.Tensor  # ``[1, pooled_projection_dim]``
    pooled: torch.Tensor


def sd3_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` is bfloat16 on CUDA, the precision SD3.5 is published and run in (float16 only when asked)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return torch_dtype(name, device)


class SD3Denoiser(SyncDecoding, TextEncoderOffload, Denoiser):
    """SD3 / SD3.5 MMDiT + three text encoders + 16-channel VAE, from any source diffusers can load."""

    Config = SD3Config
    latent_factor = 8
    latent_channels = 16
    prediction_type = "flow_prediction"

    def __init__(self, config: SD3Config | None = None):
        super().__init__(config)
        c = self.config
        self.device = torch_device(c.device)
        self.dtype = sd3_dtype(c.dtype, self.device)
        self.is_tiny = c.pretrained == TINY_MODEL
        self.pipe = self._load_pipeline()
        for tokenizer in (self.pipe.tokenizer, self.pipe.tokenizer_2) + ((self.pipe.tokenizer_3,) if c.t5 else ()):
            check_tokenizer(tokenizer, c.pretrained)
        self.pipe.to(self.device)
        for module in self._modules_in_use():
            module.requires_grad_(False)
            module.eval()
        self.transformer = self.pipe.transformer
        self.vae = self.pipe.vae
        if c.gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()
        self.scheduler_config = dict(self.pipe.scheduler.config)
        self.latent_channels = int(self.transformer.config.in_channels)
        self.latent_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.patch_size = int(self.transformer.config.patch_size)
        self.text_encoders_offloaded = False
        self.sync_decoder = self.load_sync_decoder()

    # ----------------------------------------------------------------------------------------------------- loading

    def _load_pipeline(self):
        from diffusers import StableDiffusion3Pipeline

        c = self.config
        kwargs: dict[str, Any] = hub_kwargs(c)
        if c.single_file_config:
            kwargs["single_file_config"] = c.single_file_config
        if not c.t5:  # as diffusers documents: the pipeline then feeds zeros where T5's tokens go
            kwargs.update(text_encoder_3=None, tokenizer_3=None)
        ref = c.pretrained
        if self.is_tiny:
            from .tiny import tiny_model_path

            log.warning("%s: the built-in tiny SD3 with RANDOM weights: images are noise-like (smoke runs only)", ref)
            ref = str(tiny_model_path())
        elif c.single_file_config and Path(ref).expanduser().is_file():
            kwargs.update(self._encoders_not_in(Path(ref).expanduser(), c.single_file_config, c.t5))
        return load_pipeline(StableDiffusion3Pipeline, ref, self.dtype, **kwargs)

    def _encoders_not_in(self, checkpoint: Path, config: str, t5: bool) -> dict[str, Any]:
        """The text encoders a single-file checkpoint lacks (SD3.5's files hold the transformer and VAE; some add
        the CLIPs, few T5), loaded from ``single_file_config``: diffusers' single-file loader would refuse them."""
        if checkpoint.suffix != ".safetensors":
            return {}  # reading a pickle's names costs a full load: diffusers decides
        from safetensors import safe_open
        from transformers import CLIPTextModelWithProjection, T5EncoderModel

        with safe_open(str(checkpoint), framework="pt") as f:
            prefixes = {key.split(".", 2)[1] for key in f.keys() if key.startswith("text_encoders.")}
        wanted = [("text_encoder", "clip_l", CLIPTextModelWithProjection),
                  ("text_encoder_2", "clip_g", CLIPTextModelWithProjection)] + (
            [("text_encoder_3", "t5xxl", T5EncoderModel)] if t5 else [])
        out = {}
        for name, prefix, cls in wanted:
            if prefix in prefixes:
                continue
            try:
                out[name] = cls.from_pretrained(config, subfolder=name, torch_dtype=self.dtype)
            except (OSError, ValueError) as exc:
                raise _not_found(config, f"{name} for the single-file checkpoint (denoiser.single_file_config)",
                                 exc) from exc
        return out

    def _modules_in_use(self) -> list[torch.nn.Module]:
        p = self.pipe
        return [m for m in (p.transformer, p.vae, p.text_encoder, p.text_encoder_2, p.text_encoder_3) if m is not None]

    @property
    def default_window(self) -> int:
        return int(self.transformer.config.sample_size) * self.latent_factor

    def describe(self) -> dict[str, Any]:
        out = {"pretrained": self.config.pretrained, "prediction_type": self.prediction_type,
               "dtype": str(self.dtype).replace("torch.", ""), "device": str(self.device), "t5": self.config.t5,
               "max_sequence_length": self.config.max_sequence_length}
        if self.is_tiny:
            out["warning"] = "random weights (built-in tiny model)"
        return out

    @classmethod
    def check_run(cls, spec: ResolvedSpec, views: Sequence[View]) -> None:
        """Before any weights load: a flow scheduler, and windows that tile into the transformer's patches."""
        from omegaconf import OmegaConf

        s = spec.config.sampler
        check_flow_scheduler(str(s.scheduler), OmegaConf.to_container(s.scheduler_options), "sd3")
        factor = cls.latent_factor
        for view in views:
            h, w = view.latent_size
            if h % PATCH_SIZE or w % PATCH_SIZE:
                raise ConfigError("tiler.window", f"a {h * factor}x{w * factor} px window is {h}x{w} latents, not a "
                                  f"multiple of sd3's patch size {PATCH_SIZE}; use windows that are multiples of "
                                  f"{PATCH_SIZE * factor} px")

    # --------------------------------------------------------------------------------------------------- inference

    def make_scheduler(self, name: str, **options: Any):
        return make_scheduler(name, self.scheduler_config, **options)

    def set_timesteps(self, scheduler: Any, steps: int, views: Sequence[View]) -> None:
        """As StableDiffusion3Pipeline sets them; with ``use_dynamic_shifting``, ``mu`` comes from ONE window's
        sequence length (the first view's), so each window is sampled as at its own resolution, whatever the
        canvas."""
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

        kwargs: dict[str, Any] = {}
        config = scheduler.config
        if config.get("use_dynamic_shifting", None):
            h, w = views[0].latent_size
            seq_len = (h // self.patch_size) * (w // self.patch_size)
            kwargs["mu"] = calculate_shift(seq_len, config.get("base_image_seq_len", 256),
                                           config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                                           config.get("max_shift", 1.16))
        scheduler.set_timesteps(steps, device=self.device, **kwargs)

    def encode_prompt(self, prompt: str, negative_prompt: str = "") -> SD3PromptEmbedding:
        self.text_encoders_to(self.device)
        positive, negative, pooled, negative_pooled = self.pipe.encode_prompt(
            prompt, None, None, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=True,
            negative_prompt=negative_prompt or None, max_sequence_length=self.config.max_sequence_length,
        )
        return SD3PromptEmbedding(negative=negative, positive=positive, negative_pooled=negative_pooled, pooled=pooled)

    def text_encoder_modules(self):
        return (self.pipe.text_encoder, self.pipe.text_encoder_2, self.pipe.text_encoder_3)  # CLIP-L, CLIP-G, T5

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
        """Extra keyword arguments of the transformer call for this batch (one row per entry of ``views``;
        ``cond_mask`` flags the conditional rows of the CFG batch): the hook conditioning composes through, as SD's
        ``unet_kwargs`` (a transformer ControlNet adds ``block_controlnet_hidden_states``). None for plain SD3."""
        return {}

    def transformer_forward(self, latents: torch.Tensor, step: Step, hidden: torch.Tensor, pooled: torch.Tensor,
                            views: Sequence[View] = (), cond_mask: torch.Tensor | None = None,
                            context: RequestContext = NO_CONTEXT) -> torch.Tensor:
        """One MMDiT call on a batch, as the pipeline makes it (the timestep broadcast over the batch), with the
        keyword arguments of :meth:`transformer_kwargs`."""
        if cond_mask is None:
            cond_mask = torch.ones(latents.shape[0], dtype=torch.bool, device=latents.device)
        kwargs = self.transformer_kwargs(latents, step, hidden, pooled, views, cond_mask, context)
        timestep = step.timestep.to(latents.device).expand(latents.shape[0])
        return self.transformer(hidden_states=latents, timestep=timestep, encoder_hidden_states=hidden,
                                pooled_projections=pooled, return_dict=False, **kwargs)[0]

    def predict(
        self,
        latents: torch.Tensor,
        step: Step,
        conds: Sequence[Conditioning],
        views: Sequence[View],
        context: RequestContext = NO_CONTEXT,
    ) -> torch.Tensor:
        self.text_encoders_to(torch.device("cpu"))
        x = latents.to(self.dtype)
        scales = torch.tensor([c.guidance_scale for c in conds], device=x.device, dtype=torch.float32)
        embeds = [SD3PromptEmbedding(*c.embedding) for c in conds]
        positive = torch.cat([e.positive for e in embeds])
        pooled = torch.cat([e.pooled for e in embeds])
        if bool((scales <= 1).all()):  # no guidance: conditional branch only (as the pipeline does)
            return self.transformer_forward(x, step, positive, pooled, views, None, context).float()
        negative = torch.cat([e.negative for e in embeds])
        negative_pooled = torch.cat([e.negative_pooled for e in embeds])
        n = x.shape[0]
        mask = torch.cat([torch.zeros(n, dtype=torch.bool), torch.ones(n, dtype=torch.bool)]).to(x.device)
        out = self.transformer_forward(torch.cat([x, x]), step, torch.cat([negative, positive]),
                                       torch.cat([negative_pooled, pooled]), list(views) * 2, mask, context)
        uncond, cond = out.float().chunk(2)
        g = scales.view(-1, 1, 1, 1)
        return uncond + g * (cond - uncond)

    # ---------------------------------------------------------------------------------------------------- decoding

    @property
    def _shift(self) -> float:
        return float(self.vae.config.shift_factor or 0.0)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """SD3's VAE reads ``latents / scaling + shift`` (the engine's latents are the transformer's)."""
        z = latents.to(self.dtype) / self.vae.config.scaling_factor + self._shift
        return self.vae.decode(z).sample.float()

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`decode`'s latent map, on the posterior mean (region bootstrapping, image inputs)."""
        posterior = self.vae.encode(images.to(self.device, self.dtype)).latent_dist
        return ((posterior.mean - self._shift) * self.vae.config.scaling_factor).float()

    def tiny_decoder_input(self, latents: torch.Tensor) -> torch.Tensor:
        """TAESD3 reads what diffusers gives a pipeline's VAE: latents over its scale plus its shift."""
        config = self.sync_decoder.config
        return latents.to(self.dtype) / config.scaling_factor + float(config.get("shift_factor", 0.0) or 0.0)

    def decode_final(self, latents: torch.Tensor, tiled: bool = False) -> torch.Tensor:
        if tiled:
            self.vae.enable_tiling()
        try:
            with torch.no_grad():
                return self.decode(latents)
        finally:
            if tiled:
                self.vae.disable_tiling()
