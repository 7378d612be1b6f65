"""The ``shifted`` tiler (SpotDiffusion) and step-dependent views in the sampler.

Geometry: each step's windows cover the canvas, exactly once along a wrapped axis; the offsets are a function of
(seed, step). Sampling: shifted windows with sync equal Algorithm 1 written per window on each step's own windows
(benchmarks/reference.py with a view schedule); a shifted run is reproducible and equal across view batch sizes;
unshifted tiles equal one diffusers pipeline run per tile. Sharded shifted runs are checked in tests/test_sharding.py.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from _tolerance import KERNEL_ULPS, assert_reordered_close, reorder_tolerance

from benchmarks.reference import reference_syncdiffusion
from syncengine.config import resolve
from syncengine.errors import ConfigError
from syncengine.merger import MergeBuffer
from syncengine.pipeline import Pipeline
from syncengine.sampler import JointSampler, Request, SamplerOptions
from syncengine.sync import SyncSchedule
from syncengine.view_schedule import FixedViews, MovingViews
from syncengine.views import CanvasSpec
from syncengine_panorama.shifted import ShiftedConfig, ShiftedTiler, shifted_starts, step_shift


def coverage(views, canvas: CanvasSpec) -> torch.Tensor:
    out = torch.zeros(canvas.latent_shape())
    for view in views:
        view.scatter_add(torch.ones(1, 4, *view.latent_size), out)
    return out[0, 0]


def tiler(**options) -> ShiftedTiler:
    return ShiftedTiler(ShiftedConfig(**options))


@pytest.mark.parametrize("width", [512, 576])
def test_looping_strip_covers_every_position_once_per_step(width):
    canvas = CanvasSpec(64, width)
    schedule = tiler(window=64, loop=True).view_schedule(canvas, seed=5)
    assert schedule.moving
    for step in range(12):
        count = coverage(schedule.at(step), canvas)
        if width % 64 == 0:
            assert bool((count == 1).all()), f"step {step}"
        else:  # the last window wraps over the first one's start
            assert bool((count >= 1).all()) and int((count == 2).sum()) == 8 * (64 - width % 64) // 8 * 1


def test_clamped_canvas_is_covered_and_overlaps_only_at_its_edges():
    canvas = CanvasSpec(160, 320)  # 20x40 latents, 8x8 latent windows: 2D, shifted both ways, no wrap
    schedule = tiler(window=64).view_schedule(canvas, seed=1)
    shifts = set()
    for step in range(16):
        views = schedule.at(step)
        count = coverage(views, canvas)
        assert bool((count >= 1).all())
        assert bool((count[8:12, 8:32] == 1).all())  # overlaps only within a window of an edge (clamped windows)
        shifts.add(step_shift(1, step, 8, 8, 20, 40))
    assert len(shifts) > 8  # the grid really moves, both ways


def test_shifts_are_a_function_of_seed_and_step():
    canvas = CanvasSpec(64, 512)
    boxes = lambda schedule, step: [v.box for v in schedule.at(step)]  # noqa: E731
    a, b = (tiler(window=64, loop=True).view_schedule(canvas, seed=3) for _ in range(2))
    assert all(boxes(a, i) == boxes(b, i) for i in (0, 4, 2, 9))  # any order of asking
    other = tiler(window=64, loop=True).view_schedule(canvas, seed=4)
    assert any(boxes(a, i) != boxes(other, i) for i in range(6))
    assert shifted_starts(20, 8, 3, wrap=False) == [0, 3, 11, 12]
    assert shifted_starts(24, 8, 3, wrap=True) == [3, 11, 19]


def test_unshifted_tiles_are_fixed_views():
    schedule = tiler(window=64, shift=False).view_schedule(CanvasSpec(64, 256), seed=0)
    assert isinstance(schedule, FixedViews) and [v.left for v in schedule.at(7)] == [0, 8, 16, 24]


def test_anchor_is_the_view_holding_the_anchor_position():
    canvas = CanvasSpec(64, 512)
    schedule = tiler(window=64, loop=True).view_schedule(canvas, seed=2)
    assert isinstance(schedule, MovingViews)
    for step in range(8):
        views = schedule.at(step)
        for name, col in (("center", 32), ("first", 0), ("last", 63)):
            anchor = schedule.anchor(name, views)
            assert (col - anchor.left) % 64 < 8, (step, name)
    with pytest.raises(ConfigError, match="sync.anchor.*move"):
        schedule.anchor(2, views)


def shifted_spec(tiny_spec, tiler: dict, **sections) -> dict:
    spec = tiny_spec(**sections)
    spec["tiler"] = {"name": "shifted", **tiler}  # another plugin: the section is replaced, as a spec's would be
    return spec


def _parts(tiny_spec, tiler: dict, **sections):
    resolved = resolve(shifted_spec(tiny_spec, tiler, **sections))
    denoiser = Pipeline(resolved).denoiser_for(resolved)
    return resolved, denoiser, resolved.build("sync.loss")


def test_shifted_sync_equals_algorithm_1_on_each_steps_windows(tiny_spec):
    resolved, den, loss = _parts(tiny_spec, {"window": 64, "loop": True}, canvas={"height": 64, "width": 192})
    schedule = resolved.build("tiler").view_schedule(resolved.canvas, seed=3)
    steps, weight = 3, 5.0
    request = Request("a photo of a mountain", seed=3)

    def sample(collective=None, batch=3):
        return JointSampler(den, schedule, resolved.build("merger"), loss, SyncSchedule(weight, 0.9),
                            SamplerOptions(steps=steps, guidance_scale=7.5, view_batch_size=batch), collective)

    sampler = sample()
    ours = sampler.sample(request, resolved.canvas)
    assert ours.stats["sync_steps"] == steps and ours.stats["sync_views"] == steps * 2  # 3 windows, one anchor
    canvas0 = sampler.initial_noise(resolved.canvas, 3)
    ref = reference_syncdiffusion(den, loss, schedule.at(0), canvas0, steps, weight, 0.9, 7.5, request.prompt,
                                  False, schedule=schedule)
    tolerance = reorder_tolerance(lambda c: sample(c).sample(request, resolved.canvas).latents, KERNEL_ULPS)
    assert_reordered_close(ours.latents, ref, tolerance, "shifted sampler vs per-window Algorithm 1")
    # reproducible, and the same with one view per batch
    again = sample(batch=1).sample(request, resolved.canvas).latents
    assert_reordered_close(again, ours.latents, tolerance, "view batch 1 vs 3")
    assert torch.equal(sample().sample(request, resolved.canvas).latents, ours.latents)


def test_unshifted_tiles_equal_one_diffusers_run_per_tile(tiny_spec, tiny_sd):
    """With shift off the tiles never overlap, so MultiDiffusion's average is each tile's own denoising: one
    StableDiffusionPipeline run per tile, from the tile's crop of the canvas noise."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    resolved, den, _ = _parts(tiny_spec, {"window": 64, "shift": False}, canvas={"height": 64, "width": 192},
                              sampler={"view_batch_size": 1})
    ours = Pipeline(resolved).run(0)
    noise = JointSampler.initial_noise(None, resolved.canvas, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd), safety_checker=None,
                                                       requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    tiles = [pipe("a photo of a mountain", height=64, width=64, num_inference_steps=3, guidance_scale=7.5,
                  latents=noise[..., 8 * k:8 * (k + 1)].clone(), output_type="latent").images for k in range(3)]
    torch.testing.assert_close(ours.latents, torch.cat(tiles, -1).float(), atol=2e-5, rtol=1e-4)


