"""The stable-diffusion-xl denoiser on a tiny random SDXL model: diffusers' pipeline and a literal MultiDiffusion
loop at sync weight 0, the per-window Algorithm 1 with sync, per-view micro-conditioning, every tiler and merge
target, the float16 VAE rules, and a Turbo-like run."""
from __future__ import annotations

import warnings

import pytest
import torch
from _sdxl_helpers import PROMPT, sdxl_spec, tiny_sdxl, tiny_sdxl_lcm  # noqa: F401 - fixtures
from _tolerance import KERNEL_ULPS, assert_reordered_close, reorder_tolerance

from benchmarks.reference import reference_syncdiffusion
from syncengine.config import resolve
from syncengine.errors import ConfigError, ModelNotFoundError
from syncengine.pipeline import Pipeline
from syncengine.sampler import JointSampler, Request, SamplerOptions
from syncengine.sync import SyncSchedule

# Same arithmetic in the same order, except that the engine runs the UNet on a batch of views and steps on the
# canvas: diffusers' own SD panorama test bound (atol 2e-5, rtol 1e-4) holds with a wide margin (measured below).
ATOL, RTOL = 2e-5, 1e-4


pytestmark = pytest.mark.usefixtures("one_thread")


def _pipeline(model_dir):
    from diffusers import StableDiffusionXLPipeline

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = StableDiffusionXLPipeline.from_pretrained(str(model_dir))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _parts(spec):
    resolved = resolve(spec)
    pipe = Pipeline(resolved)
    return resolved, pipe, pipe.denoiser_for(resolved), resolved.build("tiler").views(resolved.canvas)


@pytest.fixture(scope="module")
def diffusers_pipe(tiny_sdxl):
    return _pipeline(tiny_sdxl)


def test_one_window_at_weight_zero_equals_diffusers(sdxl_spec, diffusers_pipe):
    from diffusers import DDIMScheduler

    height, width, steps, seed = 64, 96, 3, 5  # not square: (height, width) order in the time ids matters
    spec = sdxl_spec(canvas={"height": height, "width": width},
                     tiler={"name": "sliding", "window": width, "window_height": height, "stride": 32},
                     sampler={"steps": steps}, requests=[{"prompt": PROMPT, "seed": seed}])
    resolved, pipe, den, views = _parts(spec)
    assert len(views) == 1 and views[0].latent_size == (8, 12)
    ours = pipe.run(0).latents
    noise = JointSampler.initial_noise(None, resolved.canvas, seed)
    diffusers_pipe.scheduler = DDIMScheduler.from_config(diffusers_pipe.scheduler.config)
    ref = diffusers_pipe(PROMPT, height=height, width=width, num_inference_steps=steps, guidance_scale=7.5,
                         latents=noise.clone(), output_type="latent").images
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref.float(), atol=ATOL, rtol=RTOL)


