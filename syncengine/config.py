"""Specs: OmegaConf configs composed from files and overrides, validated before any model loads.

A spec names each part by registry name plus its options (see ``configs/``). Composition: a spec may say
``extends: base.yaml`` (a path relative to it, or a preset name from ``configs/``); command-line ``key=value``
overrides apply last. Validation checks the top-level schema, then every plugin section against that plugin's own
``Config`` dataclass (importing the plugin's module, never loading weights), then the cross-field rules (sizes,
window vs canvas). Every failure is a :class:`~syncengine.errors.ConfigError` naming the key.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from . import registry
from .errors import ConfigError, SyncEngineError, one_line
from .denoiser import Denoiser
from .views import CanvasSpec

PRESETS_DIR = Path(__file__).resolve().parent.parent / "configs"


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
    anchor: Any = "center"  # "center" (paper), "first", "last" or a view index
    batch_size: Optional[int] = None  # views per sync forward/backward; None: view_batch_size on GPU, 1 on CPU
    resolution: Optional[int] = None  # resize decoded x0 (shorter side, px) before the loss; None: full size (paper)


@dataclass
class SamplerConfig:
    scheduler: str = "ddim"  # short name (ddim, ddpm, euler, euler_a, dpm++, pndm, unipc, lms, heun) or diffusers class
    steps: int = 50
    guidance_scale: float = 7.5
    view_batch_size: int = 1  # views per UNet call
    scheduler_options: Dict[str, Any] = field(default_factory=dict)  # passed to the scheduler's from_config


@dataclass
class RequestConfig:
    prompt: str = MISSING
    negative_prompt: str = ""
    seed: int = 0
    name: Optional[str] = None  # output file stem; default "<index>-<prompt slug>-s<seed>"
    inputs: Dict[str, Any] = field(default_factory=dict)  # per-request inputs for plugins (masks, condition images)
    overrides: Dict[str, Any] = field(default_factory=dict)  # dotted spec keys applied to this request only


@dataclass
class RuntimeConfig:
    accelerator: str = "auto"
    devices: Any = 1
    num_nodes: int = 1
    precision: Optional[str] = None
    strategy: str = "auto"
    shard: str = "windows"  # "windows": every rank works on one request; "requests": data parallel
    output_dir: str = "outputs"
    overwrite: bool = False  # replace existing outputs of the same name (default: add a numeric suffix)
    progress: bool = True
    tiled_decode: bool = False  # decode the final canvas in tiles (diffusers enable_tiling): bounded memory


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


PLUGIN_SECTIONS: dict[str, str] = {"tiler": "tiler", "merger": "merger", "denoiser": "denoiser", "sync.loss": "sync_loss"}


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
    """Load one spec file, following ``extends`` (a string or a list, merged in order, then this file)."""
    if path in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, path))
        raise SyncEngineError(f"spec files extend each other in a cycle: {chain}")
    try:
        cfg = OmegaConf.load(path)
    except Exception as exc:  # yaml errors come in many types
        raise SyncEngineError(f"cannot parse spec {path}: {one_line(exc)}") from exc
    if not isinstance(cfg, DictConfig):
        raise SyncEngineError(f"spec {path} must be a mapping of sections, got a {type(cfg).__name__}")
    parents = cfg.pop("extends", None)
    if parents is None:
        return cfg
    if isinstance(parents, str):
        parents = [parents]
    merged = OmegaConf.create()
    for parent in parents:
        merged = merge_layer(merged, load_file(find_spec_file(parent, path.parent), (*_seen, path)))
    return merge_layer(merged, cfg)


def _parse_value(key: str, text: str) -> Any:
    """A command-line value parsed the way YAML would (numbers, booleans, null, lists)."""
    try:
        node = OmegaConf.from_dotlist([f"value={text}"])
    except OmegaConfBaseException as exc:
        raise SyncEngineError(f"bad override {key}={text}: {one_line(exc)}") from exc
    value = node._get_node("value")
    return OmegaConf.to_container(node)["value"] if isinstance(value, (DictConfig, ListConfig)) else node.value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """``key=value`` strings -> (dotted key, parsed value) pairs, in order."""
    out = []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise SyncEngineError(f"override {item!r} is not key=value (e.g. sync.weight=10)")
        out.append((key.strip(), _parse_value(key.strip(), text)))
    return out


def _switch_plugins(base: DictConfig, layer: DictConfig | dict) -> None:
    """A layer that names another plugin for a section replaces that section: the old plugin's options belong to
    it (``sync.loss.net`` means nothing to the ``style`` loss), so they are not merged into the new one's."""
    for section in PLUGIN_SECTIONS:
        given = OmegaConf.select(layer, section) if isinstance(layer, DictConfig) else None
        current = OmegaConf.select(base, section)
        if (isinstance(given, DictConfig) and "name" in given and isinstance(current, DictConfig)
                and "name" in current and given.name != current.name):
            OmegaConf.update(base, section, {}, merge=False)


