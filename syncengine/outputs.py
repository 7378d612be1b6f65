"""Output files: ``<name>.png`` plus ``<name>.json`` (resolved spec, seed, versions, timings), never overwriting
earlier outputs silently. Each image is written as soon as it is finished, so an interrupted run keeps them.

Concurrent runs may write into one folder under the same name: each output first *claims* its stem with an exclusive
create of ``.<stem>.claim`` (atomic on local and NFSv3+ filesystems), so no two writers pick the same stem. Files are
written to temporary names and renamed into place, the PNG first and the sidecar last: a sidecar present means its
pair is complete. A write that fails (disk full) removes what it had written and releases the claim.
"""
from __future__ import annotations

import errno
import json
import os
import platform
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import torch

from .errors import SyncEngineError, one_line
from .pipeline import Generated

CLAIM_WAIT_S = 300.0
"""With ``overwrite``, how long a writer waits for another one writing the same name to finish."""


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("syncengine", "torch", "diffusers", "transformers", "lightning", "lpips", "omegaconf"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def claim_path(folder: Path, stem: str) -> Path:
    return folder / f".{stem}.claim"


def _try_claim(folder: Path, stem: str) -> bool:
    """Create ``.<stem>.claim`` exclusively; False when another writer holds it."""
    try:
        fd = os.open(claim_path(folder, stem), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    try:
        os.write(fd, f"{socket.gethostname()} {os.getpid()}\n".encode())
    except BaseException:
        os.close(fd)
        release(folder, stem)
        raise
    os.close(fd)
    return True


def _claim_is_stale(folder: Path, stem: str) -> bool:
    """A claim left by a process of this host that no longer runs (killed mid-write)."""
    try:
        host, pid = claim_path(folder, stem).read_text().split()
        if host != socket.gethostname():
            return False
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (OSError, ValueError):
        return False
    return False


def release(folder: Path, stem: str) -> None:
    try:
        os.unlink(claim_path(folder, stem))
    except FileNotFoundError:
        pass


def claim_stem(folder: Path, name: str, overwrite: bool) -> str:
    """Claim ``name``, or ``name-1``, ``name-2``... (the first whose files and claim do not exist); the caller writes
    then :func:`release`\\ s it. With ``overwrite`` the stem is always ``name``: wait for a concurrent writer of it."""
    if overwrite:
        deadline = time.monotonic() + CLAIM_WAIT_S
        while not _try_claim(folder, name):
            if _claim_is_stale(folder, name):
                release(folder, name)
                continue
            if time.monotonic() > deadline:
                raise SyncEngineError(f"{claim_path(folder, name)} is held by another writer; if no run is writing "
                                      f"{name!r}, delete that file")
            time.sleep(0.05)
        return name
    stem, k = name, 0
    while True:
        taken = (folder / f"{stem}.png").exists() or (folder / f"{stem}.json").exists()
        if not taken and _try_claim(folder, stem):
            # checked again under the claim: a writer may have finished this stem since the first look
            if not ((folder / f"{stem}.png").exists() or (folder / f"{stem}.json").exists()):
                return stem
            release(folder, stem)
        k += 1
        stem = f"{name}-{k}"


def free_stem(folder: Path, name: str, overwrite: bool) -> str:
    """``name``, or ``name-1``, ``name-2``... if files of that name exist (unless ``overwrite``). Not claimed: a
    concurrent writer may pick the same stem; writers use :func:`claim_stem`."""
    if overwrite:
        return name
    stem, k = name, 0
    while (folder / f"{stem}.png").exists() or (folder / f"{stem}.json").exists() or claim_path(folder, stem).exists():
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


def _temp_name(path: Path) -> Path:
    """Unique per process and thread: concurrent writers never share a temporary file."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}-{uuid.uuid4().hex[:8]}")


def _remove(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError:  # best effort: the failure being reported matters more
        pass


def _atomic_write(path: Path, write) -> None:
    tmp = _temp_name(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def _write_json(path: Path, data: dict[str, Any]) -> None:
    with open(path, "w") as f:
        f.write(json.dumps(data, indent=2, default=str))


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
    """Write the PNG and its JSON sidecar; returns the PNG path. On failure nothing of this output is left (a
    replaced output of the same name is removed too: half of a pair would be worse) and a one-line
    :class:`SyncEngineError` says why."""
    folder = Path(output_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        stem = claim_stem(folder, result.request.name, overwrite)
    except OSError as exc:
        raise SyncEngineError(f"cannot write to {str(folder)!r}: {one_line(exc)}") from exc
    png = folder / f"{stem}.png"
    written: list[Path] = []
    try:
        _atomic_write(png, lambda p: to_pil(result.image).save(p, format="PNG", pnginfo=png_info(result.metadata)))
        written.append(png)
        extras = {}
        for suffix, image in result.extra_images.items():  # e.g. a ControlNet's condition image, for inspection
            path = folder / f"{stem}.{suffix}.png"
            _atomic_write(path, lambda p, image=image: to_pil(image).save(p, format="PNG"))
            written.append(path)
            extras[suffix] = path.name
        meta = sidecar(result, png.name, {**({"extra_images": extras} if extras else {}),
                                          **result.metadata.get("sidecar", {})})
        _atomic_write(folder / f"{stem}.json", lambda p: _write_json(p, meta))
    except BaseException as exc:
        for path in written:
            _remove(path)
        if written:  # an older sidecar of this name (overwrite) would now describe nothing
            _remove(folder / f"{stem}.json")
        if isinstance(exc, OSError):
            reason = "disk full" if exc.errno == errno.ENOSPC else one_line(exc)
            raise SyncEngineError(f"could not write {png}: {reason}; nothing of it was kept") from exc
        raise
    finally:
        release(folder, stem)
    return png


def check_output_dir(output_dir: str | Path) -> Path:
    """Create the output folder and write a probe file there, so an unusable folder (a file, under a file, read-only,
    full) is a one-line error before any model loads rather than a traceback after the first image."""
    folder = Path(output_dir)
    key = "runtime.output_dir"
    if folder.exists() and not folder.is_dir():
        raise SyncEngineError(f"{key} {str(folder)!r} is a file, not a folder; choose another {key}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise SyncEngineError(f"{key} {str(folder)!r} cannot be created: a parent is a file; choose another {key}") \
            from None
    except OSError as exc:
        raise SyncEngineError(f"{key} {str(folder)!r} cannot be created ({one_line(exc)}); choose another {key}") \
            from None
    probe = _temp_name(folder / ".syncengine-probe")
    try:
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        try:
            os.write(fd, b"probe")
        finally:
            os.close(fd)
    except OSError as exc:
        raise SyncEngineError(f"{key} {str(folder)!r} is not writable ({one_line(exc)}); choose another {key}") \
            from None
    finally:
        _remove(probe)
    return folder
