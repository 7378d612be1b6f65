"""Plugin registry over ``importlib.metadata`` entry points, plus classes registered in-process.

Built-in plugins are registered in ``pyproject.toml`` exactly as a third-party package registers its own, under the
groups in :data:`GROUPS`. Nothing is imported until a plugin is asked for by name. :func:`register` adds a class
defined in a notebook, a test or a script without packaging it (as timm's ``register_model``); packages keep using
entry points.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Callable, TypeVar

try:  # Python 3.12+ has the selectable API in the stdlib; the backport keeps 3.10/3.11 identical.
    from importlib_metadata import EntryPoint, entry_points
except ImportError:  # pragma: no cover
    from importlib.metadata import EntryPoint, entry_points  # type: ignore[assignment]

from .errors import PluginContractError, PluginNotFoundError  # the contract error stays importable from here
from .plugin import abstract_message, missing_methods

GROUPS: dict[str, str] = {
    "tiler": "syncengine.tilers",
    "merger": "syncengine.mergers",
    "denoiser": "syncengine.denoisers",
    "sync_loss": "syncengine.sync_losses",
    "preprocessor": "syncengine.preprocessors",
}


REGISTERED = "registered in-process"  # the ``distribution`` of a class added by :func:`register`

_registered: dict[str, dict[str, type]] = {kind: {} for kind in GROUPS}
_names: dict[tuple[str, type], str] = {}  # (kind, class) -> the name it was last looked up or registered under

P = TypeVar("P", bound=type)


@dataclass(frozen=True)
class PluginInfo:
    kind: str
    name: str
    target: str  # "module:attr"
    distribution: str  # "<name> <version>", or REGISTERED

    @property
    def registered(self) -> bool:
        """True for a class added by :func:`register` (not installed as an entry point)."""
        return self.distribution == REGISTERED

    def load(self):
        if self.registered:
            return _registered[self.kind][self.name]
        return _entry_point(self.kind, self.name).load()


def _target(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def register(kind: str, name: str, *, replace: bool = False) -> Callable[[P], P]:
    """Class decorator: make ``cls`` the ``kind`` plugin ``name`` in this process, without installing anything.

    ``@register("tiler", "my-tiler")`` on a :class:`~syncengine.tiler.Tiler` subclass lets a spec say
    ``tiler: {name: my-tiler}``. ``kind`` is one of :data:`GROUPS` (as for :func:`get`). A name already used by an
    installed (entry-point) plugin, or registered to a different class, is an error unless ``replace=True``, which
    then shadows it; registering the same class again (a re-run notebook cell) just updates it. The class must
    implement every abstract method of its base.
    """
    _table(kind)

    def decorate(cls: P) -> P:
        if not isinstance(cls, type):
            raise PluginContractError(f"register({kind!r}, {name!r}) decorates a class, got {cls!r}")
        if missing_methods(cls):
            raise PluginContractError(f"cannot register {kind} plugin {name!r}: {abstract_message(cls)}")
        if not replace:
            previous = _registered[kind].get(name)
            if previous is not None and _target(previous) != _target(cls):
                raise PluginContractError(f"{kind} plugin {name!r} is already registered as {_target(previous)}; "
                                          f"pass replace=True to register {_target(cls)} in its place")
            ep = _entry_points(kind).get(name)
            if previous is None and ep is not None:
                raise PluginContractError(f"{kind} plugin {name!r} is already installed by {_dist_name(ep)} as "
                                          f"{ep.value}; pick another name or pass replace=True to shadow it")
        _registered[kind][name] = cls
        _names[(kind, cls)] = name
        return cls

    return decorate


def unregister(kind: str, name: str) -> None:
    """Undo :func:`register` (an installed plugin of that name, if any, is visible again); a no-op when absent."""
    cls = _table(kind).pop(name, None)
    if cls is not None and _names.get((kind, cls)) == name:
        del _names[(kind, cls)]


def name_of(kind: str, plugin: object) -> str | None:
    """The name a plugin (class or instance) is registered under in ``kind``, so a plugin need not repeat its own
    entry-point name: the name its class was looked up or registered by, else the entry point naming its class,
    else the same for its nearest base. None when no class in its hierarchy is registered."""
    cls = plugin if isinstance(plugin, type) else type(plugin)
    by_target = {ep.value.replace(" ", ""): n for n, ep in _entry_points(kind).items()}
    for c in cls.__mro__:
        if (kind, c) in _names:
            return _names[(kind, c)]
        if _target(c) in by_target:
            return by_target[_target(c)]
    return None


def _group(kind: str) -> str:
    try:
        return GROUPS[kind]
    except KeyError:
        raise PluginNotFoundError(f"unknown plugin kind {kind!r}; kinds: {', '.join(GROUPS)}") from None


def _table(kind: str) -> dict[str, type]:
    """The classes :func:`register` added to ``kind`` (an unknown kind is the same error as for entry points)."""
    _group(kind)
    return _registered[kind]


def _entry_points(kind: str) -> dict[str, EntryPoint]:
    found: dict[str, EntryPoint] = {}
    for ep in entry_points(group=_group(kind)):
        found.setdefault(ep.name, ep)  # first on sys.path wins, as for imports
    return found


def _entry_point(kind: str, name: str) -> EntryPoint:
    eps = _entry_points(kind)
    if name in eps:
        return eps[name]
    names = sorted(set(eps) | set(_registered[kind]))
    close = difflib.get_close_matches(name, names, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    listing = ", ".join(names) if names else "none installed"
    raise PluginNotFoundError(
        f"no {kind} plugin named {name!r} (group {_group(kind)}); available: {listing}.{hint}"
    )


def names(kind: str) -> list[str]:
    return sorted(set(_entry_points(kind)) | set(_registered[kind]))


def get(kind: str, name: str) -> type:
    """The plugin class registered as ``name`` in ``kind`` (imports it now, not before): one added by
    :func:`register` first, else the entry point of that name in ``kind``'s group."""
    cls = _table(kind).get(name)
    if cls is None:
        ep = _entry_point(kind, name)
        try:
            cls = ep.load()
        except ImportError as exc:
            raise PluginNotFoundError(
                f"{kind} plugin {name!r} is registered by {_dist_name(ep)} as {ep.value} but cannot be imported: {exc}"
            ) from exc
        if isinstance(cls, type) and missing_methods(cls):
            raise PluginContractError(f"{kind} plugin {name!r} ({_dist_name(ep)}): {abstract_message(cls)}")
    _names[(kind, cls)] = name
    return cls


def _dist_name(ep: EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "unknown"
    return f"{dist.metadata['Name']} {dist.version}"


def list_plugins() -> list[PluginInfo]:
    """Every plugin, by kind then name, with the distribution that provides it (:data:`REGISTERED` for one added by
    :func:`register`, which shadows an installed one of the same name)."""
    rows = []
    for kind in GROUPS:
        found = {name: PluginInfo(kind, name, ep.value, _dist_name(ep)) for name, ep in _entry_points(kind).items()}
        for name, cls in _registered[kind].items():
            found[name] = PluginInfo(kind, name, _target(cls), REGISTERED)
        rows += [found[name] for name in sorted(found)]
    return rows
