"""Reading generated runs: a folder of PNGs with their JSON sidecars (see :mod:`syncengine.outputs`)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import SyncEngineError
from ..images import open_image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@dataclass
class Sample:
    path: Path
    prompt: str | None  # None when there is no sidecar
    spec: dict[str, Any] = field(default_factory=dict)

    def load(self) -> torch.Tensor:
        return load_image(self.path)


def load_image(path: Path) -> torch.Tensor:
    """``[3, H, W]`` float in ``[0, 1]``; a file that does not decode (damaged, not an image, or over PIL's
    decompression-bomb limit) is a one-line :class:`SyncEngineError` naming it (:func:`~syncengine.images.open_image`,
    with PIL's own limit: a run's images may be as large as any canvas it allowed)."""
    import numpy as np

    array = open_image(path, lambda img: np.asarray(img.convert("RGB"), dtype=np.uint8).copy(), canvas_pixels=None)
    return torch.from_numpy(array).permute(2, 0, 1).float() / 255


def load_images(paths: list[Path]) -> tuple[list[torch.Tensor], list[int], dict[str, str]]:
    """The readable images of ``paths``, their indices in ``paths``, and ``{path: reason}`` for each file skipped
    because it does not decode (a half-written PNG should not cost the rest of a run's evaluation)."""
    images, kept, skipped = [], [], {}
    for i, path in enumerate(paths):
        try:
            images.append(load_image(path))
        except SyncEngineError as exc:
            skipped[str(path)] = str(exc)
            continue
        kept.append(i)
    return images, kept, skipped


def image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise SyncEngineError(f"{str(folder)!r} is not a folder of images")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
    if not files:
        raise SyncEngineError(f"no images (png/jpg/webp) in {str(folder)!r}")
    return files


def read_run(folder: str | Path) -> list[Sample]:
    """The images of one run, in name order, with the prompt and spec of their sidecars."""
    samples = []
    for path in image_files(Path(folder)):
        meta_path = path.with_suffix(".json")
        prompt, spec = None, {}
        if meta_path.is_file():
            try:
                meta = json.loads(meta_path.read_text())
            except json.JSONDecodeError as exc:
                raise SyncEngineError(f"sidecar {meta_path} is not valid JSON ({exc.msg})") from None
            prompt = (meta.get("request") or {}).get("prompt")
            spec = meta.get("spec") or {}
        samples.append(Sample(path, prompt, spec))
    return samples


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"sync": {"weight": 20}}`` -> ``{"sync.weight": 20}`` (lists kept whole, as their JSON text)."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    if isinstance(tree, list):
        return {prefix[:-1]: json.dumps(tree, sort_keys=True)}
    return {prefix[:-1]: tree}


def window_of(spec: dict[str, Any]) -> tuple[int, int] | None:
    """(height, width) of the tiler's window from a sidecar spec, when it has one."""
    tiler = spec.get("tiler") or {}
    window = tiler.get("window")
    if not isinstance(window, int):
        return None
    return (tiler.get("window_height") or window, window)
