"""Transformer ControlNets: ``controlnet-sd3`` equals StableDiffusion3ControlNetPipeline and ``controlnet-flux``
FluxControlNetPipeline on one window, scale 0 is the plain family bit for bit, a synced 2-window run works, what
cannot work is refused in one line; SD3's ``text_encoders_to_cpu`` moves its three encoders off once prompts are
encoded. Tiny random ControlNets sized to the tiny SD3 / FLUX transformers, saved and loaded through the engine."""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from _controlnet_helpers import random_image
from _flux_helpers import T5_LENGTH, flux_spec, tiny_flux  # noqa: F401  (fixtures)
from _sd3_helpers import SEQ, sd3_spec, tiny_sd3  # noqa: F401  (fixtures)

from syncengine.config import resolve
from syncengine.errors import ConfigError
from syncengine.pipeline import Pipeline

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "a photo of a mountain"


def _redraw(modules, seed: int) -> None:
    """ControlNets start with zeroed output layers (a fresh one changes nothing): random ones make control visible."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in modules:
            for p in m.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def build_sd3_controlnet(out: Path, seed: int, large: bool) -> Path:
    """A ControlNet for the tiny SD3 transformer: InstantX-style (joint blocks, zero pooled projection, no VAE
    shift) or, ``large``, SD3.5 Large-style (single blocks, no text, the transformer's patch embedding)."""
    from diffusers import SD3ControlNetModel

    torch.manual_seed(seed)
    extra = dict(joint_attention_dim=None, use_pos_embed=False, force_zeros_for_pooled_projection=False) if large \
        else dict(joint_attention_dim=96, qk_norm="rms_norm")
    net = SD3ControlNetModel(sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=1,
                             attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                             pooled_projection_dim=64, **extra)
    _redraw([*net.controlnet_blocks, net.pos_embed_input], seed)
    net.save_pretrained(out)
    return out


def build_flux_controlnet(out: Path, seed: int, xlabs: bool = False, modes: int | None = None) -> Path:
    """A ControlNet for the tiny FLUX transformer: InstantX-style (packed VAE latents), with ``modes`` a
    ControlNet-Union one, or, ``xlabs``, XLabs-style (pixels through an input hint block, samples repeated over the
    transformer's blocks)."""
    from diffusers import FluxControlNetModel

    torch.manual_seed(seed)
    extra = dict(patch_size=2, conditioning_embedding_channels=16) if xlabs else dict(num_mode=modes)
    net = FluxControlNetModel(in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
                              num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                              axes_dims_rope=[4, 4, 8], guidance_embeds=True, **extra)
    zeroed = [*net.controlnet_blocks, *net.controlnet_single_blocks, net.controlnet_x_embedder]
    if xlabs:
        zeroed.append(net.input_hint_block.conv_out)
    _redraw(zeroed, seed)
    net.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def sd3_controlnets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {"instantx": build_sd3_controlnet(root / "sd3-cn", 11, large=False),
            "large": build_sd3_controlnet(root / "sd3-cn-large", 12, large=True)}


@pytest.fixture(scope="session")
def flux_controlnets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {"instantx": build_flux_controlnet(root / "flux-cn", 13, xlabs=False),
            "xlabs": build_flux_controlnet(root / "flux-cn-xlabs", 14, xlabs=True),
            "union": build_flux_controlnet(root / "flux-cn-union", 15, modes=3)}


@pytest.fixture
def posterior_mean(monkeypatch):
    """The engine encodes conditions to the posterior mean; diffusers' pipelines draw from it (unseeded): the
    references here use the mean too, so both sides compute the same thing."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean)


def _noise(resolved, seed):
    return torch.randn(resolved.canvas.latent_shape(), generator=torch.Generator("cpu").manual_seed(seed))


def _control(spec, name, unit, image):
    spec["denoiser"] = {**spec["denoiser"], "name": name, "controlnets": [unit]}
    spec["requests"][0]["inputs"] = {"control": str(image)}
    return spec


# --------------------------------------------------------------------------------------------------------------- SD3


@pytest.mark.parametrize("kind, end", [("instantx", 1.0), ("large", 0.5)])
def test_sd3_one_window_equals_the_sd3_controlnet_pipeline(sd3_spec, tiny_sd3, sd3_controlnets, posterior_mean,
                                                           tmp_path, kind, end):
    from diffusers import SD3ControlNetModel, StableDiffusion3ControlNetPipeline
    from PIL import Image

    seed, steps, guidance = 5, 2, 5.0
    image = random_image(tmp_path / "c.png", 64, 96)
    spec = sd3_spec(canvas={"height": 64, "width": 96},
                    tiler={"name": "sliding", "window": 96, "window_height": 64, "stride": 32},
                    sampler={"steps": steps, "guidance_scale": guidance},
                    requests=[{"prompt": PROMPT, "negative_prompt": "blurry", "seed": seed}])
    unit = {"model": str(sd3_controlnets[kind]), "scale": 0.7, "end": end}
    resolved = resolve(_control(spec, "controlnet-sd3", unit, image))
    ours = Pipeline(resolved).run(0).latents
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = StableDiffusion3ControlNetPipeline.from_pretrained(
            str(tiny_sd3), controlnet=SD3ControlNetModel.from_pretrained(str(sd3_controlnets[kind])))
    ref.set_progress_bar_config(disable=True)
    out = ref(PROMPT, negative_prompt="blurry", control_image=Image.open(image).convert("RGB"), height=64, width=96,
              num_inference_steps=steps, guidance_scale=guidance, controlnet_conditioning_scale=0.7,
              control_guidance_end=end, latents=_noise(resolved, seed), output_type="latent",
              max_sequence_length=SEQ).images
    # measured max |difference| about 4e-6 (latents of order 1): the pipeline VAE-encodes the condition as a batch of
    # two (its CFG rows), the engine one view at a time; the tiny VAE's convolutions differ by ~2e-6 between the two
    torch.testing.assert_close(ours, out.float(), atol=1e-5, rtol=1e-5)
    spec["denoiser"] = {k: v for k, v in spec["denoiser"].items() if k != "controlnets"} | {"name": "sd3"}
    assert not torch.allclose(ours, Pipeline(resolve(spec)).run(0).latents, atol=1e-3)  # control acts


def test_sd3_scale_zero_is_plain_sd3_and_control_acts(sd3_spec, sd3_controlnets, tmp_path):
    image = random_image(tmp_path / "c.png", 64, 160)
    plain = Pipeline(resolve(sd3_spec())).run(0).latents
    unit = {"model": str(sd3_controlnets["instantx"]), "scale": 0.0}
    assert torch.equal(Pipeline(resolve(_control(sd3_spec(), "controlnet-sd3", unit, image))).run(0).latents, plain)
    unit["scale"] = 1.0
    controlled = Pipeline(resolve(_control(sd3_spec(), "controlnet-sd3", unit, image))).run(0).latents
    assert not torch.allclose(controlled, plain, atol=1e-3)


def test_sd3_synced_two_windows_run(sd3_spec, sd3_controlnets, tmp_path):
    """Sync > 0 backpropagates through the ControlNet and the transformer; each view's condition is encoded once."""
    image = random_image(tmp_path / "c.png", 64, 96)
    spec = sd3_spec(canvas={"height": 64, "width": 96}, sync={"weight": 10.0}, sampler={"steps": 2})
    spec["denoiser"]["gradient_checkpointing"] = True  # the ControlNet's too
    unit = {"model": str(sd3_controlnets["large"]), "scale": 1.0}
    resolved = resolve(_control(spec, "controlnet-sd3", unit, image))
    pipe = Pipeline(resolved)
    den = pipe.denoiser_for(resolved)
    encodes = []
    encode = den.vae.encode
    den.vae.encode = lambda x: encodes.append(x.shape) or encode(x)
    out = pipe.run(0)
    assert torch.isfinite(out.latents).all() and out.latents.shape == (1, 16, 8, 12)
    assert encodes == [(1, 3, 64, 64)] * 2  # two views, once each for the whole run
    assert all(net.gradient_checkpointing for net in den.controlnets)


def test_sd3_text_encoders_offload_after_prompts(sd3_spec, monkeypatch):
    """text_encoders_to_cpu: CLIP-L, CLIP-G and T5 on the model's device while encoding, moved off at the first
    prediction, back for the next request's prompts (where they go is checked; nothing runs on CUDA)."""
    resolved = resolve(sd3_spec(denoiser={"text_encoders_to_cpu": True}, sampler={"steps": 1}))
    den = Pipeline(resolved).denoiser_for(resolved)
    moves = []
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        monkeypatch.setattr(getattr(den.pipe, name), "to", lambda device, name=name: moves.append((name, str(device))))
    den.device = torch.device("cuda")  # pretend
    den.text_encoders_to(torch.device("cuda"))
    assert moves == [] and not den.text_encoders_offloaded
    den.text_encoders_to(torch.device("cpu"))
    assert [d for _, d in moves] == ["cpu"] * 3 and den.text_encoders_offloaded
    den.text_encoders_to(torch.device("cpu"))
    assert len(moves) == 3  # once per request
    den.text_encoders_to(torch.device("cuda"))
    assert [d for _, d in moves[3:]] == ["cuda"] * 3 and not den.text_encoders_offloaded


def test_sd3_offload_is_wired_into_encode_and_predict(sd3_spec, monkeypatch):
    """In a run, every prompt encoding first asks for the encoders on the model's device and every prediction first
    sends them to the CPU."""
    resolved = resolve(sd3_spec(denoiser={"text_encoders_to_cpu": True}, sampler={"steps": 1}))
    pipe = Pipeline(resolved)
    den = pipe.denoiser_for(resolved)
    events = []

    def spy(name, method):
        def wrapped(*args, **kwargs):
            events.append(name)
            return method(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(den, "encode_prompt", spy("encode", den.encode_prompt))
    monkeypatch.setattr(den, "predict", spy("predict", den.predict))
    moves = den.text_encoders_to
    monkeypatch.setattr(den, "text_encoders_to", lambda device: events.append(torch.device(device).type) or
                        moves(device))
    pipe.run(0)
    assert "encode" in events and "predict" in events
    for i, event in enumerate(events):
        if event in ("encode", "predict"):
            assert events[i + 1] == ("cpu" if event == "predict" else den.device.type), events[i:i + 2]
    assert den.text_encoders_offloaded


# -------------------------------------------------------------------------------------------------------------- FLUX


@pytest.mark.parametrize("kind, true_cfg", [("instantx", 1.0), ("instantx", 4.0), ("xlabs", 1.0), ("union", 1.0)])
def test_flux_one_window_equals_the_flux_controlnet_pipeline(flux_spec, tiny_flux, flux_controlnets, posterior_mean,
                                                             tmp_path, kind, true_cfg):
    from diffusers import FluxControlNetModel, FluxControlNetPipeline
    from PIL import Image

    seed, negative = 5, "blurry"
    image = random_image(tmp_path / "c.png", 64, 96)
    spec = flux_spec(canvas={"height": 64, "width": 96},
                     tiler={"name": "sliding", "window": 96, "window_height": 64, "stride": 32},
                     denoiser={"true_cfg_scale": true_cfg},
                     requests=[{"prompt": PROMPT, "negative_prompt": negative, "seed": seed}])
    unit = {"model": str(flux_controlnets[kind]), "scale": 0.7, **({"mode": 1} if kind == "union" else {})}
    resolved = resolve(_control(spec, "controlnet-flux", unit, image))
    ours = Pipeline(resolved).run(0).latents
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = FluxControlNetPipeline.from_pretrained(
            str(tiny_flux), controlnet=FluxControlNetModel.from_pretrained(str(flux_controlnets[kind])))
    ref.set_progress_bar_config(disable=True)
    packed = ref._pack_latents(_noise(resolved, seed), 1, 16, 8, 12)
    extra = {"negative_prompt": negative, "true_cfg_scale": true_cfg} if true_cfg > 1 else {}
    if kind == "union":
        extra["control_mode"] = 1
    out = ref(PROMPT, control_image=Image.open(image).convert("RGB"), height=64, width=96, num_inference_steps=3,
              guidance_scale=3.5, controlnet_conditioning_scale=0.7, latents=packed, output_type="latent",
              max_sequence_length=T5_LENGTH, **extra).images
    # true CFG: ours runs both branches in one batch, the pipeline in two calls (float rounding only); the negative
    # branch reuses the positive branch's ControlNet samples in both
    # measured: 0.0 without true CFG; 1.4e-6 with it, as for plain FLUX (test_flux.py's FLOAT_TOL)
    torch.testing.assert_close(ours, ref._unpack_latents(out, 64, 96, 8).float(), atol=2e-5, rtol=1e-4)
    spec["denoiser"] = {k: v for k, v in spec["denoiser"].items() if k != "controlnets"} | {"name": "flux"}
    assert not torch.allclose(ours, Pipeline(resolve(spec)).run(0).latents, atol=1e-3)  # control acts


def test_flux_scale_zero_is_plain_flux_and_control_acts(flux_spec, flux_controlnets, tmp_path):
    image = random_image(tmp_path / "c.png", 64, 160)
    plain = Pipeline(resolve(flux_spec())).run(0).latents
    unit = {"model": str(flux_controlnets["instantx"]), "scale": 0.0}
    assert torch.equal(Pipeline(resolve(_control(flux_spec(), "controlnet-flux", unit, image))).run(0).latents, plain)
    unit["scale"] = 1.0
    controlled = Pipeline(resolve(_control(flux_spec(), "controlnet-flux", unit, image))).run(0).latents
    assert not torch.allclose(controlled, plain, atol=1e-3)


def test_flux_synced_two_windows_run(flux_spec, flux_controlnets, tmp_path):
    image = random_image(tmp_path / "c.png", 64, 96)
    spec = flux_spec(canvas={"height": 64, "width": 96}, sync={"weight": 10.0}, sampler={"steps": 2})
    unit = {"model": str(flux_controlnets["instantx"]), "scale": 1.0}
    out = Pipeline(resolve(_control(spec, "controlnet-flux", unit, image))).run(0)
    assert torch.isfinite(out.latents).all() and out.latents.shape == (1, 16, 8, 12)


# ----------------------------------------------------------------------------------------------------------- composes

COMPOSE = {
    "loop": dict(tiler={"name": "sliding", "window": 64, "stride": 32, "loop": True}, sync={"weight": 5.0}),
    "regions": dict(tiler={"name": "regions", "window": 64, "stride": 32, "bootstrap": 0.5,
                           "regions": [{"mask": {"rect": [0, 0, 64, 16]}, "prompt": "a red car"},
                                       {"mask": {"rect": [0, 96, 64, 16]}, "prompt": "a blue boat",
                                        "guidance_scale": 6.0}]}),
    "x0": dict(merger={"name": "average", "target": "x0"}, sync={"weight": 5.0}),
}


@pytest.mark.parametrize("case", sorted(COMPOSE))
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_composes_with(sd3_spec, flux_spec, sd3_controlnets, flux_controlnets, tmp_path, family, case):
    """Loop strips (the seam window's condition wraps too), regions with mixed prompts and guidance in one batch,
    and the x0 merge target, with sync."""
    from PIL import Image

    from syncengine_controlnet.conditions import condition_crop, to_tensor

    image = random_image(tmp_path / "c.png", 64, 160)
    make, nets = (sd3_spec, sd3_controlnets) if family == "sd3" else (flux_spec, flux_controlnets)
    spec = make(sampler={"steps": 2, "view_batch_size": 8}, **COMPOSE[case])
    resolved = resolve(_control(spec, f"controlnet-{family}", {"model": str(nets["instantx"])}, image))
    pipe = Pipeline(resolved)
    den = pipe.denoiser_for(resolved)
    encoded = []
    encode = den.vae.encode
    den.vae.encode = lambda x: encoded.append(x.clone()) or encode(x)
    out = pipe.run(0)
    assert out.latents.shape == (1, 16, 8, 20) and bool(torch.isfinite(out.latents).all())
    if case == "loop":  # one encode per view, each exactly its (wrapped) crop in [-1, 1]
        views = resolved.build("tiler").views(resolved.canvas)
        assert any(v.wraps for v in views)
        full = to_tensor(Image.open(image))  # canvas-sized already: no fitting
        assert len(encoded) == len(views)  # in the sampler's order (the sync anchor first)
        for view in views:
            assert any(torch.equal(got, condition_crop(view, full, 8)[None] * 2 - 1) for got in encoded), view.index


# ----------------------------------------------------------------------------------------------------------- refusals


def test_guess_mode_is_refused_at_validation(sd3_spec, flux_spec, tmp_path):
    for spec, name in ((sd3_spec(), "controlnet-sd3"), (flux_spec(), "controlnet-flux")):
        unit = {"model": str(tmp_path / "absent"), "scale": 1.0}
        spec = _control(spec, name, unit, tmp_path / "c.png")
        spec["denoiser"]["guess_mode"] = True
        with pytest.raises(ConfigError, match="guess_mode") as err:
            resolve(spec)
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("tiler", [{"name": "perspective", "window": 32, "fov": 90, "views_per_ring": 4,
                                    "pitches": [0.0], "poles": True}, {"name": "cubemap", "window": 32}],
                         ids=["perspective", "cubemap"])
def test_views_without_a_crop_are_refused_at_validation(sd3_spec, tmp_path, no_network, tiler):
    spec = sd3_spec(canvas={"height": 64, "width": 128}, merger={"name": "average", "target": "x0"})
    spec["tiler"] = tiler
    spec = _control(spec, "controlnet-sd3", {"model": str(tmp_path / "not-loaded")}, tmp_path / "c.png")
    with pytest.raises(ConfigError, match="tiler.name.*have no crop") as err:
        resolve(spec)
    assert "\n" not in str(err.value)


def test_a_controlnet_of_another_class_is_one_line(flux_spec, sd3_controlnets, tmp_path):
    image = random_image(tmp_path / "c.png", 64, 160)
    spec = _control(flux_spec(), "controlnet-flux", {"model": str(sd3_controlnets["instantx"])}, image)
    with pytest.raises(ConfigError, match="SD3ControlNetModel, not a FluxControlNetModel") as err:
        Pipeline(resolve(spec)).run(0)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("kind, mode, needle", [("union", None, "3 control modes: set mode to one of 0..2"),
                                                ("union", 3, "3 control modes"),
                                                ("instantx", 0, "not a ControlNet-Union model")])
def test_union_modes_are_checked_when_the_net_loads(flux_spec, flux_controlnets, tmp_path, kind, mode, needle):
    image = random_image(tmp_path / "c.png", 64, 160)
    unit = {"model": str(flux_controlnets[kind]), **({"mode": mode} if mode is not None else {})}
    resolved = resolve(_control(flux_spec(), "controlnet-flux", unit, image))
    with pytest.raises(ConfigError, match="controlnets.0.mode") as err:
        Pipeline(resolved).denoiser_for(resolved)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_presets_resolve_offline(no_network):
    """The presets validate without loading weights, with the ControlNets diffusers documents for each base."""
    for name, family, base, model in (
        ("sd3-controlnet-canny", "controlnet-sd3", "stabilityai/stable-diffusion-3-medium-diffusers",
         "InstantX/SD3-Controlnet-Canny"),
        ("flux-controlnet-canny", "controlnet-flux", "black-forest-labs/FLUX.1-dev",
         "InstantX/FLUX.1-dev-Controlnet-Canny"),
    ):
        c = resolve(name).config
        assert (c.denoiser.name, c.denoiser.pretrained, c.denoiser.controlnets[0].model) == (family, base, model)
        assert c.denoiser.controlnets[0].preprocessor["name"] == "canny" and c.sampler.scheduler == "flow_euler"
        assert c.requests[0].inputs["control"]
