"""The toy model's architecture: a Stable-Diffusion-format pipeline small enough to train on two CPU cores.

Every part is a stock diffusers/transformers class (AutoencoderKL, UNet2DConditionModel, CLIPTextModel, SD's DDIM
configuration), so the trained folder loads through the ``stable-diffusion`` denoiser like any SD checkpoint and no
inference code knows it is a toy. The VAE keeps SD's four levels (latent factor 8): the engine sizes a canvas's
latents from the denoiser class's factor before any weights load, so a model with another factor would sample at the
wrong size. Windows are 128 px, i.e. 16x16 latents, enough for the UNet to place ridges, trees and suns.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class ToyModelConfig:
    """Sizes of the toy pipeline (recorded in ``training.json``; the folder's own configs repeat them)."""

    image_size: int = 128  # training window in pixels (the model's default window)
    vae_channels: tuple[int, ...] = (16, 32, 64, 64)  # four levels: SD's latent factor 8; 16 at full size
    latent_channels: int = 4
    unet_channels: tuple[int, ...] = (32, 64, 112)  # keeps the folder under 20 MB in float32
    unet_layers: int = 1
    attention_head_dim: int = 8
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 4
    norm_groups: int = 8
    extra: dict = field(default_factory=dict)  # free-form notes kept with the settings

    @property
    def latent_factor(self) -> int:
        return 2 ** (len(self.vae_channels) - 1)

    def to_dict(self) -> dict:
        return asdict(self)


def build_vae(c: ToyModelConfig):
    """A small SD-shaped KL autoencoder; ``scaling_factor`` is set after training from the latents' spread. No
    attention in its mid block: it trains on crops, and attention (a softmax over every position) trained on 32 px
    crops failed on whole 128 px windows (L1 0.07 on crops, 0.37 on windows)."""
    from diffusers import AutoencoderKL

    levels = len(c.vae_channels)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * levels,
                         up_block_types=("UpDecoderBlock2D",) * levels, block_out_channels=c.vae_channels,
                         layers_per_block=1, latent_channels=c.latent_channels, norm_num_groups=c.norm_groups,
                         sample_size=c.image_size, mid_block_add_attention=False)


def build_unet(c: ToyModelConfig):
    """SD's UNet shrunk: cross-attention on the two coarser levels, where a global look is decided."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=c.image_size // c.latent_factor, in_channels=c.latent_channels, out_channels=c.latent_channels,
        layers_per_block=c.unet_layers, block_out_channels=c.unet_channels,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=c.text_hidden, attention_head_dim=c.attention_head_dim, norm_num_groups=c.norm_groups,
    )


def build_tokenizer(folder: Path):
    """The byte-level CLIP tokenizer of the built-in tiny model (no merges: any prompt tokenizes, offline)."""
    from syncengine_sd.tiny import tiny_tokenizer

    return tiny_tokenizer(folder)


def build_text_encoder(tokenizer, c: ToyModelConfig):
    from syncengine_sd.tiny import clip_text_encoder

    return clip_text_encoder(tokenizer, hidden_size=c.text_hidden, intermediate_size=2 * c.text_hidden,
                             layers=c.text_layers, heads=c.text_heads)


def build_scheduler():
    """Sampling: Stable Diffusion's own DDIM configuration (so every SD scheduler alias applies unchanged)."""
    from syncengine_sd.tiny import sd_ddim_scheduler

    return sd_ddim_scheduler("epsilon")


def build_training_scheduler():
    """Training: the DDPM forward process with the same betas as :func:`build_scheduler`."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(build_scheduler().config)
