"""Issue 13 (hardening), plugin inputs and evaluate: oversized (decompression-bomb) and damaged mask, layout and
condition images, degenerate tiler options, and `evaluate` on damaged images, a bad --out and an empty model cache.
Every failure is one line (the CLI: `error: ...`, exit 2), and nothing here decodes a big image or opens a socket."""
from __future__ import annotations

import json
import socket
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from _evaluation_helpers import tiled, write_panorama
from PIL import Image

from syncengine.cli import main
from syncengine.errors import ConfigError, SyncEngineError

# ------------------------------------------------------------------------------------------------------- files


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def header_only_png(path: Path, width: int, height: int) -> Path:
    """A PNG whose header says ``width x height`` RGB but that holds no pixel data: 57 bytes for any size, so an
    oversized image costs nothing to make, and decoding it (which the size check must prevent) would fail."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IEND", b""))
    return path


def damaged(path: Path, kind: str) -> Path:
    """A file that is not a usable image: ``text``, a ``truncated`` PNG, or a ``ztxt`` PNG whose text chunk
    decompresses past PIL's limit (a ValueError, not an OSError)."""
    if kind == "text":
        path.write_text("not an image")
    elif kind == "truncated":
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 64, 3), np.uint8)).save(path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "ztxt":
        ihdr = struct.pack(">IIBBBBB", 4, 4, 8, 0, 0, 0, 0)
        bomb = _chunk(b"zTXt", b"k\x00\x00" + zlib.compress(b"a" * 2_000_000))
        idat = _chunk(b"IDAT", zlib.compress(b"\x00\x00\x00\x00\x00" * 4))
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + bomb + idat + _chunk(b"IEND", b""))
    return path


def _config(tmp_path: Path, spec: dict, *overrides: str, capsys) -> str:
    """``syncengine config`` (validation only, no model loads) must exit 2 with one ``error:`` line: that line."""
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    code = main(["config", str(path), *overrides])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _spec(tiler: dict, height: int = 64, width: int = 128) -> dict:
    return {"canvas": {"height": height, "width": width}, "tiler": tiler,
            "denoiser": {"name": "stable-diffusion", "pretrained": "syncengine:tiny-random"},
            "sync": {"weight": 0}, "requests": [{"prompt": "a photo of a mountain"}]}


def _regions(mask: dict) -> dict:
    return {"name": "regions", "window": 64, "stride": 32, "regions": [{"mask": mask, "prompt": "a balloon"}]}


# --------------------------------------------------------------------------------- 1. decompression bombs


@pytest.mark.parametrize("size, needle", [(12000, "is 12000x12000 px (144 MP), more than the 89 MP"),
                                          (20000, "is too large (Image size (400000000 pixels) exceeds")])
@pytest.mark.parametrize("source", ["png", "mask_layout", "layout"])
def test_oversized_mask_or_layout_is_refused_from_its_header(tmp_path, capsys, size, needle, source):
    # 12000^2 is over PIL's warning limit (our check, from the header); 20000^2 over twice it (Image.open refuses).
    big = str(header_only_png(tmp_path / "big.png", size, size))
    tiler = {"png": _regions({"png": big}), "mask_layout": _regions({"layout": big, "color": "#ff0000"}),
             "layout": {"name": "regions", "window": 64, "stride": 32, "layout": big,
                        "prompts": {"#ff0000": "a balloon"}}}[source]
    line = _config(tmp_path, _spec(tiler), capsys=capsys)
    assert big in line and needle in line and "resize it" in line


def test_the_size_limit_grows_with_very_large_canvases(tmp_path):
    from syncengine_regions import masks

    big = str(header_only_png(tmp_path / "big.png", 12000, 12000))
    with pytest.raises(ConfigError, match="144 MP"):
        masks.load_image(big, "k", canvas_pixels=64 * 128)
    # for a 40 MP canvas, 144 MP is within 4x the canvas: the header passes and decoding (of no data) is what fails
    with pytest.raises(ConfigError, match="cannot read image"):
        masks.load_image(big, "k", canvas_pixels=40_000_000)
    assert masks.max_image_pixels(0) == Image.MAX_IMAGE_PIXELS  # PIL's own default limit


@pytest.mark.parametrize("size, needle", [(12000, "12000x12000 px (144 MP)"), (20000, "400000000 pixels")])
def test_oversized_condition_image_is_refused_from_its_header(tmp_path, size, needle):
    from syncengine_controlnet.conditions import load_image

    big = header_only_png(tmp_path / "big.png", size, size)
    with pytest.raises(SyncEngineError, match="condition image") as info:
        load_image(big, "condition image", canvas_pixels=64 * 160)
    message = str(info.value)
    assert "\n" not in message and str(big) in message and needle in message and "resize it" in message


