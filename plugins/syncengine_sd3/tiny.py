"""A tiny SD3-shaped model with RANDOM weights: for offline smoke runs and tests only.

It keeps SD3's interfaces and geometry (three text encoders with CLIP-L/CLIP-G/T5 roles, an MMDiT with patch size 2,
a 16-channel VAE with shift and scale, 8x latent factor, a flow-matching scheduler) so that every code path runs;
its sizes follow diffusers' own tiny SD3 test components. Built once, saved with ``save_pretrained`` and loaded
through the same loader as any real model.
"""
from __future__ import annotations

import os
import shutil
import string
import tempfile
import uuid
from pathlib import Path

import torch

TINY_FOLDER = "tiny-random-sd3-v1"
CLIP_HIDDEN = 32  # each CLIP tower; their concatenation (64) is zero-padded to T5's width, as SD3's 2048 to 4096
T5_HIDDEN = 96  # the transformer's joint_attention_dim


def t5_tokenizer():
    """A character-level T5 tokenizer (a ``tokenizers`` Unigram model): any ASCII text, offline, no sentencepiece."""
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in string.ascii_letters + string.digits + string.punctuation]
    return T5TokenizerFast(vocab=pieces, extra_ids=0)


def t5_encoder(tokenizer, seed: int):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=T5_HIDDEN, d_kv=24, d_ff=64, num_layers=1, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    ))


def clip_with_projection(tokenizer, seed: int):
    """A CLIP text tower with a projection (SD3 pools both CLIPs' projected end-of-text features)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=CLIP_HIDDEN, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, projection_dim=CLIP_HIDDEN, max_position_embeddings=77, hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))


def sd3_vae(seed: int):
    """Four levels (8x latent factor), 16 latent channels, SD3's shift and scale, no quant convolutions."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8),
                         layers_per_block=1, latent_channels=16, norm_num_groups=8, sample_size=256,
                         use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)


def sd3_transformer(seed: int, sample_size: int = 32):
    """An MMDiT with SD3.5's features (a dual-attention block, RMS query/key norm), shrunk."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=sample_size, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=T5_HIDDEN,
        pooled_projection_dim=2 * CLIP_HIDDEN, dual_attention_layers=(0,), qk_norm="rms_norm",
    )


def build_tiny_sd3(path: str | Path, seed: int = 0, shift: float = 3.0, dynamic_shifting: bool = False):
    """Build and ``save_pretrained`` a tiny random StableDiffusion3Pipeline into ``path``; returns the path.
    ``dynamic_shifting``: a resolution-dependent shift (``mu``) instead of the fixed ``shift``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    from syncengine_sd.tiny import _replace_folder, tiny_tokenizer

    path = Path(path)
    with tempfile.TemporaryDirectory() as src:
        tokenizer = tiny_tokenizer(Path(src))
    t5_tok = t5_tokenizer()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift, use_dynamic_shifting=dynamic_shifting,
                                                base_image_seq_len=16, max_image_seq_len=256)
    pipe = StableDiffusion3Pipeline(
        transformer=sd3_transformer(seed), scheduler=scheduler, vae=sd3_vae(seed + 1),
        text_encoder=clip_with_projection(tokenizer, seed + 2), tokenizer=tokenizer,
        text_encoder_2=clip_with_projection(tokenizer, seed + 3), tokenizer_2=tokenizer,
        text_encoder_3=t5_encoder(t5_tok, seed + 4), tokenizer_3=t5_tok,
    )
    tmp = path.with_name(f"{path.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        pipe.save_pretrained(tmp)
        _replace_folder(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def tiny_model_path() -> Path:
    """The built-in tiny SD3 (``pretrained: syncengine:tiny-random``) in the model cache, built on first use; builders
    in several processes take turns (the SD tiny model's lock) and each build is renamed into place whole."""
    from syncengine_sd.tiny import _build_lock, _cache_dir, writable_cache_dir

    path = _cache_dir() / TINY_FOLDER
    if (path / "model_index.json").is_file():
        return path
    root = writable_cache_dir()
    with _build_lock(root, TINY_FOLDER):
        if not (path / "model_index.json").is_file():
            build_tiny_sd3(path)
    return path