def _literal_multidiffusion(pipe, views, noise, steps, guidance, factor, crop=True):
    """StableDiffusionPanoramaPipeline's loop written out for SDXL: per window a CFG UNet call with that window's
    own micro-conditioning (its size; its offset on the canvas, or (0, 0) without ``crop``), a DDIM step on the
    window, then the average of the stepped windows."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    with torch.no_grad():
        positive, negative, pooled, negative_pooled = pipe.encode_prompt(PROMPT, device="cpu")
        latents = noise.clone()
        for t in scheduler.timesteps:
            value, count = torch.zeros_like(latents), torch.zeros_like(latents)
            for view in views:
                top, left = view.top, view.left
                h, w = view.latent_size
                window = latents[:, :, top : top + h, left : left + w]
                size = (h * factor, w * factor)
                offset = (top * factor, left * factor) if crop else (0, 0)
                time_ids = pipe._get_add_time_ids(size, offset, size, dtype=positive.dtype,
                                                  text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
                added = {"text_embeds": torch.cat([negative_pooled, pooled]), "time_ids": time_ids.repeat(2, 1)}
                out = pipe.unet(torch.cat([window] * 2), t, encoder_hidden_states=torch.cat([negative, positive]),
                                added_cond_kwargs=added).sample
                uncond, cond = out.chunk(2)
                eps = uncond + guidance * (cond - uncond)
                value[:, :, top : top + h, left : left + w] += scheduler.step(eps, t, window).prev_sample
                count[:, :, top : top + h, left : left + w] += 1
            latents = torch.where(count > 0, value / count, value)
    return latents


@pytest.mark.parametrize("crop", [True, False], ids=["offsets", "crop_conditioning-off"])
def test_windows_at_weight_zero_equal_a_literal_multidiffusion_loop(sdxl_spec, diffusers_pipe, crop):
    steps, seed = 2, 3
    spec = sdxl_spec(canvas={"height": 64, "width": 128}, sampler={"steps": steps, "view_batch_size": 3},
                     denoiser={"crop_conditioning": crop}, requests=[{"prompt": PROMPT, "seed": seed}])
    resolved, pipe, den, views = _parts(spec)
    assert [v.left for v in views] == [0, 4, 8]
    ours = pipe.run(0).latents
    noise = JointSampler.initial_noise(None, resolved.canvas, seed)
    ref = _literal_multidiffusion(diffusers_pipe, views, noise, steps, 7.5, den.latent_factor, crop)
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=RTOL)
    # and the offsets matter: the loop with the other setting is another result
    other = _literal_multidiffusion(diffusers_pipe, views, noise, steps, 7.5, den.latent_factor, not crop)
    assert (ours - other).abs().max() > 100 * ATOL


def test_sync_matches_per_window_reference(sdxl_spec):
    # three windows, one wrapping around the seam: each reads its own offset's micro-conditioning in both loops
    spec = sdxl_spec(canvas={"height": 64, "width": 128}, tiler={"name": "sliding", "window": 64, "stride": 48,
                                                                  "loop": True})
    resolved, _, den, views = _parts(spec)
    assert len(views) == 3 and views[-1].wraps
    loss = resolved.build("sync.loss")
    steps, weight = 2, 5.0
    request = Request(PROMPT, seed=3)

    def sample(collective=None):
        return JointSampler(den, views, resolved.build("merger"), loss, SyncSchedule(weight, 0.9),
                            SamplerOptions(steps=steps, guidance_scale=7.5, view_batch_size=3), collective)

    sampler = sample()
    ours = sampler.sample(request, resolved.canvas)
    assert ours.stats["sync_steps"] == steps
    canvas0 = sampler.initial_noise(resolved.canvas, 3)
    ref = reference_syncdiffusion(den, loss, views, canvas0, steps, weight, 0.9, 7.5, request.prompt, False)
    tolerance = reorder_tolerance(lambda c: sample(c).sample(request, resolved.canvas).latents, KERNEL_ULPS)
    assert_reordered_close(ours.latents, ref, tolerance, "SDXL sampler vs per-window Algorithm 1")
    plain = JointSampler(den, views, resolved.build("merger"), None, SyncSchedule(0.0),
                         SamplerOptions(steps=steps, guidance_scale=7.5, view_batch_size=3))
    assert (plain.sample(request, resolved.canvas).latents - ours.latents).abs().max() > 10 * tolerance


def test_micro_conditioning_per_view(sdxl_spec):
    from syncengine.views import CropView
    from syncengine_spherical.views import ProjectedView

    spec = sdxl_spec(canvas={"height": 128, "width": 160},
                     tiler={"name": "sliding", "window": 64, "stride": 32, "loop": True})
    resolved, _, den, views = _parts(spec)
    ids = den.time_ids(views)
    assert ids.shape == (len(views), 6)
    for view, row in zip(views, ids.tolist()):
        assert row == [64, 64, view.top * 8, view.left * 8, 64, 64]
    assert {r[2] for r in ids.tolist()} == {0, 32, 64} and max(r[3] for r in ids.tolist()) == 128  # grid, wrapping
    den.config.crop_conditioning = False
    assert den.time_ids(views)[:, 2:4].abs().sum() == 0
    den.config.crop_conditioning, den.config.original_size = True, [1024, 2048]
    assert den.time_ids(views[:1]).tolist() == [[1024, 2048, 0, 0, 64, 64]]
    den.config.original_size = None
    ring = sdxl_spec(canvas={"height": 64, "width": 128}, tiler={"name": "perspective", "window": 32,
                                                                  "views_per_ring": 8})
    projected = resolve(ring).build("tiler").views(resolve(ring).canvas)[0]
    assert isinstance(projected, ProjectedView) and not isinstance(projected, CropView)
    assert den.time_ids([projected]).tolist() == [[32, 32, 0, 0, 32, 32]]
    with pytest.raises(ConfigError, match="denoiser.original_size"):
        resolve(sdxl_spec(denoiser={"original_size": [1024]}))


SMOKE = {
    "sliding-loop": dict(tiler={"name": "sliding", "window": 64, "stride": 48, "loop": True}),
    "grid-2d": dict(canvas={"height": 96, "width": 128}, tiler={"name": "sliding", "window": 64, "stride": 32},
                    sync={"weight": 4.0}),
    "regions": dict(tiler={"name": "regions", "window": 64, "stride": 32, "bootstrap": 0.5,
                           "regions": [{"mask": {"rect": [0, 0, 64, 48]}, "prompt": "a red car"}]}),
    "perspective": dict(canvas={"height": 64, "width": 128}, merger={"name": "average", "target": "x0"},
                        tiler={"name": "perspective", "window": 32, "views_per_ring": 8, "poles": True}),
    "cubemap": dict(canvas={"height": 64, "width": 128}, merger={"name": "average", "target": "x0"},
                    tiler={"name": "cubemap", "window": 32}, sync={"weight": 4.0, "anchor": "first"}),
    "x0-crops": dict(merger={"name": "gaussian", "target": "x0"}),
}


@pytest.mark.parametrize("case", list(SMOKE))
def test_runs_with_every_tiler_and_merge_target(sdxl_spec, case):
    sections = SMOKE[case]
    spec = sdxl_spec(sampler={"view_batch_size": 4}, **sections)
    resolved = resolve(spec)
    out = Pipeline(resolved).run(0)
    canvas = resolved.canvas
    assert out.latents.shape == (1, 4, canvas.latent_height, canvas.latent_width)
    assert out.image.shape == (3, canvas.height, canvas.width)
    assert torch.isfinite(out.latents).all() and torch.isfinite(out.image).all()
    if "sync" in sections:
        assert out.stats["sync_steps"] == 2
    if case == "regions":  # the region's own prompt reached its views
        views = resolved.build("tiler").views(canvas)
        assert {v.context.get("prompt") for v in views} >= {"a red car"}


def test_presets_resolve_offline(tiny_sdxl):
    panorama = resolve("sdxl-panorama").config
    assert panorama.denoiser.name == "stable-diffusion-xl" and panorama.tiler.window == 1024
    assert panorama.canvas.height == 1024 and panorama.canvas.width >= 4 * 1024
    assert resolve("sdxl-loop").config.tiler.loop is True
    turbo = resolve("sdxl-turbo-panorama").config
    assert turbo.denoiser.pretrained == "stabilityai/sdxl-turbo" and turbo.tiler.window == 512
    assert turbo.sampler.steps <= 4 and turbo.sampler.guidance_scale <= 1
    assert turbo.sampler.scheduler == "euler_a" and turbo.sampler.scheduler_options["timestep_spacing"] == "trailing"
    for name in ("sdxl-loop",):  # shrunk onto the tiny model, it runs (the turbo recipe: test_turbo_like_run)
        spec = resolve(name, [f"denoiser.pretrained={tiny_sdxl}", "denoiser.dtype=float32", "canvas.height=64",
                              "canvas.width=128", "tiler.window=64", "tiler.stride=32", "sampler.steps=1",
                              "sync.loss.net=alex", "sync.loss.backbone=random", "runtime.accelerator=cpu"])
        assert torch.isfinite(Pipeline(spec).run(0).latents).all()


def test_vae_dtype_rules():
    from types import SimpleNamespace

    from syncengine_sdxl.vae import vae_dtype

    upcast, fixed = SimpleNamespace(force_upcast=True), SimpleNamespace(force_upcast=False)
    assert vae_dtype(upcast, torch.float16) == torch.float32  # SDXL's own VAE overflows in float16
    assert vae_dtype(fixed, torch.float16) == torch.float16  # a fixed VAE (sdxl-vae-fp16-fix) stays in float16
    assert vae_dtype(upcast, torch.float32) == torch.float32
    assert vae_dtype(upcast, torch.bfloat16) == torch.bfloat16  # bfloat16 has float32's range


def test_float16_upcasts_the_vae_and_a_fixed_vae_stays_float16(sdxl_spec, tiny_sdxl, tmp_path):
    from diffusers import AutoencoderKL

    den = _parts(sdxl_spec(denoiser={"dtype": "float16"}))[2]
    assert den.unet.dtype == torch.float16 and den.vae.dtype == torch.float32 and den.vae_dtype == torch.float32
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    image = den.decode_final(latents)
    assert image.dtype == torch.float32 and torch.isfinite(image).all()
    # a fixed VAE (force_upcast false, as madebyollin/sdxl-vae-fp16-fix says) replaces the model's, in float16
    vae = AutoencoderKL.from_pretrained(str(tiny_sdxl / "vae"))
    fixed = AutoencoderKL.from_config({**vae.config, "force_upcast": False})
    fixed.load_state_dict(vae.state_dict())
    fixed.save_pretrained(tmp_path / "fixed-vae")
    den = _parts(sdxl_spec(denoiser={"dtype": "float16", "vae": str(tmp_path / "fixed-vae")}))[2]
    assert den.vae.dtype == torch.float16 and den.vae.config.force_upcast is False
    assert den.describe()["vae"] == str(tmp_path / "fixed-vae") and den.describe()["vae_dtype"] == "float16"


@pytest.mark.parametrize("missing", ["path", "empty-folder"])
def test_missing_vae_is_a_one_line_error(sdxl_spec, no_network, tmp_path, missing):
    ref = "/nonexistent/sdxl-vae" if missing == "path" else str(tmp_path)  # a folder without config.json
    with pytest.raises(ModelNotFoundError, match="denoiser.vae") as info:
        _parts(sdxl_spec(denoiser={"vae": ref}))
    assert "\n" not in str(info.value) and ref in str(info.value)


def _turbo_reference(pipe, scheduler, height, width, steps, seed, noise):
    pipe.scheduler = scheduler
    generator = torch.Generator("cpu").manual_seed(seed + 1)  # the engine seeds a stochastic step with seed + 1
    return pipe(PROMPT, height=height, width=width, num_inference_steps=steps, guidance_scale=0.0,
                latents=noise.clone(), generator=generator, output_type="latent").images


@pytest.mark.parametrize("steps", [1, 2])
def test_turbo_like_run(sdxl_spec, diffusers_pipe, steps):
    """SDXL-Turbo's recipe: Euler ancestral with trailing timesteps, guidance 0 (no CFG batch), 1-2 steps; one window
    equals diffusers' pipeline (same noise, same step generator) and a panorama runs with one UNet row per view."""
    from diffusers import EulerAncestralDiscreteScheduler

    sampler = {"scheduler": "euler_a", "scheduler_options": {"timestep_spacing": "trailing"}, "steps": steps,
               "guidance_scale": 0.0}
    spec = sdxl_spec(canvas={"height": 64, "width": 64}, sampler=sampler, requests=[{"prompt": PROMPT, "seed": 2}])
    resolved, pipe, den, _ = _parts(spec)
    ours = pipe.run(0).latents
    noise = JointSampler.initial_noise(None, resolved.canvas, 2)
    scheduler = EulerAncestralDiscreteScheduler.from_config(diffusers_pipe.scheduler.config,
                                                             timestep_spacing="trailing")
    ref = _turbo_reference(diffusers_pipe, scheduler, 64, 64, steps, 2, noise)
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=RTOL)
    panorama = resolve(sdxl_spec(sampler={**sampler, "view_batch_size": 4}))
    pipe = Pipeline(panorama)
    rows = []
    pipe.denoiser_for(panorama).unet.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    out = pipe.run(0)
    assert torch.isfinite(out.latents).all() and out.stats["unet_views"] == 4 * steps
    assert rows == [4] * steps  # four views, one UNet row each: no unconditional half


