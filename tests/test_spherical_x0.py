"""The x0 merge target (SyncTweedies): exact against the x_t path and against plain generation where it must be,
against a closed-form reference on projections, and the noise statistics it fixes."""
from __future__ import annotations

import threading
import warnings

import pytest
import torch
from _tolerance import assert_reordered_close, reorder_tolerance

from syncengine.collective import Collective, balanced_slices
from syncengine.config import resolve
from syncengine.denoiser import Conditioning, Step
from syncengine.errors import ConfigError
from syncengine.pipeline import Pipeline

RING = {"name": "perspective", "window": 32, "views_per_ring": 8, "poles": True}


def _ring_spec(tiny_spec, tiler=RING, **sections):
    sections.setdefault("canvas", {"height": 64, "width": 128})
    spec = tiny_spec(**sections)
    spec["tiler"] = dict(tiler)  # replace, not merge into, the default sliding tiler
    return spec


def _latents(spec, collective=None):
    return Pipeline(resolve(spec), collective=collective).run(0).latents


@pytest.mark.parametrize("tiler, merger", [
    ({"name": "sliding", "window": 64, "stride": 32}, "average"),
    ({"name": "sliding", "window": 64, "stride": 48, "loop": True}, "gaussian"),
])
def test_x0_merging_equals_xt_merging_for_crops(tiny_spec, tiler, merger):
    # Crops read consistent windows of one canvas, so with DDIM (eta 0) and no sync step each view's DDIM step
    # towards the merged x0 is the crop of the canvas step: the two targets agree to float error.
    spec = tiny_spec(tiler=tiler, sampler={"steps": 3})
    xt = _latents({**spec, "merger": {"name": merger, "target": "xt"}})
    x0 = _latents({**spec, "merger": {"name": merger, "target": "x0"}})
    assert (xt - x0).abs().max() < 1e-5 * xt.abs().max()


def test_x0_merging_equals_xt_merging_for_v_prediction(tiny_spec, tiny_sd_v):
    spec = tiny_spec(denoiser={"name": "stable-diffusion", "pretrained": str(tiny_sd_v)}, sampler={"steps": 3})
    xt = _latents({**spec, "merger": {"name": "average", "target": "xt"}})
    x0 = _latents({**spec, "merger": {"name": "average", "target": "x0"}})
    assert (xt - x0).abs().max() < 1e-5 * xt.abs().max()


def _reference_synctweedies(den, views, noise, steps, prompt, guidance):
    """SyncTweedies written out: per-view x_t from the canvas noise, merge Tweedie x0 by the views' adjoints, DDIM
    (eta 0) in closed form per view towards the reprojected x0; the last step on the canvas."""
    sched = den.make_scheduler("ddim")
    sched.set_timesteps(steps)
    ac = sched.alphas_cumprod.double()
    cond = Conditioning(den.encode_prompt(prompt), guidance)
    xs = [v.extract_noise(noise).double() for v in views]
    canvas_hw = noise.shape[-2:]
    for i, t in enumerate(sched.timesteps):
        a = ac[int(t)]
        prev = int(t) - sched.config.num_train_timesteps // steps
        a_prev = ac[prev] if prev >= 0 else ac[0]  # SD's set_alpha_to_one=False
        num = torch.zeros(1, 4, *canvas_hw, dtype=torch.float64)
        weight = torch.zeros(1, 1, *canvas_hw, dtype=torch.float64)
        for v, x in zip(views, xs):
            with torch.no_grad():
                eps = den.predict(x.float(), Step(i, steps, t), [cond], [v]).double()
            x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
            v.scatter_add(x0, num)
            v.scatter_add(torch.ones(1, 1, *v.latent_size, dtype=torch.float64), weight)
        merged = torch.where(weight > 0, num / weight.clamp_min(1e-12), torch.zeros_like(num))

        def ddim(x, x0):
            return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * (x - a.sqrt() * x0) / (1 - a).sqrt()

        if i == steps - 1:
            xt = torch.zeros_like(num)
            for v, x in zip(views, xs):
                v.scatter_add(x, xt)
            xt = torch.where(weight > 0, xt / weight.clamp_min(1e-12), torch.zeros_like(xt))
            return ddim(xt, merged)
        xs = [ddim(x, v.extract(merged)) for v, x in zip(views, xs)]


