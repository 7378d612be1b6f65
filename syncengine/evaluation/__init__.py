"""Evaluation: the SyncDiffusion paper's coherence, fidelity and quality metrics over folders of generated
panoramas (``syncengine evaluate``), and parameter sweeps that produce such folders (``syncengine sweep``).

Imports are lazy so that the CLI can register these subcommands without importing torch.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "grid_crops": "crops", "pairs": "crops", "random_crops": "crops",
    "METRICS": "runner", "EvalOptions": "runner", "RunResult": "runner", "evaluate": "runner", "table": "runner",
    "write_reports": "runner",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
