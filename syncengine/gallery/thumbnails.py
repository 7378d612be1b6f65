"""Thumbnails and 360° viewer data, written once: a file that is newer than its source is kept, so rebuilding the
page of a large run only does the new images."""
from __future__ import annotations

import base64
import hashlib
import io
import json
from pathlib import Path

THUMB_HEIGHT = 256
THUMB_MAX_WIDTH = 2048  # a 1:8 panorama strip stays readable
PANO_MAX_WIDTH = 4096


def _key(source: Path) -> str:
    return hashlib.sha1(str(source.resolve()).encode()).hexdigest()[:16]


def _fresh(target: Path, source: Path) -> bool:
    return target.is_file() and target.stat().st_mtime_ns >= source.stat().st_mtime_ns


def _rgb(source: Path):
    from PIL import Image

    with Image.open(source) as image:
        return image.convert("RGB")


def _write(target: Path, data: bytes) -> None:
    """Temporary name then rename: an interrupted build never leaves half a file that looks fresh."""
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(target)


def thumbnail(source: Path, out_dir: Path) -> Path:
    """``thumbs/<key>.jpg``: at most THUMB_HEIGHT high and THUMB_MAX_WIDTH wide, aspect kept."""
    target = out_dir / "thumbs" / f"{_key(source)}.jpg"
    if _fresh(target, source):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    image = _rgb(source)
    image.thumbnail((THUMB_MAX_WIDTH, THUMB_HEIGHT))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=88)
    _write(target, buf.getvalue())
    return target


def pano_script(source: Path, out_dir: Path) -> tuple[Path, str]:
    """``panos/<key>.js`` defining the image as a data URL: the viewer loads its panorama with an XMLHttpRequest,
    which browsers refuse for ``file://`` pages but allow for data URLs, so the page works from disk."""
    key = _key(source)
    target = out_dir / "panos" / f"{key}.js"
    if not _fresh(target, source):
        target.parent.mkdir(parents=True, exist_ok=True)
        image = _rgb(source)
        image.thumbnail((PANO_MAX_WIDTH, PANO_MAX_WIDTH // 2))
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=92)
        url = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
        _write(target, f"(window.SE_PANOS = window.SE_PANOS || {{}})[{json.dumps(key)}] = {json.dumps(url)};\n"
               .encode())
    return target, key
