"""The SyncDiffusion update (Eq. 14, Algorithm 1 lines 1-5) and its schedule."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from .denoiser import NO_CONTEXT, Conditioning, Denoiser, RequestContext, Step
from .parameterization import NoiseLevel, predicted_x0
from .sync_loss import SyncLoss
from .views import View


@dataclass(frozen=True)
class SyncSchedule:
    """When to synchronize and how hard: ``w_i = weight * decay**i`` on steps with ``(i + 1) % every == 0``
    and ``i < until`` (the reference implementation's conventions)."""

    weight: float = 20.0
    decay: float = 0.95
    every: int = 1
    until: int | None = None

    def weight_at(self, index: int) -> float:
        if self.weight == 0 or (index + 1) % self.every != 0:
            return 0.0
        if self.until is not None and index >= self.until:
            return 0.0
        return float(self.weight * self.decay**index)


def decoded_x0(
    denoiser: Denoiser,
    latents: torch.Tensor,
    step: Step,
    conds: Sequence[Conditioning],
    views: Sequence[View],
    level: NoiseLevel,
    resolution: int | None = None,
    context: RequestContext = NO_CONTEXT,
) -> torch.Tensor:
    """D(phi(x_t, t)): the decoded, clamped prediction of the clean image for a batch of views, conditioned as the
    request's ``predict`` calls are (its ``context``).

    ``resolution`` resizes the decoded image (shorter side, antialiased) before the loss: a cheaper loss."""
    out = denoiser.predict(latents, step, conds, views, context)
    x0 = predicted_x0(out.to(latents.dtype), latents, level.to(latents), denoiser.prediction_type)
    image = denoiser.decode_for_sync(x0).clamp(-1, 1)
    if resolution is not None and min(image.shape[-2:]) != resolution:
        h, w = image.shape[-2:]
        size = (round(h * resolution / min(h, w)), round(w * resolution / min(h, w)))
        image = torch.nn.functional.interpolate(image, size=size, mode="bilinear", antialias=True, align_corners=False)
    return image


def sync_gradient(
    loss: SyncLoss,
    render: Callable[[torch.Tensor], torch.Tensor],
    latents: torch.Tensor,
    targets: Sequence[Any],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient of each view's loss w.r.t. its own noisy latent, for a batch of views at once.

    ``render`` maps latents ``[B, C, h, w]`` to images (``decoded_x0`` with the batch's context bound);
    ``targets[k]`` is view k's anchor target. The loss is a sum of per-view terms, so the gradient of the sum gives
    each view exactly the gradient of its own loss. Returns ``(gradient, per-view loss)``.
    """
    x = latents.detach().requires_grad_(True)
    with torch.enable_grad():
        images = render(x)
        groups: dict[int, list[int]] = {}
        for k, target in enumerate(targets):
            groups.setdefault(id(target), []).append(k)
        losses = torch.empty(len(targets), device=images.device, dtype=torch.float32)
        total = 0
        for members in groups.values():
            idx = torch.tensor(members, device=images.device)
            value = loss(images.index_select(0, idx), targets[members[0]]).reshape(-1).float()
            losses = losses.index_copy(0, idx, value)
            total = total + value.sum()
        (grad,) = torch.autograd.grad(total, x)
    return grad, losses.detach()