def test_one_opener_and_one_limit_rule_for_masks_conditions_and_evaluate(tmp_path, monkeypatch):
    """Masks, layouts, condition images and evaluate all open images through syncengine.images: the limit rule set
    there applies to every plugin reader, and a damaged file reads the same everywhere."""
    from syncengine import images
    from syncengine.evaluation import runs
    from syncengine_controlnet import conditions
    from syncengine_regions import masks

    small = tmp_path / "small.png"
    Image.new("RGB", (16, 16)).save(small)
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ConfigError, match="16x16 px .* more than the 0 MP read for this canvas"):
        masks.load_image(str(small), "k")
    with pytest.raises(SyncEngineError, match="^c: image .*16x16 px"):
        conditions.load_image(small, "c")
    assert runs.load_image(small).shape == (3, 16, 16)  # evaluate keeps PIL's own limit (any canvas it made)
    monkeypatch.undo()
    bad = damaged(tmp_path / "bad.png", "truncated")
    messages = []
    for read in (lambda: masks.load_image(str(bad), "k"), lambda: conditions.load_image(bad, "c"),
                 lambda: runs.load_image(bad)):
        with pytest.raises(SyncEngineError) as info:
            read()
        messages.append(str(info.value).split(f"cannot read image {bad} (")[1])
    assert len(set(messages)) == 1 and "not a readable image" in messages[0]
    for module in (masks, conditions, runs):  # no copy of the rule or the error list is left behind
        assert not hasattr(module, "DECODE_ERRORS") and not hasattr(module, "MAX_IMAGE_PIXELS")


@pytest.mark.parametrize("canvas, needle", [((64, 160), "more than the 89 MP"), ((5000, 8000), "cannot read image")])
def test_condition_image_limit_grows_with_the_canvas(tmp_path, canvas, needle):
    """prepare_request gives the loader the canvas size: a 144 MP condition is refused from its header for a small
    canvas, but for a 40 MP canvas it is within 4x the canvas (only its missing pixel data then fails), as masks."""
    from types import SimpleNamespace

    from syncengine_controlnet.denoiser import ControlNetDenoiser, ControlNetUnit

    big = header_only_png(tmp_path / "big.png", 12000, 12000)
    den = SimpleNamespace(config=SimpleNamespace(controlnets=[ControlNetUnit(model="m", image=str(big))]),
                          preprocessors=[None])
    height, width = canvas
    with pytest.raises(SyncEngineError, match="condition image of denoiser.controlnets.0") as info:
        ControlNetDenoiser.prepare_request(den, SimpleNamespace(inputs={}), SimpleNamespace(height=height,
                                                                                           width=width))
    assert needle in str(info.value) and str(big) in str(info.value)


# ---------------------------------------------------------------------------------- 2. damaged or non-image


@pytest.mark.parametrize("kind", ["text", "truncated", "ztxt"])
@pytest.mark.parametrize("source", ["png", "mask_layout", "layout"])
def test_damaged_mask_or_layout_is_one_line_naming_the_file(tmp_path, capsys, kind, source):
    bad = str(damaged(tmp_path / "bad.png", kind))
    tiler = {"png": _regions({"png": bad}), "mask_layout": _regions({"layout": bad, "color": "#ff0000"}),
             "layout": {"name": "regions", "window": 64, "stride": 32, "layout": bad,
                        "prompts": {"#ff0000": "a balloon"}}}[source]
    line = _config(tmp_path, _spec(tiler), capsys=capsys)
    assert f"cannot read image {bad} (" in line and "tiler." in line


def test_mask_modes_pil_cannot_convert_and_16_bit_masks(tmp_path):
    from syncengine_regions.masks import MaskConfig, load_mask

    lab = tmp_path / "lab.tif"
    Image.new("LAB", (8, 8)).save(lab)  # PIL has no LAB -> grey conversion
    with pytest.raises(ConfigError, match=f"cannot read image {lab} .*conversion"):
        load_mask(MaskConfig(png=str(lab)), 16, 16, "k")
    # a 16-bit grey PNG keeps its range: half of 65535 is a half-covered mask, not a full one (convert("L") clips)
    half = tmp_path / "half.png"
    Image.fromarray(np.full((8, 8), 32768, np.uint16)).save(half)
    assert Image.open(half).mode == "I;16"
    soft = load_mask(MaskConfig(png=str(half), threshold=None), 16, 16, "k")
    assert soft.max().item() == pytest.approx(32768 / 65535)


@pytest.mark.parametrize("kind", ["text", "truncated", "ztxt"])
def test_damaged_condition_image_is_one_line_naming_the_file(tmp_path, kind):
    from syncengine_controlnet.conditions import load_image

    bad = damaged(tmp_path / "bad.png", kind)
    with pytest.raises(SyncEngineError, match="not a readable image") as info:
        load_image(bad, "condition image of denoiser.controlnets.0")
    assert "\n" not in str(info.value) and str(bad) in str(info.value)


