"""The Python API: the same operations as the CLI."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf

from .config import ResolvedSpec, compose, validate
from .errors import SyncEngineError

REQUEST_KEYS = {"prompt", "negative_prompt", "seed", "name", "inputs", "overrides"}


def read_prompts(path: str | Path) -> list[dict[str, Any]]:
    """Requests from a JSON-lines file: one object per line with prompt, negative_prompt, seed, name, overrides."""
    path = Path(path)
    if not path.is_file():
        raise SyncEngineError(f"prompts file {str(path)!r} not found")
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SyncEngineError(f"{path}:{n}: not a JSON object ({exc.msg}); write one object per line") from None
        if isinstance(item, str):
            item = {"prompt": item}
        if not isinstance(item, dict) or "prompt" not in item:
            raise SyncEngineError(f"{path}:{n}: each line needs a \"prompt\" (and optional seed, name, overrides)")
        unknown = set(item) - REQUEST_KEYS
        if unknown:
            raise SyncEngineError(f"{path}:{n}: unknown keys {sorted(unknown)}; allowed: {sorted(REQUEST_KEYS)}")
        out.append(item)
    if not out:
        raise SyncEngineError(f"prompts file {str(path)!r} has no requests")
    return out


def resolve_run(
    spec: str | Path | dict | DictConfig | None = None,
    overrides: Sequence[str] = (),
    prompts: str | Path | None = None,
) -> ResolvedSpec:
    raw = compose(spec, list(overrides))
    if prompts is not None:
        raw.requests = OmegaConf.create(read_prompts(prompts))
    return validate(raw)


def generate(
    spec: str | Path | dict | DictConfig | None = None,
    overrides: Sequence[str] = (),
    prompts: str | Path | None = None,
):
    """Generate every request of a spec; returns a :class:`~syncengine.lightning_module.RunSummary`.

    ``generate("configs/demo.yaml", ["sync.weight=0", "runtime.output_dir=out"])``
    """
    from .lightning_module import run

    return run(resolve_run(spec, overrides, prompts))
