"""Loading diffusers pipelines from a hub id, a local folder, a single checkpoint file or the built-in tiny model.

A model that is not there is a :class:`~syncengine.errors.ModelNotFoundError` that says how to get it; nothing falls
back to random weights silently.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from syncengine.errors import ModelNotFoundError, one_line

TINY_MODEL = "syncengine:tiny-random"  # the offline demo model: random weights, for smoke runs only


def torch_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    try:
        dtype = getattr(torch, name)
    except AttributeError:
        dtype = None
    if not isinstance(dtype, torch.dtype):
        from syncengine.errors import ConfigError

        raise ConfigError("denoiser.dtype", f"{name!r} is not a torch dtype; use auto, float32, float16 or bfloat16")
    return dtype


def torch_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def looks_like_path(ref: str) -> bool:
    return ref.startswith(("/", "./", "../", "~")) or os.sep in ref and Path(ref).expanduser().exists() or (
        Path(ref).suffix in (".safetensors", ".ckpt", ".pt", ".bin")
    )


def _not_found(ref: str, what: str, cause: BaseException | None = None) -> ModelNotFoundError:
    reason = f" ({one_line(cause)})" if cause else ""
    return ModelNotFoundError(
        f"{what} {ref!r} could not be loaded{reason}. Download it where the Hugging Face hub is reachable "
        f"(`huggingface-cli download {ref}`) and copy the cache (HF_HOME), or set denoiser.pretrained to a local "
        f"diffusers folder or .safetensors file; for an offline smoke run use pretrained: {TINY_MODEL}"
    )


def load_pipeline(pipeline_cls, ref: str, dtype: torch.dtype, **kwargs: Any):
    """``pipeline_cls.from_pretrained`` / ``from_single_file`` with clear errors for missing models."""
    import warnings

    with warnings.catch_warnings():
        # diffusers >= 0.36 renamed torch_dtype to dtype; older releases only know torch_dtype.
        warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
        return _load_pipeline(pipeline_cls, ref, dtype, **kwargs)


def _load_pipeline(pipeline_cls, ref: str, dtype: torch.dtype, **kwargs: Any):
    if ref == TINY_MODEL:
        from .tiny import tiny_model_path

        ref = str(tiny_model_path())
    path = Path(ref).expanduser()
    common = dict(torch_dtype=dtype, safety_checker=None, requires_safety_checker=False)
    if looks_like_path(ref) or path.exists():
        if not path.exists():
            raise ModelNotFoundError(
                f"model path {ref!r} does not exist; give a diffusers folder (with model_index.json), a "
                f".safetensors/.ckpt checkpoint, or a hub id such as stabilityai/stable-diffusion-2-base"
            )
        if path.is_file():
            config = kwargs.pop("single_file_config", None)
            try:
                return pipeline_cls.from_single_file(str(path), config=config, **common, **kwargs)
            except (OSError, ValueError) as exc:
                # not _not_found: its `huggingface-cli download <ref>` hint makes no sense for a local file
                reason = one_line(exc)
                raise ModelNotFoundError(
                    f"single-file checkpoint {ref!r} could not be loaded ({reason}); it needs its pipeline's configs: "
                    f"set denoiser.single_file_config to a local diffusers folder of the same architecture (or a "
                    f"cached hub id)"
                ) from exc
        if not (path / "model_index.json").is_file():
            raise ModelNotFoundError(
                f"{ref!r} is not a diffusers pipeline folder (no model_index.json); save one with "
                f"pipeline.save_pretrained(folder) or point at the folder that has it"
            )
        kwargs.pop("single_file_config", None)
        return pipeline_cls.from_pretrained(str(path), **common, **kwargs)
    kwargs.pop("single_file_config", None)
    try:
        return pipeline_cls.from_pretrained(ref, **common, **kwargs)
    except OSError as exc:
        raise _not_found(ref, "model", exc) from exc


def check_tokenizer(tokenizer, ref: str) -> None:
    """transformers 5 returns a 2-token tokenizer for an uncached hub id instead of failing: refuse it."""
    if tokenizer is None or len(tokenizer) < 10:
        raise _not_found(ref, "tokenizer of model")
