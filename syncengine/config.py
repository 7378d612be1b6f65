"""Specs: OmegaConf configs composed from files and overrides, validated before any model loads.

A spec names each part by registry name plus its options (see ``configs/``). Composition: a spec may say
``extends: base.yaml`` (a path relative to it, or a preset name from ``configs/``); command-line ``key=value``
overrides apply last. Validation checks the top-level schema, then every plugin section against that plugin's own
``Config`` dataclass (importing the plugin's module, never loading weights), then the cross-field rules (sizes,
window vs canvas). Every failure is a :class:`~syncengine.errors.ConfigError` naming the key.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Union, get_args, get_origin, get_type_hints

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from . import registry
from .denoiser import Denoiser
from .errors import ConfigError, SyncEngineError, one_line
from .runtime_checks import check_runtime
from .user_text import literal_override, literal_request
from .views import CanvasSpec


def _presets_dir() -> Path:
    """The presets shipped inside the package (``syncengine/presets``; ``configs/`` in a checkout links there), found
    through :mod:`importlib.resources` so that a wheel install has them too. pip always unpacks wheels, so this is a
    directory on disk."""
    from importlib.resources import files

    return Path(str(files("syncengine").joinpath("presets")))


PRESETS_DIR = _presets_dir()


@dataclass
class CanvasConfig:
    height: int = 512
    width: int = 2048


@dataclass
class SyncConfig:
    loss: Dict[str, Any] = field(default_factory=lambda: {"name": "lpips", "net": "vgg"})
    weight: float = 20.0  # w of Eq. 14; 0 is exactly MultiDiffusion
    decay: float = 0.95  # w_i = weight * decay**i at step i
    every: int = 1  # sync on steps i with (i + 1) % every == 0
    until: Optional[int] = None  # sync only while i < until (None: every step)
    anchor: Union[int, Literal["center", "first", "last"]] = field(
        default="center", metadata={"also": "a view index"})  # "center" (paper), "first", "last" or a view index
    batch_size: Optional[int] = None  # views per sync forward/backward; None: view_batch_size on GPU, 1 on CPU
    resolution: Optional[int] = None  # resize decoded x0 (shorter side, px) before the loss; None: full size (paper)


@dataclass
class SamplerConfig:
    scheduler: str = "ddim"  # ddim, ddpm, euler, euler_a, dpm++, pndm, unipc, lms, heun, lcm, tcd, flow_euler; a class
    steps: int = 50
    guidance_scale: float = 7.5
    view_batch_size: int = 1  # views per UNet call
    scheduler_options: Dict[str, Any] = field(default_factory=dict)  # passed to the scheduler's from_config


@dataclass
class RequestConfig:
    prompt: str = MISSING
    negative_prompt: str = ""  # negative prompt for classifier-free guidance (literal text)
    seed: int = 0
    name: Optional[str] = None  # output file stem (literal); default "<index>-<prompt slug>-s<seed>"
    inputs: Dict[str, Any] = field(default_factory=dict)  # per-request plugin inputs (mask, image paths; literal text)
    overrides: Dict[str, Any] = field(default_factory=dict)  # dotted spec keys applied to this request only


@dataclass
class RuntimeConfig:
    accelerator: str = "auto"
    devices: Any = 1
    num_nodes: int = 1
    precision: Optional[str] = None
    strategy: str = "auto"
    shard: Literal["windows", "requests"] = "windows"  # "windows": ranks share each request; "requests": data parallel
    output_dir: str = "outputs"
    overwrite: bool = False  # replace existing outputs of the same name (default: add a numeric suffix)
    progress: bool = True
    tiled_decode: bool = False  # decode the final canvas in tiles (diffusers enable_tiling): bounded memory
    max_megapixels: float = 100.0  # refuse canvases above this many million pixels (likely a typo); raise it if meant


@dataclass
class Spec:
    canvas: CanvasConfig = field(default_factory=CanvasConfig)
    tiler: Dict[str, Any] = field(default_factory=lambda: {"name": "sliding"})
    merger: Dict[str, Any] = field(default_factory=lambda: {"name": "average"})
    denoiser: Dict[str, Any] = field(
        default_factory=lambda: {"name": "stable-diffusion", "pretrained": "stabilityai/stable-diffusion-2-base"}
    )
    sync: SyncConfig = field(default_factory=SyncConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    requests: List[RequestConfig] = field(default_factory=list)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)


PLUGIN_SECTIONS: dict[str, str] = {
    "tiler": "tiler", "merger": "merger", "denoiser": "denoiser", "sync.loss": "sync_loss",
}


@dataclass
class ResolvedSpec:
    """A validated spec: the full config (plugin defaults filled in) and the typed option objects of each plugin."""

    config: DictConfig
    plugin_configs: dict[str, Any]  # section -> validated Config instance
    plugin_classes: dict[str, type]

    @property
    def canvas(self) -> CanvasSpec:
        den = self.plugin_classes["denoiser"]
        return CanvasSpec(
            int(self.config.canvas.height), int(self.config.canvas.width), den.latent_factor, den.latent_channels
        )

    def to_container(self) -> dict:
        return OmegaConf.to_container(self.config, resolve=True)  # type: ignore[return-value]

    def build(self, section: str):
        """Instantiate the plugin of a section from its validated options."""
        return self.plugin_classes[section](self.plugin_configs[section])


# ---------------------------------------------------------------------------------------------------------- loading


def find_spec_file(name: str | Path, relative_to: Path | None = None) -> Path:
    """A spec path as given, relative to the extending file, or a preset name from ``configs/``."""
    candidates = [Path(name)]
    if relative_to is not None:
        candidates.insert(0, relative_to / name)
    stem = str(name)
    candidates += [PRESETS_DIR / stem, PRESETS_DIR / f"{stem}.yaml"]
    for path in candidates:
        if path.is_file():
            return path.resolve()
    presets = ", ".join(sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))) if PRESETS_DIR.is_dir() else "none"
    raise SyncEngineError(f"spec file {str(name)!r} not found; give a path to a YAML file or a preset ({presets})")


def load_file(path: Path, _seen: tuple[Path, ...] = ()) -> DictConfig:
    """Load one spec file, following its ``extends`` (:func:`_follow_extends`)."""
    if path in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, path))
        raise SyncEngineError(f"spec files extend each other in a cycle: {chain}")
    try:
        cfg = OmegaConf.load(path)
    except Exception as exc:  # yaml errors come in many types
        raise SyncEngineError(f"cannot parse spec {path}: {one_line(exc)}") from exc
    if not isinstance(cfg, DictConfig):
        raise SyncEngineError(f"spec {path} must be a mapping of sections, got a {type(cfg).__name__}")
    return _follow_extends(cfg, path.parent, (*_seen, path))


def _follow_extends(cfg: DictConfig, relative_to: Path | None, seen: tuple[Path, ...]) -> DictConfig:
    """``cfg`` over the specs its ``extends`` names (a string or a list, merged in order): the one place a file's
    and a mapping's parents are read. ``seen``: the files on the way here, so that a cycle is an error."""
    parents = cfg.pop("extends", None)
    if parents is None:
        return cfg
    merged = OmegaConf.create()
    for parent in [parents] if isinstance(parents, str) else parents:
        merged = merge_layer(merged, load_file(find_spec_file(parent, relative_to), seen))
    return merge_layer(merged, cfg)


