"""The page: outputs grouped by (prompt, seed) so a sweep's members sit side by side, each with the settings that
differ inside its group, timings and metrics. Static HTML plus two small assets and the vendored viewer."""
from __future__ import annotations

import html
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import SyncEngineError
from .collect import Entry, collect
from .thumbnails import pano_script, thumbnail

HERE = Path(__file__).parent
IGNORED_SETTINGS = ("runtime.", "requests")
"""Spec keys that differ between runs without changing the image (where it was written, the request list)."""


@dataclass
class GalleryResult:
    page: Path
    images: int
    groups: int
    skipped: list[str] = field(default_factory=list)


def flatten(spec: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(spec, dict):
        out = {}
        for k, v in spec.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: spec}


def differing(entries: list[Entry]) -> list[str]:
    """Spec keys whose value is not the same in every entry (sorted)."""
    flats = [flatten(e.spec) for e in entries]
    keys = sorted(set().union(*flats))
    return [k for k in keys if not k.startswith(IGNORED_SETTINGS)
            and len({repr(f.get(k)) for f in flats}) > 1]


def group(entries: list[Entry]) -> list[list[Entry]]:
    """Entries with the same prompt and seed; groups of several (sweeps: the comparisons) first, then first-seen."""
    groups: dict[tuple[str, str], list[Entry]] = {}
    for e in entries:
        groups.setdefault((e.prompt, repr(e.seed)), []).append(e)
    return sorted(groups.values(), key=lambda members: len(members) == 1)


def _rel(path: Path, out: Path) -> str:
    return Path(os.path.relpath(path.resolve(), out.resolve())).as_posix()


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _card(e: Entry, diffs: list[str], out: Path) -> str:
    esc = html.escape
    thumb = _rel(thumbnail(e.image, out), out)
    full = _rel(e.image, out)
    name = esc(str(e.sidecar.get("name", e.image.stem)))
    if e.kind == "equirectangular":
        script, key = pano_script(e.image, out)
        view = (f'<div class="pano" data-pano="{esc(_rel(script, out))}" data-pano-id="{key}"></div>'
                f'<a class="open" href="{esc(full)}">equirectangular image</a>')
    elif e.kind == "loop":
        img = f'<img src="{esc(thumb)}" alt="{name}" draggable="false">'
        view = (f'<div class="loop-strip" title="loop panorama: scroll or drag, it wraps around">'
                f'<div class="loop-track">{img * 3}</div></div>')
    else:
        view = f'<a href="{esc(full)}"><img class="thumb" src="{esc(thumb)}" alt="{name}" loading="lazy"></a>'
    flat = flatten(e.spec)
    rows = [f"<tr><th>{esc(k)}</th><td>{esc(_fmt(flat.get(k)))}</td></tr>" for k in diffs]
    timings = e.sidecar.get("timings_s") or {}
    if timings:
        rows.append("<tr><th>time</th><td>" + esc(", ".join(f"{k} {_fmt(v)} s" for k, v in timings.items()))
                    + "</td></tr>")
    for k, v in e.metrics.items():
        rows.append(f'<tr class="metric"><th>{esc(k)}</th><td>{esc(_fmt(v))}</td></tr>')
    extras = "".join(f'<a class="extra" href="{esc(_rel(p, out))}"><img src="{esc(_rel(thumbnail(p, out), out))}" '
                     f'alt="{esc(label)}" loading="lazy"><span>{esc(label)}</span></a>'
                     for label, p in e.extras.items())
    exports = (e.sidecar.get("projection") or {}).get("exports") or {}
    if exports:
        extras += f'<p class="exports">exports: {esc(", ".join(exports))}</p>'
    extras_html = f'<div class="extras">{extras}</div>' if extras else ""
    return (f'<figure class="card {e.kind}" data-name="{name}">{view}<figcaption><b>{name}</b> '
            f'<span class="path">{esc(full)}</span><table>{"".join(rows)}</table>'
            f'{extras_html}</figcaption></figure>')


def _section(members: list[Entry], out: Path) -> str:
    esc = html.escape
    diffs = differing(members) if len(members) > 1 else []
    first = members[0]
    kind = "sweep" if len(members) > 1 else "single"
    varies = f' <span class="varies">varies: {esc(", ".join(diffs))}</span>' if diffs else ""
    head = (f'<h2><span class="prompt">{esc(first.prompt) or "(no prompt)"}</span> <span class="seed">seed '
            f"{esc(str(first.seed))}</span>{varies}</h2>")
    cards = "".join(_card(e, diffs, out) for e in members)
    return f'<section class="group {kind}">{head}<div class="members">{cards}</div></section>'


def _copy_assets(out: Path) -> None:
    for src in (HERE / "assets").iterdir():
        shutil.copyfile(src, out / src.name)
    shutil.copytree(HERE / "vendor", out / "vendor", dirs_exist_ok=True)


def build_gallery(folders: list[str | Path], out_dir: str | Path = "gallery") -> GalleryResult:
    """Write ``<out_dir>/index.html`` for the outputs under ``folders``; returns what it showed and skipped."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise SyncEngineError(f"gallery folder {str(out)!r} is a file, not a folder; give --out a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SyncEngineError(f"cannot create gallery folder {str(out)!r}: {exc.strerror}") from exc
    found = collect(folders, exclude=out)
    groups = group(found.entries)
    skipped = list(found.skipped)
    sections = []
    for members in groups:
        try:
            sections.append(_section(members, out))
        except OSError as exc:  # an image that exists but does not decode
            skipped.append(f"{members[0].image}: could not be read ({exc}), group skipped")
    skipped_html = "".join(f"<li>{html.escape(s)}</li>" for s in skipped)
    template = (HERE / "template.html").read_text()
    page = (template.replace("{{count}}", f"{len(found.entries)} images in {len(groups)} groups")
            .replace("{{skipped}}", f'<details class="skipped" open><summary>{len(skipped)} skipped</summary>'
                                    f"<ul>{skipped_html}</ul></details>" if skipped else "")
            .replace("{{sections}}", "\n".join(sections) or '<p class="empty">nothing to show</p>'))
    _copy_assets(out)
    index = out / "index.html"
    index.write_text(page)
    return GalleryResult(page=index, images=len(found.entries), groups=len(groups), skipped=skipped)