def test_moving_views_are_refused_where_they_cannot_work(tiny_spec):
    resolved, den, loss = _parts(tiny_spec, {"window": 64})
    schedule = resolved.build("tiler").view_schedule(resolved.canvas, seed=0)
    from syncengine.merger import MergerConfig
    from syncengine_mergers.weighted import AverageMerger

    with pytest.raises(ConfigError, match="merger.target.*move every step"):
        JointSampler(den, schedule, AverageMerger(MergerConfig(target="x0")), loss, SyncSchedule(5.0),
                     SamplerOptions(steps=2))
    with pytest.raises(ConfigError, match="sync.anchor"):
        JointSampler(den, schedule, AverageMerger(), loss, SyncSchedule(5.0), SamplerOptions(anchor=1))


def test_moving_weights_follow_the_views():
    """The merger's cached weight is per view, not per index: a moved view with the same index gets its own."""
    from syncengine_mergers.weighted import AverageMerger

    canvas = CanvasSpec(64, 256)
    schedule = tiler(window=64).view_schedule(canvas, seed=0)
    merger = AverageMerger()
    for step in range(3):
        views = schedule.at(step)
        weights = MergeBuffer.weights_of(views, merger, canvas.latent_shape(), None)
        assert torch.equal(weights[0, 0], coverage(views, canvas))


