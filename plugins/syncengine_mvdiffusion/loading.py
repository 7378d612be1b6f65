"""Loading MVDiffusion weights: the official panorama checkpoint, or a folder saved by :func:`save_pretrained`.

The official release (Tangshitao/MVDiffusion, ``weights/pano.ckpt``) is a PyTorch Lightning checkpoint of its
``PanoGenerator``: ``state_dict`` holds the whole model under these prefixes, mapped here to our modules:

==================================  ====================================================================
official key prefix                 loaded into
==================================  ====================================================================
``mv_base_model.unet.``             the SD UNet (diffusers names, unchanged)
``mv_base_model.cp_blocks_*``       :class:`~.model.CorrespondenceBlocks` (``cp_blocks_encoder.<i>``, ...)
``vae.``                            the VAE (diffusers 0.16 attention names ``query/key/value/proj_attn``
                                    renamed to ``to_q/to_k/to_v/to_out.0``)
``text_encoder.``                   the CLIP text encoder (``position_ids``, a buffer older transformers
                                    saved, is dropped; the ``text_model.`` level is dropped where the
                                    installed transformers has none)
==================================  ====================================================================

The UNet and the blocks must match exactly (missing, unexpected and wrongly shaped keys are listed in one error);
VAE and text encoder are optional (the release froze them at SD 2 base's weights) but must match when present. The
tokenizer, scheduler and model configs come from ``denoiser.pretrained`` (SD 2 base for the official weights).
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from syncengine.errors import ConfigError, ModelNotFoundError, SyncEngineError, one_line
from syncengine_sd.model_files import LOAD_ERRORS, file_problem, load_checked

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

OFFICIAL_URL = "https://www.dropbox.com/scl/fi/yx9e0lj4fwtm9xh2wlhhg/pano.ckpt?rlkey=kowqygw7vt64r3maijk8klfl0&dl=0"
BLOCKS_FOLDER = "correspondence_attention"  # inside a pipeline folder saved by save_pretrained
FORMAT = "syncengine-mvdiffusion"
PREFIXES = {"unet": "mv_base_model.unet.", "blocks": "mv_base_model.", "vae": "vae.", "text_encoder": "text_encoder."}
LEGACY_VAE_NAMES = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}
IGNORED = {"text_encoder": {"text_model.embeddings.position_ids", "embeddings.position_ids"}}
HOW_TO_GET = (f"download the official panorama checkpoint pano.ckpt ({OFFICIAL_URL}, MVDiffusion's README, "
              f"'Model Zoo') and set denoiser.checkpoint to its path, with denoiser.pretrained the SD 2 base model "
              f"(stabilityai/stable-diffusion-2-base, a hub id or a local diffusers folder)")


def find_weights(checkpoint: str | None, pretrained: str) -> tuple[str, Path]:
    """Where the correspondence-attention weights are: ``("official", file)`` or ``("folder", pipeline folder)``.
    Runs before the base model loads, so a missing checkpoint fails in a second."""
    if checkpoint:
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise ModelNotFoundError(f"MVDiffusion checkpoint {checkpoint!r} (denoiser.checkpoint) does not exist; "
                                     f"{HOW_TO_GET}")
        return "official", path
    folder = Path(pretrained).expanduser()
    if (folder / BLOCKS_FOLDER / "config.json").is_file():
        return "folder", folder
    raise ModelNotFoundError(
        f"the mvdiffusion denoiser needs correspondence-attention weights, and {pretrained!r} (denoiser.pretrained) "
        f"is not a folder saved by syncengine_mvdiffusion.loading.save_pretrained (no {BLOCKS_FOLDER}/config.json): "
        f"{HOW_TO_GET}")


# ------------------------------------------------------------------------------------------------- official format


def read_state_dict(path: Path, trust: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of a Lightning ``.ckpt`` (its ``state_dict``), a plain ``torch.save``d state dict or a
    ``.safetensors`` file. Pickled objects beyond tensors are refused unless ``trust``; a file that is not a valid,
    complete checkpoint (truncated, garbage) is one line naming it."""
    try:
        obj = _read(path, trust)
    except SyncEngineError:
        raise
    except Exception as exc:  # noqa: BLE001 - explained by the file when it is damaged; else re-raised below
        problem = file_problem(path)
        if problem:
            raise ModelNotFoundError(f"MVDiffusion checkpoint {str(path)!r} (denoiser.checkpoint) is not a valid, "
                                     f"complete checkpoint: it {problem}; {HOW_TO_GET}") from exc
        if isinstance(exc, pickle.UnpicklingError):
            raise SyncEngineError(
                f"checkpoint {str(path)!r} holds Python objects beyond tensors ({one_line(exc, 120)}); if "
                f"you trust the file, set denoiser.trust_checkpoint: true") from None
        if isinstance(exc, LOAD_ERRORS):
            raise ModelNotFoundError(f"MVDiffusion checkpoint {str(path)!r} (denoiser.checkpoint) could not be read "
                                     f"({one_line(exc)}); {HOW_TO_GET}") from exc
        raise
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SyncEngineError(f"checkpoint {str(path)!r} is not a state dict (nor a Lightning checkpoint with one)")
    return state