def test_x0_merging_on_projections_matches_reference(tiny_spec):
    spec = _ring_spec(tiny_spec, merger={"name": "average", "target": "x0"}, sampler={"steps": 3, "view_batch_size": 4})
    resolved = resolve(spec)
    pipe = Pipeline(resolved)
    ours = pipe.run(0).latents
    den = pipe.denoiser_for(resolved)
    views = resolved.build("tiler").views(resolved.canvas)
    noise = torch.randn(resolved.canvas.latent_shape(), generator=torch.Generator().manual_seed(0))
    reference = _reference_synctweedies(den, views, noise, 3, "a photo of a mountain", 7.5)
    assert (ours.double() - reference).abs().max() < 1e-4 * reference.abs().max()
    xt = _latents({**spec, "merger": {"name": "average", "target": "xt"}})
    assert (xt - ours).abs().max() > 0.1 * ours.abs().max()  # on projections the two targets really differ


def _first_step_inputs(spec):
    """The model inputs of every view at the first step (pure noise)."""
    resolved = resolve(spec)
    pipe = Pipeline(resolved)
    den = pipe.denoiser_for(resolved)
    seen = []
    predict = den.predict

    def recording(latents, step, conds, views, *context):
        if step.index == 0:
            seen.append(latents.detach().clone())
        return predict(latents, step, conds, views, *context)

    den.predict = recording
    try:
        pipe.run(0)
    finally:
        del den.predict
    return torch.cat(seen)


def test_projected_noise_variance_for_both_targets(tiny_spec):
    # x_t merging projects the canvas noise bilinearly: the views see variance ~0.5 (off-distribution for the
    # model). x0 merging gives each view its own x_t, initialised by a nearest projection: variance ~1.
    ring = {**RING, "window": 64}
    spec = _ring_spec(tiny_spec, ring, canvas={"height": 128, "width": 256},
                      sampler={"steps": 1, "view_batch_size": 10})
    xt = _first_step_inputs({**spec, "merger": {"name": "average", "target": "xt"}})
    x0 = _first_step_inputs({**spec, "merger": {"name": "average", "target": "x0"}})
    assert xt.shape == x0.shape == (10, 4, 8, 8)
    # Measured (seed 0, 16x32 latent canvas, 10 views of 8x8 latents): x_t 0.47, x0 1.04.
    assert 0.3 < xt.var().item() < 0.7
    assert 0.85 < x0.var().item() < 1.15


def test_nearest_projection_of_noise_keeps_unit_variance():
    # 32x32 latent views at 90° FoV on a 64x128 latent canvas (the ring of an SD-sized 512x1024 panorama).
    from syncengine_spherical import geometry as g
    from syncengine_spherical.views import ProjectedView

    x = torch.randn(1, 4, 64, 128, generator=torch.Generator().manual_seed(0))
    view = ProjectedView(0, grid=g.equirect_to_perspective_grid(32, 32, 90.0, yaw_deg=30.0, pitch_deg=0.0))
    assert 0.3 < view.extract(x).var().item() < 0.7
    assert 0.9 < view.extract_noise(x).var().item() < 1.1


def test_x0_target_needs_ddim(tiny_spec):
    spec = tiny_spec(merger={"name": "average", "target": "x0"}, sampler={"scheduler": "euler"})
    with pytest.raises(ConfigError, match="sampler.scheduler"):
        Pipeline(resolve(spec)).run(0)
    with pytest.raises(ConfigError, match="merger.target"):
        resolve(tiny_spec(merger={"name": "average", "target": "eps"})).build("merger")


class _ThreadCollective(Collective):
    """Window sharding over threads: the same owned/owner_of/all_reduce/broadcast contract as torch.distributed."""

    def __init__(self, rank, world_size, shared):
        super().__init__()
        self.rank, self.world_size, self.shared = rank, world_size, shared

    def owned(self, items):
        return [items[i] for i in balanced_slices(len(items), self.world_size)[self.rank]]

    def owner_of(self, position, count):
        return next(r for r, s in enumerate(balanced_slices(count, self.world_size)) if position in s)

    def _exchange(self, value):
        barrier, slots = self.shared
        slots[self.rank] = value
        barrier.wait()
        out = list(slots)
        barrier.wait()
        return out

    def all_reduce_(self, tensors):
        self.stats["all_reduce_calls"] += 1
        everyone = self._exchange([t.clone() for t in tensors])
        for k, t in enumerate(tensors):
            t.copy_(sum(parts[k] for parts in everyone))

    def broadcast_(self, tensor, src):
        return self._exchange(tensor.clone())[src].clone()


