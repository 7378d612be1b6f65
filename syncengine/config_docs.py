"""The spec reference, ``docs/config.md``, generated from the schema so that it cannot drift from the code.

Every key comes from a dataclass: the top-level sections of :mod:`syncengine.config` and the ``Config`` of each
built-in plugin (registered by the ``syncengine`` distribution). Types and defaults are read from the fields; the
meaning of a field is its ``metadata["doc"]`` if it has one, else the ``#`` comment on the line that declares it.

    python -m syncengine.config_docs            # rewrite docs/config.md
    python -m syncengine.config_docs --check    # exit 1 if docs/config.md is not current
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import json
import re
import sys
import textwrap
import tokenize
from pathlib import Path

DOC_PATH = Path(__file__).resolve().parent.parent / "docs" / "config.md"
KIND_SECTIONS = {"tiler": "tiler", "merger": "merger", "denoiser": "denoiser", "sync_loss": "sync.loss"}

# Meanings of core fields declared without a comment in syncengine/config.py (a comment there takes precedence).
CORE_MEANINGS = {
    "CanvasConfig.height": "canvas height in pixels; a multiple of the denoiser's latent factor (8 for SD)",
    "CanvasConfig.width": "canvas width in pixels; a multiple of the denoiser's latent factor (8 for SD)",
    "SamplerConfig.steps": "number of denoising steps",
    "SamplerConfig.guidance_scale": "classifier-free guidance scale, >= 0 (<= 1 disables guidance: the prompt's "
                                    "prediction alone, as diffusers does)",
    "RequestConfig.prompt": "the text prompt (required, not blank); taken literally: `${...}` is not interpolated",
    "RequestConfig.seed": "seed of the initial noise, an integer in [0, 2**63); the same seed gives the same image",
    "RuntimeConfig.accelerator": "Lightning accelerator: auto, cpu, gpu/cuda, mps (checked to exist on this machine)",
    "RuntimeConfig.devices": "devices per node: a count, a list of device ids, \"auto\", or ids as a string (\"0,1\")",
    "RuntimeConfig.num_nodes": "number of machines (Lightning num_nodes)",
    "RuntimeConfig.precision": "Lightning precision (e.g. 16-mixed); null: the denoiser's dtype decides",
    "RuntimeConfig.strategy": "Lightning strategy (auto, ddp, ddp_spawn, ...)",
    "RuntimeConfig.output_dir": "folder for the PNG images and their JSON sidecars",
    "RuntimeConfig.progress": "show a progress bar",
    "SyncConfig.loss": "the sync-loss plugin and its options (see `sync.loss` below)",
    # built-in plugins' fields declared without a comment
    "SlidingConfig.window_height": "window height in pixels; default: window",
    "StableDiffusionConfig.device": "auto: cuda when available (the rank's device under Lightning), else cpu",
    "StableDiffusionConfig.revision": "hub revision (branch, tag or commit) of the model",
    "StyleConfig.layers": "VGG ReLU outputs whose Gram matrices are compared",
}
SECTION_MEANINGS = {
    "canvas": "size of the output image",
    "tiler": "how the canvas is cut into views: a tiler plugin by name, plus its options",
    "merger": "how the views' results are combined on the canvas: a merger plugin by name, plus its options",
    "denoiser": "the pretrained diffusion model: a denoiser plugin by name, plus its options",
    "sync": "synchronization (SyncDiffusion): the loss between views and its weight schedule",
    "sync.loss": "the perceptual distance between each view and the anchor: a sync-loss plugin by name",
    "sampler": "the diffusion sampler",
    "requests": "what to generate: a list of requests, one image each",
    "runtime": "where and how it runs, and where outputs go",
}


def _comments(cls: type) -> dict[str, str]:
    """``{field: comment}`` from ``name: type = value  # comment`` lines in the class body (and its bases)."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass) or klass is object:
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        comments: dict[int, str] = {}
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT:
                comments[tok.start[0]] = tok.string.lstrip("#").strip()
        body = ast.parse(source).body[0]
        for node in getattr(body, "body", []):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                for line in range(node.lineno, (node.end_lineno or node.lineno) + 1):
                    if line in comments:
                        out[node.target.id] = comments[line]
                        break
    return out


def _choices(literal: re.Match) -> str:
    """``Literal["a", 'b']`` as ``"a" or "b"`` (the values as a spec writes them)."""
    return " or ".join(f'"{v.strip().strip(chr(34) + chr(39))}"' for v in literal.group(1).split(","))


def _type(field: dataclasses.Field) -> str:
    t = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", str(field.type))
    t = t.replace("typing.", "")
    t = re.sub(r"Literal\[([^\]]*)\]", _choices, t)  # a closed set
    union = re.fullmatch(r"Union\[([^\[\]]*)\]", t)
    if union:
        t = " or ".join(v.strip() for v in union.group(1).split(","))
    if t.startswith("Optional[") and t.endswith("]"):
        t = f"{t[9:-1]} or null"
    return t.replace("Dict[str, Any]", "mapping").replace("List[str]", "list of str").replace("Any", "any")


