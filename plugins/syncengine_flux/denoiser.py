"""The ``flux`` denoiser: FLUX.1 dev and schnell, rectified-flow transformers, through diffusers.

The canvas stays an unpacked latent image ``[B, 16, h, w]`` (every tiler, merger and the sync loss work on it as on
SD's); ``predict`` packs each window into 2x2 tokens with the position ids of a standalone image of its size, runs the
transformer and unpacks the velocity ``eps - x0``. Guidance: dev is guidance-distilled (the view's guidance scale is
its guidance embedding), schnell has none; true classifier-free guidance with the request's negative prompt is an
option (``true_cfg_scale``).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Optional, Sequence

import numpy as np
import torch

from syncengine.denoiser import NO_CONTEXT, Conditioning, Denoiser, RequestContext, Step
from syncengine.errors import ConfigError, ModelNotFoundError, one_line
from syncengine.schedulers import check_flow_scheduler, make_scheduler
from syncengine.views import View
from syncengine_sd.loading import (
    TINY_MODEL,
    check_device,
    check_tokenizer,
    hub_kwargs,
    load_pipeline,
    torch_device,
    torch_dtype,
)
from syncengine_sd.model_files import load_single_file
from syncengine_sd.sync_decoding import SyncDecoding, check_sync_decode_scale
from syncengine_sd.text_encoders import TextEncoderOffload

from .packing import image_ids, pack, unpack, window_sequence_length

if TYPE_CHECKING:
    from syncengine.config import ResolvedSpec

log = logging.getLogger(__name__)

FAMILY = "FLUX"
DEV = "black-forest-labs/FLUX.1-dev"
SCHNELL = "black-forest-labs/FLUX.1-schnell"
T5_LIMIT = 512  # FLUX's T5 sequence is at most 512 tokens (diffusers refuses more)


@dataclass
class FluxConfig:
    pretrained: str = DEV  # hub id, local diffusers folder, or a single-file transformer checkpoint (.safetensors)
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU
    device: str = "auto"  # auto: CUDA when present
    revision: Optional[str] = None
    variant: Optional[str] = None
    single_file_config: Optional[str] = None  # single file: folder/hub id of the other parts (unset: dev/schnell)
    max_sequence_length: Optional[int] = None  # T5 tokens; unset: 512 for dev, 256 for schnell (as diffusers' docs)
    true_cfg_scale: float = 1.0  # > 1: true CFG against the request's negative prompt (two transformer passes)
    gradient_checkpointing: bool = False  # recompute transformer activations in the sync backward
    text_encoders_to_cpu: bool = False  # move CLIP and T5 off the accelerator once a request's prompts are encoded
    sync_vae: Optional[str] = None  # a cheaper decoder for the sync loss only (TAEF1: madebyollin/taef1)
    sync_decode_scale: float = 1.0  # resize x0 latents by this before the sync decode

    def __post_init__(self):
        if self.device != "auto":
            check_device(self.device, "denoiser.device")
        if self.max_sequence_length is not None and not 1 <= self.max_sequence_length <= T5_LIMIT:
            raise ConfigError("denoiser.max_sequence_length",
                              f"must be in 1..{T5_LIMIT} (FLUX's T5 limit), got {self.max_sequence_length}")
        if self.true_cfg_scale < 0:
            raise ConfigError("denoiser.true_cfg_scale", f"must be >= 0 (<= 1 turns it off), got {self.true_cfg_scale}")
        check_sync_decode_scale(self.sync_decode_scale)


class FluxPrompt(NamedTuple):
    """A prompt as FLUX reads it: the T5 sequence and CLIP's pooled vector, and the negative prompt's when true CFG
    is on (else None)."""

    text: torch.Tensor  # [1, max_sequence_length, joint_attention_dim]
    pooled: torch.Tensor  # [1, pooled_projection_dim]
    negative_text: Optional[torch.Tensor] = None
    negative_pooled: Optional[torch.Tensor] = None


def calculate_shift(seq_len: int, config: dict) -> float:
    """FLUX's resolution-dependent shift ``mu``: linear in the image's token count between the scheduler's base and
    max sequence lengths (FluxPipeline's rule, with the same config keys and defaults)."""
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    m = (max_shift - base_shift) / (max_len - base_len)
    return seq_len * m + base_shift - m * base_len


def twice(value: Any) -> Any:
    """A batch-first keyword argument for the doubled true-CFG batch: tensors (or lists of them) repeated, row for
    row, for the negative half; anything else (flags) as it is."""
    if isinstance(value, torch.Tensor):
        return torch.cat([value, value])
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, torch.Tensor) for v in value):
        return type(value)(torch.cat([v, v]) for v in value)
    return value