def _read(path: Path, trust: bool) -> Any:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        return torch.load(str(path), map_location="cpu", weights_only=not trust, mmap=True)
    except RuntimeError:  # mmap needs the zip format; legacy files load without it
        return torch.load(str(path), map_location="cpu", weights_only=not trust)


def _vae_name(key: str) -> str:
    for old, new in LEGACY_VAE_NAMES.items():
        if ".attentions." in key and old in key:
            return key.replace(old, new)
    return key


def split_official(state: dict[str, torch.Tensor]) -> tuple[dict[str, dict[str, torch.Tensor]], list[str]]:
    """Official keys -> ``{component: state dict in our module's names}`` and the keys that belong to none."""
    parts: dict[str, dict[str, torch.Tensor]] = {name: {} for name in PREFIXES}
    unexpected = []
    for key, value in state.items():
        if key.startswith(PREFIXES["unet"]):
            parts["unet"][key[len(PREFIXES["unet"]):]] = value
        elif key.startswith(PREFIXES["blocks"] + "cp_blocks_"):
            parts["blocks"][key[len(PREFIXES["blocks"]):]] = value
        elif key.startswith(PREFIXES["vae"]):
            parts["vae"][_vae_name(key[len(PREFIXES["vae"]):])] = value
        elif key.startswith(PREFIXES["text_encoder"]):
            parts["text_encoder"][key[len(PREFIXES["text_encoder"]):]] = value
        else:
            unexpected.append(key)
    return parts, unexpected


def _listing(keys: list[str], limit: int = 6) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" (and {len(keys) - limit} more)" if len(keys) > limit else "")


