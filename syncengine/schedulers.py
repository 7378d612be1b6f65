"""Scheduler names: short aliases for common diffusers schedulers, or any diffusers scheduler class by name.

The sampler steps once on the canvas (see ``docs/architecture.md``), so any diffusers scheduler works, multistep ones
keeping their history on the canvas.
"""
from __future__ import annotations

from typing import Any

from .errors import ConfigError

ALIASES: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm++": ("DPMSolverMultistepScheduler", {}),
    "dpm++_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "unipc": ("UniPCMultistepScheduler", {}),
}


def _diffusers_class(name: str):
    import diffusers

    cls = getattr(diffusers, name, None)
    if cls is None or not name.endswith("Scheduler"):
        return None
    return cls


def check_scheduler_name(name: str) -> None:
    if name in ALIASES or _diffusers_class(name) is not None:
        return
    import difflib

    choices = list(ALIASES)
    close = difflib.get_close_matches(name, choices, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ConfigError(
        "sampler.scheduler",
        f"unknown scheduler {name!r}; use one of {', '.join(choices)} or a diffusers class name such as "
        f"'DDIMScheduler'.{hint}",
    )


def scheduler_class(name: str):
    """The diffusers class of a scheduler name (a short alias or a class name)."""
    check_scheduler_name(name)
    return _diffusers_class(ALIASES.get(name, (name, {}))[0])


def check_scheduler_options(name: str, options: dict[str, Any]) -> None:
    """``sampler.scheduler_options`` keys must be parameters of the scheduler class: diffusers' ``from_config``
    silently ignores any other key, so a misspelt option would change nothing without a word."""
    if not options:
        return
    import difflib
    import inspect

    cls = scheduler_class(name)
    params = [p for p, v in inspect.signature(cls.__init__).parameters.items()
              if p != "self" and v.kind not in (v.VAR_POSITIONAL, v.VAR_KEYWORD)]
    for key in options:
        if key not in params:
            close = difflib.get_close_matches(str(key), params, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(f"sampler.scheduler_options.{key}", f"{cls.__name__} has no option {key!r}; {hint}"
                                                                  f"valid options: {', '.join(params)}")


def make_scheduler(name: str, base_config: dict, **options: Any):
    """A fresh scheduler of the named kind, configured from a model's scheduler config plus ``options``."""
    check_scheduler_name(name)
    class_name, preset = ALIASES.get(name, (name, {}))
    cls = _diffusers_class(class_name)
    return cls.from_config(dict(base_config), **{**preset, **options})
