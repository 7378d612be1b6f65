"""Output files: ``<name>.png`` plus ``<name>.json`` (resolved spec, seed, versions, timings), never overwriting
earlier outputs silently. Each image is written as soon as it is finished, so an interrupted run keeps them."""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import torch

from .pipeline import Generated


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("syncengine", "torch", "diffusers", "transformers", "lightning", "lpips", "omegaconf"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def free_stem(folder: Path, name: str, overwrite: bool) -> str:
    """``name``, or ``name-1``, ``name-2``... if files of that name exist (unless ``overwrite``)."""
    if overwrite:
        return name
    stem, k = name, 0
    while (folder / f"{stem}.png").exists() or (folder / f"{stem}.json").exists():
        k += 1
        stem = f"{name}-{k}"
    return stem


def to_pil(image: torch.Tensor):
    from PIL import Image

    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


def png_info(metadata: dict[str, Any]):
    """PNG text chunks for an image's metadata: an XMP packet (``metadata["xmp"]``, e.g. 360° projection) goes in
    the iTXt chunk ``XML:com.adobe.xmp``, where XMP readers (photo-sphere viewers included) look for it."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    if metadata.get("xmp"):
        info.add_itxt("XML:com.adobe.xmp", metadata["xmp"])
    return info


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def sidecar(result: Generated, image_file: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    r = result.request
    return {
        "name": Path(image_file).stem,
        "image": image_file,
        "request": {"index": result.index, "prompt": r.prompt, "negative_prompt": r.negative_prompt, "seed": r.seed,
                    "inputs": r.inputs},
        "seed": r.seed,
        "spec": result.spec,
        "model": result.model,
        "timings_s": {k: round(v, 4) for k, v in result.timings.items()},
        "stats": result.stats,
        "versions": versions(),
        **(extra or {}),
    }


def write_result(result: Generated, output_dir: str | Path, overwrite: bool = False) -> Path:
    """Write the PNG and its JSON sidecar; returns the PNG path."""
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    stem = free_stem(folder, result.request.name, overwrite)
    png = folder / f"{stem}.png"
    _atomic_write(png, lambda p: to_pil(result.image).save(p, format="PNG", pnginfo=png_info(result.metadata)))
    extras = {}
    for suffix, image in result.extra_images.items():  # e.g. a ControlNet's condition image, for inspection
        path = folder / f"{stem}.{suffix}.png"
        _atomic_write(path, lambda p, image=image: to_pil(image).save(p, format="PNG"))
        extras[suffix] = path.name
    meta = sidecar(result, png.name, {**({"extra_images": extras} if extras else {}),
                                      **result.metadata.get("sidecar", {})})
    _atomic_write(folder / f"{stem}.json", lambda p: p.write_text(json.dumps(meta, indent=2, default=str)))
    return png
