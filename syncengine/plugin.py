"""The base of every plugin: a class with a typed options dataclass.

A plugin declares ``Config``, a dataclass of its options. The spec section that names the plugin (``tiler: {name:
sliding, window: 512}``) is validated against it before any model loads, and the plugin is built from the validated
instance. This is what lets a wrong key fail in a second, with the key's name, instead of after a download.
"""
from __future__ import annotations

from abc import ABCMeta
from dataclasses import dataclass
from typing import Any, ClassVar


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


class Plugin(metaclass=ABCMeta):
    """Base class of tilers, mergers, denoisers, sync losses and preprocessors.

    An ABC so that a base's ``@abstractmethod`` is a contract: a subclass that misses one cannot be built. (A
    ``SyncLoss`` is also an ``nn.Module``, whose metaclass is plain ``type``; ``ABCMeta`` derives from it, so the two
    combine.)
    """

    Config: ClassVar[type] = NoOptions

    def __new__(cls, *args: Any, **kwargs: Any):
        # object.__new__ also refuses, but its message varies by Python version; this one is the registry's wording.
        if missing_methods(cls):
            raise TypeError(abstract_message(cls))
        return super().__new__(cls)

    def __init__(self, config: Any = None):
        self.config = config if config is not None else self.Config()
