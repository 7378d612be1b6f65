"""The ``flux`` denoiser on a tiny random FLUX loaded through the engine's loader: one window is FluxPipeline, several
windows are a literal per-window MultiDiffusion loop, sync is the per-window Algorithm 1, the shift follows a window's
token count, every tiler runs, and what cannot work is refused before any weights load."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from _flux_helpers import T5_LENGTH, flux_spec, tiny_flux, tiny_flux_schnell  # noqa: F401 - fixtures
from _tolerance import KERNEL_ULPS, assert_reordered_close, reorder_tolerance

from benchmarks.reference import reference_syncdiffusion
from syncengine.config import resolve
from syncengine.errors import ConfigError
from syncengine.pipeline import Pipeline
from syncengine.sampler import JointSampler, Request, SamplerOptions
from syncengine.sync import SyncSchedule

PROMPT = "a photo of a mountain"
FLOAT_TOL = dict(atol=2e-5, rtol=1e-4)  # the same float32 math in another batch layout (see each test)


def _run(spec) -> torch.Tensor:
    return Pipeline(resolve(spec)).run(0).latents


def _denoiser(spec):
    resolved = resolve(spec)
    return resolved, Pipeline(resolved).denoiser_for(resolved)


def _noise(resolved, seed: int) -> torch.Tensor:
    return torch.randn(resolved.canvas.latent_shape(), generator=torch.Generator("cpu").manual_seed(seed))


# ------------------------------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize("true_cfg", [1.0, 4.0], ids=["embedded-guidance", "true-cfg"])
def test_one_window_equals_flux_pipeline(flux_spec, true_cfg):
    """One 64x96 px window at sync weight 0: FluxPipeline with the same initial latents (packed as it expects)."""
    negative = "blurry, low quality"
    spec = flux_spec(canvas={"height": 64, "width": 96}, tiler={"name": "sliding", "window": 96,
                                                                 "window_height": 64, "stride": 32},
                     denoiser={"true_cfg_scale": true_cfg},
                     requests=[{"prompt": PROMPT, "negative_prompt": negative, "seed": 5}])
    resolved, den = _denoiser(spec)
    ours = Pipeline(resolved).run(0).latents
    noise = _noise(resolved, 5)
    pipe = den.pipe
    pipe.set_progress_bar_config(disable=True)
    packed = pipe._pack_latents(noise, 1, 16, 8, 12)
    extra = {"negative_prompt": negative, "true_cfg_scale": true_cfg} if true_cfg > 1 else {}
    out = pipe(PROMPT, height=64, width=96, num_inference_steps=3, guidance_scale=3.5, latents=packed,
               output_type="latent", max_sequence_length=T5_LENGTH, **extra).images
    # ours runs the negative and positive branches in one batch, FluxPipeline in two calls: float rounding only
    torch.testing.assert_close(ours, pipe._unpack_latents(out, 64, 96, 8).float(), **FLOAT_TOL)


def test_several_windows_equal_a_per_window_multidiffusion_loop(flux_spec):
    """Four windows at sync weight 0 equal MultiDiffusion written out with FluxPipeline's own parts: per window its
    packed tokens and standalone image ids, the velocities averaged on the canvas, one Euler step there."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    steps = 3
    spec = flux_spec(sampler={"steps": steps, "view_batch_size": 3}, requests=[{"prompt": PROMPT, "seed": 2}])
    resolved, den = _denoiser(spec)
    ours = Pipeline(resolved).run(0).latents
    pipe = den.pipe
    latents = _noise(resolved, 2)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=calculate_shift(4 * 4))  # 8x8 latents
    with torch.no_grad():
        text, pooled, text_ids = pipe.encode_prompt(PROMPT, None, max_sequence_length=T5_LENGTH)
        ids = pipe._prepare_latent_image_ids(1, 4, 4, latents.device, latents.dtype)
        starts = [0, 4, 8, 12]  # 64 px windows at a 32 px stride on 160 px: latent columns
        for t in scheduler.timesteps:
            value, count = torch.zeros_like(latents), torch.zeros_like(latents)
            for s in starts:
                window = latents[..., s : s + 8]
                v = pipe.transformer(hidden_states=pipe._pack_latents(window, 1, 16, 8, 8),
                                     timestep=t.expand(1) / 1000, guidance=torch.full([1], 3.5),
                                     pooled_projections=pooled, encoder_hidden_states=text, txt_ids=text_ids,
                                     img_ids=ids, return_dict=False)[0]
                value[..., s : s + 8] += pipe._unpack_latents(v, 64, 64, 8)
                count[..., s : s + 8] += 1
            latents = scheduler.step(value / count, t, latents).prev_sample
    torch.testing.assert_close(ours, latents, **FLOAT_TOL)  # batches of 3 windows vs one at a time


