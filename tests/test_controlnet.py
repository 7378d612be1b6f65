"""The controlnet denoiser: each view gets exactly its crop of the condition, the arithmetic equals diffusers'
StableDiffusionControlNetPipeline, scale 0 equals plain Stable Diffusion, and ControlNets add up. The same mixin on
the SDXL denoiser equals StableDiffusionXLControlNetPipeline."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from _controlnet_helpers import (  # noqa: F401  (fixtures)
    controlnet_spec,
    coordinate_image,
    random_image,
    record_conditions,
    tiny_controlnet,
    tiny_controlnet_b,
    tiny_sdxl_controlnet,
)
from _sdxl_helpers import tiny_sdxl  # noqa: F401  (fixture)

from syncengine.config import resolve
from syncengine.errors import SyncEngineError
from syncengine.pipeline import Pipeline

pytestmark = pytest.mark.usefixtures("one_thread")


def _pipeline(spec):
    pipe = Pipeline(resolve(spec))
    return pipe, pipe.denoiser_for(pipe.resolved)


def _coordinates(crop: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) pixel coordinates encoded by coordinate_image, read back from a [3, h, w] crop in [0, 1]."""
    v = (crop.double() * 255).round().long()
    return v[0] + 256 * v[2], v[1]


# ------------------------------------------------------------------------------------------------- per-view crops


@pytest.mark.parametrize(
    "canvas, tiler, boxes",
    [
        # sliding strip: 64x160 px, 64 px windows every 32 px -> lefts 0, 32, 64, 96
        ((64, 160), {"window": 64, "stride": 32}, [(0, 0), (0, 32), (0, 64), (0, 96)]),
        # loop: windows every 32 px all around; the last one covers 128..159 then 0..31
        ((64, 160), {"window": 64, "stride": 32, "loop": True}, [(0, 0), (0, 32), (0, 64), (0, 96), (0, 128)]),
        # 2D grid: 128x160 px -> tops 0, 32, 64 x lefts 0, 32, 64, 96, row by row
        ((128, 160), {"window": 64, "stride": 32}, [(t, x) for t in (0, 32, 64) for x in (0, 32, 64, 96)]),
    ],
    ids=["sliding", "loop", "grid"],
)
def test_each_view_receives_exactly_its_crop(tiny_spec, tiny_controlnet, tmp_path, canvas, tiler, boxes):
    H, W = canvas
    image = coordinate_image(tmp_path / "coords.png", H, W)
    spec = controlnet_spec(tiny_spec, tiny_controlnet, inputs={"control": str(image)})
    spec.update(canvas={"height": H, "width": W}, tiler={"name": "sliding", **tiler})
    spec["sampler"].update(steps=1, view_batch_size=1)
    pipe, den = _pipeline(spec)
    calls = record_conditions(den.controlnets[0])
    pipe.run(0)
    assert len(calls) == len(boxes)  # one call per view (sync off, one step)
    for batch, (top, left) in zip(calls, boxes):
        assert batch.shape == (2, 3, 64, 64)  # the CFG batch: unconditional and conditional rows, same crop
        assert torch.equal(batch[0], batch[1])
        xs, ys = _coordinates(batch[0])
        assert torch.equal(xs, ((left + torch.arange(64)) % W).expand(64, 64))
        assert torch.equal(ys, (top + torch.arange(64))[:, None].expand(64, 64))


def test_sync_step_predictions_use_the_same_crops(tiny_spec, tiny_controlnet, tmp_path):
    """With sync on, the anchor's x0, every view's sync gradient and its noise prediction see the view's own crop."""
    image = coordinate_image(tmp_path / "coords.png", 64, 160)
    spec = controlnet_spec(tiny_spec, tiny_controlnet, inputs={"control": str(image)})
    spec["sampler"].update(steps=1, view_batch_size=1)
    spec["sync"]["weight"] = 5.0
    pipe, den = _pipeline(spec)
    calls = record_conditions(den.controlnets[0])
    result = pipe.run(0)
    assert result.stats["sync_steps"] == 1
    lefts = [0, 32, 64, 96]
    anchor = 2  # centre of 4 views
    expected = [anchor] + [v for view in range(4) for v in ([view] if view == anchor else [view, view])]
    assert len(calls) == len(expected)
    for batch, view in zip(calls, expected):
        for row in batch:
            xs, _ = _coordinates(row)
            assert torch.equal(xs[0], lefts[view] + torch.arange(64))


