"""The SDXL autoencoder's two float16 concerns: its original decoder overflows in float16 (diffusers decodes it in
float32, as its config's ``force_upcast`` asks), and a fixed decoder (``denoiser.vae``, e.g.
madebyollin/sdxl-vae-fp16-fix) can replace it to stay in float16.
"""
from __future__ import annotations

from pathlib import Path

import torch

from syncengine.errors import ModelNotFoundError
from syncengine_sd.loading import _not_found, looks_like_path


def vae_dtype(vae_config, dtype: torch.dtype) -> torch.dtype:
    """The dtype the VAE runs in: float32 where the model runs in float16 and the VAE says it overflows there."""
    if dtype == torch.float16 and bool(getattr(vae_config, "force_upcast", False)):
        return torch.float32
    return dtype


def load_vae(ref: str, dtype: torch.dtype):
    """An ``AutoencoderKL`` from a diffusers folder, hub id or single file; a missing one is a one-line error."""
    from diffusers import AutoencoderKL

    path = Path(ref).expanduser()
    if looks_like_path(ref) and not path.exists():
        raise ModelNotFoundError(f"VAE path {ref!r} (denoiser.vae) does not exist; give an AutoencoderKL folder "
                                 f"(with config.json), a .safetensors file or a hub id such as "
                                 f"madebyollin/sdxl-vae-fp16-fix")
    if path.is_dir() and not (path / "config.json").is_file():
        raise ModelNotFoundError(f"{ref!r} (denoiser.vae) is not an AutoencoderKL folder (no config.json); save one "
                                 f"with vae.save_pretrained(folder) or point at the folder that has it")
    try:
        if path.is_file():
            return AutoencoderKL.from_single_file(str(path), torch_dtype=dtype)
        return AutoencoderKL.from_pretrained(str(path) if path.exists() else ref, torch_dtype=dtype)
    except (OSError, ValueError) as exc:
        raise _not_found(ref, "VAE (denoiser.vae)", exc) from exc
