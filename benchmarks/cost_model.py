"""The cost model of one panorama, in closed form: what the sampler must compute, counted in model calls.

Per denoising step with ``N`` views (one sync group), view batch size ``V`` and sync batch size ``S``:
- every step: ``N`` UNet evaluations without gradient (the MultiDiffusion denoise);
- a sync step adds the anchor (1 UNet evaluation and 1 decode, no gradient) and, for the ``N - 1`` other views,
  1 UNet evaluation and 1 decode with gradient each, plus the loss's forward and backward; the backward runs once
  per chunk of at most ``S`` non-anchor views of a view batch;
- a step that is not a sync step (or has weight 0) adds nothing.
With classifier-free guidance each UNet evaluation is 2 batch rows. The final canvas is decoded once.
docs/performance.md prints this model; tests/test_performance.py checks the sampler against it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Costs:
    unet_rows: int  # UNet batch rows (2 per evaluation with classifier-free guidance)
    unet_rows_with_grad: int
    sync_decodes: int  # decodes for the sync loss (full VAE, or the tiny one with denoiser.sync_vae)
    backward_calls: int  # autograd passes (one per sync chunk)
    sync_steps: int


def sync_steps(steps: int, weight: float, every: int = 1, until: int | None = None) -> list[int]:
    """Step indices that synchronize: ``(i + 1) % every == 0`` and ``i < until`` (SyncSchedule's rule)."""
    if weight == 0:
        return []
    return [i for i in range(steps) if (i + 1) % every == 0 and (until is None or i < until)]


def panorama_costs(
    views: int,
    steps: int,
    view_batch_size: int,
    sync_batch_size: int | None = None,
    weight: float = 20.0,
    every: int = 1,
    until: int | None = None,
    guidance: bool = True,
    anchor: int | None = None,
) -> Costs:
    """Counts for one panorama; ``anchor`` is the anchor's view index (default: the centre, ``views // 2``)."""
    anchor = views // 2 if anchor is None else anchor
    rows = 2 if guidance else 1
    n_sync = len(sync_steps(steps, weight, every, until))
    chunks = 0
    for start in range(0, views, view_batch_size):
        members = [v for v in range(start, min(start + view_batch_size, views)) if v != anchor]
        if members:
            chunks += math.ceil(len(members) / (sync_batch_size or len(members)))
    evals = steps * views + n_sync * views  # denoise every step; anchor + (N - 1) views on sync steps
    return Costs(
        unet_rows=rows * evals,
        unet_rows_with_grad=rows * n_sync * (views - 1),
        sync_decodes=n_sync * views,
        backward_calls=n_sync * chunks,
        sync_steps=n_sync,
    )


def reference_costs(views: int, steps: int, guidance: bool = True) -> Costs:
    """Counts of ``benchmarks.reference`` (the authors' structure, syncing every step): per step the anchor (1 UNet
    evaluation and 1 decode, no gradient), then for *every* window, the anchor's included, 1 UNet evaluation and
    1 decode with gradient and one backward, then 1 UNet evaluation to denoise."""
    rows = 2 if guidance else 1
    return Costs(
        unet_rows=rows * steps * (2 * views + 1),
        unet_rows_with_grad=rows * steps * views,
        sync_decodes=steps * (views + 1),
        backward_calls=steps * views,
        sync_steps=steps,
    )
