"""Conversions between what a network predicts (epsilon, v, x0) and the quantities the sampler needs.

All in "alpha space": ``x_t = sqrt(a) * x0 + sqrt(1 - a) * eps`` with ``a = alphas_cumprod[t]``. Sigma-space schedulers
(Euler, Heun, ...) scale their latents into this space with ``scale_model_input`` first, so these formulas serve all.
"""
from __future__ import annotations

import torch


def alpha_bar(alphas_cumprod: torch.Tensor, timestep: torch.Tensor | float) -> torch.Tensor:
    """``alphas_cumprod`` at a (possibly fractional) timestep, linearly interpolated."""
    t = torch.as_tensor(timestep, dtype=torch.float64).clamp(0, len(alphas_cumprod) - 1)
    lo = int(t.floor())
    hi = min(lo + 1, len(alphas_cumprod) - 1)
    frac = float(t - lo)
    ac = alphas_cumprod.to(torch.float64)
    return (ac[lo] * (1 - frac) + ac[hi] * frac).to(torch.float32)


def predicted_x0(model_output: torch.Tensor, x_t: torch.Tensor, a: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """Tweedie's estimate of the clean sample from the model output at ``x_t``."""
    a = a.to(x_t.dtype)
    if prediction_type == "epsilon":
        return (x_t - (1 - a).sqrt() * model_output) / a.sqrt()
    if prediction_type == "v_prediction":
        return a.sqrt() * x_t - (1 - a).sqrt() * model_output
    if prediction_type == "sample":
        return model_output
    raise ValueError(f"unknown prediction_type {prediction_type!r}: expected epsilon, v_prediction or sample")


def model_output_of(x0: torch.Tensor, x_t: torch.Tensor, a: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """The inverse of :func:`predicted_x0`: the model output that a scheduler of ``prediction_type`` reads as the pair
    (x_t, x0), through the implied noise ``eps = (x_t - sqrt(a) x0) / sqrt(1 - a)``. Lets a merged x0 drive any
    scheduler step (SyncTweedies' x0 merge target)."""
    a = a.to(device=x_t.device, dtype=x_t.dtype)
    eps = (x_t - a.sqrt() * x0) / (1 - a).sqrt()
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return a.sqrt() * eps - (1 - a).sqrt() * x0
    if prediction_type == "sample":
        return x0
    raise ValueError(f"unknown prediction_type {prediction_type!r}: expected epsilon, v_prediction or sample")


def predicted_epsilon(
    model_output: torch.Tensor, x_t: torch.Tensor, a: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """The noise implied by the model output at ``x_t``."""
    a = a.to(x_t.dtype)
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "v_prediction":
        return a.sqrt() * model_output + (1 - a).sqrt() * x_t
    if prediction_type == "sample":
        return (x_t - a.sqrt() * model_output) / (1 - a).sqrt()
    raise ValueError(f"unknown prediction_type {prediction_type!r}: expected epsilon, v_prediction or sample")