def test_sync_matches_per_window_reference(flux_spec):
    """Sync weight > 0: the sampler equals the literal per-window Algorithm 1 (benchmarks/reference.py) with its
    flow Euler step, within the measured kernel-reordering tolerance (as tests/test_sync.py for SD). A loop strip:
    its last window wraps across the seam."""
    spec = flux_spec(canvas={"height": 64, "width": 128}, tiler={"name": "sliding", "window": 64, "stride": 32,
                                                                  "loop": True})
    resolved = resolve(spec)
    den = Pipeline(resolved).denoiser_for(resolved)
    loss = resolved.build("sync.loss")
    views = resolved.build("tiler").views(resolved.canvas)
    assert any(v.wraps for v in views)
    steps, weight = 2, 5.0
    request = Request(PROMPT, seed=3)

    def sample(collective=None):
        return JointSampler(den, views, resolved.build("merger"), loss, SyncSchedule(weight, 0.9),
                            SamplerOptions(scheduler="flow_euler", steps=steps, guidance_scale=3.5, view_batch_size=3),
                            collective)

    ours = sample().sample(request, resolved.canvas)
    assert ours.stats["sync_steps"] == steps
    canvas0 = sample().initial_noise(resolved.canvas, 3)
    ref = reference_syncdiffusion(den, loss, views, canvas0, steps, weight, 0.9, 3.5, PROMPT, scheduler="flow_euler")
    tolerance = reorder_tolerance(lambda c: sample(c).sample(request, resolved.canvas).latents, KERNEL_ULPS)
    assert_reordered_close(ours.latents, ref, tolerance, "flux sampler vs per-window Algorithm 1")
    plain = JointSampler(den, views, resolved.build("merger"), None, SyncSchedule(0.0),
                         SamplerOptions(scheduler="flow_euler", steps=steps, guidance_scale=3.5, view_batch_size=3))
    assert (plain.sample(request, resolved.canvas).latents - ours.latents).abs().max() > 10 * tolerance


