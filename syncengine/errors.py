"""User-facing errors.

Everything a user can fix (a bad config key, an unknown plugin, a missing model, a bad mask file) is raised as a
:class:`SyncEngineError` with a one-line message that says what was wrong and what to do. The CLI prints the message
and exits with status 2; anything else is a bug and keeps its traceback.
"""


class SyncEngineError(Exception):
    """A problem with the user's input, reported as one line (the CLI exits 2)."""


class ConfigError(SyncEngineError, ValueError):
    """A spec that does not validate: names the key, the bad value and the fix."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"config error at '{key}': {message}")


class PluginNotFoundError(SyncEngineError, LookupError):
    """An unknown plugin name in a registry group."""


class PluginContractError(SyncEngineError, TypeError):
    """A plugin class that cannot be used as registered: still abstract, or a name taken by another plugin."""


class ModelNotFoundError(SyncEngineError, FileNotFoundError):
    """A model (weights, tokenizer, backbone) that is not available locally and cannot be fetched."""


def one_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message, shortened, for a one-line error that names its cause; the
    exception's type when it has no message (``str(exc)`` may be empty: never index its lines blindly)."""
    lines = str(exc).strip().splitlines()
    return lines[0][:limit] if lines else type(exc).__name__