def _parse_value(key: str, text: str) -> Any:
    """A command-line value parsed the way YAML would (numbers, booleans, null, lists). Not resolved: ``${...}`` is
    resolved against the whole spec at validation (and never in a request's text, see :func:`literal`)."""
    try:
        node = OmegaConf.from_dotlist([f"value={text}"])
    except Exception as exc:  # OmegaConf's and YAML's errors (``[1,`` is a yaml ParserError)
        raise ConfigError(key, f"cannot parse {text!r} ({one_line(exc)}); write a YAML value such as 3, "
                               f"[1, 2] or {{a: 1}}, or quote text: {key}='...'") from None
    return OmegaConf.to_container(node)["value"]


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """``key=value`` strings -> (dotted key, parsed value) pairs, in order."""
    out = []
    for item in overrides:
        if not isinstance(item, str):
            raise SyncEngineError(f"override {item!r} is not a 'key=value' string (e.g. 'sync.weight=10')")
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise SyncEngineError(f"override {item!r} is not key=value (e.g. sync.weight=10)")
        out.append((key.strip(), _parse_value(key.strip(), text)))
    return out


def _named_plugins(layer: DictConfig) -> dict[str, Any]:
    """``{section: plugin name}`` for each plugin section a spec layer names a plugin in (a name that does not
    resolve is left out: validation names its key)."""
    out = {}
    for section in PLUGIN_SECTIONS:
        given = OmegaConf.select(layer, section)
        if isinstance(given, DictConfig) and "name" in given:
            try:
                out[section] = given.name
            except OmegaConfBaseException:
                continue
    return out