def test_shift_follows_one_windows_token_count(flux_spec):
    """mu comes from a window's tokens: a wider canvas keeps the sigmas (FluxPipeline's for one window); a larger
    window shifts them further."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    resolved, den = _denoiser(flux_spec())

    def sigmas(height, width, window):
        r = resolve(flux_spec(canvas={"height": height, "width": width}, tiler={"window": window, "stride": 32}))
        sched = den.make_scheduler("flow_euler")
        den.set_timesteps(sched, 4, r.build("tiler").views(r.canvas))
        return sched.sigmas

    narrow, wide, big = sigmas(64, 96, 64), sigmas(64, 640, 64), sigmas(128, 640, 128)
    torch.testing.assert_close(narrow, wide, atol=0, rtol=0)
    expected = den.make_scheduler("flow_euler")
    expected.set_timesteps(sigmas=np.linspace(1.0, 0.25, 4), mu=calculate_shift(16))
    torch.testing.assert_close(narrow, expected.sigmas, atol=0, rtol=0)
    assert bool((big[1:-1] > narrow[1:-1]).all())  # more tokens per window: more time at high noise


# ----------------------------------------------------------------------------------------------------- tilers


SPHERE = {"canvas": {"height": 64, "width": 128}, "merger": {"name": "average", "target": "x0"},
          "sync": {"loss": {"name": "lpips", "net": "alex", "backbone": "random"}, "weight": 5.0},
          "sampler": {"steps": 2, "view_batch_size": 5}}


@pytest.mark.parametrize("case", ["loop", "grid", "regions", "perspective", "cubemap", "x0"])
def test_tilers_run(flux_spec, case):
    specs = {
        "loop": dict(tiler={"loop": True}, sync={"weight": 5.0}, sampler={"steps": 2, "view_batch_size": 5}),
        "grid": dict(canvas={"height": 96, "width": 96}, tiler={"window": 64, "stride": 32}, sampler={"steps": 2}),
        "regions": dict(tiler={"name": "regions", "window": 64, "stride": 32, "bootstrap": 0.5,
                               "regions": [{"mask": {"rect": [0, 0, 64, 16]}, "prompt": "a red car"},
                                           {"mask": {"rect": [0, 96, 64, 16]}, "prompt": "a blue boat",
                                            "guidance_scale": 6.0}]},
                        sampler={"steps": 2, "view_batch_size": 8}),  # mixed prompts and guidance in one batch
        "perspective": dict(tiler={"name": "perspective", "window": 32, "fov": 90, "views_per_ring": 4,
                                   "pitches": [0.0], "poles": True}, **SPHERE),
        "cubemap": dict(tiler={"name": "cubemap", "window": 32}, **SPHERE),
        "x0": dict(merger={"name": "average", "target": "x0"}, sync={"weight": 5.0}, sampler={"steps": 2}),
    }
    spec = flux_spec(**{k: v for k, v in specs[case].items() if k != "tiler"})
    spec["tiler"] = {**({"name": "sliding", "window": 64, "stride": 32} if "name" not in specs[case].get("tiler", {})
                        else {}), **specs[case].get("tiler", {})}
    out = Pipeline(resolve(spec)).run(0)
    h, w = spec["canvas"]["height"], spec["canvas"]["width"]
    assert out.latents.shape == (1, 16, h // 8, w // 8) and tuple(out.image.shape) == (3, h, w)
    assert bool(torch.isfinite(out.latents).all())
    if case in ("perspective", "cubemap", "x0", "loop"):
        assert out.stats["sync_steps"] == 2


def test_loop_seam_windows_wrap(flux_spec):
    """A loop strip's last window wraps past the right edge: it reads the first columns, and the final decode pads
    across the seam (the image is the canvas width)."""
    resolved = resolve(flux_spec(tiler={"loop": True}))
    views = resolved.build("tiler").views(resolved.canvas)
    assert any(v.wraps for v in views) and all(v.latent_size == (8, 8) for v in views)


# -------------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("override, key, text", [
    ({"tiler": {"window": 72, "stride": 32}, "canvas": {"height": 72, "width": 160}}, "tiler.window", "2x2"),
    ({"sampler": {"scheduler": "ddim"}}, "sampler.scheduler", "rectified-flow"),
])
def test_refused_before_weights_load(flux_spec, override, key, text):
    spec = flux_spec(**override)
    spec["denoiser"]["pretrained"] = "/no/such/flux"  # never loaded: validation refuses first
    with pytest.raises(ConfigError) as info:
        resolve(spec)
    message = str(info.value)
    assert key in message and text in message and "\n" not in message


def test_option_errors_are_one_line(flux_spec):
    for option, value in (("max_sequence_length", 600), ("true_cfg_scale", -1.0)):
        spec = flux_spec(denoiser={option: value})
        with pytest.raises(ConfigError, match=f"denoiser.{option}"):
            resolve(spec)


def test_missing_model_is_one_line_error(flux_spec):
    from syncengine.errors import ModelNotFoundError

    spec = flux_spec(denoiser={"pretrained": "/no/such/flux"})
    with pytest.raises(ModelNotFoundError) as info:
        _denoiser(spec)
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------------------- model and options


def test_schnell_has_no_guidance_embedding(flux_spec, tiny_flux_schnell):
    """schnell: no guidance input (the view's scale changes nothing), T5 at 256 tokens by default."""
    spec = flux_spec(denoiser={"pretrained": str(tiny_flux_schnell), "max_sequence_length": None},
                     sampler={"steps": 1})
    resolved, den = _denoiser(spec)
    assert not den.guidance_embeds and den.max_sequence_length == 256
    assert den.encode_prompt(PROMPT).text.shape[1] == 256
    low = Pipeline(resolved).run(0).latents
    high = Pipeline(resolve({**spec, "sampler": {**spec["sampler"], "guidance_scale": 9.0}})).run(0).latents
    assert torch.equal(low, high)


def test_dev_defaults_and_guidance_matters(flux_spec):
    resolved, den = _denoiser(flux_spec(denoiser={"max_sequence_length": None}))
    assert den.guidance_embeds and den.max_sequence_length == 512 and den.default_window == 1024
    assert den.latent_channels == 16 and den.latent_factor == 8 and den.prediction_type == "flow_prediction"
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    from syncengine.denoiser import Conditioning, Step

    views = resolved.build("tiler").views(resolved.canvas)[:1]
    embedding = den.encode_prompt(PROMPT)
    outs = [den.predict(x, Step(0, 1, torch.tensor(500.0)), [Conditioning(embedding, g)], views) for g in (1.0, 5.0)]
    assert not torch.equal(*outs)


def test_vae_shift_and_scale(flux_spec):
    """decode: latents / scale + shift into the VAE; encode is its inverse (region bootstrapping composes with it)."""
    _, den = _denoiser(flux_spec())
    config = den.vae.config
    assert (config.shift_factor, config.scaling_factor) == (0.1159, 0.3611)
    z = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(den.decode(z), den.vae.decode(z / 0.3611 + 0.1159).sample)
        image = torch.rand(1, 3, 32, 32) * 2 - 1
        mean = den.vae.encode(image).latent_dist.mean
        torch.testing.assert_close(den.encode(image), (mean - 0.1159) * 0.3611)


def test_sync_vae_taef1_and_decode_scale(flux_spec, tmp_path):
    from syncengine_flux.tiny import build_tiny_taef1

    taef1 = build_tiny_taef1(tmp_path / "taef1")
    _, den = _denoiser(flux_spec(denoiser={"sync_vae": str(taef1), "sync_decode_scale": 0.5}))
    z = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(2))
    image = den.decode_for_sync(z)
    assert tuple(image.shape) == (2, 3, 32, 32) and den.sync_image_size((8, 8)) == (32, 32)
    # TAEF1 reads the model's latents as they are (its config: scale 1, shift 0), as FluxPipeline would feed it
    torch.testing.assert_close(den.tiny_decoder_input(z), z)