def test_shifted_validation_messages(tiny_spec):
    with pytest.raises(ConfigError, match="tiler.window.*larger than the canvas"):
        resolve(shifted_spec(tiny_spec, {"window": 256}))
    with pytest.raises(ConfigError, match="tiler.window.*multiple of the latent factor"):
        resolve(shifted_spec(tiny_spec, {"window": 60}))


@pytest.mark.parametrize("weight", [0.0, 4.0], ids=["multidiffusion", "sync"])
def test_regions_on_shifted_windows_equal_the_shifted_panorama_for_one_covering_region(tiny_spec, weight):
    """Regions take the shifted tiler's windows (``windows: shifted``): one region covering the canvas with the
    request's prompt gives the same views, weights and anchors at every step, so the same latents bit for bit."""
    sections = {"canvas": {"height": 64, "width": 192}, "sync": {"weight": weight}, "sampler": {"steps": 2}}
    plain = Pipeline(resolve(shifted_spec(tiny_spec, {"window": 64}, **sections))).run(0).latents
    spec = tiny_spec(**sections)
    spec["tiler"] = {"name": "regions", "window": 64, "windows": "shifted", "regions": [
        {"mask": {"rect": [0, 0, 1.0, 1.0]}, "prompt": "a photo of a mountain", "sync": True}]}
    resolved = resolve(spec)
    schedule = resolved.build("tiler").view_schedule(resolved.canvas, seed=0)
    assert schedule.moving and schedule.at(0)[0].context["region"] == 0
    assert torch.equal(Pipeline(resolved).run(0).latents, plain)


def test_controlnet_condition_crops_follow_the_moving_windows():
    """ControlNet conditions each view on its crop of the canvas-sized condition image; with shifted windows the
    crop moves (and wraps) with the window at every step."""
    from syncengine_controlnet.conditions import condition_crop

    canvas = CanvasSpec(64, 256)
    image = torch.arange(64 * 256, dtype=torch.float32).reshape(1, 64, 256).expand(3, 64, 256)
    schedule = tiler(window=64, loop=True).view_schedule(canvas, seed=7)
    for step in range(4):
        for view in schedule.at(step):
            cols = torch.arange(view.left * 8, view.left * 8 + 64) % 256
            assert torch.equal(condition_crop(view, image, 8), image[:, :, cols])


@pytest.mark.parametrize("override, key", [({"merger": {"name": "average", "target": "x0"}}, "merger.target"),
                                           ({"sync": {"weight": 5.0, "anchor": 1}}, "sync.anchor")])
def test_spec_validation_refuses_what_moving_views_cannot_do(tiny_spec, override, key):
    """Refused when the spec is validated, before any weights load."""
    spec = shifted_spec(tiny_spec, {"window": 64}, **override)
    with pytest.raises(ConfigError, match=key):
        resolve(spec)