def switch_plugins(base: DictConfig, names: dict[str, Any]) -> DictConfig:
    """The composition rule, in one place: naming another plugin for a section replaces the section. The old
    plugin's options belong to it (``sync.loss.net`` means nothing to the ``style`` loss), so every section of
    ``base`` whose plugin ``names`` changes is emptied (in place) before the new layer is merged or set."""
    for section, name in names.items():
        current = OmegaConf.select(base, section)
        if isinstance(current, DictConfig) and "name" in current and current.name != name:
            OmegaConf.update(base, section, {}, merge=False)
    return base


def merge_layer(base: DictConfig, layer: DictConfig | dict) -> DictConfig:
    """``layer`` over ``base`` (both specs): OmegaConf's merge, except that naming another plugin replaces the
    section (see :func:`switch_plugins`)."""
    layer = layer if isinstance(layer, DictConfig) else OmegaConf.create(layer)
    base = switch_plugins(OmegaConf.create(OmegaConf.to_container(base)), _named_plugins(layer))
    return OmegaConf.merge(base, layer)  # type: ignore[return-value]


def apply_overrides(cfg: DictConfig, overrides: list[tuple[str, Any]] | dict[str, Any]) -> DictConfig:
    """Set dotted keys on a spec (``requests.0.seed=3`` indexes lists). A key that names another plugin for a section
    (``sync.loss.name=style``) first replaces that section (:func:`switch_plugins`), whatever the order of the
    overrides."""
    pairs = list(overrides.items()) if isinstance(overrides, dict) else list(overrides)
    names = {f"{section}.name": section for section in PLUGIN_SECTIONS}
    cfg = switch_plugins(OmegaConf.create(OmegaConf.to_container(cfg)),
                         {names[key]: value for key, value in pairs if key in names})
    for key, value in pairs:
        parts = key.split(".")
        for depth, part in enumerate(parts[:-1]):
            node = OmegaConf.select(cfg, ".".join(parts[: depth + 1]))
            if isinstance(node, ListConfig):
                nxt = parts[depth + 1]
                if not nxt.isdigit() or int(nxt) >= len(node):
                    where = ".".join(parts[: depth + 1])
                    valid = f"indices 0..{len(node) - 1}" if len(node) else "it is empty"
                    raise ConfigError(key, f"{where} has no item {nxt!r} ({valid}); add it in the spec first")
        try:
            OmegaConf.update(cfg, key, value, merge=True)
        except (OmegaConfBaseException, TypeError, ValueError, IndexError) as exc:
            raise ConfigError(key, f"cannot set this key: {one_line(exc)}") from None
    return cfg


def compose(spec: str | Path | dict | DictConfig | None = None, overrides: list[str] = ()) -> DictConfig:
    """A raw (unvalidated) spec: file or mapping, with ``extends`` followed and overrides applied."""
    if spec is None:
        raw = OmegaConf.create()
    elif isinstance(spec, (str, Path)):
        raw = load_file(find_spec_file(spec))
    elif not isinstance(spec, (dict, DictConfig)):
        raise SyncEngineError(f"spec is {type(spec).__name__} {spec!r}; give a YAML file, a preset name (e.g. 'demo') "
                              "or a mapping of sections")
    else:
        raw = _follow_extends(OmegaConf.create(spec), None, ())
    return apply_overrides(raw, parse_overrides(list(overrides)))


