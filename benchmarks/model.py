"""The benchmark model: Stable-Diffusion-2-shaped, narrow, RANDOM weights, built once and saved like a real one.

What is kept from SD 2 (base): the UNet's four levels (three cross-attention levels, one plain), linear attention
projections, 64x64 latents for a 512 px window, 4 latent channels; the VAE's four decoder levels (8x latent factor,
512 px tiles); a CLIP text encoder and tokenizer; the DDIM configuration. What is smaller: channel widths (UNet 1/10,
VAE 1/8), one layer per block instead of two, few attention heads, a 2-layer text encoder. The tiny autoencoder is
TAESD-shaped (AutoencoderTiny, 1/4 width). The loss network (LPIPS-VGG) is the real one, with random backbone weights.

The sizes were picked so that, on 2 CPU cores, one batch-2 UNet forward at 64x64 latents costs about a sixth of a
512 px VAE decode with its backward, the ratio the real SD-2 shows on this machine (16 s vs 99 s); see
docs/performance.md. Timings of this model say how the *structure* of each method scales, not how fast SD runs.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

VERSION = "v1"
UNET_CHANNELS = (32, 64, 128, 128)  # SD 2: (320, 640, 1280, 1280)
UNET_HEADS = (1, 1, 2, 2)  # head width 32-64 (SD 2: 64)
VAE_CHANNELS = (16, 32, 64, 64)  # SD 2: (128, 256, 512, 512)
TAESD_CHANNELS = 16  # TAESD: 64


def _cache_root() -> Path:
    root = os.environ.get("SYNCENGINE_CACHE") or Path.home() / ".cache" / "syncengine"
    return Path(root)


def bench_model_paths(root: Path | None = None) -> tuple[Path, Path]:
    """(pipeline folder, AutoencoderTiny folder), built on first use."""
    root = Path(root) if root is not None else _cache_root()
    pipe, taesd = root / f"bench-sd2-shaped-{VERSION}", root / f"bench-taesd-shaped-{VERSION}"
    if not (pipe / "model_index.json").is_file():
        _atomic_save(build_pipeline(), pipe)
    if not (taesd / "config.json").is_file():
        _atomic_save(build_taesd(), taesd)
    return pipe, taesd


def _atomic_save(model, path: Path) -> None:
    tmp = path.with_name(path.name + f".partial-{os.getpid()}")
    model.save_pretrained(tmp)
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)


def build_pipeline(seed: int = 0):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from syncengine_sd.tiny import clip_text_encoder, sd_ddim_scheduler, sd_vae, tiny_tokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=UNET_CHANNELS,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=64,
        attention_head_dim=UNET_HEADS,  # diffusers' legacy name: the number of heads per level
        use_linear_projection=True,
        norm_num_groups=8,
    )
    vae = sd_vae(VAE_CHANNELS, 512, scaling_factor=0.18215)
    import tempfile

    with tempfile.TemporaryDirectory() as src:
        tokenizer = tiny_tokenizer(Path(src))
    text_encoder = clip_text_encoder(tokenizer, hidden_size=64, intermediate_size=128)
    scheduler = sd_ddim_scheduler()
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def build_taesd(seed: int = 0):
    """A TAESD-shaped AutoencoderTiny (same block counts, 8x factor), random weights."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    return AutoencoderTiny(
        encoder_block_out_channels=(TAESD_CHANNELS,) * 4,
        decoder_block_out_channels=(TAESD_CHANNELS,) * 4,
        latent_channels=4,
    )
