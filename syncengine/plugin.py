"""The base of every plugin: a class with a typed options dataclass.

A plugin declares ``Config``, a dataclass of its options. The spec section that names the plugin (``tiler: {name:
sliding, window: 512}``) is validated against it before any model loads, and the plugin is built from the validated
instance. This is what lets a wrong key fail in a second, with the key's name, instead of after a download.
"""
from __future__ import annotations

import dataclasses
from abc import ABCMeta
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Union, get_args, get_origin, get_type_hints

from .errors import ConfigError


@dataclass
class NoOptions:
    """Options of a plugin that takes none."""


def missing_methods(cls: type) -> list[str]:
    """The abstract methods ``cls`` leaves unimplemented, sorted (empty for a complete plugin)."""
    return sorted(getattr(cls, "__abstractmethods__", ()))


def abstract_message(cls: type) -> str:
    """One line naming an incomplete plugin class and what it lacks (used at instantiation and by the registry)."""
    return (f"plugin class {cls.__module__}.{cls.__qualname__} is abstract: it does not implement "
            f"{', '.join(missing_methods(cls))}")


def check_choices(config: Any, where: str) -> None:
    """A dataclass config's closed-set (``Literal``) fields hold one of their values, else a one-line error naming
    ``<where>.<field>`` in the typed configs' wording. A spec gets this check where OmegaConf types it; this is the
    same rule, from the same ``Literal``, for a plugin built directly from a config object."""
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        return
    try:
        hints = get_type_hints(type(config))
    except Exception:  # noqa: BLE001 - annotations that do not resolve (a local class): nothing to check by type
        return
    for f in dataclasses.fields(config):
        hint = hints.get(f.name)
        options = get_args(hint) if get_origin(hint) is Union else (hint,)
        allowed = [v for option in options if get_origin(option) is Literal for v in get_args(option)]
        value = getattr(config, f.name)
        others = tuple(o for o in options if get_origin(o) is not Literal and isinstance(o, type))
        if allowed and value not in allowed and not isinstance(value, others):
            key = f"{where}.{f.name}" if where else f.name
            raise ConfigError(key, f"{value!r} is not one of {', '.join(map(str, allowed))}")


class Plugin(metaclass=ABCMeta):
    """Base class of tilers, mergers, denoisers, sync losses and preprocessors.

    An ABC so that a base's ``@abstractmethod`` is a contract: a subclass that misses one cannot be built. (A
    ``SyncLoss`` is also an ``nn.Module``, whose metaclass is plain ``type``; ``ABCMeta`` derives from it, so the two
    combine.)
    """

    Config: ClassVar[type] = NoOptions
    section: ClassVar[str] = ""  # the spec section its options come from (``merger``), for error keys

    def __new__(cls, *args: Any, **kwargs: Any):
        # object.__new__ also refuses, but its message varies by Python version; this one is the registry's wording.
        if missing_methods(cls):
            raise TypeError(abstract_message(cls))
        return super().__new__(cls)

    def __init__(self, config: Any = None):
        self.config = config if config is not None else self.Config()
        check_choices(self.config, self.section)