def test_x0_merging_with_window_sharding_matches_one_process(tiny_spec, with_torch_home):
    # Each rank keeps only its owned views' x_t; the anchor's owner broadcasts the sync target.
    ring = {"name": "perspective", "window": 32, "fov": 100, "views_per_ring": 4}
    spec = _ring_spec(tiny_spec, ring, merger={"name": "average", "target": "x0"}, sync={"weight": 5.0},
                      sampler={"steps": 2, "view_batch_size": 2})
    single = Pipeline(resolve(spec)).run(0)
    assert single.stats["sync_steps"] == 2 and single.stats["sync_views"] > 0
    # the ranks sum their shares, then all-reduce: the same sums in another order (tests/_tolerance.py)
    tolerance = reorder_tolerance(lambda collective: Pipeline(resolve(spec), collective=collective).run(0).latents)
    shared = (threading.Barrier(2), [None, None])
    pipes = [Pipeline(resolve(spec), collective=_ThreadCollective(r, 2, shared)) for r in range(2)]
    for pipe in pipes:  # load in this thread: model loading is not thread-safe
        pipe.loss_for(pipe.resolved, pipe.denoiser_for(pipe.resolved).device)
    results, errors = [None, None], []

    def rank(r):
        try:
            results[r] = pipes[r].run(0).latents
        except Exception as exc:  # surfaced below
            errors.append(exc)
            shared[0].abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for r, latents in enumerate(results):
        assert_reordered_close(latents, single.latents, tolerance, f"rank {r} of 2 vs one process")


@pytest.mark.parametrize("target", ["xt", "x0"])
def test_one_view_with_weight_zero_is_a_plain_generation(tiny_spec, tiny_sd, target):
    # One 64 px (8 latent) view at 60° FoV, nearest sampling, on a finer 32x64 latent canvas: each view pixel reads
    # its own canvas pixel, so the projection round-trips the view exactly and the joint sampler reduces to plain
    # text-to-image generation of that view from its projected noise (diffusers' pipeline as the reference).
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    one = {"name": "perspective", "window": 64, "fov": 60, "views_per_ring": 1, "pitches": [20.0],
           "sampling": "nearest"}
    spec = _ring_spec(tiny_spec, one, canvas={"height": 256, "width": 512}, sampler={"steps": 3, "view_batch_size": 1},
                      merger={"name": "average", "target": target})
    resolved = resolve(spec)
    (view,) = resolved.build("tiler").views(resolved.canvas)
    hit = view.extract(torch.arange(32 * 64, dtype=torch.float64).reshape(1, 1, 32, 64))
    assert hit.unique().numel() == 64  # injective: no two view pixels share a canvas pixel
    ours = view.extract(Pipeline(resolved).run(0).latents)
    noise = torch.randn(resolved.canvas.latent_shape(), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd), safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    reference = pipe("a photo of a mountain", height=64, width=64, num_inference_steps=3, guidance_scale=7.5,
                     latents=view.extract_noise(noise), output_type="latent").images
    torch.testing.assert_close(ours, reference.float(), atol=1e-4, rtol=1e-4)


def test_x0_merging_applies_prepare_input(tiny_spec):
    # Each view's model input is its prepare_input of its own x_t, and the view steps from that input: shifting every
    # crop's input by 0.5 at the first step is the same as starting from canvas noise shifted by 0.5.
    from dataclasses import dataclass

    from syncengine.sampler import JointSampler, Request, SamplerOptions
    from syncengine.sync import SyncSchedule
    from syncengine.views import CropView

    @dataclass
    class Shifted(CropView):
        def prepare_input(self, x, inputs):
            return x + 0.5 if inputs.step.index == 0 else x

    resolved = resolve(tiny_spec(merger={"name": "average", "target": "x0"}))
    den = Pipeline(resolved).denoiser_for(resolved)
    canvas = resolved.canvas
    noise = torch.randn(canvas.latent_shape(), generator=torch.Generator().manual_seed(0))

    def run(cls, noise):
        views = [cls(i, top=0, left=6 * i, height=8, width=8) for i in range(3)]  # 8x20 latent canvas, overlapping
        sampler = JointSampler(den, views, resolved.build("merger"), None, SyncSchedule(0.0),
                               SamplerOptions(steps=2, view_batch_size=2))
        return sampler.sample(Request("a photo of a mountain"), canvas, noise=noise).latents

    shifted = run(Shifted, noise)
    torch.testing.assert_close(shifted, run(CropView, noise + 0.5), atol=1e-5, rtol=1e-5)
    assert (shifted - run(CropView, noise)).abs().max() > 0.1
