"""``runtime.*`` (where Lightning runs a spec) checked against what Lightning accepts on this machine, at validation:
a GPU that is not there, a device string Lightning cannot parse or a precision it does not know would otherwise fail
inside ``Trainer(...)`` with a traceback, after the spec was accepted."""
from __future__ import annotations

import re

from omegaconf import DictConfig, ListConfig, OmegaConf

from .errors import ConfigError


def _check(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(key, message)


_DEVICE_IDS = r"\s*\d+\s*(,\s*\d+\s*)*,?\s*"  # Lightning's device string: "2" (a count), "0,1" or "1," (ids)


def check_runtime(r: DictConfig) -> None:
    """``runtime.*`` checked against what Lightning accepts on this machine, before any model loads (Lightning would
    fail later, with a traceback). Lightning is imported only for values other than the CPU defaults."""
    import torch

    accelerator, devices = str(r.accelerator), r.devices
    devices = OmegaConf.to_container(devices) if isinstance(devices, ListConfig) else devices
    shape_ok = (
        (isinstance(devices, int) and not isinstance(devices, bool) and (devices >= 1 or devices == -1))
        or (isinstance(devices, str) and (devices.strip() in ("auto", "-1") or re.fullmatch(_DEVICE_IDS, devices)))
        or (isinstance(devices, list) and len(devices) > 0
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in devices))
    )
    _check(shape_ok, "runtime.devices", f"{devices!r} is not a device count: give an int (e.g. 1), a list of device "
                                        "ids ([0, 1]), 'auto', or ids as a string ('0,1')")
    gpu = torch.cuda.is_available() or torch.backends.mps.is_available()
    if (accelerator == "cpu" or (accelerator == "auto" and not gpu)) and r.precision is None and r.strategy == "auto":
        count = devices.strip() if isinstance(devices, str) else devices  # Lightning's CPU rule: a count >= 1
        _check(count == "auto" or int(count if str(count).isdigit() else 0) >= 1, "runtime.devices",
               f"{devices!r} on the CPU: give a number of processes (an int >= 1)")
        return
    from typing import get_args

    from lightning.fabric import connector
    from lightning.pytorch.accelerators import AcceleratorRegistry
    from lightning.pytorch.strategies import StrategyRegistry

    names = sorted({"auto", "gpu", *AcceleratorRegistry.available_accelerators()})
    _check(accelerator in names, "runtime.accelerator", f"{accelerator!r} is not one of {', '.join(names)}")
    if accelerator == "auto":
        accelerator = next((a for a in ("cuda", "mps") if AcceleratorRegistry[a]["accelerator"].is_available()), "cpu")
    if accelerator == "gpu":
        found = [a for a in ("cuda", "mps") if AcceleratorRegistry[a]["accelerator"].is_available()]
        _check(bool(found), "runtime.accelerator", "gpu: this machine has no GPU (CUDA or MPS); use "
                                                   "runtime.accelerator=cpu or auto")
        accelerator = found[0]
    cls = AcceleratorRegistry[accelerator]["accelerator"]
    _check(cls.is_available(), "runtime.accelerator", f"{accelerator}: not available on this machine; use "
                                                      "runtime.accelerator=auto or cpu")
    if devices != "auto":
        try:
            cls.parse_devices(devices)
        except Exception as exc:  # Lightning's MisconfigurationException / TypeError / ValueError
            reason = " ".join(str(exc).split()) or type(exc).__name__  # Lightning's reason spans two lines
            raise ConfigError("runtime.devices", f"{devices!r} with accelerator {accelerator}: {reason}") from None
    if r.precision is not None:
        allowed = [*get_args(connector._PRECISION_INPUT_STR), *get_args(connector._PRECISION_INPUT_STR_ALIAS)]
        _check(str(r.precision) in allowed, "runtime.precision",
               f"{r.precision!r} is not a Lightning precision; use one of {', '.join(allowed)}, or null (the "
               f"denoiser's dtype decides)")
    strategies = ["auto", *StrategyRegistry.available_strategies()]
    if str(r.strategy) not in strategies:
        import difflib

        close = difflib.get_close_matches(str(r.strategy), strategies, n=1)
        raise ConfigError("runtime.strategy", f"{r.strategy!r} is not a Lightning strategy; "
                          f"{f'did you mean {close[0]!r}? ' if close else ''}use auto, ddp, fsdp, deepspeed or another "
                          "name in Lightning's StrategyRegistry")