def test_predictions_do_not_depend_on_view_batch_size(tiny_spec, tiny_controlnet, tmp_path):
    image = random_image(tmp_path / "c.png", 64, 160)
    outs = []
    for size in (1, 4):
        spec = controlnet_spec(tiny_spec, tiny_controlnet, inputs={"control": str(image)})
        spec["sampler"].update(steps=2, view_batch_size=size)
        outs.append(Pipeline(resolve(spec)).run(0).latents)
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)


def test_unsupported_view_type_is_a_clear_error(tiny_sd, tiny_controlnet, tmp_path):
    from syncengine.denoiser import Conditioning, Step
    from syncengine.sampler import Request
    from syncengine.views import CanvasSpec
    from syncengine_controlnet.denoiser import ControlNetConfig, ControlNetDenoiser, ControlNetUnit
    from syncengine_spherical.views import ProjectedView

    units = [ControlNetUnit(str(tiny_controlnet))]
    den = ControlNetDenoiser(ControlNetConfig(pretrained=str(tiny_sd), controlnets=units))
    context = den.prepare_request(Request("x", inputs={"control": str(random_image(tmp_path / "c.png", 64, 128))}),
                                  CanvasSpec(64, 128))
    view = ProjectedView(0, grid=torch.zeros(1, 8, 8, 2))
    cond = Conditioning(den.encode_prompt("x"), 7.5)
    with pytest.raises(SyncEngineError, match="ProjectedView.*CropView.*extract_image"):
        den.predict(torch.randn(1, 4, 8, 8), Step(0, 1, torch.tensor(500)), [cond], [view], context)


# ------------------------------------------------------------------------------ arithmetic: the diffusers reference


