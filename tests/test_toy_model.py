"""The shipped toy-world model (``pretrained: syncengine:toy``): its files are the ones trained, it loads through the
engine's own loader and samples a panorama, the training script runs and is deterministic, and a missing or damaged
shipped folder is a one-line error."""
from __future__ import annotations

import hashlib
import importlib.resources
import json
import shutil
from pathlib import Path

import pytest
import torch

from syncengine.errors import ModelNotFoundError
from syncengine_sd.loading import TOY_MODEL, toy_model_path

SHIPPED = Path(__file__).resolve().parents[1] / "plugins" / "syncengine_toy" / "weights" / "toy-v1"
LIMIT_BYTES = 20 * 1024 * 1024


pytestmark = pytest.mark.usefixtures("one_thread")


def test_shipped_files_match_their_checksums():
    listed = {}
    for line in (SHIPPED / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split("  ", 1)
        listed[name] = digest
    present = {p.relative_to(SHIPPED).as_posix() for p in SHIPPED.rglob("*") if p.is_file()} - {"SHA256SUMS"}
    assert set(listed) == present, "SHA256SUMS lists exactly the folder's files"
    for name, digest in listed.items():
        assert hashlib.sha256((SHIPPED / name).read_bytes()).hexdigest() == digest, name
    assert sum((SHIPPED / name).stat().st_size for name in listed) <= LIMIT_BYTES
    assert all(not name.endswith((".bin", ".pt", ".ckpt")) for name in listed), "safetensors only"


def test_shipped_settings_are_recorded():
    record = json.loads((SHIPPED / "training.json").read_text())
    assert record["script"]["commit"]
    for key in ("settings", "vae", "unet", "minutes", "world", "reproduce"):
        assert key in record
    assert record["unet"]["final_loss"] is not None and record["vae"]["final_rec_loss"] is not None
    assert set(record["world"]["looks"]) == {"day", "sunset", "night", "snow"}


def test_name_resolves_to_the_package_folder():
    assert toy_model_path() == SHIPPED


def test_toy_model_generates_a_panorama(tmp_path):
    """Through the normal loader and pipeline: a 2.5-window panorama, finite, the canvas's shape (the model's latent
    factor is the one the engine sizes canvases with)."""
    from syncengine.config import resolve
    from syncengine.pipeline import Pipeline

    spec = {
        "canvas": {"height": 128, "width": 320},
        "tiler": {"name": "sliding", "window": 128, "stride": 64},
        "merger": {"name": "average"},
        "denoiser": {"name": "stable-diffusion", "pretrained": TOY_MODEL},
        "sync": {"loss": {"name": "lpips", "net": "alex", "backbone": "random"}, "weight": 0.0},
        "sampler": {"scheduler": "ddim", "steps": 3, "guidance_scale": 4.0, "view_batch_size": 4},
        "requests": [{"prompt": "a snowy landscape", "seed": 0, "name": "toy"}],
        "runtime": {"accelerator": "cpu", "devices": 1, "output_dir": str(tmp_path / "out"), "progress": False},
    }
    resolved = resolve(spec)
    pipe = Pipeline(resolved)
    result = pipe.run(0)
    denoiser = pipe.denoiser_for(resolved)
    assert denoiser.latent_factor == 8 and denoiser.default_window == 128
    assert result.image.shape == (3, 128, 320)
    assert result.latents.shape == (1, 4, 16, 40)
    assert torch.isfinite(result.image).all() and torch.isfinite(result.latents).all()
    assert result.image.std() > 0.01, "not a flat image"


def _point_package_at(monkeypatch, root: Path) -> None:
    """``importlib.resources.files('syncengine_toy')`` answers ``root`` (an install whose package lies there)."""
    real = importlib.resources.files

    def files(package):
        return root if package == "syncengine_toy" else real(package)

    monkeypatch.setattr(importlib.resources, "files", files)


def _load(ref: str):
    from diffusers import StableDiffusionPipeline

    from syncengine_sd.loading import load_pipeline

    return load_pipeline(StableDiffusionPipeline, ref, torch.float32)


def test_missing_shipped_folder_is_one_line(monkeypatch, tmp_path):
    _point_package_at(monkeypatch, tmp_path)
    with pytest.raises(ModelNotFoundError) as info:
        _load(TOY_MODEL)
    message = str(info.value)
    assert "\n" not in message and TOY_MODEL in message and "missing" in message
    assert "syncengine_toy.train" in message


def test_damaged_shipped_file_is_one_line(monkeypatch, tmp_path):
    folder = tmp_path / "weights" / "toy-v1"
    shutil.copytree(SHIPPED, folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated
    _point_package_at(monkeypatch, tmp_path)
    with pytest.raises(ModelNotFoundError) as info:
        _load(TOY_MODEL)
    message = str(info.value)
    assert "\n" not in message and "diffusion_pytorch_model.safetensors" in message


def test_training_script_smoke_and_determinism(tmp_path):
    """Two steps per phase on tiny networks: the folder loads through the engine's loader, its checksums hold, and the
    same settings give the same weights."""
    from syncengine_toy.train import CHECKSUMS, checksums, tiny_config, train

    record = train(tmp_path / "a", tiny_config())
    train(tmp_path / "b", tiny_config())
    assert record["vae"]["steps"] == 2 and record["unet"]["steps"] == 2
    a, b = ((tmp_path / x / CHECKSUMS).read_text().splitlines() for x in "ab")
    weights = [line for line in a if line.endswith(".safetensors")]
    assert len(weights) == 3 and set(weights) <= set(b), "same settings, same weights"
    assert (tmp_path / "a" / CHECKSUMS).read_text() == checksums(tmp_path / "a")
    pipe = _load(str(tmp_path / "a"))
    assert pipe.vae.config.scaling_factor == record["settings"]["model"]["extra"]["scaling_factor"]
    assert pipe.unet.config.sample_size == 4 and pipe.unet.config.cross_attention_dim == 16
