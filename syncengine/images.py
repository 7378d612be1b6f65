"""Opening a user's image file (region masks and layouts, ControlNet conditions, the images ``evaluate`` reads).

One place for what every reader must get right: the size is checked from the header, before anything is decoded,
so a decompression bomb costs nothing; and the many exception types PIL raises for a damaged file become one-line
errors naming the file, instead of tracebacks.
"""
from __future__ import annotations

import struct
import warnings
from pathlib import Path
from typing import Any, Callable

from .errors import SyncEngineError, one_line

# The largest image read: PIL's own decompression-bomb limit (Image.MAX_IMAGE_PIXELS, 0.25 GiB as RGB, ample for any
# photo or mask), raised to CANVAS_MULTIPLE x the canvas for canvases so large that twice their resolution exceeds it.
MAX_IMAGE_PIXELS = 1024 * 1024 * 1024 // 4 // 3
CANVAS_MULTIPLE = 4
# What PIL raises for a damaged file, depending on the format and the damage (a zTXt bomb is a ValueError; a
# conversion PIL lacks, LAB to grey, is one too).
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error)


def max_image_pixels(canvas_pixels: int = 0) -> int:
    """The largest image read for a canvas of ``canvas_pixels`` (0: unknown)."""
    return max(MAX_IMAGE_PIXELS, CANVAS_MULTIPLE * canvas_pixels)


def open_image(path: str | Path, convert: Callable[[Any], Any] | None = None, canvas_pixels: int | None = 0,
               error: Callable[[str], Exception] = SyncEngineError) -> Any:
    """The decoded image of ``path`` (``convert``-ed, e.g. to RGB or an array; else a ``PIL.Image`` copy).

    ``canvas_pixels`` sets the limit (:func:`max_image_pixels`); None keeps PIL's own (an image ``evaluate`` reads
    was made for a canvas it does not know). A file that is not an image, is damaged, is too large, or has a mode
    ``convert`` cannot handle is ``error(one line naming the file)``: callers add their key or context there.
    """
    from PIL import Image

    limit = None if canvas_pixels is None else max_image_pixels(canvas_pixels)
    try:
        with warnings.catch_warnings():
            if limit is not None:
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the limit below decides
            with Image.open(path) as im:
                w, h = im.size
                if limit is None or w * h <= limit:
                    im.load()
                    return convert(im) if convert is not None else im.copy()
    except SyncEngineError:  # from convert: already one line (and a ConfigError is a ValueError too)
        raise
    except Image.DecompressionBombError as exc:  # above twice PIL's limit: refused by Image.open itself
        fix = "" if canvas_pixels is None else "; resize it to about the canvas size"
        raise error(f"image {path} is too large ({one_line(exc)}){fix}") from None
    except DECODE_ERRORS as exc:
        raise error(f"cannot read image {path} ({one_line(exc)}): not a readable image; give a PNG, JPEG or WebP "
                    "file") from None
    raise error(f"image {path} is {w}x{h} px ({w * h / 1e6:.0f} MP), more than the {limit / 1e6:.0f} MP read for "
                "this canvas; resize it (it is fitted to the canvas anyway)")
