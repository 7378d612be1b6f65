"""The cheaper decode the sync loss differentiates through, shared by every latent-diffusion family.

The sync backward runs through the decoder once per synced view and step, and the decoder's cost grows with pixels:
``sync_decode_scale`` shrinks the x0 latents first (anchor and views alike; the loss then compares coarser images),
``sync_vae`` swaps the decoder for a tiny one (TAESD, TAESDXL, TAESD3, TAEF1: diffusers' ``AutoencoderTiny``). The final
image always comes from the model's own VAE.
"""
from __future__ import annotations

import torch

from syncengine.errors import ConfigError


def check_sync_decode_scale(scale: float) -> None:
    if not 0 < scale <= 1:
        raise ConfigError("denoiser.sync_decode_scale", f"must be in (0, 1], got {scale}")


class SyncDecoding:
    """Mixin for a :class:`~syncengine.denoiser.Denoiser` whose config has ``sync_vae`` and ``sync_decode_scale``;
    call :meth:`load_sync_decoder` once the model's ``dtype`` and ``device`` are set."""

    sync_decoder = None

    def load_sync_decoder(self):
        if not self.config.sync_vae:
            return None
        from diffusers import AutoencoderTiny

        from .loading import _not_found

        ref = self.config.sync_vae
        try:
            vae = AutoencoderTiny.from_pretrained(ref, torch_dtype=self.dtype)
        except (OSError, ValueError) as exc:
            raise _not_found(ref, "tiny autoencoder (denoiser.sync_vae)", exc) from exc
        vae.requires_grad_(False).eval().to(self.device)
        return vae

    def tiny_decoder_input(self, latents: torch.Tensor) -> torch.Tensor:
        """The engine's latents as the tiny decoder reads them (a family whose VAE shifts its latents overrides)."""
        return latents.to(self.dtype) / self.sync_decoder.config.scaling_factor

    def sync_image_size(self, latent_size: tuple[int, int]) -> tuple[int, int]:
        scale = self.config.sync_decode_scale
        return tuple(max(1, round(s * scale)) * self.latent_factor for s in latent_size)  # type: ignore[return-value]

    def decode_for_sync(self, latents: torch.Tensor) -> torch.Tensor:
        scale = self.config.sync_decode_scale
        if scale != 1:
            size = [max(1, round(s * scale)) for s in latents.shape[-2:]]
            latents = torch.nn.functional.interpolate(latents, size=size, mode="bilinear", antialias=True,
                                                      align_corners=False)
        if self.sync_decoder is None:
            return self.decode(latents)
        return self.sync_decoder.decode(self.tiny_decoder_input(latents)).sample.float()