def load_strict(module: nn.Module, state: dict[str, torch.Tensor], what: str, key: str, prefix: str = "",
                ignore: set[str] = frozenset(), extra: list[str] = (), hint: str = "") -> None:
    """``module.load_state_dict`` after a strict check whose error lists every problem at once (names shown with
    ``prefix``, as they appear in the file)."""
    expected = module.state_dict()
    state = {k: v for k, v in state.items() if k not in ignore or k in expected}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(f"{prefix}{k}" for k in set(state) - set(expected)) + list(extra)
    shapes = sorted(f"{prefix}{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                    if k in state and state[k].shape != v.shape)
    if missing or unexpected or shapes:
        problems = []
        if missing:
            problems.append(f"missing keys: {_listing([prefix + k for k in missing])}")
        if unexpected:
            problems.append(f"unexpected keys: {_listing(unexpected)}")
        if shapes:
            problems.append(f"wrong shapes (file vs model): {_listing(shapes)}")
        raise ConfigError(key, f"{what} does not fit the model; {'; '.join(problems)}{hint}")
    module.load_state_dict(state, strict=True)


def _match_text_level(state: dict[str, torch.Tensor], module: nn.Module) -> dict[str, torch.Tensor]:
    """transformers 4 named the CLIP text encoder's weights ``text_model.*``; transformers 5 has no such level."""
    if any(k.startswith("text_model.") for k in module.state_dict()):
        return state
    return {k.removeprefix("text_model."): v for k, v in state.items()}


def load_official(path: Path, unet: nn.Module, blocks: nn.Module, vae: nn.Module, text_encoder: nn.Module,
                  trust: bool = False) -> dict[str, int]:
    """Load the official checkpoint into our modules; returns how many tensors each component took."""
    parts, unexpected = split_official(read_state_dict(path, trust))
    what, key = f"MVDiffusion checkpoint {str(path)!r}", "denoiser.checkpoint"
    hint = ". The official panorama checkpoint needs denoiser.pretrained: stabilityai/stable-diffusion-2-base"
    load_strict(unet, parts["unet"], what, key, PREFIXES["unet"], extra=unexpected, hint=hint)
    load_strict(blocks, parts["blocks"], what, key, PREFIXES["blocks"], hint=hint)
    parts["text_encoder"] = _match_text_level(parts["text_encoder"], text_encoder)
    for name, module in (("vae", vae), ("text_encoder", text_encoder)):
        if parts[name]:
            load_strict(module, parts[name], what, key, PREFIXES[name], ignore=IGNORED.get(name, set()), hint=hint)
    return {name: len(part) for name, part in parts.items()}


# ---------------------------------------------------------------------------------------------------- own folders


def block_channels(blocks: nn.Module) -> dict[str, Any]:
    return {"encoder": [b.pe.freq_bands.shape[-1] * 4 for b in blocks.cp_blocks_encoder],
            "mid": blocks.cp_blocks_mid.pe.freq_bands.shape[-1] * 4,
            "decoder": [b.pe.freq_bands.shape[-1] * 4 for b in blocks.cp_blocks_decoder]}


def save_blocks(blocks: nn.Module, folder: str | Path) -> Path:
    """Write the correspondence blocks into ``folder/correspondence_attention`` (config.json + safetensors)."""
    from safetensors.torch import save_file

    out = Path(folder) / BLOCKS_FOLDER
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in blocks.state_dict().items()}
    save_file(state, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps({"format": FORMAT, "version": 1, "channels": block_channels(blocks)},
                                                indent=2))
    return out


def save_pretrained(pipe: DiffusionPipeline, blocks: nn.Module, folder: str | Path) -> Path:
    """A self-contained MVDiffusion folder: the diffusers pipeline (``pipe.save_pretrained``) plus the blocks.
    ``denoiser.pretrained: <folder>`` loads it (no ``checkpoint`` needed)."""
    pipe.save_pretrained(str(folder))
    save_blocks(blocks, folder)
    return Path(folder)


def load_blocks(blocks: nn.Module, folder: Path) -> None:
    from safetensors.torch import load_file

    where = folder / BLOCKS_FOLDER
    fix = "save the folder again with syncengine_mvdiffusion.loading.save_pretrained"
    what = f"correspondence attention {str(where)!r} (denoiser.pretrained)"
    config = load_checked(lambda: json.loads((where / "config.json").read_text()), where, what, fix)
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        found = config.get("format") if isinstance(config, dict) else config
        raise ModelNotFoundError(f"{str(where)!r} is not a {FORMAT} folder (config.json format {found!r})")
    weights = where / "model.safetensors"
    if not weights.is_file():
        raise ModelNotFoundError(f"{str(weights)!r} is missing; {fix}")
    state = load_checked(lambda: load_file(str(weights)), where, what, fix)
    load_strict(blocks, state, f"correspondence attention in {str(where)!r}", "denoiser.pretrained")