# ------------------------------------------------------------------------------------------------------- validation

def _literal_fields(cls: type) -> tuple[str, ...]:
    """The user-text fields a plugin's ``Config`` names in ``literal_text`` (dotted, relative to its section; every
    string under one is text, e.g. ``"regions.prompt"`` or a whole ``"prompts"`` mapping): like requests' prompts,
    never interpolated."""
    return tuple(getattr(cls.Config, "literal_text", ()))


def _section_fields(data: dict, names: dict[str, Any]) -> dict[str, tuple[str, ...]]:
    """``{section: literal text fields}`` of the plugins a plain spec names (``names``: a request's own choices)."""
    out = {}
    for section, kind in PLUGIN_SECTIONS.items():
        node = data
        for part in section.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        name = names.get(section, node.get("name") if isinstance(node, dict) else None)
        if name is None:
            name = OmegaConf.select(OmegaConf.structured(Spec), f"{section}.name")
        try:
            out[section] = _literal_fields(registry.get(kind, str(name)))
        except SyncEngineError:
            continue  # an unknown plugin: _plugin_section names it
    return out


def _literal_plugin_text(data: dict) -> None:
    """The plugins' user text (:func:`_literal_fields`) escaped in place in a plain spec, as requests' text is: in the
    plugin sections and in the requests' ``overrides`` that set it."""
    fields = _section_fields(data, {})
    for section, paths in fields.items():
        parent, _, key = section.rpartition(".")
        owner = data.get(parent) if parent else data
        if isinstance(owner, dict) and isinstance(owner.get(key), dict):
            owner[key] = literal_override(section, owner[key], {section: paths})
    requests = data.get("requests")
    for request in requests if isinstance(requests, list) else ():
        overrides = request.get("overrides") if isinstance(request, dict) else None
        if isinstance(overrides, dict):
            names = {s: overrides[f"{s}.name"] for s in PLUGIN_SECTIONS if f"{s}.name" in overrides}
            own = _section_fields(data, names)
            request["overrides"] = {k: literal_override(str(k), v, own) for k, v in overrides.items()}


def _omegaconf_error(prefix: str, exc: OmegaConfBaseException) -> ConfigError:
    key = getattr(exc, "full_key", None) or ""
    msg = one_line(exc, 10_000)
    return ConfigError(f"{prefix}.{key}".strip(".") if key else prefix, msg)


