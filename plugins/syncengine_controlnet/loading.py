"""Loading ``ControlNetModel`` from a hub id, a local diffusers folder or a single checkpoint file, with the same
kind of errors as the base model's loader: what is missing, and how to get it. Nothing falls back to random weights."""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch

from syncengine.errors import ConfigError, ModelNotFoundError, one_line
from syncengine_sd.loading import looks_like_path
from syncengine_sd.model_files import damaged_cache_error, load_checked, load_single_file

EXAMPLE = "lllyasviel/sd-controlnet-canny"


def _reason(exc: BaseException) -> str:
    return f" ({one_line(exc)})"


def load_controlnet(ref: str, key: str, dtype: torch.dtype, revision: str | None = None, variant: str | None = None,
                    single_file_config: str | None = None, model_class: type | None = None, example: str = EXAMPLE):
    """A diffusers ControlNet of ``model_class`` (default ``ControlNetModel``; SD3's and FLUX's have their own) from
    ``ref``; ``key`` is the spec key that named it, ``example`` a hub id of the family's kind (for messages)."""
    if model_class is None:
        from diffusers import ControlNetModel as model_class

    cls = model_class
    name = cls.__name__
    if not ref:
        raise ConfigError(key, f"missing: name a ControlNet (hub id such as {example}, a folder or a .safetensors "
                               "file)")
    kwargs: dict[str, Any] = {"torch_dtype": dtype}
    path = Path(ref).expanduser()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
        if looks_like_path(ref) or path.exists():
            if not path.exists():
                raise ModelNotFoundError(
                    f"ControlNet path {ref!r} ({key}) does not exist; give a diffusers {name} folder (config.json "
                    f"and weights), a .safetensors/.pth checkpoint, or a hub id such as {example}"
                )
            if path.is_file():
                if not hasattr(cls, "from_single_file"):
                    raise ConfigError(key, f"diffusers cannot load a {name} from a single file; give a diffusers "
                                           f"folder or a hub id such as {example}")
                config_key = key.rsplit(".", 1)[0] + ".single_file_config"
                return load_single_file(
                    lambda: cls.from_single_file(str(path), config=single_file_config, **kwargs), path,
                    f"ControlNet checkpoint {ref!r} ({key})", single_file_config, config_key,
                    f"a local diffusers {name} folder")
            config = path / "config.json"
            if not config.is_file():
                raise ModelNotFoundError(
                    f"{ref!r} ({key}) is not a diffusers ControlNet folder (no config.json); save one with "
                    f"controlnet.save_pretrained(folder) or point at the folder that has it"
                )
            check_class(config, name, ref, key)
            return load_checked(lambda: cls.from_pretrained(str(path), **kwargs), path,
                                f"ControlNet folder {ref!r} ({key})",
                                "download it again, or save the folder again with controlnet.save_pretrained(folder)")
        if revision:
            kwargs["revision"] = revision
        if variant:
            kwargs["variant"] = variant
        try:
            return cls.from_pretrained(ref, **kwargs)
        except Exception as exc:  # noqa: BLE001 - a damaged cache file, a missing model, or (re-raised) a bug
            error = damaged_cache_error(exc, ref, f"ControlNet ({key})", revision)
            if error is not None:
                raise error from exc
            if not isinstance(exc, OSError):
                raise
            raise ModelNotFoundError(
                f"ControlNet {ref!r} ({key}) could not be loaded{_reason(exc)}. Download it where the Hugging Face "
                f"hub is reachable (`huggingface-cli download {ref}`) and copy the cache (HF_HOME), or set {key} to a "
                f"local diffusers folder or .safetensors file"
            ) from exc


def check_class(config: Path, name: str, ref: str, key: str) -> None:
    """A folder of another ControlNet class (an SD 1.5 ``ControlNetModel`` given to FLUX) loads with random parts or
    fails deep inside diffusers: say which class it is instead."""
    try:
        found = json.loads(config.read_text(encoding="utf-8")).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return  # load_checked names the broken file
    if found and found != name:
        raise ConfigError(key, f"{ref!r} is a {found}, not a {name}: use a ControlNet trained for this base model")


def check_compatible(controlnet, unet, ref: str, base: str, key: str) -> None:
    """A ControlNet trained for another base model fails deep inside the UNet with a shape error: say it here."""
    checks = ("cross_attention_dim", "block_out_channels", "in_channels")

    def norm(value):
        return tuple(value) if isinstance(value, (list, tuple)) else value

    for name in checks:
        mine, theirs = controlnet.config.get(name), unet.config.get(name)
        if mine is not None and theirs is not None and norm(mine) != norm(theirs):
            raise ConfigError(
                key,
                f"ControlNet {ref!r} does not fit the base model {base!r} ({name} {mine} vs {theirs}); use a "
                f"ControlNet trained for this base (SD 1.5 ControlNets need an SD 1.5 model, SD 2.1 ones SD 2.1)",
            )
