"""Plugin registry over ``importlib.metadata`` entry points.

Built-in plugins are registered in ``pyproject.toml`` exactly as a third-party package registers its own, under the
groups in :data:`GROUPS`. Nothing is imported until a plugin is asked for by name.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass

try:  # Python 3.12+ has the selectable API in the stdlib; the backport keeps 3.10/3.11 identical.
    from importlib_metadata import EntryPoint, entry_points
except ImportError:  # pragma: no cover
    from importlib.metadata import EntryPoint, entry_points  # type: ignore[assignment]

from .errors import PluginNotFoundError

GROUPS: dict[str, str] = {
    "tiler": "syncengine.tilers",
    "merger": "syncengine.mergers",
    "denoiser": "syncengine.denoisers",
    "sync_loss": "syncengine.sync_losses",
    "preprocessor": "syncengine.preprocessors",
}


@dataclass(frozen=True)
class PluginInfo:
    kind: str
    name: str
    target: str  # "module:attr"
    distribution: str

    def load(self):
        return _entry_point(self.kind, self.name).load()


def _group(kind: str) -> str:
    try:
        return GROUPS[kind]
    except KeyError:
        raise PluginNotFoundError(f"unknown plugin kind {kind!r}; kinds: {', '.join(GROUPS)}") from None


def _entry_points(kind: str) -> dict[str, EntryPoint]:
    found: dict[str, EntryPoint] = {}
    for ep in entry_points(group=_group(kind)):
        found.setdefault(ep.name, ep)  # first on sys.path wins, as for imports
    return found


def _entry_point(kind: str, name: str) -> EntryPoint:
    eps = _entry_points(kind)
    if name in eps:
        return eps[name]
    names = sorted(eps)
    close = difflib.get_close_matches(name, names, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    listing = ", ".join(names) if names else "none installed"
    raise PluginNotFoundError(
        f"no {kind} plugin named {name!r} (group {_group(kind)}); available: {listing}.{hint}"
    )


def names(kind: str) -> list[str]:
    return sorted(_entry_points(kind))


def get(kind: str, name: str) -> type:
    """The plugin class registered as ``name`` in ``kind``'s group (imports it now, not before)."""
    ep = _entry_point(kind, name)
    try:
        return ep.load()
    except ImportError as exc:
        raise PluginNotFoundError(
            f"{kind} plugin {name!r} is registered by {_dist_name(ep)} as {ep.value} but cannot be imported: {exc}"
        ) from exc


def _dist_name(ep: EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "unknown"
    return f"{dist.metadata['Name']} {dist.version}"


def list_plugins() -> list[PluginInfo]:
    """Every registered plugin, by kind then name, with the distribution that provides it."""
    rows = []
    for kind in GROUPS:
        for name, ep in sorted(_entry_points(kind).items()):
            rows.append(PluginInfo(kind, name, ep.value, _dist_name(ep)))
    return rows