def test_text_encoders_offload_after_prompts(flux_spec, monkeypatch):
    """text_encoders_to_cpu: encoders on the model's device while encoding, moved off at the first prediction."""
    _, den = _denoiser(flux_spec(denoiser={"text_encoders_to_cpu": True}, sampler={"steps": 1}))
    moves = []
    monkeypatch.setattr(den.pipe.text_encoder_2, "to", lambda device: moves.append(str(device)))
    monkeypatch.setattr(den.pipe.text_encoder, "to", lambda device: moves.append(str(device)))
    den.device = torch.device("cuda")  # pretend: only where the encoders go is checked, nothing runs on it
    den.text_encoders_to(torch.device("cuda"))
    assert moves == [] and not den.text_encoders_offloaded  # already there
    den.text_encoders_to(torch.device("cpu"))
    assert moves == ["cpu", "cpu"] and den.text_encoders_offloaded
    den.text_encoders_to(torch.device("cpu"))
    assert moves == ["cpu", "cpu"]  # once per request
    den.text_encoders_to(torch.device("cuda"))
    assert moves == ["cpu", "cpu", "cuda", "cuda"] and not den.text_encoders_offloaded


def test_single_file_transformer(flux_spec, tiny_flux, tmp_path):
    """A single-file transformer checkpoint plus single_file_config (the folder with the rest) loads the same
    model."""
    from safetensors.torch import save_file

    _, den = _denoiser(flux_spec())
    ckpt = tmp_path / "flux-transformer.safetensors"
    save_file({k: v.contiguous() for k, v in den.transformer.state_dict().items()}, str(ckpt))
    spec = flux_spec(denoiser={"pretrained": str(ckpt), "single_file_config": str(tiny_flux)}, sampler={"steps": 1})
    _, single = _denoiser(spec)
    for (name, a), (_, b) in zip(den.transformer.state_dict().items(), single.transformer.state_dict().items()):
        assert torch.equal(a, b), name


