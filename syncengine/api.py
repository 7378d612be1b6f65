"""The Python API: the same operations as the CLI."""
from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf

from .config import ResolvedSpec, apply_overrides, compose, parse_overrides, validate
from .errors import ConfigError, SyncEngineError
from .user_text import literal, literal_request

REQUEST_KEYS = {"prompt", "negative_prompt", "seed", "name", "inputs", "overrides"}


class RequestSourceError(ConfigError):
    """A request that does not validate, reported where the user wrote it (``prompts.jsonl:3: seed: ...``,
    ``prompts[2]: ...``) rather than as ``requests.2.seed``, which names no line of any file the user has."""

    def __init__(self, key: str, where: str, message: str):
        self.key = key  # still the spec key, for callers that catch ConfigError
        SyncEngineError.__init__(self, f"{where}: {message}")


def _read_prompt_lines(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, request) for each request of a JSON-lines file; the text as written (never interpolated)."""
    shown = str(path)
    path = Path(path)
    if not path.is_file():
        if path.exists() or path.suffix.lower() in (".jsonl", ".json", ".txt") or "/" in shown:
            raise SyncEngineError(f"prompts file {shown!r} not found (or not a file); give a JSON-lines file, one "
                                  "request per line")
        raise SyncEngineError(f"prompts {shown!r} is not a file; give a JSON-lines file (one request per line), "
                              f"or pass the text itself as a list: prompts=[{shown!r}]")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SyncEngineError(f"{shown}: not UTF-8 text (byte {exc.start}: {exc.reason}); give a JSON-lines file, "
                              "one request per line") from None
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SyncEngineError(f"{shown}:{n}: not a JSON object ({exc.msg}); write one object per line") from None
        if isinstance(item, str):
            item = {"prompt": item}
        if not isinstance(item, dict) or "prompt" not in item:
            raise SyncEngineError(f"{shown}:{n}: each line needs a \"prompt\" (and optional seed, name, overrides)")
        unknown = set(item) - REQUEST_KEYS
        if unknown:
            raise SyncEngineError(f"{shown}:{n}: unknown keys {sorted(unknown)}; allowed: {sorted(REQUEST_KEYS)}")
        out.append((n, literal_request(item, literal)))
    if not out:
        raise SyncEngineError(f"prompts file {shown!r} has no requests")
    return out


def read_prompts(path: str | Path) -> list[dict[str, Any]]:
    """Requests from a JSON-lines file: one object per line with prompt, negative_prompt, seed, name, overrides."""
    return [item for _, item in _read_prompt_lines(path)]


def _requests_and_sources(prompts: Any, seeds: Any) -> tuple[list[dict], list[dict[str, str]]]:
    """The requests of ``prompts`` (and ``seeds``) and, for each, where it came from: ``{"": "file:line"}`` or
    ``{"": "prompts[i]"}``, plus ``"seed": "seeds[i]"`` where ``seeds`` gave its seed."""
    if isinstance(prompts, (str, Path)):
        lines = _read_prompt_lines(prompts)
        items, where = [item for _, item in lines], [{"": f"{prompts}:{n}"} for n, _ in lines]
    elif isinstance(prompts, Sequence) and not isinstance(prompts, (bytes, bytearray)):
        items, where = [], []
        for n, item in enumerate(prompts):
            if isinstance(item, str):
                item = {"prompt": item}
            elif isinstance(item, Mapping):
                item = dict(item)
            else:
                raise SyncEngineError(f"prompts[{n}] is {type(item).__name__} {item!r}; give a prompt string or a "
                                      "request mapping ({'prompt': ..., 'seed': ...})")
            unknown = set(item) - REQUEST_KEYS
            if "prompt" not in item or unknown:
                raise SyncEngineError(f"prompts[{n}]: needs a prompt and only the keys {sorted(REQUEST_KEYS)}")
            items.append(literal_request(item, literal))
            where.append({"": f"prompts[{n}]"})
        if not items:
            raise SyncEngineError("prompts is empty; give at least one prompt")
    else:
        raise SyncEngineError(f"prompts is {type(prompts).__name__} {prompts!r}; give a list of prompts "
                              "(['a beach']) or a JSON-lines file path")
    if seeds is not None:
        if isinstance(seeds, (str, bytes, Mapping)) or not isinstance(seeds, Sequence):
            raise SyncEngineError(f"seeds is {type(seeds).__name__} {seeds!r}; give a list with one integer seed "
                                  f"per prompt, e.g. seeds=[0]")
        if len(seeds) != len(items):
            raise SyncEngineError(f"{len(seeds)} seeds for {len(items)} prompts; give one seed per prompt")
        for i, (item, seed) in enumerate(zip(items, seeds)):
            item["seed"] = seed  # checked by validation like any seed (1.7 is not 1)
            where[i]["seed"] = f"seeds[{i}]"
    return items, where


def requests_from(prompts: str | Path | Sequence[str | dict], seeds: Sequence[int] | None = None) -> list[dict]:
    """Requests from a JSON-lines file or a list of prompts (strings or request mappings), with optional seeds."""
    return _requests_and_sources(prompts, seeds)[0]


def _at_source(exc: ConfigError, where: list[dict[str, str]], override_keys: list[str]) -> ConfigError:
    """A request's error reported at its source, unless a command-line override set that key (then it is right)."""
    m = re.fullmatch(r"requests\.(\d+)(?:\.(.+))?", exc.key)
    if m is None or int(m[1]) >= len(where):
        return exc
    for key in override_keys:  # `requests.0.seed=x` is where that seed came from
        if key == exc.key or exc.key.startswith(f"{key}.") or key.startswith(f"{exc.key}."):
            return exc
    message = str(exc).removeprefix(f"config error at '{exc.key}': ")
    labels, field = where[int(m[1])], m[2] or ""
    if field in labels:
        return RequestSourceError(exc.key, labels[field], message)
    return RequestSourceError(exc.key, labels[""], f"{field}: {message}" if field else message)


def resolve_run(
    spec: str | Path | dict | DictConfig | None = None,
    overrides: Sequence[str] = (),
    prompts: str | Path | Sequence[str | dict] | None = None,
    seeds: Sequence[int] | None = None,
) -> ResolvedSpec:
    """Spec, then the prompts (replacing the spec's requests), then the overrides (which may index requests).
    An error in a request from ``prompts`` names its file and line (or its index in the list)."""
    if isinstance(overrides, (str, bytes)) or not isinstance(overrides, Sequence):
        raise SyncEngineError(f"overrides is {type(overrides).__name__} {overrides!r}; give a list of 'key=value' "
                              "strings, e.g. ['sync.weight=10']")
    raw = compose(spec)
    where: list[dict[str, str]] = []
    if prompts is not None:
        items, where = _requests_and_sources(prompts, seeds)
        raw.requests = OmegaConf.create(items)
    elif seeds is not None:
        raise SyncEngineError("seeds given without prompts; pass prompts=[...] with one seed each")
    pairs = parse_overrides(list(overrides))
    raw = apply_overrides(raw, pairs)
    try:
        return validate(raw)
    except ConfigError as exc:
        located = _at_source(exc, where, [key for key, _ in pairs])
        if located is exc:
            raise
        raise located from None


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