def single_file_family(path: Path) -> str:
    """The hub id whose configs fit a single-file transformer: dev when it has a guidance embedding, else schnell."""
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except Exception:  # noqa: BLE001 - not a readable safetensors file: the loader says what is wrong with it
        return DEV
    return DEV if any(k.startswith(("guidance_in.", "time_text_embed.guidance_embedder.")) for k in keys) else SCHNELL


class FluxDenoiser(SyncDecoding, TextEncoderOffload, Denoiser):
    """FLUX.1 transformer + CLIP and T5 text encoders + a 16-channel VAE with shift and scale."""

    Config = FluxConfig
    latent_factor = 8
    latent_channels = 16
    prediction_type = "flow_prediction"

    def __init__(self, config: FluxConfig | None = None):
        super().__init__(config)
        c = self.config
        self.device = torch_device(c.device)
        self.dtype = torch.bfloat16 if c.dtype == "auto" and self.device.type == "cuda" else \
            torch_dtype(c.dtype, self.device)
        self.pipe = self._load_pipeline()
        check_tokenizer(self.pipe.tokenizer, c.pretrained)
        check_tokenizer(self.pipe.tokenizer_2, c.pretrained)
        self.pipe.to(self.device)
        for module in (self.pipe.transformer, self.pipe.vae, self.pipe.text_encoder, self.pipe.text_encoder_2):
            module.requires_grad_(False)
            module.eval()
        if c.gradient_checkpointing:
            self.pipe.transformer.enable_gradient_checkpointing()
        self.transformer = self.pipe.transformer
        self.vae = self.pipe.vae
        self.scheduler_config = dict(self.pipe.scheduler.config)
        self.guidance_embeds = bool(self.transformer.config.guidance_embeds)
        self.max_sequence_length = c.max_sequence_length or (T5_LIMIT if self.guidance_embeds else 256)
        self.latent_channels = self.transformer.config.in_channels // 4
        self.latent_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.text_encoders_offloaded = False
        self.sync_decoder = self.load_sync_decoder()

    # ----------------------------------------------------------------------------------------------------- loading

    def _load_pipeline(self):
        from diffusers import FluxPipeline

        c = self.config
        kwargs: dict[str, Any] = hub_kwargs(c)
        if c.pretrained == TINY_MODEL:  # the offline smoke model: random weights
            from .tiny import TINY_NOTICE, tiny_flux_path

            log.warning("%s (flux): %s", TINY_MODEL, TINY_NOTICE)
            return load_pipeline(FluxPipeline, str(tiny_flux_path()), self.dtype)
        path = Path(c.pretrained).expanduser()
        if path.is_file():  # a transformer checkpoint; the text encoders, VAE and scheduler come from its config
            if c.single_file_config:
                kwargs["transformer"] = self._load_single_file_transformer(path, c.single_file_config)
                return load_pipeline(FluxPipeline, c.single_file_config, self.dtype, **kwargs)
            guess = single_file_family(path)
            try:
                kwargs["transformer"] = self._load_single_file_transformer(path, guess)
                return load_pipeline(FluxPipeline, guess, self.dtype, **kwargs)
            except ModelNotFoundError as exc:
                raise ModelNotFoundError(
                    f"single-file checkpoint {c.pretrained!r} holds the transformer only; its other parts (text "
                    f"encoders, VAE, configs) come from denoiser.single_file_config, unset, so {guess} was tried "
                    f"and could not be loaded ({one_line(exc.__cause__ or exc, 160)}); set "
                    f"denoiser.single_file_config to a local FLUX diffusers folder or a downloaded hub id") from exc
        return load_pipeline(FluxPipeline, c.pretrained, self.dtype, **kwargs)

    def _load_single_file_transformer(self, path: Path, config: str):
        from diffusers import FluxTransformer2DModel

        return load_single_file(
            lambda: FluxTransformer2DModel.from_single_file(str(path), config=config, subfolder="transformer",
                                                            torch_dtype=self.dtype),
            path, f"single-file checkpoint {self.config.pretrained!r}", config, "denoiser.single_file_config",
            "a FLUX diffusers folder or hub id")

    @property
    def default_window(self) -> int:
        return 128 * self.latent_factor  # FluxPipeline's default sample size: 1024 px

    def describe(self) -> dict[str, Any]:
        out = {"pretrained": self.config.pretrained, "prediction_type": self.prediction_type,
               "guidance_embeds": self.guidance_embeds, "max_sequence_length": self.max_sequence_length,
               "true_cfg_scale": self.config.true_cfg_scale, "dtype": str(self.dtype).replace("torch.", ""),
               "device": str(self.device)}
        if self.config.pretrained == TINY_MODEL:
            out["warning"] = "random weights (built-in tiny model)"
        return out

    # -------------------------------------------------------------------------------------------------- validation

    @classmethod
    def check_run(cls, spec: ResolvedSpec, views: Sequence[View]) -> None:
        """Before any weights load: a flow scheduler, and windows FLUX can pack 2x2 (even latent sizes)."""
        sampler = spec.config.sampler
        check_flow_scheduler(str(sampler.scheduler), dict(sampler.scheduler_options or {}), FAMILY)
        f = cls.latent_factor
        for view in views:
            h, w = view.latent_size
            if h % 2 or w % 2:
                raise ConfigError("tiler.window", f"{FAMILY} packs latents in 2x2 patches: view {view.index} is "
                                                  f"{h * f}x{w * f} px ({h}x{w} latents, odd); use windows (and "
                                                  f"strides) in multiples of {2 * f} px")

    # --------------------------------------------------------------------------------------------------- inference

    def make_scheduler(self, name: str, **options: Any):
        return make_scheduler(name, self.scheduler_config, **options)

    def set_timesteps(self, scheduler: Any, steps: int, views: Sequence[View]) -> None:
        """FluxPipeline's schedule: sigmas ``linspace(1, 1/steps)`` shifted by ``mu`` of ONE window's token count, so
        that every window is sampled as a standalone image of its size is, whatever the canvas."""
        config = scheduler.config
        sigmas = None if config.get("use_flow_sigmas", False) else np.linspace(1.0, 1 / steps, steps)
        mu = calculate_shift(window_sequence_length(views[0].latent_size), config)
        kwargs = {"sigmas": sigmas} if sigmas is not None else {"num_inference_steps": steps}
        scheduler.set_timesteps(device=self.device, mu=mu, **kwargs)
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(0)

    @property
    def true_cfg(self) -> bool:
        return self.config.true_cfg_scale > 1

    def encode_prompt(self, prompt: str, negative_prompt: str = "") -> FluxPrompt:
        self.text_encoders_to(self.device)
        text, pooled = self._encode(prompt)
        if not self.true_cfg:
            return FluxPrompt(text, pooled)
        negative_text, negative_pooled = self._encode(negative_prompt or "")
        return FluxPrompt(text, pooled, negative_text, negative_pooled)

    def _encode(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        text, pooled, _ = self.pipe.encode_prompt(prompt, None, device=self.device, num_images_per_prompt=1,
                                                  max_sequence_length=self.max_sequence_length)
        return text, pooled

    def text_encoder_modules(self):
        return (self.pipe.text_encoder, self.pipe.text_encoder_2)  # CLIP, T5

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
        """Extra keyword arguments of the transformer call for the positive batch (one row per view; ``scales`` are
        the views' guidance scales): the hook conditioning composes through, as SD's ``unet_kwargs`` (a transformer
        ControlNet adds its block samples). With true CFG the negative pass reuses them, as FluxControlNetPipeline
        does. None for plain FLUX."""
        return {}

    def transformer_forward(self, tokens: torch.Tensor, step: Step, text: torch.Tensor, pooled: torch.Tensor,
                            guidance: Optional[torch.Tensor], ids: torch.Tensor,
                            extra: Optional[dict[str, Any]] = None) -> torch.Tensor:
        """One transformer call on packed tokens, as FluxPipeline makes it (timestep in [0, 1]); ``extra`` holds
        the keyword arguments of :meth:`transformer_kwargs`."""
        t = torch.as_tensor(step.timestep, device=tokens.device).expand(tokens.shape[0]).to(tokens.dtype)
        txt_ids = torch.zeros(text.shape[1], 3, device=tokens.device, dtype=text.dtype)
        return self.transformer(hidden_states=tokens, timestep=t / 1000, guidance=guidance,
                                pooled_projections=pooled, encoder_hidden_states=text, txt_ids=txt_ids, img_ids=ids,
                                return_dict=False, **(extra or {}))[0]

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
        _, _, h, w = x.shape
        tokens = pack(x)
        ids = image_ids(h, w, x.device, x.dtype)
        prompts = [FluxPrompt(*c.embedding) for c in conds]
        text = torch.cat([p.text for p in prompts])
        pooled = torch.cat([p.pooled for p in prompts])
        scales = torch.tensor([c.guidance_scale for c in conds], device=x.device, dtype=torch.float32)
        guidance = scales if self.guidance_embeds else None  # guidance-distilled (dev): an input of the network
        extra = self.transformer_kwargs(tokens, step, text, pooled, scales, ids, views, context)
        if not self.true_cfg:
            return unpack(self.transformer_forward(tokens, step, text, pooled, guidance, ids, extra), h, w).float()
        negative_text = torch.cat([p.negative_text for p in prompts])
        negative_pooled = torch.cat([p.negative_pooled for p in prompts])
        both = self.transformer_forward(torch.cat([tokens, tokens]), step, torch.cat([negative_text, text]),
                                        torch.cat([negative_pooled, pooled]),
                                        None if guidance is None else torch.cat([guidance, guidance]), ids,
                                        {k: twice(v) for k, v in extra.items()})
        negative, positive = unpack(both, h, w).float().chunk(2)
        return negative + self.config.true_cfg_scale * (positive - negative)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        config = self.vae.config
        return self.vae.decode(latents.to(self.dtype) / config.scaling_factor + config.shift_factor).sample.float()

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        posterior = self.vae.encode(images.to(self.device, self.dtype)).latent_dist
        config = self.vae.config
        return ((posterior.mean - config.shift_factor) * config.scaling_factor).float()

    def tiny_decoder_input(self, latents: torch.Tensor) -> torch.Tensor:
        """As FluxPipeline feeds a swapped-in TAEF1: through the tiny decoder's own scale and shift (1 and 0 for
        TAEF1, which reads the model's latents as they are)."""
        config = self.sync_decoder.config
        return latents.to(self.dtype) / config.scaling_factor + getattr(config, "shift_factor", 0.0)

    def decode_final(self, latents: torch.Tensor, tiled: bool = False) -> torch.Tensor:
        if tiled:
            self.vae.enable_tiling()
        try:
            with torch.no_grad():
                return self.decode(latents)
        finally:
            if tiled:
                self.vae.disable_tiling()