def _paths(node: Any, prefix: tuple[str, ...] = ()):
    """Every dotted path of a plain container, list indices included."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in items:
        yield (*prefix, str(k))
        yield from _paths(v, (*prefix, str(k)))


def _full_path(values: Any, key: str) -> str:
    """OmegaConf drops the list part from an error's key inside a list of dataclasses (``mask.foo`` for
    ``regions.1.mask.foo``): find the path of ``values`` that ends with ``key`` once list indices are skipped."""
    if isinstance(values, (DictConfig, ListConfig)):
        values = OmegaConf.to_container(values)
    parts = key.split(".")
    for path in _paths(values):
        named = [p for p in path if not p.isdigit()]
        if named[-len(parts):] == parts and len(path) > len(parts) and any(p.isdigit() for p in path):
            return ".".join(path)
    return key


def typed_config(schema: type, values: Any, where: str, defaults: DictConfig | None = None) -> DictConfig:
    """``values`` merged over the dataclass ``schema``'s defaults (or ``defaults``, a structured config of it) and
    type-checked; failures are a one-line :class:`ConfigError` naming the key under ``where`` (plugins validating
    their own sub-sections use this too)."""
    try:
        base = OmegaConf.structured(schema) if defaults is None else defaults
        typed = OmegaConf.merge(base, values)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or getattr(exc, "key", None)
        if key:
            key = _full_path(values, str(key))
        msg = _choices_message(exc) or one_line(exc, 10_000)
        if "not in" in msg and key is not None:
            owner = getattr(exc, "object_type", None)
            owner = owner if dataclasses.is_dataclass(owner) else schema
            valid = ", ".join(f.name for f in dataclasses.fields(owner))
            msg = f"unknown key {str(key).split('.')[-1]!r}; valid keys: {valid}"
        full = ".".join(part for part in (where, str(key) if key else "") if part) or "spec"
        raise ConfigError(full, msg) from None
    _check_values(typed, where)
    return typed  # type: ignore[return-value]


def _choices_message(exc: OmegaConfBaseException) -> str | None:
    """A one-line message for a value outside a closed set (a ``Literal`` field, maybe in a ``Union`` with other
    types: ``sync.anchor``): the allowed values by name, where OmegaConf prints the raw type hint."""
    owner, name = getattr(exc, "object_type", None), getattr(exc, "key", None)
    if not dataclasses.is_dataclass(owner) or not isinstance(name, str):
        return None
    try:
        hint = get_type_hints(owner).get(name)
    except Exception:  # unresolvable annotations: OmegaConf's own message
        return None
    options = get_args(hint) if get_origin(hint) is Union else (hint,)
    values = [str(v) for option in options if get_origin(option) is Literal for v in get_args(option)]
    if not values:
        return None
    also = next((f.metadata.get("also") for f in dataclasses.fields(owner) if f.name == name), None)
    others = [also or f"an {option.__name__}" for option in options
              if get_origin(option) is not Literal and option is not type(None)][:1]
    others += ["null"] if type(None) in options else []
    allowed = ", ".join(values) + "".join(f" or {other}" for other in others)
    return f"{getattr(exc, 'value', None)!r} is not one of {allowed}"


def _check_values(node: DictConfig | ListConfig, where: str) -> None:
    """Every value resolves and every number is finite: one rule for every section typed here (core, plugins, their
    sub-sections). A bad ``${...}`` is then an error naming its key, not a traceback at first use; NaN or infinity
    (``sampler.guidance_scale=nan``, ``sync.weight=inf``) would give a black image reported as success."""
    for k in (node.keys() if isinstance(node, DictConfig) else range(len(node))):
        key = f"{where}.{k}" if where else str(k)
        if OmegaConf.is_missing(node, k):
            continue
        try:
            value = node[k]
        except OmegaConfBaseException as exc:
            raise ConfigError(key, f"cannot resolve this value ({one_line(exc)}); fix the ${{...}} reference, or "
                                   f"write \\${{ for a literal ${{") from None
        if isinstance(value, (DictConfig, ListConfig)):
            _check_values(value, key)
        elif isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(key, f"must be a finite number, got {value}")


def _plugin_section(cfg: DictConfig, section: str, kind: str) -> tuple[DictConfig, Any, type]:
    node = OmegaConf.select(cfg, section)
    if node is None or not isinstance(node, DictConfig) or "name" not in node:
        raise ConfigError(f"{section}.name", f"missing: name a {kind} plugin (see `syncengine plugins`)")
    name = node.name
    try:
        cls = registry.get(kind, str(name))
    except SyncEngineError as exc:
        raise ConfigError(f"{section}.name", str(exc)) from None
    options = OmegaConf.create({k: v for k, v in node.items() if k != "name"})
    raw = OmegaConf.to_container(node)
    for k in {path.split(".")[0] for path in _literal_fields(cls)} & set(raw):
        options[k] = raw[k]  # escaped text as it is (items() would resolve a top-level string's escapes)
    typed = typed_config(cls.Config, options, section)
    instance = OmegaConf.to_object(typed)
    full = OmegaConf.merge({"name": name}, typed)
    return full, instance, cls  # type: ignore[return-value]


def _check(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(key, message)


SEED_LIMIT = 2**63  # torch takes seeds below 2**64; below 2**63 derived seeds (the sampler's seed + 1) still fit


def _seed_error(value: Any) -> str | None:
    """Why ``value`` is not a seed (None if it is): an integer in [0, 2**63); not a bool, not a float (1.7 must not
    quietly become 1)."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < SEED_LIMIT:
        return None
    return f"must be an integer from 0 to 2**63-1, got {value!r}"