def _default(field: dataclasses.Field) -> str:
    from omegaconf import MISSING

    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = field.default_factory()  # type: ignore[misc]
    else:
        return "required"
    if value == MISSING:
        return "required"
    if dataclasses.is_dataclass(value):
        return "see below"
    return json.dumps(value, default=str)


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:]


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def field_rows(cls: type, prefix: str) -> list[tuple[str, str, str, str]]:
    """(key, type, default, meaning) for every field of a dataclass."""
    comments = _comments(cls)
    rows = []
    for f in dataclasses.fields(cls):
        inherited = (CORE_MEANINGS.get(f"{k.__name__}.{f.name}") for k in cls.__mro__)  # a subclass's inherited fields
        meaning = f.metadata.get("doc") or comments.get(f.name) or next((m for m in inherited if m), "")
        rows.append((f"{prefix}{f.name}", _type(f), _default(f), meaning))
        nested = _nested_dataclass(cls, f)
        if nested is not None:  # options that are themselves structured (a region, its mask): their keys too
            kind, sub = nested
            rows += field_rows(sub, f"{prefix}{f.name}{'[].' if kind == 'list' else '.'}")
    return rows


def _nested_dataclass(cls: type, f: dataclasses.Field) -> tuple[str, type] | None:
    """``("list", D)`` for a ``List[D]`` field, ``("one", D)`` for a ``D`` field, D a dataclass; else None."""
    import typing

    try:
        hint = typing.get_type_hints(cls).get(f.name)
    except Exception:  # unresolvable annotations: document the field itself only
        return None
    if dataclasses.is_dataclass(hint):
        return "one", hint
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (list, typing.List) and args and dataclasses.is_dataclass(args[0]):
        return "list", args[0]
    return None


def _table(rows: list[tuple[str, str, str, str]]) -> list[str]:
    out = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for key, typ, default, meaning in rows:
        out.append(f"| `{key}` | {_cell(typ)} | `{_cell(default)}` | {_cell(meaning)} |")
    return out


def _builtin_plugins(kind: str):
    from . import registry

    for info in registry.list_plugins():
        if info.kind == kind and info.distribution.split(" ")[0] == "syncengine":
            yield info


def _plugin_section(kind: str, section: str) -> list[str]:
    from .config import Spec

    default = next(f for f in dataclasses.fields(Spec) if f.name == section.split(".")[0]).default_factory()
    if section == "sync.loss":
        default = default.loss
    group = "sync_losses" if kind == "sync_loss" else kind + "s"
    out = [f"## `{section}`", "", f"{_sentence(SECTION_MEANINGS[section])}. Default: `{json.dumps(default)}`.",
           f"Plugins of kind `{kind}` (entry-point group `syncengine.{group}`); "
           f"`{section}.name` picks one, the other keys are its options.", ""]
    for info in _builtin_plugins(kind):
        cls = info.load()
        doc = (inspect.getdoc(cls) or "").split("\n\n")[0].replace("\n", " ")
        out += [f"### `{section}.name: {info.name}`", "", f"`{info.target}`: {doc}", ""]
        config = getattr(cls, "Config", None)
        if config is None or not dataclasses.is_dataclass(config) or not dataclasses.fields(config):
            out += ["No options.", ""]
            continue
        out += _table(field_rows(config, f"{section}.")) + [""]
    return out


def generate() -> str:
    from .config import CanvasConfig, RequestConfig, RuntimeConfig, SamplerConfig, SyncConfig

    lines = [
        "# Spec reference",
        "",
        "<!-- Generated by `python -m syncengine.config_docs` from the schema (syncengine/config.py and each",
        "     built-in plugin's Config dataclass). Do not edit by hand: edit the field comments and regenerate. -->",
        "",
        "A spec is a YAML file (or a mapping) with the sections below. A spec may start with `extends: base.yaml`",
        "(a path relative to it, a preset name from `configs/`, or a list of them, merged in order); `key=value`",
        "overrides on the command line apply last (`syncengine generate demo sync.weight=10`). Everything is",
        "validated before any model loads: an unknown key or a wrong type is an error naming the key.",
        "`syncengine config SPEC` prints the resolved spec with every default filled in.",
        "",
    ]
    for name, cls in (("canvas", CanvasConfig),):
        lines += [f"## `{name}`", "", f"{_sentence(SECTION_MEANINGS[name])}.", ""]
        lines += _table(field_rows(cls, f"{name}.")) + [""]
    lines += _plugin_section("tiler", "tiler")
    lines += _plugin_section("merger", "merger")
    lines += _plugin_section("denoiser", "denoiser")
    lines += ["## `sync`", "", f"{_sentence(SECTION_MEANINGS['sync'])}.", ""]
    lines += _table(field_rows(SyncConfig, "sync.")) + [""]
    lines += _plugin_section("sync_loss", "sync.loss")
    lines += ["## `sampler`", "", f"{_sentence(SECTION_MEANINGS['sampler'])}.", ""]
    lines += _table(field_rows(SamplerConfig, "sampler.")) + [""]
    lines += ["## `requests`", "", f"{_sentence(SECTION_MEANINGS['requests'])} (`--prompts FILE.jsonl` replaces "
              "them: one JSON object per line with the same keys).", ""]
    lines += _table(field_rows(RequestConfig, "requests[].")) + [""]
    lines += ["## `runtime`", "", f"{_sentence(SECTION_MEANINGS['runtime'])}.", ""]
    lines += _table(field_rows(RuntimeConfig, "runtime.")) + [""]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m syncengine.config_docs", description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="exit 1 if the file is not current, without writing")
    p.add_argument("-o", "--output", type=Path, default=DOC_PATH)
    args = p.parse_args(argv)
    text = generate()
    if args.check:
        current = args.output.read_text() if args.output.is_file() else ""
        if current != text:
            print(f"{args.output} is not current: run python -m syncengine.config_docs", file=sys.stderr)
            return 1
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
