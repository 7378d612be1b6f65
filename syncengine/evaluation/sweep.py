"""``syncengine sweep``: the same requests over a list of values of one spec key, one output folder per value.

``syncengine sweep configs/sd2-panorama.yaml sync.weight=0,10,20`` writes ``<output_dir>/sync.weight=0/``,
``.../sync.weight=10/`` and ``.../sync.weight=20/``; ``syncengine evaluate <output_dir>/*`` then compares them (the
paper's weight study in two commands). Every spec is validated before the first image is generated.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ..errors import SyncEngineError


@dataclass
class SweepRun:
    value: str
    output_dir: Path
    written: list[Path] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)


def parse_sweep(item: str) -> tuple[str, list[str]]:
    """``"sync.weight=0,10,20"`` -> ``("sync.weight", ["0", "10", "20"])``."""
    key, sep, values = item.partition("=")
    parts = [v.strip() for v in values.split(",")]
    if not sep or not key or not values or any(v == "" for v in parts):
        raise SyncEngineError(f"sweep {item!r} is not key=v1,v2,... (e.g. sync.weight=0,10,20)")
    if len(set(parts)) != len(parts):
        raise SyncEngineError(f"sweep {item!r} repeats a value")
    return key.strip(), parts


def folder_name(key: str, value: str) -> str:
    """A file-system safe folder name for one value: ``sync.weight=10``."""
    return re.sub(r"[^A-Za-z0-9._=+-]+", "_", f"{key}={value}")


def plan(spec, sweep: str, overrides: Sequence[str] = (), prompts=None):
    """The validated spec of every value, with its output folder: ``[(value, folder, resolved)]``."""
    from ..api import resolve_run

    key, values = parse_sweep(sweep)
    if any(o.split("=", 1)[0].strip() == key for o in overrides):
        raise SyncEngineError(f"{key} is both swept and overridden; drop the override")
    base = resolve_run(spec, list(overrides), prompts)
    root = Path(str(base.config.runtime.output_dir))
    out = []
    for value in values:
        folder = root / folder_name(key, value)
        resolved = resolve_run(spec, [*overrides, f"{key}={value}", f"runtime.output_dir={folder}"], prompts)
        out.append((value, folder, resolved))
    return out


def sweep(spec, sweep: str, overrides: Sequence[str] = (), prompts=None, on_value=None) -> list[SweepRun]:
    """Generate every request once per value of the swept key; returns one :class:`SweepRun` per value."""
    from ..lightning_module import run

    runs = []
    for value, folder, resolved in plan(spec, sweep, overrides, prompts):
        if on_value is not None:
            on_value(value, folder, resolved)
        summary = run(resolved)
        runs.append(SweepRun(value, folder, list(summary.written), list(summary.failed)))
    return runs
