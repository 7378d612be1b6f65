"""The Python API: the same operations as the CLI."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf

from .config import ResolvedSpec, apply_overrides, compose, parse_overrides, validate
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


def requests_from(prompts: str | Path | Sequence[str | dict], seeds: Sequence[int] | None = None) -> list[dict]:
    """Requests from a JSON-lines file or a list of prompts (strings or request mappings), with optional seeds."""
    if isinstance(prompts, (str, Path)):
        items = read_prompts(prompts)
    else:
        items = []
        for n, item in enumerate(prompts):
            item = {"prompt": item} if isinstance(item, str) else dict(item)
            unknown = set(item) - REQUEST_KEYS
            if "prompt" not in item or unknown:
                raise SyncEngineError(f"prompts[{n}]: needs a prompt and only the keys {sorted(REQUEST_KEYS)}")
            items.append(item)
        if not items:
            raise SyncEngineError("prompts is empty; give at least one prompt")
    if seeds is not None:
        seeds = list(seeds)
        if len(seeds) != len(items):
            raise SyncEngineError(f"{len(seeds)} seeds for {len(items)} prompts; give one seed per prompt")
        for item, seed in zip(items, seeds):
            item["seed"] = int(seed)
    return items


def resolve_run(
    spec: str | Path | dict | DictConfig | None = None,
    overrides: Sequence[str] = (),
    prompts: str | Path | Sequence[str | dict] | None = None,
    seeds: Sequence[int] | None = None,
) -> ResolvedSpec:
    """Spec, then the prompts (replacing the spec's requests), then the overrides (which may index requests)."""
    raw = compose(spec)
    if prompts is not None:
        raw.requests = OmegaConf.create(requests_from(prompts, seeds))
    elif seeds is not None:
        raise SyncEngineError("seeds given without prompts; pass prompts=[...] with one seed each")
    return validate(apply_overrides(raw, parse_overrides(list(overrides))))


def generate(
    spec: str | Path | dict | DictConfig | None = None,
    overrides: Sequence[str] = (),
    prompts: str | Path | Sequence[str | dict] | None = None,
    seeds: Sequence[int] | None = None,
):
    """Generate every request of a spec; returns a :class:`~syncengine.lightning_module.RunSummary`.

    ``generate("configs/demo.yaml", ["sync.weight=0"], prompts=["a beach", "a forest"], seeds=[1, 2])``
    """
    from .lightning_module import run

    return run(resolve_run(spec, overrides, prompts, seeds))
