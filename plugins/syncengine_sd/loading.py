"""Loading diffusers pipelines from a hub id, a local folder, a single checkpoint file or the built-in tiny model.

A model that is not there is a :class:`~syncengine.errors.ModelNotFoundError` that says how to get it; nothing falls
back to random weights silently.
"""
from __future__ import annotations

import inspect
import logging
import os
from pathlib import Path
from typing import Any

import torch

from syncengine.errors import ConfigError, ModelNotFoundError, one_line

from .model_files import damaged_cache_error, load_checked, load_single_file

log = logging.getLogger(__name__)

TINY_MODEL = "syncengine:tiny-random"  # the offline demo model: random weights, for smoke runs only
TOY_MODEL = "syncengine:toy"  # the small model trained on the toy world, shipped in syncengine_toy/weights/toy-v1


def torch_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    try:
        dtype = getattr(torch, name)
    except AttributeError:
        dtype = None
    if not isinstance(dtype, torch.dtype):
        raise ConfigError("denoiser.dtype", f"{name!r} is not a torch dtype; use auto, float32, float16 or bfloat16")
    return dtype


def torch_device(name: str, key: str = "denoiser.device") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return check_device(name, key)


def available_devices() -> list[str]:
    """The devices this machine has, as ``denoiser.device`` values (CUDA counted without initialising it)."""
    devices = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        devices.append("mps")
    return devices


