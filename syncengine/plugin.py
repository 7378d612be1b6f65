"""The base of every plugin: a class with a typed options dataclass.

A plugin declares ``Config``, a dataclass of its options. The spec section that names the plugin (``tiler: {name:
sliding, window: 512}``) is validated against it before any model loads, and the plugin is built from the validated
instance. This is what lets a wrong key fail in a second, with the key's name, instead of after a download.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar


@dataclass
class NoOptions:
    """Options of a plugin that takes none."""


class Plugin:
    """Base class of tilers, mergers, denoisers, sync losses and preprocessors."""

    Config: ClassVar[type] = NoOptions

    def __init__(self, config: Any = None):
        self.config = config if config is not None else self.Config()