def _spec_data(raw: Any) -> dict:
    """A spec as a plain (unresolved) mapping, or a one-line error for anything that is not one."""
    try:
        cfg = raw if isinstance(raw, DictConfig) else OmegaConf.create(raw)
    except (OmegaConfBaseException, ValueError, TypeError) as exc:
        raise ConfigError("spec", f"not a spec mapping ({one_line(exc)}); give sections such as canvas, "
                                  "requests") from None
    if not isinstance(cfg, DictConfig):
        raise ConfigError("spec", f"a spec is a mapping of sections (canvas, tiler, ...), got {type(raw).__name__}")
    return OmegaConf.to_container(cfg)  # type: ignore[return-value]


def _requests(items: list) -> list[dict]:
    """Each request typed on its own, so that an error names its index (OmegaConf's own key drops it inside a list),
    with its text literal (:func:`literal_request`): the request rules, in one place."""
    out, names = [], set()
    for i, item in enumerate(items):
        key = f"requests.{i}"
        _check(isinstance(item, dict), key, f"a request is a mapping with a prompt (and seed, name, ...), got {item!r}")
        item = literal_request(item)
        prompt = item.get("prompt")
        _check(prompt not in (None, MISSING) and str(prompt).strip() != "", f"{key}.prompt",
               "empty prompt; give the text to generate, e.g. prompt: 'a photo of a mountain range'")
        seed = item.get("seed", 0)
        if not (isinstance(seed, str) and "${" in seed):  # an interpolation is checked once typed (resolved)
            _check(_seed_error(seed) is None, f"{key}.seed", str(_seed_error(seed)))
        typed = typed_config(RequestConfig, item, key)
        _check(_seed_error(typed.seed) is None, f"{key}.seed", str(_seed_error(typed.seed)))
        if typed.name is not None:
            _check(typed.name not in names, f"{key}.name",
                   f"duplicate request name {typed.name!r}; give each request its own (names are output file stems)")
            _check("/" not in typed.name and typed.name.strip() not in ("", ".", ".."), f"{key}.name",
                   f"{typed.name!r} is not a file name; give a stem such as 'beach-1' (no '/')")
            names.add(typed.name)
        out.append(OmegaConf.to_container(typed))
    return out


MEGAPIXEL = 1_000_000


def _check_canvas_size(height: int, width: int, limit: float) -> None:
    """Refuse canvases so large they are almost surely a typo (512x1000000 sits at step 0 for minutes, then runs for
    half a day): ``runtime.max_megapixels`` says how large, and raising it is the way through.

    Why pixels rather than views: the canvas size is what a user types (and mistypes); every tiler's cost grows with
    it, and the costs the tiler does not change grow with it alone: the decoded image (12 B/px in float32, 1.2 GB at
    100 MP), an untiled VAE decode (the SD decoder's full-size 128-channel activations, ~0.8 KB/px in float16 for
    the few alive at once: ~80 GB at 100 MP, use runtime.tiled_decode) and the PNG. The number of views (time: each
    view-step with sync costs ~0.1 s on a current GPU) follows from the size and the stride the user chose. 100 MP
    admits 8192x8192, 4096x16384 (360°) and 512x131072 strips (67 MP: ~1000-3700 SD views at stride 128, hours per
    image) and refuses 512x1000000 (512 MP: ~7800 views, ~half a day per image at 50 steps)."""
    mp = height * width / MEGAPIXEL
    _check(mp <= limit, "canvas", f"canvas {height}x{width} = {mp:g} MP is above runtime.max_megapixels={limit:g}; "
                                  f"raise it if you mean it (runtime.max_megapixels={math.ceil(mp)})")


