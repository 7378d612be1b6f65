"""A tiny SDXL-shaped model with RANDOM weights: for offline smoke runs and tests only.

It keeps what makes SDXL differ from SD 1/2: two CLIP text encoders (the second with a projection, whose pooled
output conditions the UNet), hidden states concatenated to the UNet's cross-attention width, and the "text_time"
added embedding that reads the micro-conditioning (original size, crop offset, target size). Sizes follow diffusers'
own tiny SDXL test models, shrunk further; it is saved with ``save_pretrained`` and loaded through the engine's
loader like any real model.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path

TINY_SDXL_FOLDER = "tiny-random-sdxl-v1"
TEXT_WIDTH = 32  # each text encoder's hidden size; the UNet's cross-attention width is their sum
TIME_EMBED_DIM = 8  # per micro-conditioning number (six of them)


def build_tiny_sdxl_pipeline(path: str | Path, seed: int = 0, sample_size: int = 128,
                             time_cond_proj_dim: int | None = None) -> Path:
    """Build and ``save_pretrained`` a tiny random SDXL pipeline into ``path`` (renamed into place whole); returns
    the path. ``time_cond_proj_dim``: a guidance-embedding UNet, as LCM-distilled SDXL UNets have."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModelWithProjection

    from syncengine_sd.tiny import _replace_folder, clip_text_encoder, sd_ddim_scheduler, sd_vae, tiny_tokenizer

    path = Path(path)
    import torch

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_DIM,
        transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=6 * TIME_EMBED_DIM + TEXT_WIDTH,  # time ids + pooled projection
        cross_attention_dim=2 * TEXT_WIDTH,
        norm_num_groups=8,
        time_cond_proj_dim=time_cond_proj_dim,
    )
    vae = sd_vae((16, 16, 16, 16), sample_size * 8, force_upcast=True, scaling_factor=0.13025)
    with tempfile.TemporaryDirectory() as src:
        tokenizer = tiny_tokenizer(Path(src) / "one")
        tokenizer_2 = tiny_tokenizer(Path(src) / "two")
    text_encoder = clip_text_encoder(tokenizer, hidden_size=TEXT_WIDTH, intermediate_size=37)
    encoder_2 = clip_text_encoder(tokenizer_2, hidden_size=TEXT_WIDTH, intermediate_size=37)
    config_2 = encoder_2.config
    config_2.projection_dim = TEXT_WIDTH
    text_encoder_2 = CLIPTextModelWithProjection(config_2)
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=sd_ddim_scheduler(), force_zeros_for_empty_prompt=True,
    )
    tmp = path.with_name(f"{path.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        pipe.save_pretrained(tmp)
        _replace_folder(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def tiny_sdxl_path() -> Path:
    """The built-in tiny SDXL model's folder in the engine's cache (``SYNCENGINE_CACHE``), built on first use under
    the same lock as the SD tiny model's."""
    from syncengine_sd.tiny import _build_lock, _cache_dir, cache_stamp, writable_cache_dir

    path = _cache_dir() / TINY_SDXL_FOLDER
    if (path / "model_index.json").is_file():
        return path
    root = writable_cache_dir()
    with _build_lock(root, TINY_SDXL_FOLDER):
        if cache_stamp(path) is None:
            build_tiny_sdxl_pipeline(path)
    return path
