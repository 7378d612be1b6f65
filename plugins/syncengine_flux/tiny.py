"""A tiny FLUX-shaped pipeline with RANDOM weights, for tests and offline smoke runs only.

It keeps FLUX's interfaces and geometry (CLIP pooled prompt + T5 sequence, 16 latent channels at an 8x factor packed
2x2 into 64-channel tokens, 3-axis rotary image ids, a VAE with shift and scale, FLUX's dynamically shifted flow
scheduler) so that every code path runs; the sizes follow diffusers' own tiny FLUX test configuration. It is saved with
``save_pretrained`` and loaded back through the engine's loader like any real model.
"""
from __future__ import annotations

import string
import tempfile
from pathlib import Path

import torch

TINY_NOTICE = "using the built-in tiny FLUX with RANDOM weights: images are noise-like (smoke runs only)"
LATENT_CHANNELS = 16
SHIFT_FACTOR = 0.1159  # FLUX.1's VAE: latents are (z - shift) * scale
SCALING_FACTOR = 0.3611


def tiny_t5_tokenizer(model_max_length: int = 512):
    """A T5 tokenizer built with the ``tokenizers`` library (no sentencepiece): a Unigram model over single characters
    with T5's special ids (pad 0, eos 1, unk 2) and its ``</s>`` suffix."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    chars = string.ascii_lowercase + string.digits + string.punctuation
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    pieces += [(c, -1.0) for c in chars] + [("\u2581" + c, -2.0) for c in string.ascii_lowercase]
    backend = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                           special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=backend, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                           extra_ids=0, model_max_length=model_max_length)


def tiny_t5_encoder(vocab_size: int, d_model: int = 32):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=37, num_layers=2,
                                   num_heads=4, relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                                   decoder_start_token_id=0))


def flux_vae(block_out_channels: tuple[int, ...] = (8, 8, 8, 8), sample_size: int = 256):
    """A random-weight FLUX-shaped VAE: four levels (8x), 16 latent channels, FLUX's shift and scale, no quant convs."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=block_out_channels,
                         layers_per_block=1, latent_channels=LATENT_CHANNELS, norm_num_groups=4,
                         sample_size=sample_size, use_quant_conv=False, use_post_quant_conv=False,
                         shift_factor=SHIFT_FACTOR, scaling_factor=SCALING_FACTOR)


def flux_scheduler():
    """The flow scheduler configuration FLUX.1 ships with (resolution-dependent shift)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                           base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                           max_image_seq_len=4096)


def build_tiny_flux(path: str | Path, seed: int = 0, guidance_embeds: bool = True):
    """Build and ``save_pretrained`` a tiny random FluxPipeline into ``path`` (``guidance_embeds``: dev-like, else
    schnell-like); returns the path."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    from syncengine_sd.tiny import clip_text_encoder, tiny_tokenizer

    path = Path(path)
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4 * LATENT_CHANNELS, num_layers=1,
                                         num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                                         joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8),
                                         guidance_embeds=guidance_embeds)
    with tempfile.TemporaryDirectory() as src:
        tokenizer = tiny_tokenizer(Path(src))
    text_encoder = clip_text_encoder(tokenizer, hidden_size=32, intermediate_size=37)
    tokenizer_2 = tiny_t5_tokenizer()
    text_encoder_2 = tiny_t5_encoder(len(tokenizer_2))
    pipe = FluxPipeline(scheduler=flux_scheduler(), vae=flux_vae(), text_encoder=text_encoder, tokenizer=tokenizer,
                        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer)
    pipe.save_pretrained(path)
    return path


def build_tiny_taef1(path: str | Path, seed: int = 0):
    """A random-weight TAEF1-shaped ``AutoencoderTiny`` (16 latent channels), for ``sync_vae``."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    vae = AutoencoderTiny(latent_channels=LATENT_CHANNELS, encoder_block_out_channels=(8, 8, 8, 8),
                          decoder_block_out_channels=(8, 8, 8, 8), num_encoder_blocks=(1, 1, 1, 1),
                          num_decoder_blocks=(1, 1, 1, 1), shift_factor=0.0, scaling_factor=1.0)
    vae.save_pretrained(path)
    return Path(path)


TINY_FOLDER = "tiny-random-flux-v1"


def tiny_flux_path() -> Path:
    """The built-in tiny FLUX (``pretrained: syncengine:tiny-random`` with ``denoiser.name: flux``) in the engine's
    model cache, built on first use; concurrent builders take turns and each build is renamed into place whole (the
    SD demo model's cache rules, :mod:`syncengine_sd.tiny`)."""
    import os
    import shutil
    import uuid

    from syncengine.errors import one_line
    from syncengine_sd.tiny import _build_lock, _cache_dir, _cache_error, _replace_folder, writable_cache_dir

    path = _cache_dir() / TINY_FOLDER
    if (path / "model_index.json").is_file():
        return path
    root = writable_cache_dir()
    with _build_lock(root, TINY_FOLDER):
        if (path / "model_index.json").is_file():
            return path  # built by another process while this one waited
        tmp = path.with_name(f"{TINY_FOLDER}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            build_tiny_flux(tmp)
            _replace_folder(tmp, path)
        except OSError as exc:
            raise _cache_error(root, f"cannot be written ({one_line(exc, 120)})") from exc
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return path
