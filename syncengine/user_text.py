"""User text is never an OmegaConf template.

Prompts, negative prompts, output names, the paths in a request's ``inputs`` and the text options a plugin names in
its ``Config.literal_text`` are the user's words: ``${oc.env:HOME}`` in a prompt must not put an environment
variable into the prompt and its sidecar, and ``${x}`` must not crash the run. Specs still interpolate everywhere
else (``canvas.width: ${canvas.height}``). The text is escaped (OmegaConf's ``\\${``) where it enters a spec, so every
reader (the pipeline, the sidecar's resolved spec, ``syncengine config``) gets it back unchanged.
"""
from __future__ import annotations

import re
from typing import Any

_INTERPOLATION = re.compile(r"(\\*)\$\{")


def literal(text: str) -> str:
    """Raw user text (a prompts-file line, the API's ``prompts``) escaped so that OmegaConf gives it back unchanged:
    ``${oc.env:HOME}`` in a prompt must not put an environment variable in the prompt and its sidecar."""
    return _INTERPOLATION.sub(lambda m: m.group(1) * 2 + "\\${", text)


def uninterpolated(text: str) -> str:
    """Spec text (YAML, ``key=value``) with every interpolation escaped and escaped ones kept: what OmegaConf shows,
    never resolved. Idempotent, so a validated spec validates again and ``syncengine config`` output round-trips."""
    return _INTERPOLATION.sub(lambda m: m.group(0) if len(m.group(1)) % 2 else m.group(1) + "\\${", text)


REQUEST_TEXT = ("prompt", "negative_prompt", "name")  # and every string under ``inputs`` (paths)


def escape_strings(value: Any, escape=uninterpolated) -> Any:
    """``value`` with every string in it (through dicts and lists) escaped: user text, never a spec reference."""
    if isinstance(value, str):
        return escape(value)
    if isinstance(value, dict):
        return {k: escape_strings(v, escape) for k, v in value.items()}
    return [escape_strings(v, escape) for v in value] if isinstance(value, list) else value


def literal_request(item: dict, escape=uninterpolated) -> dict:
    """A request (plain mapping) whose text is never interpolated: prompts, names and ``inputs`` strings are the
    user's words and paths, not spec references; ``overrides`` are spec keys and keep OmegaConf's meaning."""
    return {k: escape_strings(v, escape) if k in REQUEST_TEXT or k == "inputs" else v for k, v in item.items()}


def escape_at(value: Any, path: list[str]) -> Any:
    """``value`` with the text at the dotted ``path`` made literal (lists are crossed item by item)."""
    if not path:
        return escape_strings(value)
    if isinstance(value, list):
        return [escape_at(v, path) for v in value]
    if isinstance(value, dict) and path[0] in value:
        return {**value, path[0]: escape_at(value[path[0]], path[1:])}
    return value


def literal_override(key: str, value: Any, fields: dict[str, tuple[str, ...]]) -> Any:
    """A ``key=value`` override (a request's ``overrides``) with the text it sets in plugin text fields made literal:
    ``tiler.regions.0.prompt``, ``tiler.prompts`` or the whole ``tiler`` all reach ``regions.prompt``/``prompts``."""
    for section, paths in fields.items():
        if key != section and not key.startswith(section + "."):
            continue
        named = [p for p in key[len(section) + 1:].split(".") if p and not p.isdigit()]
        for path in (p.split(".") for p in paths):
            if path[: len(named)] == named:
                value = escape_at(value, path[len(named):])
            elif named[: len(path)] == path:
                value = escape_strings(value)
    return value
