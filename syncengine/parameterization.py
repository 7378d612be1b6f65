"""Where a step's latents are, and conversions between what a network predicts and the quantities the sampler needs.

Every family the engine drives writes its noisy latents as ``x_t = signal * x0 + noise * eps`` (a
:class:`NoiseLevel`):

- diffusion models (SD 1/2, SDXL) in "alpha space": ``signal = sqrt(a)``, ``noise = sqrt(1 - a)`` with
  ``a = alphas_cumprod[t]``; sigma-space schedulers (Euler, Heun, ...) scale their latents into this space with
  ``scale_model_input`` first, so these formulas serve them all;
- rectified-flow models (SD3, FLUX): ``signal = 1 - sigma``, ``noise = sigma``, and the network predicts the velocity
  ``eps - x0`` (``prediction_type = "flow_prediction"``, diffusers' name).

Algorithm 1 needs only Tweedie's x0 (for the sync loss and the x0 merge target) and its inverse, so the sampler, the
mergers and every tiler work unchanged for both.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow_prediction")


def _unknown(prediction_type: str) -> ValueError:
    return ValueError(f"unknown prediction_type {prediction_type!r}: expected one of {', '.join(PREDICTION_TYPES)}")


@dataclass(frozen=True)
class NoiseLevel:
    """``x_t = signal * x0 + noise * eps`` at one step (scalar tensors, float32)."""

    signal: torch.Tensor
    noise: torch.Tensor

    @classmethod
    def diffusion(cls, alpha_bar: torch.Tensor) -> NoiseLevel:
        """Alpha space: ``sqrt(a) x0 + sqrt(1 - a) eps`` (DDPM, DDIM and the samplers derived from them)."""
        a = torch.as_tensor(alpha_bar, dtype=torch.float32)
        return cls(a.sqrt(), (1 - a).sqrt())

    @classmethod
    def flow(cls, sigma: torch.Tensor | float) -> NoiseLevel:
        """Rectified flow: ``(1 - sigma) x0 + sigma eps`` (SD3, FLUX)."""
        s = torch.as_tensor(sigma, dtype=torch.float32)
        return cls(1 - s, s)

    def to(self, like: torch.Tensor) -> NoiseLevel:
        """On ``like``'s device and dtype."""
        return NoiseLevel(self.signal.to(device=like.device, dtype=like.dtype),
                          self.noise.to(device=like.device, dtype=like.dtype))

    def noised(self, x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """A clean latent brought to this step with noise ``eps`` (region bootstrapping, image inputs)."""
        level = self.to(x0)
        return level.signal * x0 + level.noise * eps


def alpha_bar(alphas_cumprod: torch.Tensor, timestep: torch.Tensor | float) -> torch.Tensor:
    """``alphas_cumprod`` at a (possibly fractional) timestep, linearly interpolated."""
    t = torch.as_tensor(timestep, dtype=torch.float64).clamp(0, len(alphas_cumprod) - 1)
    lo = int(t.floor())
    hi = min(lo + 1, len(alphas_cumprod) - 1)
    frac = float(t - lo)
    ac = alphas_cumprod.to(torch.float64)
    return (ac[lo] * (1 - frac) + ac[hi] * frac).to(torch.float32)


def is_flow_scheduler(scheduler: Any) -> bool:
    """Whether a diffusers scheduler steps a rectified flow (its ``sigmas`` are the flow's, no ``alphas_cumprod``)."""
    config = scheduler.config
    return type(scheduler).__name__.startswith("FlowMatch") or bool(config.get("use_flow_sigmas", False)) or (
        config.get("prediction_type") == "flow_prediction")


def noise_level(scheduler: Any, index: int, timestep: torch.Tensor) -> NoiseLevel:
    """The level of step ``index`` (timestep ``timestep``) of a scheduler whose timesteps are set."""
    if is_flow_scheduler(scheduler):
        return NoiseLevel.flow(scheduler.sigmas[index])
    return NoiseLevel.diffusion(alpha_bar(scheduler.alphas_cumprod.to(torch.float32), timestep))


def predicted_x0(model_output: torch.Tensor, x_t: torch.Tensor, level: NoiseLevel,
                 prediction_type: str) -> torch.Tensor:
    """Tweedie's estimate of the clean sample from the model output at ``x_t``."""
    s, n = level.signal.to(x_t.dtype), level.noise.to(x_t.dtype)
    if prediction_type == "epsilon":
        return (x_t - n * model_output) / s
    if prediction_type == "v_prediction":  # v = s eps - n x0, with s^2 + n^2 = 1
        return s * x_t - n * model_output
    if prediction_type == "sample":
        return model_output
    if prediction_type == "flow_prediction":  # velocity v = eps - x0
        return x_t - n * model_output
    raise _unknown(prediction_type)


def model_output_of(x0: torch.Tensor, x_t: torch.Tensor, level: NoiseLevel, prediction_type: str) -> torch.Tensor:
    """The inverse of :func:`predicted_x0`: the model output that a scheduler of ``prediction_type`` reads as the pair
    (x_t, x0), through the implied noise ``eps = (x_t - signal x0) / noise``. Lets a merged x0 drive any scheduler
    step (SyncTweedies' x0 merge target)."""
    s, n = (level.signal.to(device=x_t.device, dtype=x_t.dtype), level.noise.to(device=x_t.device, dtype=x_t.dtype))
    eps = (x_t - s * x0) / n
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return s * eps - n * x0
    if prediction_type == "sample":
        return x0
    if prediction_type == "flow_prediction":
        return eps - x0
    raise _unknown(prediction_type)


def predicted_epsilon(model_output: torch.Tensor, x_t: torch.Tensor, level: NoiseLevel,
                      prediction_type: str) -> torch.Tensor:
    """The noise implied by the model output at ``x_t``."""
    s, n = level.signal.to(x_t.dtype), level.noise.to(x_t.dtype)
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "v_prediction":
        return s * model_output + n * x_t
    if prediction_type == "sample":
        return (x_t - s * model_output) / n
    if prediction_type == "flow_prediction":  # eps = x0 + v = x_t + (1 - n) v
        return x_t + s * model_output
    raise _unknown(prediction_type)


def ddim_step(x0: torch.Tensor, x_t: torch.Tensor, level: NoiseLevel, next_level: NoiseLevel) -> torch.Tensor:
    """The deterministic step from ``x_t`` to ``next_level`` given x0: ``signal' x0 + noise' eps``. It is DDIM
    (eta = 0) for diffusion and exactly the Euler step of a rectified flow, so a view can take its own step with a
    merged x0 whatever the family (the x0 merge target)."""
    level, next_level = level.to(x_t), next_level.to(x_t)
    eps = (x_t - level.signal * x0) / level.noise
    return next_level.signal * x0 + next_level.noise * eps
