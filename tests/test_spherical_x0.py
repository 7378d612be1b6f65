"""The x0 merge target (SyncTweedies): exact against the x_t path where it must be, and what it buys on projections."""
from __future__ import annotations

import pytest
import torch

from syncengine.config import resolve
from syncengine.errors import ConfigError
from syncengine.pipeline import Pipeline


def _latents(spec):
    resolved = resolve(spec)
    return Pipeline(resolved).run(0).latents


@pytest.mark.parametrize("tiler", [
    {"name": "sliding", "window": 64, "stride": 32},
    {"name": "sliding", "window": 64, "stride": 48, "loop": True},
])
@pytest.mark.parametrize("merger", ["average", "gaussian"])
def test_x0_merging_equals_xt_merging_for_crops(tiny_spec, tiler, merger):
    # Crops read consistent windows of one canvas, so with DDIM (eta 0) and no sync step each view's DDIM step
    # towards the merged x0 is the crop of the canvas step: the two targets agree to float error.
    spec = tiny_spec(tiler=tiler, sampler={"steps": 3})
    xt = _latents({**spec, "merger": {"name": merger, "target": "xt"}})
    x0 = _latents({**spec, "merger": {"name": merger, "target": "x0"}})
    assert (xt - x0).abs().max() < 1e-4 * xt.abs().max()