def test_single_file_without_its_other_parts_is_one_line(flux_spec, tmp_path, no_network, monkeypatch):
    """Unset single_file_config: the hub id of the checkpoint's family (dev: it has a guidance embedding) is tried;
    not downloaded, that is one line saying what to set."""
    import diffusers.utils.constants
    import huggingface_hub.constants
    from safetensors.torch import save_file

    for module in (huggingface_hub.constants, diffusers.utils.constants):  # offline: no retries against the hub
        monkeypatch.setattr(module, "HF_HUB_OFFLINE", True, raising=False)

    from syncengine.errors import ModelNotFoundError
    from syncengine_flux.denoiser import DEV, single_file_family

    _, den = _denoiser(flux_spec())
    ckpt = tmp_path / "flux-transformer.safetensors"
    save_file({k: v.contiguous() for k, v in den.transformer.state_dict().items()}, str(ckpt))
    assert single_file_family(ckpt) == DEV
    with pytest.raises(ModelNotFoundError) as info:
        _denoiser(flux_spec(denoiser={"pretrained": str(ckpt)}))
    message = str(info.value)
    assert "denoiser.single_file_config" in message and DEV in message and "\n" not in message


# ------------------------------------------------------------------------------------------------- presets


@pytest.mark.parametrize("preset, views", [("flux-panorama", 13), ("flux-schnell-panorama", 13),
                                           ("spherical-flux-perspective", 10)])
def test_presets_validate_as_written(preset, views):
    from syncengine.config import PRESETS_DIR

    resolved = resolve(PRESETS_DIR / f"{preset}.yaml")
    assert resolved.config.denoiser.name == "flux" and resolved.config.sampler.scheduler == "flow_euler"
    assert len(resolved.build("tiler").views(resolved.canvas)) == views


# ------------------------------------------------------------------------------------------------ sharding


@pytest.mark.slow
def test_window_sharding_equals_one_process(tiny_flux, tmp_path):
    """2 processes (Lightning ddp on CPU, gloo) sharding the windows give the one-process latents within the measured
    one-ulp reordering tolerance (tests/test_sharding.py's harness and rule)."""
    import json
    import os

    from test_sharding import assert_same_output, sharded_and_one_process

    one, two, jitter = sharded_and_one_process({
        "canvas": {"height": 64, "width": 160},
        "tiler": {"name": "sliding", "window": 64, "stride": 32},
        "merger": {"name": "average"},
        "denoiser": {"name": "flux", "pretrained": str(tiny_flux), "max_sequence_length": T5_LENGTH},
        "sync": {"loss": {"name": "lpips", "net": "alex", "backbone": "random"}, "weight": 20.0, "every": 2},
        "sampler": {"scheduler": "flow_euler", "steps": 4, "guidance_scale": 3.5, "view_batch_size": 2},
        "requests": [{"prompt": PROMPT, "seed": 0, "name": "pano"}],
        "runtime": {"accelerator": "cpu", "devices": 1, "progress": False},
    }, tmp_path)
    meta = assert_same_output(one, two, jitter, "pano")
    assert meta["stats"]["owned_views"] == 2 and meta["stats"]["views"] == 4 and meta["stats"]["sync_views"] > 0
    assert json.loads((one / "pano.json").read_text())["model"]["guidance_embeds"] and os.path.exists(two / "pano.png")


def test_spherical_preset_runs_shrunk_on_the_builtin_tiny_flux(tmp_path, monkeypatch):
    """``pretrained: syncengine:tiny-random`` with flux: the tiny FLUX is built into the model cache, then loaded
    through the loader; the 360° preset runs end to end when shrunk onto it."""
    import json

    from syncengine.api import generate
    from syncengine.config import PRESETS_DIR

    monkeypatch.setenv("SYNCENGINE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    summary = generate(str(PRESETS_DIR / "spherical-flux-perspective.yaml"), [
        "canvas.height=64", "canvas.width=128", "tiler.window=32", "denoiser.pretrained=syncengine:tiny-random",
        f"denoiser.max_sequence_length={T5_LENGTH}", "sync.loss.net=alex", "sync.loss.backbone=random",
        "sync.weight=5", "sampler.steps=1", "runtime.accelerator=cpu", "runtime.progress=false",
        f"runtime.output_dir={out}"])
    assert not summary.failed
    assert (tmp_path / "cache" / "tiny-random-flux-v1" / "model_index.json").is_file()
    (png,) = [p for p in out.glob("*.png") if p.stem.count(".") == 0]
    meta = json.loads(png.with_suffix(".json").read_text())
    assert meta["model"]["warning"].startswith("random weights") and meta["stats"]["sync_steps"] == 1