@pytest.mark.parametrize(
    "units, guess",
    [
        ([{"scale": 0.7, "start": 0.0, "end": 0.67}], False),
        ([{"scale": 1.0}], True),
        ([{"scale": 0.5}, {"scale": 1.2, "start": 0.3}], False),
    ],
    ids=["scale-end", "guess-mode", "two-controlnets"],
)
def test_single_window_equals_diffusers_controlnet_pipeline(tiny_spec, tiny_sd, tiny_controlnet, tiny_controlnet_b,
                                                           tmp_path, units, guess):
    """A canvas of one window is exactly what StableDiffusionControlNetPipeline computes from the same noise."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
    from PIL import Image

    models = [tiny_controlnet, tiny_controlnet_b][: len(units)]
    images = [random_image(tmp_path / f"c{i}.png", 64, 64, seed=i) for i in range(len(units))]
    spec = controlnet_spec(tiny_spec, *[{"model": str(m), **u} for m, u in zip(models, units)],
                           inputs={"control": [str(p) for p in images]}, guess_mode=guess)
    spec.update(canvas={"height": 64, "width": 64}, tiler={"name": "sliding", "window": 64, "stride": 64})
    spec["sampler"]["steps"] = 3
    ours = Pipeline(resolve(spec)).run(0).latents

    nets = [ControlNetModel.from_pretrained(m) for m in models]
    ref = StableDiffusionControlNetPipeline.from_pretrained(
        tiny_sd, controlnet=nets if len(nets) > 1 else nets[0], safety_checker=None, requires_safety_checker=False
    )
    ref.set_progress_bar_config(disable=True)
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator("cpu").manual_seed(0))
    conds = [Image.open(p).convert("RGB") for p in images]
    pick = (lambda key, default: [u.get(key, default) for u in units]) if len(units) > 1 else (
        lambda key, default: units[0].get(key, default))
    out = ref(
        "a photo of a mountain",
        image=conds if len(conds) > 1 else conds[0],
        num_inference_steps=3,
        guidance_scale=7.5,
        latents=noise,
        output_type="latent",
        controlnet_conditioning_scale=pick("scale", 1.0),
        control_guidance_start=pick("start", 0.0),
        control_guidance_end=pick("end", 1.0),
        guess_mode=guess,
    ).images
    torch.testing.assert_close(ours, out, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------- scale 0 and addition


def test_scale_zero_equals_plain_stable_diffusion(tiny_spec, tiny_controlnet, tmp_path):
    image = random_image(tmp_path / "c.png", 64, 160)
    plain = Pipeline(resolve(tiny_spec(sync={"weight": 3.0}))).run(0).latents
    spec = controlnet_spec(tiny_spec, {"model": str(tiny_controlnet), "scale": 0.0}, inputs={"control": str(image)})
    spec["sync"]["weight"] = 3.0
    pipe, den = _pipeline(spec)
    calls = record_conditions(den.controlnets[0])
    assert torch.equal(pipe.run(0).latents, plain)
    assert calls == []  # skipped, not multiplied by zero
    spec["denoiser"]["controlnets"][0]["scale"] = 1.0
    assert not torch.allclose(Pipeline(resolve(spec)).run(0).latents, plain, atol=1e-3)  # control does act


def test_two_controlnets_with_one_at_scale_zero_equal_the_other_alone(tiny_spec, tiny_controlnet, tiny_controlnet_b,
                                                                     tmp_path):
    a = random_image(tmp_path / "a.png", 64, 160, seed=1)
    b = random_image(tmp_path / "b.png", 64, 160, seed=2)
    unit_a = {"model": str(tiny_controlnet), "scale": 0.8}
    alone = Pipeline(resolve(controlnet_spec(tiny_spec, unit_a, inputs={"control": str(a)}))).run(0).latents
    both = controlnet_spec(tiny_spec, unit_a, {"model": str(tiny_controlnet_b), "scale": 0.0},
                           inputs={"control": [str(a), str(b)]})
    assert torch.equal(Pipeline(resolve(both)).run(0).latents, alone)
    # and the second one does act when its scale is not zero
    both["denoiser"]["controlnets"][1]["scale"] = 0.5
    assert not torch.allclose(Pipeline(resolve(both)).run(0).latents, alone, atol=1e-3)


def test_condition_is_saved_next_to_the_output(tiny_spec, tiny_controlnet, tmp_path):
    from PIL import Image

    from syncengine.outputs import write_result

    image = coordinate_image(tmp_path / "coords.png", 64, 160)
    spec = controlnet_spec(tiny_spec, tiny_controlnet, inputs={"control": str(image)})
    spec["sampler"]["steps"] = 1
    result = Pipeline(resolve(spec)).run(0)
    png = write_result(result, tmp_path / "out")
    saved = tmp_path / "out" / "img.control.png"
    assert png.name == "img.png" and saved.is_file()
    assert Image.open(saved).tobytes() == Image.open(image).convert("RGB").tobytes()
    meta = json.loads((tmp_path / "out" / "img.json").read_text())
    assert meta["extra_images"] == {"control": "img.control.png"}
    assert meta["model"]["controlnets"][0]["model"] == str(tiny_controlnet)
    assert meta["request"]["inputs"] == {"control": str(image)}


def test_region_layout_views_get_their_boxes(tiny_sd, tiny_controlnet, tmp_path):
    """A region layout (views with their own prompts, sizes and masks, as a region tiler makes them): each view's
    ControlNet input is its own box of the condition, whatever its size."""
    from syncengine.sampler import JointSampler, Request, SamplerOptions
    from syncengine.sync import SyncSchedule
    from syncengine.views import CanvasSpec, CropView
    from syncengine_controlnet.denoiser import ControlNetConfig, ControlNetDenoiser, ControlNetUnit
    from syncengine_mergers.weighted import AverageMerger

    units = [ControlNetUnit(str(tiny_controlnet))]
    den = ControlNetDenoiser(ControlNetConfig(pretrained=str(tiny_sd), controlnets=units))
    canvas = CanvasSpec(64, 160)
    image = coordinate_image(tmp_path / "coords.png", 64, 160)
    request = Request("a landscape", inputs={"control": str(image)})
    context = den.prepare_request(request, canvas)
    mask = torch.zeros(1, 1, 8, 20)
    mask[..., 10:] = 1
    views = [
        CropView(0, top=0, left=0, height=8, width=20, context={"prompt": "a meadow"}, weight=1 - mask),
        CropView(1, top=0, left=8, height=8, width=12, context={"prompt": "a lake"}),
    ]
    calls = record_conditions(den.controlnets[0])
    JointSampler(den, views, AverageMerger(), None, SyncSchedule(0.0), SamplerOptions(steps=1)).sample(request, canvas,
                                                                                                  context=context)
    assert [c.shape for c in calls] == [(2, 3, 64, 160), (2, 3, 64, 96)]
    for batch, left in zip(calls, (0, 64)):
        xs, ys = _coordinates(batch[1])
        assert torch.equal(xs[0], left + torch.arange(batch.shape[-1])) and torch.equal(ys[:, 0], torch.arange(64))


# ------------------------------------------------------------------------------------- the mixin on another family


@pytest.fixture
def sdxl_controlnet_denoiser():
    """The built-in ``controlnet-sdxl``: ControlNetConditioning on the SDXL denoiser (the family's ``unet_kwargs``
    carry ``added_cond_kwargs``, which the mixin hands to its ControlNets)."""
    return "controlnet-sdxl"


@pytest.mark.parametrize("guess_mode", [False, True], ids=["plain", "guess-mode"])
def test_mixin_on_sdxl_equals_diffusers_sdxl_controlnet_pipeline(tiny_spec, tiny_sdxl, tiny_sdxl_controlnet,
                                                                 sdxl_controlnet_denoiser, tmp_path, guess_mode):
    from diffusers import ControlNetModel, DDIMScheduler, StableDiffusionXLControlNetPipeline
    from PIL import Image

    from syncengine.sampler import JointSampler

    height, width, steps, seed, prompt = 64, 96, 3, 5, "a photo of a mountain"
    image = random_image(tmp_path / "c.png", height, width)
    unit = {"model": str(tiny_sdxl_controlnet), "scale": 0.7}
    spec = tiny_spec(canvas={"height": height, "width": width},
                     tiler={"name": "sliding", "window": width, "window_height": height, "stride": 32},
                     requests=[{"prompt": prompt, "seed": seed, "inputs": {"control": str(image)}}])
    spec["denoiser"] = {"name": sdxl_controlnet_denoiser, "pretrained": str(tiny_sdxl), "controlnets": [unit],
                        "guess_mode": guess_mode}
    resolved = resolve(spec)
    ours = Pipeline(resolved).run(0).latents
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_pipe = StableDiffusionXLControlNetPipeline.from_pretrained(
            str(tiny_sdxl), controlnet=ControlNetModel.from_pretrained(str(tiny_sdxl_controlnet)))
    ref_pipe.set_progress_bar_config(disable=True)
    ref_pipe.scheduler = DDIMScheduler.from_config(ref_pipe.scheduler.config)
    ref = ref_pipe(prompt, image=Image.open(image).convert("RGB"), height=height, width=width,
                   num_inference_steps=steps, guidance_scale=7.5, controlnet_conditioning_scale=0.7,
                   guess_mode=guess_mode, latents=JointSampler.initial_noise(None, resolved.canvas, seed),
                   output_type="latent").images
    torch.testing.assert_close(ours, ref.float(), atol=1e-5, rtol=1e-5)  # measured: equal (0.0) on the CPU
    if not guess_mode:
        unit["scale"] = 0.0
        spec["denoiser"] = {"name": "stable-diffusion-xl", "pretrained": str(tiny_sdxl)}
        plain = Pipeline(resolve(spec)).run(0).latents
        assert not torch.allclose(ours, plain, atol=1e-3)  # control acts
        spec["denoiser"] = {"name": sdxl_controlnet_denoiser, "pretrained": str(tiny_sdxl), "controlnets": [unit]}
        assert torch.equal(Pipeline(resolve(spec)).run(0).latents, plain)  # scale 0: plain SDXL, bit for bit
