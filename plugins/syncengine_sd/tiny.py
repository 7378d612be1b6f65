"""A tiny Stable-Diffusion-shaped model with RANDOM weights: for offline smoke runs and tests only.

It keeps SD's interfaces and geometry (8x latent factor, 4 latent channels, CLIP-style tokenizer, DDIM config) so
that every code path runs, but its images are noise-like: it has never been trained. It is built once, saved with
``save_pretrained`` and then loaded through the same loader as any real model.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

TINY_NOTICE = "using the built-in tiny model with RANDOM weights: images are noise-like (smoke runs only)"


def _cache_dir() -> Path:
    root = os.environ.get("SYNCENGINE_CACHE") or Path.home() / ".cache" / "syncengine"
    return Path(root)


def tiny_model_path() -> Path:
    """The demo model's folder, built on first use."""
    path = _cache_dir() / "tiny-random-sd-v1"
    if not (path / "model_index.json").is_file():
        build_tiny_pipeline(path)
    return path


def tiny_tokenizer(folder: Path):
    """A byte-level CLIP tokenizer (every byte is a token, no merges): works for any text, offline."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols)}
    for s in symbols:
        vocab[s + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def clip_text_encoder(tokenizer, hidden_size: int, intermediate_size: int, layers: int = 2, heads: int = 4):
    """A random-weight CLIP text encoder sized for ``tokenizer`` (SD's text tower, shrunk)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))


def sd_vae(block_out_channels: tuple[int, ...], sample_size: int, **options):
    """A random-weight SD-shaped VAE: four levels (8x latent factor), 4 latent channels, one layer per block."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=block_out_channels,
                         layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=sample_size, **options)


def sd_ddim_scheduler(prediction_type: str = "epsilon"):
    """The DDIM configuration Stable Diffusion ships with."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)


def build_tiny_pipeline(path: str | Path, seed: int = 0, prediction_type: str = "epsilon", sample_size: int = 64):
    """Build and ``save_pretrained`` a tiny random SD pipeline into ``path``; returns the path."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    path = Path(path)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    vae = sd_vae((16, 16, 16, 16), sample_size * 8)
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory() as src:
        tokenizer = tiny_tokenizer(Path(src))
    text_encoder = clip_text_encoder(tokenizer, hidden_size=32, intermediate_size=37)
    scheduler = sd_ddim_scheduler(prediction_type)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    tmp = path.with_name(path.name + f".partial-{os.getpid()}")
    pipe.save_pretrained(tmp)
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)
    return path