def validate(raw: DictConfig | dict) -> ResolvedSpec:
    """Validate a composed spec; returns the resolved spec or raises a one-line :class:`ConfigError`."""
    data = _spec_data(raw)
    _literal_plugin_text(data)
    if data.get("requests") is not None:
        _check(isinstance(data["requests"], list), "requests",
               f"a list of requests ([{{prompt: ..., seed: 0}}]), got {data['requests']!r}")
        data["requests"] = _requests(data["requests"])
    defaults = switch_plugins(OmegaConf.structured(Spec), _named_plugins(OmegaConf.create(data)))
    top = typed_config(Spec, data, "", defaults)
    plugin_configs: dict[str, Any] = {}
    plugin_classes: dict[str, type] = {}
    for section, kind in PLUGIN_SECTIONS.items():
        full, instance, cls = _plugin_section(top, section, kind)
        OmegaConf.update(top, section, OmegaConf.to_container(full), merge=False)
        plugin_configs[section] = instance
        plugin_classes[section] = cls

    c = top.canvas
    factor = plugin_classes["denoiser"].latent_factor
    for key in ("height", "width"):
        value = c[key]
        _check(value > 0, f"canvas.{key}", f"must be positive, got {value}")
        _check(value % factor == 0, f"canvas.{key}",
               f"{value} is not divisible by {factor}; use a multiple of {factor}")
    r = top.runtime
    _check(r.max_megapixels > 0, "runtime.max_megapixels", f"must be > 0, got {r.max_megapixels}")
    _check_canvas_size(c.height, c.width, r.max_megapixels)

    s = top.sampler
    _check(s.steps >= 1, "sampler.steps", f"must be >= 1, got {s.steps}")
    _check(s.view_batch_size >= 1, "sampler.view_batch_size", f"must be >= 1, got {s.view_batch_size}")
    _check(s.guidance_scale >= 0, "sampler.guidance_scale",
           f"must be >= 0, got {s.guidance_scale}: values <= 1 turn guidance off (the prompt's prediction alone); "
           "7.5 is the usual strength")
    from .schedulers import check_scheduler_name, check_scheduler_options

    check_scheduler_name(s.scheduler)
    check_scheduler_options(s.scheduler, OmegaConf.to_container(s.scheduler_options))

    y = top.sync
    _check(y.weight >= 0, "sync.weight", f"must be >= 0, got {y.weight}")
    _check(0 < y.decay <= 1, "sync.decay", f"must be in (0, 1], got {y.decay}")
    _check(y.every >= 1, "sync.every", f"must be >= 1, got {y.every}")
    _check(y.until is None or y.until >= 0, "sync.until", f"must be >= 0, got {y.until}")
    _check(y.resolution is None or y.resolution >= 16, "sync.resolution", f"must be >= 16 px, got {y.resolution}")
    _check(y.batch_size is None or y.batch_size >= 1, "sync.batch_size", f"must be >= 1, got {y.batch_size}")

    _check(r.num_nodes >= 1, "runtime.num_nodes", f"must be >= 1, got {r.num_nodes}")
    check_runtime(r)

    resolved = ResolvedSpec(top, plugin_configs, plugin_classes)
    tiler = resolved.build("tiler")
    tiler.validate(resolved.canvas)
    denoiser_cls = plugin_classes["denoiser"]
    if getattr(denoiser_cls.check_run, "__func__", None) is not Denoiser.check_run.__func__:  # views cost only then
        denoiser_cls.check_run(resolved, tiler.views(resolved.canvas))
    merger = resolved.build("merger")  # mergers check their options on construction; cheap
    from .sampler import check_moving_views, check_x0_scheduler

    if merger.target == "x0":
        check_x0_scheduler(str(s.scheduler))
    check_moving_views(tiler.view_schedule(resolved.canvas, 0), merger.target, y.anchor, y.weight > 0)
    return resolved


def resolve(spec: str | Path | dict | DictConfig | None = None, overrides: list[str] = ()) -> ResolvedSpec:
    """Compose and validate in one call: ``resolve("configs/demo.yaml", ["sync.weight=0"])``."""
    return validate(compose(spec, overrides))


def request_spec(resolved: ResolvedSpec, index: int) -> ResolvedSpec:
    """The spec of one request: its ``overrides`` applied on top of the run's spec (validated again)."""
    req = resolved.config.requests[index]
    if not req.overrides:
        return resolved
    pairs = [(str(k), OmegaConf.to_container(v) if isinstance(v, (DictConfig, ListConfig)) else v)
             for k, v in req.overrides.items()]
    return validate(apply_overrides(resolved.config, pairs))