# ------------------------------------------------------------------------------------ 3. degenerate tilers


SPHERE = {"name": "perspective", "window": 32}


@pytest.mark.parametrize("tiler, overrides, needle", [
    (SPHERE, ["tiler.window=0"], "'tiler.window': must be positive, got 0"),
    (SPHERE, ["tiler.window=-32"], "'tiler.window': must be positive, got -32"),
    (SPHERE, ["tiler.window=4"], "'tiler.window': 4 px is not a multiple of the latent factor 8"),
    ({"name": "cubemap", "window": 32}, ["tiler.window=0"], "'tiler.window': must be positive"),
    (SPHERE, ["tiler.views_per_ring=0"], "'tiler.views_per_ring': must be >= 1, got 0"),
    (SPHERE, ["tiler.views_per_ring=-2"], "'tiler.views_per_ring': must be >= 1, got -2"),
    (SPHERE, ["tiler.fov=0"], "'tiler.fov': must be in (0, 180)"),
    (SPHERE, ["tiler.fov=180"], "'tiler.fov': must be in (0, 180)"),
    (SPHERE, ["tiler.pitches=[0,120]"], "'tiler.pitches.1': must be in [-90, 90] degrees, got 120"),
    (SPHERE, ["tiler.pitches=[]"], "'tiler.pitches': no views"),
    (SPHERE, ["tiler.export_size=-1"], "'tiler.export_size': must be >= 0"),
    ({"name": "sliding", "window": 64, "stride": 32}, ["tiler.window=0"], "'tiler.window': must be positive"),
    ({"name": "sliding", "window": 64, "stride": 32}, ["tiler.stride=0"], "'tiler.stride': must be positive"),
    ({"name": "sliding", "window": 64, "stride": 32}, ["tiler.stride=-8"], "'tiler.stride': must be positive"),
    ({"name": "sliding", "window": 64, "stride": 32}, ["tiler.window_height=0"], "'tiler.window_height': must be"),
    ({"name": "sliding", "window": 64, "stride": 32}, ["tiler.stride_height=-8"], "'tiler.stride_height': must be"),
    (_regions({"rect": [0, 0, 8, 8]}), ["tiler.window=0"], "'tiler.window': must be positive"),
    (_regions({"rect": [0, 0, 8, 8]}), ["tiler.stride=-8"], "'tiler.stride': must be positive"),
])
def test_degenerate_tiler_options_are_config_errors(tmp_path, capsys, tiler, overrides, needle):
    assert needle in _config(tmp_path, _spec(tiler), *overrides, capsys=capsys)


def test_poles_alone_are_still_a_valid_ring_configuration():
    from syncengine.views import CanvasSpec
    from syncengine_spherical.tilers import PerspectiveTiler

    tiler = PerspectiveTiler(PerspectiveTiler.Config(window=32, pitches=[], poles=True))
    tiler.validate(CanvasSpec(64, 128))
    assert len(tiler.views(CanvasSpec(64, 128))) == 2


# ------------------------------------------------------------------------------------------------ 4. evaluate


def _run(folder: Path, n: int = 3) -> Path:
    torch.manual_seed(0)
    for k in range(n):
        write_panorama(folder, f"{k:03d}", tiled(torch.rand(3, 32, 32), 4))
    return folder


def test_evaluate_skips_damaged_images_with_one_line_each(tmp_path, caplog):
    run = _run(tmp_path / "a")
    damaged(run / "001.png", "truncated")
    out = tmp_path / "report"
    assert main(["evaluate", str(run), "--metrics", "intra_lpips", "--backbone", "random", "--no-plot",
                 "--out", str(out)]) == 0
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]  # stderr, via logging
    assert len(skipped) == 1 and str(run / "001.png") in skipped[0] and "not a readable image" in skipped[0]
    (result,) = json.loads((out / "metrics.json").read_text())["runs"]
    assert result["images"] == 2 and list(result["skipped"]) == [str(run / "001.png")]
    assert len(result["per_image"]["intra_lpips"]) == 2