def test_lcm_guidance_embedding_equals_diffusers(sdxl_spec, tiny_sdxl_lcm):
    """An LCM-distilled UNet embeds the guidance scale (timestep_cond) instead of a CFG batch: one window with
    diffusers' LCMScheduler equals diffusers' pipeline, which does the same."""
    from diffusers import LCMScheduler

    spec = sdxl_spec(canvas={"height": 64, "width": 64}, denoiser={"pretrained": str(tiny_sdxl_lcm)},
                     sampler={"scheduler": "LCMScheduler", "steps": 2, "guidance_scale": 4.0},
                     requests=[{"prompt": PROMPT, "seed": 4}])
    resolved, pipe, den, _ = _parts(spec)
    assert den.guidance_embedding == 32
    ours = pipe.run(0).latents
    reference = _pipeline(tiny_sdxl_lcm)
    reference.scheduler = LCMScheduler.from_config(reference.scheduler.config)
    noise = JointSampler.initial_noise(None, resolved.canvas, 4)
    ref = reference(PROMPT, height=64, width=64, num_inference_steps=2, guidance_scale=4.0, latents=noise.clone(),
                    generator=torch.Generator("cpu").manual_seed(5), output_type="latent").images
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=RTOL)


def test_builtin_tiny_model_name_loads_a_tiny_sdxl(sdxl_spec, tmp_path, monkeypatch):
    monkeypatch.setenv("SYNCENGINE_CACHE", str(tmp_path / "cache"))
    den = _parts(sdxl_spec(denoiser={"pretrained": "syncengine:tiny-random"}))[2]
    assert (tmp_path / "cache" / "tiny-random-sdxl-v1" / "model_index.json").is_file()
    assert den.pipe.text_encoder_2 is not None and "random weights" in den.describe()["warning"]


def test_sync_through_a_tiny_decoder_at_half_size(sdxl_spec, tmp_path):
    """``sync_vae`` (TAESDXL's architecture, random weights) and ``sync_decode_scale`` come with the SD denoiser."""
    from diffusers import AutoencoderTiny

    AutoencoderTiny(encoder_block_out_channels=(8,) * 4, decoder_block_out_channels=(8,) * 4).save_pretrained(
        tmp_path / "taesdxl")
    spec = resolve(sdxl_spec(denoiser={"sync_vae": str(tmp_path / "taesdxl"), "sync_decode_scale": 0.5},
                             sync={"weight": 4.0}))
    pipe = Pipeline(spec)
    den = pipe.denoiser_for(spec)
    assert den.sync_decoder is not None and den.sync_image_size((8, 8)) == (32, 32)
    out = pipe.run(0)
    assert torch.isfinite(out.latents).all() and out.stats["sync_steps"] == 2 and out.stats["decodes"] > 0
