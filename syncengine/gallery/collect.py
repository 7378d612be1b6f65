"""Find the outputs in folders: ``<name>.png`` + ``<name>.json`` pairs and evaluation ``metrics.json``. Whatever
cannot be shown becomes one ``skipped`` line, so a bad folder never stops the page."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SIDECAR_KEYS = ("image", "spec", "seed", "request")
"""Keys every sidecar of this version has; one without them is from another version (or not a sidecar)."""


@dataclass
class Entry:
    """One output image with what the page shows about it."""

    image: Path
    sidecar: dict[str, Any]
    folder: Path
    extras: dict[str, Path] = field(default_factory=dict)  # label -> file: condition images, masks, layouts
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def prompt(self) -> str:
        return str(self.sidecar.get("request", {}).get("prompt", ""))

    @property
    def seed(self) -> Any:
        return self.sidecar.get("seed")

    @property
    def spec(self) -> dict[str, Any]:
        return self.sidecar.get("spec") or {}

    @property
    def kind(self) -> str:
        """``equirectangular`` (360° viewer), ``loop`` (wrapping strip) or ``flat``."""
        if (self.sidecar.get("projection") or {}).get("type") == "equirectangular":
            return "equirectangular"
        if (self.spec.get("tiler") or {}).get("loop"):
            return "loop"
        return "flat"


@dataclass
class Collection:
    entries: list[Entry] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def _layout_files(entry: Entry) -> dict[str, Path]:
    """A regions run's layout image and mask PNGs, found next to the output or among the presets."""
    from ..config import PRESETS_DIR

    tiler = entry.spec.get("tiler") or {}
    wanted = {}
    if tiler.get("layout"):
        wanted["layout"] = str(tiler["layout"])
    for i, region in enumerate(tiler.get("regions") or []):
        if isinstance(region, dict) and region.get("png"):
            wanted[f"mask {i}"] = str(region["png"])
    found = {}
    for label, name in wanted.items():
        for base in (entry.folder, Path.cwd(), PRESETS_DIR):
            path = base / name
            if path.is_file():
                found[label] = path
                break
    return found


def _read_metrics(path: Path, collection: Collection) -> dict[Path, dict[str, float]]:
    try:
        runs = json.loads(path.read_text())["runs"]
        return {Path(r["folder"]).resolve(): {k: v for k, v in r["metrics"].items() if v is not None} for r in runs}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        collection.skipped.append(f"{path}: not an evaluation report ({type(exc).__name__}), metrics not shown")
        return {}


def _read_sidecar(path: Path, collection: Collection) -> Entry | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        collection.skipped.append(f"{path}: unreadable JSON ({type(exc).__name__})")
        return None
    if not isinstance(data, dict):
        collection.skipped.append(f"{path}: not a sidecar (a JSON {type(data).__name__})")
        return None
    missing = [k for k in SIDECAR_KEYS if k not in data]
    missing += [k for k, kind in (("image", str), ("spec", dict), ("request", dict))
                if k in data and not isinstance(data[k], kind)]  # present with another shape: as good as absent
    if missing:
        version = (data.get("versions") or {}).get("syncengine", "unknown") if isinstance(data.get("versions"),
                                                                                          dict) else "unknown"
        collection.skipped.append(f"{path}: sidecar from another version (syncengine {version}), no "
                                  f"{', '.join(missing)}")
        return None
    image = path.parent / str(data["image"])
    if not image.is_file():
        collection.skipped.append(f"{path}: its image {data['image']} is missing")
        return None
    entry = Entry(image=image, sidecar=data, folder=path.parent)
    for label, name in (data.get("extra_images") or {}).items():
        extra = path.parent / str(name)
        if extra.is_file():
            entry.extras[str(label)] = extra
        else:
            collection.skipped.append(f"{path}: its {label} image {name} is missing")
    entry.extras.update(_layout_files(entry))
    return entry


def collect(folders: list[str | Path], exclude: Path | None = None) -> Collection:
    """Every output under ``folders`` (recursively), sorted by path; ``exclude`` (the page's own folder) is not read."""
    out = Collection()
    metrics: dict[Path, dict[str, float]] = {}
    exclude = exclude.resolve() if exclude else None
    for folder in map(Path, folders):
        if not folder.is_dir():
            out.skipped.append(f"{folder}: not a folder")
            continue
        found = 0
        pngs = 0
        reported = len(out.skipped)
        for root, dirs, files in os.walk(folder):
            dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                             and (exclude is None or (Path(root) / d).resolve() != exclude))
            for name in sorted(files):
                path = Path(root) / name
                if name.startswith("."):
                    continue
                if name == "metrics.json":
                    metrics.update(_read_metrics(path, out))
                elif name.endswith(".json"):
                    entry = _read_sidecar(path, out)
                    if entry is not None:
                        out.entries.append(entry)
                        found += 1
                elif name.endswith(".png"):
                    pngs += 1
        if not found and len(out.skipped) == reported:  # one line per problem: a bad sidecar already said why
            why = f"{pngs} PNG(s) but no sidecars" if pngs else "no outputs"
            out.skipped.append(f"{folder}: {why}, nothing to show")
    for entry in out.entries:
        entry.metrics = metrics.get(entry.folder.resolve(), {})
    return out