def test_evaluate_skips_damaged_reference_images_and_fails_on_a_folder_with_none_readable(tmp_path, capsys):
    from _evaluation_helpers import TinyFeatures

    from syncengine.evaluation import EvalOptions, evaluate

    run, ref = _run(tmp_path / "a"), _run(tmp_path / "ref", 3)
    damaged(ref / "000.png", "ztxt")
    (r,) = evaluate([run], EvalOptions(metrics=["fid"], reference=str(ref)), features=TinyFeatures())
    assert np.isfinite(r.metrics["fid"])
    for k in range(3):
        damaged(run / f"{k:03d}.png", "truncated")
    code = main(["evaluate", str(run), "--metrics", "intra_lpips", "--backbone", "random", "--out",
                 str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and "error: no readable images in" in err and "Traceback" not in err


def test_evaluate_out_naming_a_file_fails_before_any_metric(tmp_path, capsys, monkeypatch):
    from syncengine.evaluation import runner

    def no_metrics(*args, **kwargs):
        raise AssertionError("metrics computed before --out was checked")

    monkeypatch.setattr(runner, "evaluate", no_metrics)
    run = _run(tmp_path / "a", 1)
    taken = tmp_path / "taken"
    taken.write_text("a file")
    for out in (taken, taken / "inside"):
        code = main(["evaluate", str(run), "--backbone", "random", "--out", str(out)])
        err = capsys.readouterr().err
        assert code == 2 and f"'{taken}' is a file, not a folder" in err and "Traceback" not in err, err
    (tmp_path / "r" / "metrics.csv").mkdir(parents=True)
    assert main(["evaluate", str(run), "--backbone", "random", "--out", str(tmp_path / "r")]) == 2
    assert "metrics.csv is a folder there" in capsys.readouterr().err


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """Every socket connection or name lookup is recorded and refused; empty torch and Hugging Face caches."""
    attempts: list[str] = []

    def refuse(*args, **kwargs):
        attempts.append(repr(args[:2]))
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):  # our checks, not an offline switch, must stop it
        monkeypatch.delenv(var, raising=False)
    return attempts


@pytest.mark.parametrize("options, needle", [
    (["--metrics", "intra_lpips"], "ImageNet weights of the alex backbone are not in the torch cache"),
    (["--metrics", "intra_lpips", "--lpips-net", "vgg"], "vgg backbone are not in the torch cache"),
    (["--metrics", "intra_style"], "vgg16 backbone are not in the torch cache"),
    (["--metrics", "clip"], "not in the local Hugging Face cache; evaluate reads only local files"),
    (["--metrics", "fid", "--inception", "torchvision"], "Inception-v3 weights are not in the torch cache"),
    (["--metrics", "fid"], "weights-inception-2015-12-05"),
])
def test_evaluate_never_downloads(tmp_path, capsys, no_network, options, needle):
    run = _run(tmp_path / "a", 2)
    code = main(["evaluate", str(run), "--reference", str(run), "--clip-model", "syncengine-tests/uncached-clip",
                 "--out", str(tmp_path / "r"), *options])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and "Traceback" not in err, err
    assert no_network == []


def test_evaluate_with_an_empty_cache_reports_every_model_unavailable_offline(tmp_path, capsys, no_network):
    run = _run(tmp_path / "a", 2)
    code = main(["evaluate", str(run), "--reference", str(run), "--clip-model", "syncengine-tests/uncached-clip",
                 "--inception", "torchvision", "--out", str(tmp_path / "r"), "--no-plot"])
    out = capsys.readouterr().out
    assert code == 0 and no_network == []
    for metric in ("Intra-LPIPS", "Intra-Style-L", "Mean-CLIP-S", "FID", "KID"):
        assert f"{metric}: unavailable:" in out


def test_a_cached_clip_hub_id_loads_from_the_cache_folder_without_the_network(tmp_path, monkeypatch, no_network):
    """A hub id is resolved to its snapshot folder on disk; transformers never sees the id (it would reach the hub
    for request headers even with local_files_only)."""
    import huggingface_hub.constants
    from _evaluation_helpers import build_tiny_clip

    from syncengine.evaluation.clip import ClipScorer

    repo = tmp_path / "hub" / "models--someone--tiny-clip"
    build_tiny_clip(repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    scorer = ClipScorer("someone/tiny-clip")
    assert scorer.score(torch.rand(1, 3, 32, 32), ["a photo"]).shape == (1,)
    assert no_network == []


@pytest.mark.parametrize("net", ["alex", "vgg", "squeeze"])
def test_evaluate_names_the_backbone_weights_url_through_the_public_helper(tmp_path, monkeypatch, net):
    """evaluate's missing-weights error gives the URL from the losses' public weights_url (torchvision's own)."""
    from types import SimpleNamespace

    import torchvision.models as tvm

    from syncengine.errors import ModelNotFoundError
    from syncengine.evaluation.metrics import require_cached_backbone
    from syncengine.registry import get
    from syncengine_losses.backbones import checkpoint_path, weights_url

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    url = {"alex": tvm.AlexNet_Weights, "vgg": tvm.VGG16_Weights, "squeeze": tvm.SqueezeNet1_1_Weights}[net]
    assert weights_url(net) == url.IMAGENET1K_V1.url and checkpoint_path(net).name == Path(weights_url(net)).name
    with pytest.raises(ModelNotFoundError, match=f"fetch {weights_url(net)} into that folder"):
        require_cached_backbone(get("sync_loss", "lpips"), SimpleNamespace(backbone="pretrained", net=net))
