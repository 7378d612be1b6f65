"""Scheduler names: short aliases for common diffusers schedulers, or any diffusers scheduler class by name.

The sampler steps once on the canvas (see ``docs/architecture.md``), so any diffusers scheduler works, multistep ones
keeping their history on the canvas. Stochastic ones (``euler_a``, ``ddpm``, ``dpm++_sde``, the few-step ``lcm`` and
``tcd``) draw their step noise once, on the canvas, from a CPU generator seeded by the request's seed + 1: the same
noise whatever the view batches or the window shards. ``lcm``/``tcd`` step distilled models (LCM, TCD LoRAs or UNets)
in 2-8 steps, at most their ``original_inference_steps`` (:func:`check_few_step_count`).
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
    "lcm": ("LCMScheduler", {}),  # latent consistency models (few steps)
    "tcd": ("TCDScheduler", {}),  # trajectory consistency distillation (few steps; stochastic, gamma 0.3)
    "flow_euler": ("FlowMatchEulerDiscreteScheduler", {}),  # rectified-flow models (SD3, FLUX)
}

FEW_STEP_SCHEDULERS = ("LCMScheduler", "TCDScheduler")
"""Consistency schedulers: their timesteps are a subset of the distillation's ``original_inference_steps`` grid."""


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


def is_flow_scheduler_name(name: str, options: dict[str, Any] | None = None) -> bool:
    """Whether a scheduler name (and its options) steps a rectified flow; known before any model loads."""
    class_name = ALIASES.get(name, (name, {}))[0]
    return class_name.startswith("FlowMatch") or bool((options or {}).get("use_flow_sigmas", False))


def check_diffusion_scheduler(name: str, options: dict[str, Any], family: str) -> None:
    """The reverse rule: a diffusion model (SD, SDXL) stepped by a flow scheduler would sample garbage."""
    check_scheduler_name(name)
    if is_flow_scheduler_name(name, options):
        raise ConfigError("sampler.scheduler", f"{family} is a diffusion model; {name!r} steps a rectified flow: use "
                                               "ddim, euler, dpm++ or another diffusion scheduler")


def check_flow_scheduler(name: str, options: dict[str, Any], family: str) -> None:
    """A rectified-flow model (SD3, FLUX) needs a flow scheduler, a diffusion model one of the others: say so at
    validation instead of sampling garbage."""
    check_scheduler_name(name)
    if not is_flow_scheduler_name(name, options):
        raise ConfigError("sampler.scheduler", f"{family} is a rectified-flow model; {name!r} is a diffusion "
                                               "scheduler: use flow_euler (FlowMatchEulerDiscreteScheduler)")


def check_few_step_count(scheduler, steps: int) -> None:
    """A consistency scheduler picks its timesteps from the distillation's grid of ``original_inference_steps``;
    more steps than that fail deep inside diffusers. Say so in one line, once the model's scheduler is known."""
    if type(scheduler).__name__ not in FEW_STEP_SCHEDULERS:
        return
    limit = int(scheduler.config.get("original_inference_steps") or 50)
    if steps > limit:
        raise ConfigError("sampler.steps", f"{type(scheduler).__name__} takes at most original_inference_steps="
                                           f"{limit} steps (its distillation grid), got {steps}: use 2-8 steps, or "
                                           "raise sampler.scheduler_options.original_inference_steps")
