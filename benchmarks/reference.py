"""SyncDiffusion in the structure of its reference implementation: the baseline the sampler is measured against.

One window at a time, as the authors' code does it: per sync step the anchor's x0 is decoded (no gradient); then for
every window, the anchor included, a UNet forward with gradient, a decode, the loss and its backward (the anchor's
gradient is computed and dropped); the non-anchor windows move by ``-w_i * grad``; each window is then denoised
(no gradient), stepped with DDIM on its own, and the stepped windows are averaged. ``anchor_gradient=False`` skips the
anchor's wasted gradient, which leaves Algorithm 1 exactly as the paper writes it.

tests/test_sync.py checks that :class:`syncengine.sampler.JointSampler` computes the same latents (within float
error); ``python -m benchmarks`` times it as the ``reference`` row against the sampler's batched sync.
"""
from __future__ import annotations

from typing import Sequence

import torch

from syncengine.denoiser import Conditioning, Denoiser, Step
from syncengine.parameterization import is_flow_scheduler, noise_level
from syncengine.sync import decoded_x0
from syncengine.sync_loss import SyncLoss
from syncengine.view_schedule import ViewSchedule
from syncengine.views import View


def reference_syncdiffusion(
    den: Denoiser,
    loss: SyncLoss,
    views: Sequence[View],
    canvas0: torch.Tensor,
    steps: int,
    weight: float,
    decay: float,
    guidance: float,
    prompt: str,
    anchor_gradient: bool = True,
    scheduler: str = "ddim",
    schedule: ViewSchedule | None = None,
) -> torch.Tensor:
    """The final latent canvas from initial noise ``canvas0`` (the centre window as anchor, sync every step).

    ``scheduler``: ``ddim``, stepped by diffusers per window; or, for rectified-flow models, ``flow_euler``, whose
    per-window Euler step ``x + (sigma' - sigma) v`` is written out here (diffusers' flow scheduler counts its calls:
    one per step, not one per window).

    ``schedule``: views that move from step to step (shifted windows): each step uses its own views, and the anchor
    is the view that holds the canvas centre at that step (``views`` then gives the first step's, for the scheduler).
    """
    sched = den.make_scheduler(scheduler)
    den.set_timesteps(sched, steps, views)
    flow = is_flow_scheduler(sched)
    with torch.no_grad():
        cond = Conditioning(den.encode_prompt(prompt, ""), guidance)
    latent = canvas0.to(den.device).clone()
    anchor = views[len(views) // 2]
    for i, t in enumerate(sched.timesteps):
        if schedule is not None:
            views = schedule.at(i)
            anchor = schedule.anchor("center", views)
        step = Step(i, steps, t)
        a = noise_level(sched, i, t)
        w = weight * decay**i
        with torch.no_grad():
            target = loss.prepare_target(decoded_x0(den, anchor.extract(latent), step, [cond], [anchor], a).float())
        value = torch.zeros_like(latent)
        count = torch.zeros_like(latent)
        for view in views:
            x = view.extract(latent).detach()
            if anchor_gradient or view is not anchor:
                xg = x.clone().requires_grad_(True)
                with torch.enable_grad():
                    image = decoded_x0(den, xg, step, [cond], [view], a).float()
                    (g,) = torch.autograd.grad(loss(image, target).sum(), xg)
                if view is not anchor:
                    x = x - w * g
            with torch.no_grad():
                eps = den.predict(x, step, [cond], [view]).float()
                if flow:
                    stepped = x + (sched.sigmas[i + 1] - sched.sigmas[i]).to(x) * eps
                else:
                    stepped = sched.step(eps, t, x).prev_sample
            view.scatter_add(stepped, value)
            view.scatter_add(torch.ones_like(stepped), count)
        latent = torch.where(count > 0, value / count.clamp_min(1e-8), value)
    return latent