def merge_layer(base: DictConfig, layer: DictConfig | dict) -> DictConfig:
    """``layer`` over ``base`` (both specs): OmegaConf's merge, except that naming another plugin replaces the
    section (see :func:`_switch_plugins`)."""
    layer = layer if isinstance(layer, DictConfig) else OmegaConf.create(layer)
    base = OmegaConf.create(OmegaConf.to_container(base))
    _switch_plugins(base, layer)
    return OmegaConf.merge(base, layer)  # type: ignore[return-value]


def apply_overrides(cfg: DictConfig, overrides: list[tuple[str, Any]] | dict[str, Any]) -> DictConfig:
    """Set dotted keys on a spec (``requests.0.seed=3`` indexes lists). A key that names another plugin for a section
    (``sync.loss.name=style``) first replaces that section, whatever the order of the overrides."""
    pairs = list(overrides.items()) if isinstance(overrides, dict) else list(overrides)
    cfg = OmegaConf.create(OmegaConf.to_container(cfg))
    names = {f"{section}.name": section for section in PLUGIN_SECTIONS}
    for key, value in pairs:
        if key in names and OmegaConf.select(cfg, key) not in (None, value):
            OmegaConf.update(cfg, names[key], {}, merge=False)
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
    else:
        raw = OmegaConf.create(spec)
        if "extends" in raw:
            base = OmegaConf.create()
            parents = raw.pop("extends")
            for parent in [parents] if isinstance(parents, str) else parents:
                base = merge_layer(base, load_file(find_spec_file(parent)))
            raw = merge_layer(base, raw)
    return apply_overrides(raw, parse_overrides(list(overrides)))


# ------------------------------------------------------------------------------------------------------- validation


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


def typed_config(schema: type, values: Any, where: str) -> DictConfig:
    """``values`` merged over the dataclass ``schema``'s defaults and type-checked; failures are a one-line
    :class:`ConfigError` naming the key under ``where`` (plugins validating their own sub-sections use this too)."""
    try:
        base = OmegaConf.structured(schema)
        return OmegaConf.merge(base, values)  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or getattr(exc, "key", None)
        if key:
            key = _full_path(values, str(key))
        msg = one_line(exc, 10_000)
        if "not in" in msg and key is not None:
            owner = getattr(exc, "object_type", None)
            owner = owner if dataclasses.is_dataclass(owner) else schema
            valid = ", ".join(f.name for f in dataclasses.fields(owner))
            msg = f"unknown key {str(key).split('.')[-1]!r}; valid keys: {valid}"
        full = ".".join(part for part in (where, str(key) if key else "") if part) or "spec"
        raise ConfigError(full, msg) from None


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
    typed = typed_config(cls.Config, options, section)
    instance = OmegaConf.to_object(typed)
    full = OmegaConf.merge({"name": name}, typed)
    return full, instance, cls  # type: ignore[return-value]


