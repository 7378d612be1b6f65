"""Condition images: loaded once per request, fitted to the canvas, and cropped per view.

The canvas-sized condition ``c`` is in pixels; a view is a box in latents. ``condition_crop`` is psi_{c->i} of the
paper: the pixels ``[top*f, bottom*f) x [left*f, right*f)`` (``f`` = the latent factor), with columns taken modulo the
canvas width for views that wrap (loop panoramas). So each window sees exactly the part of the condition that lies
under its latent region, never the whole image squeezed into every tile.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from syncengine.errors import SyncEngineError
from syncengine.images import open_image
from syncengine.views import CropView, View


def load_image(path: str | Path, what: str, canvas_pixels: int = 0):
    """An RGB ``PIL.Image`` from a file, or a one-line error naming ``what`` asked for it and the file (see
    :func:`syncengine.images.open_image`: missing, not an image, damaged, or too large for the canvas)."""
    p = Path(str(path)).expanduser()
    if not p.is_file():
        raise SyncEngineError(f"{what}: image file {str(path)!r} not found "
                              "(paths are relative to the working directory)")
    return open_image(p, lambda image: image.convert("RGB"), canvas_pixels,
                      lambda message: SyncEngineError(f"{what}: {message}"))


def fit_to_canvas(image, height: int, width: int, policy: str = "error", tolerance: float = 0.01,
                  what: str = "image"):
    """Resize an image to ``width x height`` px.

    An image of the canvas's aspect ratio (within ``tolerance``, relative) is resized (Lanczos, as diffusers does)
    or kept as is when it already has the canvas size. Otherwise ``policy`` decides: ``error`` (default) refuses,
    ``stretch`` resizes anyway, ``crop`` scales to cover the canvas and keeps the centre, ``pad`` scales to fit and
    pads with black (no edges for Canny; "far" for depth).
    """
    from PIL import Image

    w, h = image.size
    if (w, h) == (width, height):
        return image
    mismatch = abs((w / h) / (width / height) - 1)
    if mismatch > tolerance and policy != "stretch":
        if policy == "error":
            raise SyncEngineError(
                f"{what} is {w}x{h} px (aspect {w / h:.3f}) but the canvas is {width}x{height} px (aspect "
                f"{width / height:.3f}); give an image of the canvas's aspect ratio, or set denoiser.resize to "
                f"stretch, crop or pad"
            )
        cover = {"crop": max, "pad": min}[policy]  # the only policies left; the config's type admits no other
        scale = cover(width / w, height / h)
        sw, sh = max(1, round(w * scale)), max(1, round(h * scale))
        scaled = image.resize((sw, sh), Image.LANCZOS)
        if policy == "crop":
            left, top = (sw - width) // 2, (sh - height) // 2
            return scaled.crop((left, top, left + width, top + height))
        out = Image.new("RGB", (width, height))
        out.paste(scaled, ((width - sw) // 2, (height - sh) // 2))
        return out
    return image.resize((width, height), Image.LANCZOS)


def to_tensor(image) -> torch.Tensor:
    """RGB ``PIL.Image`` -> ``[3, H, W]`` float in [0, 1] (what diffusers feeds a ControlNet)."""
    import numpy as np

    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255.0


def condition_crop(view: View, image: torch.Tensor, factor: int) -> torch.Tensor:
    """The part of a canvas-sized condition ``image`` ``[C, H, W]`` (pixels) under ``view``: ``[C, h*f, w*f]``.

    Crop views are cut here (wrapping columns for loop views). Any other view type can take part by defining
    ``extract_image(image [B, C, H, W], factor) -> [B, C, h*f, w*f]`` (e.g. a projection resampled at pixel
    resolution); views without it are refused rather than given a wrong condition.
    """
    hook = getattr(view, "extract_image", None)
    if callable(hook):
        crop = hook(image[None], factor)[0]
    elif isinstance(view, CropView):
        top, bottom, left, right = (v * factor for v in view.box)
        rows = image[:, top:bottom]
        if view.canvas_width is not None:
            if view.canvas_width * factor != image.shape[-1]:
                raise SyncEngineError(
                    f"condition image is {image.shape[-1]} px wide but the looping canvas is "
                    f"{view.canvas_width * factor} px; the condition must be fitted to the canvas"
                )
            cols = torch.arange(left, right, device=image.device) % image.shape[-1]
            crop = rows.index_select(-1, cols)
        else:
            crop = rows[..., left:right]
    else:
        raise SyncEngineError(
            f"the controlnet denoiser cannot crop its condition image for a {type(view).__name__} view: it supports "
            f"rectangular windows (CropView: sliding panoramas, grids, regions) or views that define extract_image"
        )
    expected = tuple(s * factor for s in view.latent_size)
    if tuple(crop.shape[-2:]) != expected:
        raise SyncEngineError(
            f"view {view.index} needs a {expected[0]}x{expected[1]} px condition crop but got "
            f"{crop.shape[-2]}x{crop.shape[-1]} px: the condition image ({image.shape[-2]}x{image.shape[-1]} px) does "
            f"not match the canvas"
        )
    return crop


def request_sources(inputs: dict[str, Any], count: int, input_keys: list[str | None]) -> list[Any]:
    """Per ControlNet, the image source the request gives (``None`` when it gives none).

    ``inputs.control`` is one path (one ControlNet) or a list with one path (or null) per ControlNet; a ControlNet
    with its own ``input`` key reads ``inputs[<that key>]`` instead.
    """
    control = inputs.get("control")
    if control is not None and not isinstance(control, (str, list, tuple)):
        raise SyncEngineError(f"requests[].inputs.control must be an image path or a list of paths, got {control!r}")
    if isinstance(control, (list, tuple)) and len(control) != count:
        raise SyncEngineError(
            f"requests[].inputs.control lists {len(control)} images but the denoiser has {count} ControlNets; "
            f"give one per ControlNet (null keeps a ControlNet's own image)"
        )
    out = []
    for i, key in enumerate(input_keys):
        if key is not None:
            out.append(inputs.get(key))
        elif isinstance(control, (list, tuple)):
            out.append(control[i])
        elif isinstance(control, str) and count == 1:
            out.append(control)
        elif isinstance(control, str):
            raise SyncEngineError(
                f"requests[].inputs.control is one image but the denoiser has {count} ControlNets; give a list with "
                f"one image per ControlNet"
            )
        else:
            out.append(None)
    return out
