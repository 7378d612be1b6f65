"""The sd3 denoiser (SD3 / SD3.5, rectified flow) on a tiny random model loaded through the engine's loader: one window
is StableDiffusion3Pipeline, several are MultiDiffusion, sync is Algorithm 1; every tiler composes; what cannot work
is refused in one line before any weights load."""
from __future__ import annotations

import warnings

import pytest
import torch
from _sd3_helpers import SEQ, sd3_single_file, sd3_spec, tiny_sd3, tiny_sd3_dynamic  # noqa: F401  (fixtures)
from _tolerance import KERNEL_ULPS, assert_reordered_close, reorder_tolerance

from benchmarks.reference import reference_syncdiffusion
from syncengine.config import resolve
from syncengine.errors import ConfigError, ModelNotFoundError
from syncengine.pipeline import Pipeline
from syncengine.sampler import JointSampler, Request, SamplerOptions
from syncengine.sync import SyncSchedule

PROMPT = "a photo of a mountain"


def _pipeline(folder, t5=True):
    from diffusers import StableDiffusion3Pipeline

    kwargs = {} if t5 else {"text_encoder_3": None, "tokenizer_3": None}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = StableDiffusion3Pipeline.from_pretrained(str(folder), **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _noise(resolved, seed):
    """The canvas noise the engine draws for a seed (JointSampler.initial_noise): the pipeline gets the same."""
    return torch.randn(resolved.canvas.latent_shape(), generator=torch.Generator("cpu").manual_seed(seed))


@pytest.mark.parametrize("t5, dynamic", [(True, False), (False, False), (True, True)])
def test_one_window_equals_the_sd3_pipeline(sd3_spec, tiny_sd3, tiny_sd3_dynamic, t5, dynamic):
    folder = tiny_sd3_dynamic if dynamic else tiny_sd3
    steps, seed, guidance = 2, 5, 5.0
    spec = sd3_spec(canvas={"height": 96, "width": 96}, tiler={"name": "sliding", "window": 96, "stride": 32},
                    denoiser={"pretrained": str(folder), "t5": t5},
                    sampler={"steps": steps, "guidance_scale": guidance},
                    requests=[{"prompt": PROMPT, "negative_prompt": "blurry", "seed": seed}])
    resolved = resolve(spec)
    pipe = Pipeline(resolved)
    ours = pipe.run(0).latents
    den = pipe.denoiser_for(resolved)
    assert (den.latent_channels, den.latent_factor, den.prediction_type) == (16, 8, "flow_prediction")
    assert den.default_window == 256 and (den.pipe.text_encoder_3 is None) == (not t5)
    reference = _pipeline(folder, t5)(
        PROMPT, negative_prompt="blurry", height=96, width=96, num_inference_steps=steps, guidance_scale=guidance,
        latents=_noise(resolved, seed), output_type="latent", max_sequence_length=SEQ,
    ).images
    assert ours.shape == reference.shape == (1, 16, 12, 12)
    torch.testing.assert_close(ours, reference.float(), atol=2e-5, rtol=1e-4)


def _multidiffusion(folder, canvas0, window, stride, steps, guidance):
    """MultiDiffusion written out from the pipeline's components: per window the transformer with CFG and its own
    Euler step, then the average; ``mu`` (dynamic shifting) from one window's sequence length."""
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

    pipe = _pipeline(folder)
    pe, npe, pooled, npooled = pipe.encode_prompt(PROMPT, None, None, device="cpu", max_sequence_length=SEQ)
    hidden, pooled = torch.cat([npe, pe]), torch.cat([npooled, pooled])
    sched, cfg = pipe.scheduler, pipe.scheduler.config
    p = pipe.transformer.config.patch_size
    mu = calculate_shift((window // p) ** 2, cfg.base_image_seq_len, cfg.max_image_seq_len, cfg.base_shift, 1.16)
    sched.set_timesteps(steps, mu=mu)
    latents = canvas0.clone()
    starts = list(range(0, latents.shape[-1] - window + 1, stride))
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            value, count = torch.zeros_like(latents), torch.zeros_like(latents)
            for s in starts:
                x = latents[..., s : s + window]
                v = pipe.transformer(hidden_states=torch.cat([x, x]), timestep=t.expand(2),
                                     encoder_hidden_states=hidden, pooled_projections=pooled, return_dict=False)[0]
                uncond, cond = v.chunk(2)
                v = uncond + guidance * (cond - uncond)
                value[..., s : s + window] += x + (sched.sigmas[i + 1] - sched.sigmas[i]) * v
                count[..., s : s + window] += 1
            latents = value / count
    return latents


def test_windows_at_weight_zero_are_multidiffusion(sd3_spec, tiny_sd3_dynamic):
    # a 64x160 canvas, 64 px windows every 32 px: 8x8-latent windows at 0, 4, 8, 12; mu from a window, not the canvas
    spec = sd3_spec(denoiser={"pretrained": str(tiny_sd3_dynamic)}, sampler={"steps": 3, "view_batch_size": 3},
                    requests=[{"prompt": PROMPT, "seed": 2}])
    resolved = resolve(spec)
    pipe = Pipeline(resolved)
    ours = pipe.run(0).latents
    reference = _multidiffusion(tiny_sd3_dynamic, _noise(resolved, 2), 8, 4, 3, 5.0)
    torch.testing.assert_close(ours, reference, atol=2e-5, rtol=1e-4)
    # the canvas's own shift would be another schedule: the window's is the one the model was trained with
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

    den = pipe.denoiser_for(resolved)
    ours_sched, canvas_sched = den.make_scheduler("flow_euler"), den.make_scheduler("flow_euler")
    den.set_timesteps(ours_sched, 3, resolved.build("tiler").views(resolved.canvas))
    c = canvas_sched.config
    canvas_sched.set_timesteps(3, mu=calculate_shift(4 * 10, c.base_image_seq_len, c.max_image_seq_len, c.base_shift,
                                                     1.16))
    assert (ours_sched.sigmas - canvas_sched.sigmas).abs().max() > 1e-3


def test_sync_matches_per_window_reference(sd3_spec):
    spec = sd3_spec(canvas={"height": 64, "width": 128})  # three windows, the middle one the anchor
    resolved = resolve(spec)
    den = Pipeline(resolved).denoiser_for(resolved)
    loss = resolved.build("sync.loss")
    views = resolved.build("tiler").views(resolved.canvas)
    steps, weight, guidance = 3, 20.0, 5.0
    request = Request(PROMPT, seed=3)

    def sample(collective=None, w=weight):
        return JointSampler(den, views, resolved.build("merger"), loss, SyncSchedule(w, 0.9),
                            SamplerOptions(scheduler="flow_euler", steps=steps, guidance_scale=guidance,
                                           view_batch_size=3), collective)

    ours = sample().sample(request, resolved.canvas)
    assert ours.stats["sync_steps"] == steps
    canvas0 = sample().initial_noise(resolved.canvas, 3)
    ref = reference_syncdiffusion(den, loss, views, canvas0, steps, weight, 0.9, guidance, PROMPT,
                                  scheduler="flow_euler")
    tolerance = reorder_tolerance(lambda c: sample(c).sample(request, resolved.canvas).latents, KERNEL_ULPS)
    assert_reordered_close(ours.latents, ref, tolerance, "sd3 sampler vs per-window Algorithm 1")
    plain = sample(w=0.0).sample(request, resolved.canvas).latents
    assert (plain - ours.latents).abs().max() > 10 * tolerance  # sync really acted


@pytest.fixture(scope="module")
def taesd3(tmp_path_factory):
    """A tiny random TAESD3-shaped decoder (AutoencoderTiny, 16 latent channels, SD3's scale and shift)."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("models") / "taesd3"
    AutoencoderTiny(latent_channels=16, encoder_block_out_channels=(8,) * 4, decoder_block_out_channels=(8,) * 4,
                    num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1), scaling_factor=1.5035,
                    shift_factor=0.0609).save_pretrained(path)
    return path


RING = {"name": "perspective", "window": 32, "views_per_ring": 4, "poles": False}
SMOKE = {
    "loop": dict(tiler={"name": "sliding", "window": 64, "stride": 48, "loop": True}),
    "grid": dict(canvas={"height": 96, "width": 96}, tiler={"name": "sliding", "window": 64, "stride": 32}),
    "regions": dict(tiler={"name": "regions", "window": 64, "stride": 32, "bootstrap": 0.5, "regions": [
        {"mask": {"rect": [0, 0, 64, 64]}, "prompt": "a red car"},
        {"mask": {"rect": [0, 96, 64, 64]}, "prompt": "a blue boat"}]}),
    "perspective": dict(canvas={"height": 64, "width": 128}, tiler=RING, sampler={"view_batch_size": 4}),
    "cubemap": dict(canvas={"height": 64, "width": 128}, tiler={"name": "cubemap", "window": 32},
                    merger={"name": "average", "target": "x0"}, sampler={"view_batch_size": 6}),
    "x0": dict(canvas={"height": 64, "width": 128}, merger={"name": "average", "target": "x0"}),
    "sync_vae": dict(canvas={"height": 64, "width": 128}, sync={"weight": 5.0},
                     denoiser={"sync_vae": "TAESD3", "sync_decode_scale": 0.5, "gradient_checkpointing": True}),
}


@pytest.mark.parametrize("case", list(SMOKE))
def test_composes_with(sd3_spec, taesd3, case):
    sections = {k: dict(v) for k, v in SMOKE[case].items()}
    if "denoiser" in sections:
        sections["denoiser"]["sync_vae"] = str(taesd3)
    tiler = sections.pop("tiler", None)
    spec = sd3_spec(sampler={"steps": 2, **sections.pop("sampler", {})}, **sections)
    if tiler is not None:
        spec["tiler"] = tiler  # replace, not merge into, the default sliding tiler
    resolved = resolve(spec)
    out = Pipeline(resolved).run(0)
    assert out.latents.shape == resolved.canvas.latent_shape() and bool(torch.isfinite(out.latents).all())
    assert out.image.shape[-2:] == (resolved.canvas.height, resolved.canvas.width)


def test_decode_and_encode_use_the_vae_shift_and_scale(sd3_spec):
    resolved = resolve(sd3_spec())
    den = Pipeline(resolved).denoiser_for(resolved)
    vae = den.vae
    z = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = vae.decode(z / vae.config.scaling_factor + vae.config.shift_factor).sample
        torch.testing.assert_close(den.decode(z), expected)
        image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
        mean = vae.encode(image).latent_dist.mean
        torch.testing.assert_close(den.encode(image), (mean - vae.config.shift_factor) * vae.config.scaling_factor)


def test_preset_resolves_offline(no_network):
    r = resolve("sd3-panorama")
    c = r.config
    assert (c.denoiser.name, c.sampler.scheduler, c.denoiser.pretrained) == (
        "sd3", "flow_euler", "stabilityai/stable-diffusion-3.5-medium")
    assert c.requests and c.canvas.height % 16 == 0


@pytest.mark.parametrize("sections, key, needle", [
    (dict(tiler={"name": "sliding", "window": 72, "stride": 24}, canvas={"height": 72, "width": 168}),
     "tiler.window", "patch size 2"),
    (dict(sampler={"scheduler": "ddim"}), "sampler.scheduler", "flow_euler"),
    (dict(sampler={"scheduler": "euler"}), "sampler.scheduler", "rectified-flow"),
    (dict(denoiser={"max_sequence_length": 1000}), "denoiser.max_sequence_length", "512"),
])
def test_refused_before_loading(sd3_spec, sections, key, needle):
    spec = sd3_spec(**sections)
    spec["denoiser"]["pretrained"] = "/nonexistent/sd3"  # validation never reaches the weights
    with pytest.raises(ConfigError, match=needle) as info:
        resolve(spec)
    assert info.value.key == key and "\n" not in str(info.value)


@pytest.mark.parametrize("ref", ["/nonexistent/sd3", "/nonexistent/sd3.safetensors", "no-such-owner/no-such-sd3"])
def test_missing_model_is_one_line(sd3_spec, no_network, ref):
    resolved = resolve(sd3_spec(denoiser={"pretrained": ref}))
    with pytest.raises(ModelNotFoundError) as info:
        Pipeline(resolved).denoiser_for(resolved)
    assert ref in str(info.value) and "\n" not in str(info.value)


def test_single_file_checkpoint_equals_the_folder_model(sd3_spec, tiny_sd3, tmp_path, no_network):
    """An original-format file with the transformer and VAE (as SD3.5 ships them); the text encoders it lacks come
    from single_file_config. Without a config: one line."""
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
    from safetensors.torch import save_file

    pipe = _pipeline(tiny_sd3)
    state = sd3_single_file(pipe)
    transformer = {k: v for k, v in state.items() if k.startswith("model.diffusion_model.")}
    back = convert_sd3_transformer_checkpoint_to_diffusers(dict(transformer))  # the file reads back exactly
    assert back.keys() == pipe.transformer.state_dict().keys()
    assert all(torch.equal(v, pipe.transformer.state_dict()[k]) for k, v in back.items())
    path = tmp_path / "sd3.5-tiny.safetensors"
    save_file(state, str(path))
    spec = sd3_spec(sampler={"steps": 2})
    folder = Pipeline(resolve(spec)).run(0).latents
    single = resolve(sd3_spec(sampler={"steps": 2},
                              denoiser={"pretrained": str(path), "single_file_config": str(tiny_sd3)}))
    assert torch.equal(Pipeline(single).run(0).latents, folder)
    bare = resolve(sd3_spec(denoiser={"pretrained": str(path)}))
    with pytest.raises(ModelNotFoundError, match="single_file_config") as info:
        Pipeline(bare).denoiser_for(bare)
    assert "\n" not in str(info.value)