def check_device(name: str, key: str = "denoiser.device") -> torch.device:
    """``torch.device(name)`` when this machine has it, else a :class:`ConfigError` naming ``key`` and the devices
    it does have (``cuda`` on a machine without CUDA fails here, not deep inside ``.to()``)."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise ConfigError(key, f"{name!r} is not a device; use auto or one of: {', '.join(available_devices())}") \
            from None
    if device.type == "cuda":
        count = torch.cuda.device_count()
        ok = count > 0 and (device.index is None or device.index < count)
    elif device.type == "mps":
        ok = "mps" in available_devices()
    else:
        backend = getattr(torch, device.type, None)
        ok = not callable(getattr(backend, "is_available", None)) or bool(backend.is_available())
    if not ok:
        raise ConfigError(key, f"{name!r} is not available on this machine (available: "
                               f"{', '.join(available_devices())}); use auto or one of those")
    return device


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


def hub_kwargs(config: Any) -> dict[str, Any]:
    """The ``revision`` and ``variant`` a denoiser config sets, as ``from_pretrained`` keyword arguments."""
    return {key: getattr(config, key) for key in ("revision", "variant") if getattr(config, key, None)}


def load_pipeline(pipeline_cls, ref: str, dtype: torch.dtype, **kwargs: Any):
    """``pipeline_cls.from_pretrained`` / ``from_single_file`` with clear errors for missing models."""
    import warnings

    with warnings.catch_warnings():
        # diffusers >= 0.36 renamed torch_dtype to dtype; older releases only know torch_dtype.
        warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
        return _load_pipeline(pipeline_cls, ref, dtype, **kwargs)


def _load_pipeline(pipeline_cls, ref: str, dtype: torch.dtype, **kwargs: Any):
    common: dict[str, Any] = dict(torch_dtype=dtype)
    if "safety_checker" in inspect.signature(pipeline_cls.__init__).parameters:  # SD 1/2 only; others warn on it
        common.update(safety_checker=None, requires_safety_checker=False)
    if ref == TINY_MODEL:
        kwargs.pop("single_file_config", None)
        return _load_tiny(pipeline_cls, common, kwargs)
    if ref == TOY_MODEL:
        kwargs.pop("single_file_config", None)
        return _load_folder(pipeline_cls, toy_model_path(), f"the shipped toy model {TOY_MODEL!r}", TOY_FIX, common,
                            kwargs)
    path = Path(ref).expanduser()
    if looks_like_path(ref) or path.exists():
        if not path.exists():
            raise ModelNotFoundError(
                f"model path {ref!r} does not exist; give a diffusers folder (with model_index.json), a "
                f".safetensors/.ckpt checkpoint, or a hub id such as stabilityai/stable-diffusion-2-base"
            )
        if path.is_file():
            config = kwargs.pop("single_file_config", None)
            # no _not_found: its `huggingface-cli download <ref>` hint makes no sense for a local file
            return load_single_file(
                lambda: pipeline_cls.from_single_file(str(path), config=config, **common, **kwargs), path,
                f"single-file checkpoint {ref!r}", config, "denoiser.single_file_config",
                "a local diffusers folder")
        if not (path / "model_index.json").is_file():
            raise ModelNotFoundError(
                f"{ref!r} is not a diffusers pipeline folder (no model_index.json); save one with "
                f"pipeline.save_pretrained(folder) or point at the folder that has it"
            )
        kwargs.pop("single_file_config", None)
        return _load_folder(pipeline_cls, path, f"model folder {ref!r}", FOLDER_FIX, common, kwargs)
    kwargs.pop("single_file_config", None)
    try:
        return pipeline_cls.from_pretrained(ref, **common, **kwargs)
    except Exception as exc:  # noqa: BLE001 - a damaged cache file, a missing model, or (re-raised) a bug
        error = damaged_cache_error(exc, ref, "model", kwargs.get("revision"), pipeline_cls)
        if error is not None:
            raise error from exc
        if isinstance(exc, OSError):
            raise _not_found(ref, "model", exc) from exc
        raise


FOLDER_FIX = "download the model again, or save the folder again with pipeline.save_pretrained(folder)"


def _load_folder(pipeline_cls, path: Path, what: str, fix: str, common: dict, kwargs: dict):
    return load_checked(lambda: pipeline_cls.from_pretrained(str(path), **common, **kwargs), path, what, fix,
                        pipeline_cls)


TOY_FIX = "reinstall syncengine, or retrain the folder with `python -m syncengine_toy.train --out <that folder>`"


def toy_model_path() -> Path:
    """The shipped toy model's folder inside the installed ``syncengine_toy`` package; a one-line error when the
    package or its weights are not there (a checkout without them, an install that left them out)."""
    from importlib.resources import files

    try:
        folder = Path(str(files("syncengine_toy") / "weights" / "toy-v1"))
    except ModuleNotFoundError:
        raise ModelNotFoundError(f"{TOY_MODEL}: the syncengine_toy package is not installed; {TOY_FIX}") from None
    if not (folder / "model_index.json").is_file():
        raise ModelNotFoundError(f"{TOY_MODEL}: the shipped model folder {str(folder)!r} is missing or has no "
                                 f"model_index.json; {TOY_FIX}")
    return folder


def _load_tiny(pipeline_cls, common: dict, kwargs: dict):
    """The built-in tiny model from its cache, built on first use; a cache that fails to load (a damaged or
    half-written file) is rebuilt once."""
    from .tiny import TINY_CACHE_FIX, cache_stamp, tiny_model_path

    path = tiny_model_path()
    stamp = cache_stamp(path)
    what = f"the built-in tiny model's cache {str(path)!r}"
    try:
        return _load_folder(pipeline_cls, path, what, TINY_CACHE_FIX, common, kwargs)
    except ModelNotFoundError as exc:
        log.warning("%s failed to load, rebuilding it: %s", TINY_MODEL, exc)
    path = tiny_model_path(rebuild_from=stamp)
    return _load_folder(pipeline_cls, path, what, TINY_CACHE_FIX, common, kwargs)


def check_tokenizer(tokenizer, ref: str) -> None:
    """transformers 5 returns a 2-token tokenizer for an uncached hub id instead of failing: refuse it."""
    if tokenizer is None or len(tokenizer) < 10:
        raise _not_found(ref, "tokenizer of model")
