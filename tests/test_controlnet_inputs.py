"""ControlNet inputs: condition images fitted to the canvas (or refused), preprocessor plugins and their registry,
spec validation before any model loads, and clear errors for missing models."""
from __future__ import annotations

import pytest
import torch
from _controlnet_helpers import (  # noqa: F401  (fixtures)
    controlnet_spec,
    coordinate_image,
    random_image,
    tiny_controlnet,
)

from syncengine.config import resolve
from syncengine.errors import ConfigError, ModelNotFoundError, SyncEngineError
from syncengine.pipeline import Pipeline
from syncengine.views import CropView
from syncengine_controlnet.conditions import condition_crop, fit_to_canvas, load_image, to_tensor

pytestmark = pytest.mark.usefixtures("one_thread")


def _pil(tensor_hw3):
    from PIL import Image

    return Image.fromarray(tensor_hw3.numpy())


def _coords(h, w):
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([xs % 256, ys, xs // 256], -1).to(torch.uint8)


# ------------------------------------------------------------------------------------------- fitting to the canvas


def test_other_aspect_ratio_is_an_error_by_default():
    with pytest.raises(SyncEngineError, match=r"320x64 px .* canvas is 160x64 px.*denoiser.resize") as info:
        fit_to_canvas(_pil(_coords(64, 320)), 64, 160, what="condition")
    assert "\n" not in str(info.value)


def test_same_aspect_ratio_is_resized_and_same_size_kept_exactly():
    image = _pil(_coords(64, 160))
    assert fit_to_canvas(image, 64, 160).tobytes() == image.tobytes()
    assert fit_to_canvas(_pil(_coords(32, 80)), 64, 160).size == (160, 64)
    assert fit_to_canvas(_pil(_coords(64, 161)), 64, 160).size == (160, 64)  # within the 1% tolerance
    with pytest.raises(SyncEngineError):
        fit_to_canvas(_pil(_coords(64, 161)), 64, 160, tolerance=0.001)


def test_resize_policies_crop_pad_stretch():
    wide = _coords(64, 320)
    cropped = torch.from_numpy(__import__("numpy").asarray(fit_to_canvas(_pil(wide), 64, 160, "crop")).copy())
    assert torch.equal(cropped, wide[:, 80:240])  # scale 1 covers the height; the centre is kept
    narrow = _coords(64, 80)
    padded = torch.from_numpy(__import__("numpy").asarray(fit_to_canvas(_pil(narrow), 64, 160, "pad")).copy())
    assert torch.equal(padded[:, 40:120], narrow) and padded[:, :40].eq(0).all() and padded[:, 120:].eq(0).all()
    assert fit_to_canvas(_pil(narrow), 64, 160, "stretch").size == (160, 64)


def test_mismatched_condition_through_the_pipeline(tiny_spec, tiny_controlnet, tmp_path):
    wide = random_image(tmp_path / "wide.png", 64, 320)
    spec = controlnet_spec(tiny_spec, tiny_controlnet, inputs={"control": str(wide)})
    spec["sampler"]["steps"] = 1
    with pytest.raises(SyncEngineError, match="aspect.*denoiser.resize"):
        Pipeline(resolve(spec)).run(0)
    spec["denoiser"]["resize"] = "crop"
    result = Pipeline(resolve(spec)).run(0)
    from PIL import Image

    expected = to_tensor(Image.open(wide).crop((80, 0, 240, 64)))
    assert torch.equal(result.extra_images["control"], expected)


def test_crop_is_the_latent_box_times_the_factor_including_subclasses():
    image = torch.arange(3 * 16 * 40, dtype=torch.float32).reshape(3, 16, 40)

    class RegionView(CropView):  # e.g. a region layout's view: a crop with its own mask and prompt
        pass

    view = RegionView(0, top=1, left=2, height=1, width=2, context={"prompt": "a"})
    assert torch.equal(condition_crop(view, image, 8), image[:, 8:16, 16:32])
    wrap = CropView(1, top=0, left=4, height=2, width=2, canvas_width=5)  # latent columns 4, 0
    assert torch.equal(condition_crop(wrap, image, 8), torch.cat([image[..., 32:40], image[..., 0:8]], -1))

    class Hooked(CropView):
        def extract_image(self, image, factor):
            return image[..., :8, :8].flip(-1)

    assert torch.equal(condition_crop(Hooked(2, height=1, width=1), image, 8), image[:, :8, :8].flip(-1))
    with pytest.raises(SyncEngineError, match="does not match the canvas"):
        condition_crop(CropView(3, top=0, left=4, height=1, width=2), image, 8)  # past the right edge, no loop


def test_missing_and_unreadable_images(tmp_path):
    with pytest.raises(SyncEngineError, match="not found"):
        load_image(tmp_path / "nope.png", "condition")
    (tmp_path / "bad.png").write_text("not an image")
    with pytest.raises(SyncEngineError, match="not a readable image"):
        load_image(tmp_path / "bad.png", "condition")


# --------------------------------------------------------------------------------------------- request inputs


def test_inputs_per_controlnet_list_named_key_and_default_image(tiny_spec, tiny_controlnet, tmp_path):
    a = coordinate_image(tmp_path / "a.png", 64, 160)
    b = random_image(tmp_path / "b.png", 64, 160)
    units = [{"model": str(tiny_controlnet), "image": str(b)}, {"model": str(tiny_controlnet), "input": "edges"}]
    spec = controlnet_spec(tiny_spec, *units, inputs={"edges": str(a)})
    spec["sampler"]["steps"] = 1
    pipe = Pipeline(resolve(spec))
    den = pipe.denoiser_for(pipe.resolved)
    request = pipe.requests()[0]
    from syncengine_controlnet.denoiser import ControlNetDenoiser

    assert isinstance(den, ControlNetDenoiser)
    from syncengine.views import CanvasSpec

    context = den.prepare_request(request, CanvasSpec(64, 160))
    assert set(den.request_images(context)) == {"control-0", "control-1"}
    assert torch.equal(context["controlnet"][0].cpu(), to_tensor(load_image(b, "b")))  # the unit's own image
    assert torch.equal(context["controlnet"][1].cpu(), to_tensor(load_image(a, "a")))  # inputs.edges
    request.inputs = {"control": [str(a), None], "edges": str(b)}
    context = den.prepare_request(request, CanvasSpec(64, 160))
    assert torch.equal(context["controlnet"][0].cpu(), to_tensor(load_image(a, "a")))
    request.inputs = {"control": [str(a)]}
    with pytest.raises(SyncEngineError, match="lists 1 images but the denoiser has 2"):
        den.prepare_request(request, CanvasSpec(64, 160))
    request.inputs = {}
    with pytest.raises(SyncEngineError, match=r"controlnets.1 is missing: set requests\[\].inputs.edges"):
        den.prepare_request(request, CanvasSpec(64, 160))


# -------------------------------------------------------------------------------------------------- preprocessors


def test_canny_matches_controlnet_aux_at_native_resolution():
    from controlnet_aux import CannyDetector

    from syncengine_controlnet.preprocessors import CannyConfig, CannyPreprocessor

    g = torch.Generator().manual_seed(0)
    photo = _pil(torch.randint(0, 256, (64, 64, 3), generator=g, dtype=torch.uint8).repeat_interleave(4, 0)[:64])
    ours = CannyPreprocessor(CannyConfig(50, 150))(photo)
    ref = CannyDetector()(photo, low_threshold=50, high_threshold=150, detect_resolution=64, image_resolution=64)
    assert ours.size == photo.size and ours.tobytes() == ref.tobytes()


def test_photo_through_canny_end_to_end(tiny_spec, tiny_controlnet, tmp_path):
    from syncengine_controlnet.preprocessors import CannyConfig, CannyPreprocessor

    photo = random_image(tmp_path / "photo.png", 32, 80)  # half the canvas size: resized first, then edges
    unit = {"model": str(tiny_controlnet), "preprocessor": {"name": "canny", "low_threshold": 50}}
    spec = controlnet_spec(tiny_spec, unit, inputs={"control": str(photo)})
    spec["sampler"]["steps"] = 1
    result = Pipeline(resolve(spec)).run(0)
    fitted = fit_to_canvas(load_image(photo, "p"), 64, 160)
    expected = to_tensor(CannyPreprocessor(CannyConfig(50, 200))(fitted))
    assert torch.equal(result.extra_images["control"], expected) and expected.max() == 1.0


def test_unknown_preprocessor_lists_the_available_ones(tiny_spec, tiny_controlnet):
    spec = controlnet_spec(tiny_spec, {"model": str(tiny_controlnet), "preprocessor": "cany"})
    with pytest.raises(ConfigError) as info:
        resolve(spec)
    msg = str(info.value)
    assert "denoiser.controlnets.0.preprocessor.name" in msg and "Did you mean 'canny'?" in msg
    assert "canny" in msg and "depth-midas" in msg and "syncengine.preprocessors" in msg


def test_preprocessor_options_are_validated(tiny_spec, tiny_controlnet):
    spec = controlnet_spec(tiny_spec, {"model": str(tiny_controlnet), "preprocessor": {"name": "canny", "low": 3}})
    with pytest.raises(ConfigError, match="unknown key 'low'; valid keys: low_threshold, high_threshold"):
        resolve(spec)
    spec["denoiser"]["controlnets"][0]["preprocessor"] = {"name": "canny", "low_threshold": 300}
    with pytest.raises(ConfigError, match="controlnets.0.preprocessor.low_threshold"):
        resolve(spec)


def test_weighted_preprocessor_without_weights_says_how_to_get_them(tmp_path, tiny_sd, tiny_controlnet):
    from syncengine_controlnet.denoiser import ControlNetConfig, ControlNetDenoiser, ControlNetUnit
    from syncengine_controlnet.preprocessors import build_preprocessor

    pre = build_preprocessor({"name": "softedge-hed", "pretrained": str(tmp_path)}, "p")
    with pytest.raises(ModelNotFoundError, match=r"HEDdetector.*huggingface-cli download lllyasviel/Annotators"):
        pre.load()
    unit = ControlNetUnit(str(tiny_controlnet), preprocessor={"name": "lineart", "pretrained": str(tmp_path)})
    with pytest.raises(ModelNotFoundError, match="LineartDetector"):
        ControlNetDenoiser(ControlNetConfig(pretrained=str(tiny_sd), controlnets=[unit]))


def test_third_party_preprocessor_plugin(tiny_spec, tiny_controlnet, tmp_path, monkeypatch):
    """A package registers a preprocessor in syncengine.preprocessors; specs use it by name."""
    site = tmp_path / "site"
    (site / "invert_pre").mkdir(parents=True)
    (site / "invert_pre" / "__init__.py").write_text(
        "from dataclasses import dataclass\n"
        "from PIL import ImageOps\n"
        "from syncengine_controlnet.preprocessors import Preprocessor\n\n"
        "@dataclass\nclass InvertConfig:\n    enabled: bool = True\n\n"
        "class Invert(Preprocessor):\n    Config = InvertConfig\n\n"
        "    def __call__(self, image):\n        return ImageOps.invert(image.convert('RGB'))\n"
    )
    dist = site / "invert_pre-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: invert-pre\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[syncengine.preprocessors]\ninvert = invert_pre:Invert\n")
    monkeypatch.syspath_prepend(str(site))
    from syncengine import registry

    assert "invert" in registry.names("preprocessor")
    photo = coordinate_image(tmp_path / "photo.png", 64, 160)
    spec = controlnet_spec(tiny_spec, {"model": str(tiny_controlnet), "preprocessor": "invert"},
                           inputs={"control": str(photo)})
    spec["sampler"]["steps"] = 1
    result = Pipeline(resolve(spec)).run(0)
    inverted = 255 - (to_tensor(load_image(photo, "p")) * 255).round()
    assert torch.equal((result.extra_images["control"] * 255).round(), inverted)


# ------------------------------------------------------------------------------------- spec validation, loading


@pytest.mark.parametrize(
    "change, key",
    [
        ({"controlnets": []}, "denoiser.controlnets"),
        ({"controlnets": [{"model": ""}]}, "denoiser.controlnets.0.model"),
        ({"controlnets": [{"model": "x", "start": 0.6, "end": 0.5}]}, "denoiser.controlnets.0.start"),
        ({"controlnets": [{"model": "x"}], "resize": "squash"}, "denoiser.resize"),
        ({"controlnets": [{"modle": "x"}]}, "modle"),
    ],
)
def test_spec_errors_before_any_model_loads(tiny_spec, change, key):
    spec = tiny_spec(denoiser={"name": "controlnet", "pretrained": "/nonexistent/model", **change})
    with pytest.raises(ConfigError) as info:
        resolve(spec)
    assert key in str(info.value)


def test_closed_set_options_are_checked_when_built_without_a_spec(tiny_sd):
    """``resize`` is a Literal field: a spec is checked when typed, a config object by the Plugin base (same wording),
    before the base model loads (the path does not exist)."""
    from syncengine_controlnet.denoiser import ControlNetConfig, ControlNetDenoiser, ControlNetUnit

    with pytest.raises(ConfigError) as info:
        ControlNetDenoiser(ControlNetConfig(pretrained="/nonexistent/model", controlnets=[ControlNetUnit("x")],
                                            resize="squash"))
    assert info.value.key == "denoiser.resize" and str(info.value).endswith("is not one of error, stretch, crop, pad")


def test_missing_controlnet_models_are_clear_errors(tiny_sd, tmp_path, monkeypatch):
    from syncengine_controlnet.denoiser import ControlNetConfig, ControlNetDenoiser, ControlNetUnit

    def build(ref):
        return ControlNetDenoiser(ControlNetConfig(pretrained=str(tiny_sd), controlnets=[ControlNetUnit(ref)]))

    with pytest.raises(ModelNotFoundError, match="does not exist"):
        build(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        build(str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # read at import time
    with pytest.raises(ModelNotFoundError) as info:
        build("someone/not-a-cached-controlnet")
    assert "huggingface-cli download someone/not-a-cached-controlnet" in str(info.value)
    assert "denoiser.controlnets.0.model" in str(info.value) and "\n" not in str(info.value)


def test_controlnet_for_another_base_is_refused(tiny_sd, tmp_path):
    from diffusers import ControlNetModel

    from syncengine_controlnet.denoiser import ControlNetConfig, ControlNetDenoiser, ControlNetUnit

    other = ControlNetModel(block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                            cross_attention_dim=24, attention_head_dim=4, norm_num_groups=8, layers_per_block=1,
                            conditioning_embedding_out_channels=(8, 8, 8, 16))
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ConfigError, match="does not fit the base model.*cross_attention_dim 24 vs 32"):
        ControlNetDenoiser(ControlNetConfig(pretrained=str(tiny_sd),
                                            controlnets=[ControlNetUnit(str(tmp_path / "other"))]))


# ----------------------------------------------------------------------------------------------------- the preset


def test_canny_preset_validates_and_runs_shrunk_on_tiny_models(tiny_sd, tiny_controlnet, tmp_path):
    """The preset as shipped validates (no model loads); shrunk onto the tiny models it runs end to end through
    Lightning and writes the image, the edge map it was conditioned on, and the sidecar."""
    import json

    from syncengine.config import compose, validate
    from syncengine.lightning_module import run

    preset = resolve("controlnet-canny")
    den = preset.config.denoiser
    assert (preset.config.canvas.height, preset.config.canvas.width) == (512, 2048)
    unit = den.controlnets[0]
    assert unit.model == "lllyasviel/sd-controlnet-canny" and unit.preprocessor.name == "canny"

    photo = random_image(tmp_path / "photo.png", 16, 64)  # the preset's 4:1 aspect ratio
    raw = compose("controlnet-canny", [
        "canvas.height=64", "canvas.width=256", "tiler.window=64", "tiler.stride=32", f"denoiser.pretrained={tiny_sd}",
        "sync.loss.net=alex", "sync.loss.backbone=random", "sync.weight=2", "sampler.steps=2",
        "runtime.accelerator=cpu", "runtime.progress=false", f"runtime.output_dir={tmp_path / 'out'}",
    ])
    raw.denoiser.controlnets[0].model = str(tiny_controlnet)
    raw.requests = [{"prompt": "a skyline", "seed": 3, "name": "sky", "inputs": {"control": str(photo)}}]
    summary = run(validate(raw))
    assert summary.ok and [p.name for p in summary.written] == ["sky.png"]
    out = tmp_path / "out"
    assert (out / "sky.control.png").is_file()
    meta = json.loads((out / "sky.json").read_text())
    assert meta["extra_images"] == {"control": "sky.control.png"} and meta["stats"]["sync_steps"] == 2