def _check(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(key, message)


ANCHORS = ("center", "first", "last")


def _drop_default_plugin_options(top: DictConfig, raw: DictConfig | dict) -> None:
    """A section that names another plugin than the schema's default keeps only the keys the spec gives: the default
    plugin's options (``sync.loss.net``, ``denoiser.pretrained``) belong to it, not to the plugin the spec names."""
    raw = raw if isinstance(raw, DictConfig) else OmegaConf.create(raw)
    defaults = OmegaConf.structured(Spec)
    for section in PLUGIN_SECTIONS:
        given = OmegaConf.select(raw, section)
        if isinstance(given, DictConfig) and "name" in given and given.name != OmegaConf.select(defaults, section).name:
            OmegaConf.update(top, section, OmegaConf.to_container(given), merge=False)


def validate(raw: DictConfig | dict) -> ResolvedSpec:
    """Validate a composed spec; returns the resolved spec or raises a one-line :class:`ConfigError`."""
    top = typed_config(Spec, raw, "")
    _drop_default_plugin_options(top, raw)
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
        _check(value % factor == 0, f"canvas.{key}", f"{value} is not divisible by {factor}; use a multiple of {factor}")

    s = top.sampler
    _check(s.steps >= 1, "sampler.steps", f"must be >= 1, got {s.steps}")
    _check(s.view_batch_size >= 1, "sampler.view_batch_size", f"must be >= 1, got {s.view_batch_size}")
    from .schedulers import check_scheduler_name

    check_scheduler_name(s.scheduler)

    y = top.sync
    _check(y.weight >= 0, "sync.weight", f"must be >= 0, got {y.weight}")
    _check(0 < y.decay <= 1, "sync.decay", f"must be in (0, 1], got {y.decay}")
    _check(y.every >= 1, "sync.every", f"must be >= 1, got {y.every}")
    _check(y.until is None or y.until >= 0, "sync.until", f"must be >= 0, got {y.until}")
    _check(y.resolution is None or y.resolution >= 16, "sync.resolution", f"must be >= 16 px, got {y.resolution}")
    _check(y.batch_size is None or y.batch_size >= 1, "sync.batch_size", f"must be >= 1, got {y.batch_size}")
    anchor = y.anchor
    _check(
        (isinstance(anchor, int) and not isinstance(anchor, bool)) or anchor in ANCHORS,
        "sync.anchor",
        f"{anchor!r} is not one of {', '.join(ANCHORS)} or a view index",
    )

    r = top.runtime
    _check(r.shard in ("windows", "requests"), "runtime.shard", f"{r.shard!r} is not 'windows' or 'requests'")
    _check(r.num_nodes >= 1, "runtime.num_nodes", f"must be >= 1, got {r.num_nodes}")

    names: set[str] = set()
    for i, req in enumerate(top.requests):
        _check(isinstance(req.prompt, str) and req.prompt != "", f"requests.{i}.prompt", "missing or empty prompt")
        if req.name is not None:
            _check(req.name not in names, f"requests.{i}.name", f"duplicate request name {req.name!r}")
            _check("/" not in req.name and req.name not in ("", ".", ".."), f"requests.{i}.name", "not a file name")
            names.add(req.name)

    resolved = ResolvedSpec(top, plugin_configs, plugin_classes)
    tiler = resolved.build("tiler")
    tiler.validate(resolved.canvas)
    denoiser_cls = plugin_classes["denoiser"]
    if getattr(denoiser_cls.check_run, "__func__", None) is not Denoiser.check_run.__func__:  # views cost only then
        denoiser_cls.check_run(resolved, tiler.views(resolved.canvas))
    merger = resolved.build("merger")  # mergers check their options on construction; cheap
    if merger.target == "x0":
        from .sampler import X0_SCHEDULERS
        from .schedulers import ALIASES

        scheduler = str(s.scheduler)
        _check(ALIASES.get(scheduler, (scheduler,))[0] in X0_SCHEDULERS, "sampler.scheduler",
               f"merger.target x0 takes one DDIM step per view; {scheduler!r} cannot: use ddim or merger.target xt")
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


_typed = typed_config  # the name plugins used before it was public
