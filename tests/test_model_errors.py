"""Damaged models and caches are one-line errors naming the file and the fix (issue 13): a local diffusers folder with a
truncated, garbage or missing file or a bad model_index.json, a broken single-file checkpoint, a damaged tiny-model
cache (rebuilt once), an unusable SYNCENGINE_CACHE, a damaged LPIPS/VGG backbone file, ControlNet and MVDiffusion
files, and a denoiser.device this machine does not have. Everything is built from the tiny random models and damaged
on disk; the real loaders run."""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
from _controlnet_helpers import tiny_controlnet  # noqa: F401 - a fixture

from syncengine.errors import ConfigError, ModelNotFoundError, SyncEngineError
from syncengine_sd.denoiser import StableDiffusionConfig, StableDiffusionDenoiser
from syncengine_sd.loading import TINY_MODEL
from syncengine_sd.model_files import file_problem

UNET = "unet/diffusion_pytorch_model.safetensors"


def truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def garbage(path: Path, size: int | None = None) -> Path:
    data = random.Random(0).randbytes(size or path.stat().st_size)
    path.write_bytes(b"\x00" + data[1:])  # deterministic, and never a pickle opcode first
    return path


def one_line_error(info) -> str:
    msg = str(info.value)
    assert "\n" not in msg, msg
    return msg


@pytest.fixture
def copy_of(tmp_path):
    def copy(folder: Path, name: str = "model") -> Path:
        return Path(shutil.copytree(folder, tmp_path / name))

    return copy


# -------------------------------------------------------------------------------------- 1. damaged local folders


def _index_edit(change):
    def edit(folder: Path):
        index = json.loads((folder / "model_index.json").read_text())
        (folder / "model_index.json").write_text(json.dumps(change(index)))

    return edit


DAMAGE = {
    "unet weights truncated": (UNET, lambda f: truncate(f / UNET), "is truncated"),
    "unet weights garbage": (UNET, lambda f: garbage(f / UNET), "is not a safetensors file"),
    "text encoder truncated": ("text_encoder/model.safetensors",
                               lambda f: truncate(f / "text_encoder/model.safetensors"), "is truncated"),
    "vae weights missing": ("vae/diffusion_pytorch_model.safetensors",
                            lambda f: (f / "vae/diffusion_pytorch_model.safetensors").unlink(), "is missing"),
    "unet config not json": ("unet/config.json", lambda f: (f / "unet/config.json").write_text("{oops"),
                             "is not valid JSON"),
    "tokenizer not json": ("tokenizer/tokenizer.json", lambda f: (f / "tokenizer/tokenizer.json").write_text("{oops"),
                           "is not valid JSON"),
    "index not json": ("model_index.json", lambda f: (f / "model_index.json").write_text("{oops"), "is not valid JSON"),
    "index a list": ("model_index.json", lambda f: (f / "model_index.json").write_text("[1, 2]"),
                     "is not a JSON object"),
    "index unknown class": ("model_index.json", _index_edit(lambda i: {**i, "unet": ["diffusers", "NoSuchUNet"]}),
                            "names an unknown component 'unet'"),
    "index unknown library": ("model_index.json", _index_edit(lambda i: {**i, "vae": ["nosuchlib", "VAE"]}),
                              "names an unknown component 'vae'"),
    "index without unet": ("model_index.json", _index_edit(lambda i: {k: v for k, v in i.items() if k != "unet"}),
                           "lists no unet component"),
    "component folder missing": ("unet", lambda f: shutil.rmtree(f / "unet"), "is missing"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_model_folder_names_the_file_and_the_fix(case, tiny_sd, copy_of, no_network):
    rel, damage, problem = DAMAGE[case]
    folder = copy_of(tiny_sd)
    damage(folder)
    with pytest.raises(ModelNotFoundError) as info:
        StableDiffusionDenoiser(StableDiffusionConfig(pretrained=str(folder)))
    msg = one_line_error(info)
    assert f"{str(folder / rel)!r} {problem}" in msg, msg
    assert "save_pretrained" in msg and "download the model again" in msg
    assert "huggingface-cli" not in msg  # no hub advice for a local folder


def test_damaged_model_folder_through_the_cli_exits_2(tiny_sd, copy_of, tiny_spec, tmp_path, capsys, no_network):
    from omegaconf import OmegaConf

    from syncengine.cli import main

    folder = copy_of(tiny_sd)
    truncate(folder / UNET)
    spec = tmp_path / "spec.yaml"
    OmegaConf.save(OmegaConf.create(tiny_spec(denoiser={"name": "stable-diffusion", "pretrained": str(folder)})), spec)
    assert main(["generate", str(spec)]) == 2
    err = capsys.readouterr().err
    assert f"{str(folder / UNET)!r} is truncated" in err and "Traceback" not in err


def test_damaged_file_in_the_hub_cache_is_named(tiny_sd, tmp_path, monkeypatch, no_network):
    """A hub id whose cached snapshot has a truncated file (an interrupted download): the file, and how to fetch it
    again, instead of 'download it'."""
    import huggingface_hub.constants as hf

    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--tiny"
    snapshot = Path(shutil.copytree(tiny_sd, repo / "snapshots" / revision))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    truncate(snapshot / UNET)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError) as info:
        StableDiffusionDenoiser(StableDiffusionConfig(pretrained="someone/tiny"))
    msg = one_line_error(info)
    assert f"{str(snapshot / UNET)!r} is truncated" in msg and "--force-download" in msg, msg


# ------------------------------------------------------------------------------------------ 2. single-file checkpoints


@pytest.fixture(scope="module")
def ldm_file(tiny_sd, tmp_path_factory) -> Path:
    """The tiny model as one valid original-format (LDM) .safetensors checkpoint."""
    from _ldm_checkpoint import pipeline_to_ldm
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("single") / "tiny-sd.safetensors"
    save_file(pipeline_to_ldm(StableDiffusionPipeline.from_pretrained(str(tiny_sd))), str(path))
    return path


def _ckpt_of(safetensors_file: Path, out: Path) -> Path:
    from safetensors.torch import load_file

    torch.save({"state_dict": load_file(str(safetensors_file))}, out)
    return out


SINGLE = {
    "safetensors truncated": (".safetensors", "truncate", "is truncated"),
    "safetensors garbage": (".safetensors", "garbage", "is not a safetensors file"),
    "ckpt truncated": (".ckpt", "truncate", "is truncated or corrupt (not a complete zip archive"),
    "ckpt garbage": (".ckpt", "garbage", "is not a checkpoint"),
    "empty": (".safetensors", "empty", "is empty"),
}


@pytest.mark.parametrize("config", [False, True], ids=["no-config", "with-config"])
@pytest.mark.parametrize("case", list(SINGLE))
def test_broken_single_file_is_not_a_valid_checkpoint(case, config, ldm_file, tiny_sd, tmp_path, no_network):
    suffix, how, problem = SINGLE[case]
    path = tmp_path / f"model{suffix}"
    if suffix == ".ckpt":
        _ckpt_of(ldm_file, path)
    else:
        shutil.copy(ldm_file, path)
    {"truncate": truncate, "garbage": garbage, "empty": lambda p: p.write_bytes(b"")}[how](path)
    options = {"single_file_config": str(tiny_sd)} if config else {}
    with pytest.raises(ModelNotFoundError) as info:
        StableDiffusionDenoiser(StableDiffusionConfig(pretrained=str(path), **options))
    msg = one_line_error(info)
    assert f"{str(path)!r} is not a valid, complete checkpoint: it {problem}" in msg, msg
    assert "download it again" in msg
    assert "single_file_config" not in msg  # the configs are not what is wrong


def test_checkpoint_of_another_model_says_what_it_lacks(tiny_sd, tmp_path, no_network):
    """A sound file that is no SD checkpoint: with a config, diffusers finds no weights for a component; without
    one, it cannot configure the architecture offline (the only case that needs single_file_config)."""
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"some.weight": torch.zeros(3)}, str(path))
    with pytest.raises(ModelNotFoundError) as info:
        StableDiffusionDenoiser(StableDiffusionConfig(pretrained=str(path), single_file_config=str(tiny_sd)))
    msg = one_line_error(info)
    assert "does not hold the weights" in msg and "not a valid" not in msg, msg
    with pytest.raises(ModelNotFoundError) as info:
        StableDiffusionDenoiser(StableDiffusionConfig(pretrained=str(path)))
    msg = one_line_error(info)
    assert "its pipeline's configs could not be fetched" in msg and "set denoiser.single_file_config" in msg, msg


# -------------------------------------------------------------------------------------------- 3. the tiny-model cache


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("SYNCENGINE_CACHE", str(root))
    return root


def test_damaged_tiny_cache_is_rebuilt_once(cache, tiny_sd, caplog, no_network):
    from syncengine.config import resolve
    from syncengine.pipeline import Pipeline

    folder = cache / "tiny-random-sd-v1"
    shutil.copytree(tiny_sd, folder)  # what tiny_model_path builds (seed 0), then damaged
    truncate(folder / UNET)
    (cache / "tiny-random-sd-v1.partial-999-dead").mkdir()  # left by a builder that died
    spec = {"canvas": {"height": 64, "width": 64}, "tiler": {"name": "sliding", "window": 64, "stride": 64},
            "denoiser": {"name": "stable-diffusion", "pretrained": TINY_MODEL},
            "sync": {"loss": {"name": "lpips", "net": "alex", "backbone": "random"}, "weight": 0.0},
            "sampler": {"steps": 1}, "requests": [{"prompt": "a hill", "seed": 0}],
            "runtime": {"accelerator": "cpu", "output_dir": str(cache.parent / "out"), "progress": False}}
    with caplog.at_level(logging.WARNING):
        result = Pipeline(resolve(spec)).run(0)
    assert torch.isfinite(result.image).all()
    rebuilt = [r.getMessage() for r in caplog.records if "rebuilding" in r.getMessage()]
    assert len(rebuilt) == 1 and "is truncated" in rebuilt[0] and "\n" not in rebuilt[0]
    assert file_problem(folder / UNET) is None
    assert sorted(p.name for p in cache.iterdir() if not p.name.startswith(".")) == ["tiny-random-sd-v1"]


def test_concurrent_tiny_cache_builders_build_once(cache, tiny_sd, monkeypatch):
    """Two builders at once (threads here; the lock is a file lock, so processes alike): one builds, the other waits
    and uses its folder; a rebuild requested by both for the same damaged folder happens once."""
    from syncengine_sd import tiny

    builds = []

    def slow_build(path, **kwargs):  # the real build's atomic rename, with a copy for the (slow) model building
        builds.append(path)
        time.sleep(0.3)
        part = path.with_name(f"{path.name}.partial-{len(builds)}")
        shutil.copytree(tiny_sd, part)
        tiny._replace_folder(part, path)
        return path

    monkeypatch.setattr(tiny, "build_tiny_pipeline", slow_build)

    def both(**kwargs):
        out: list = []
        threads = [threading.Thread(target=lambda: out.append(tiny.tiny_model_path(**kwargs))) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return out

    first = both()
    assert len(builds) == 1 and first == [cache / "tiny-random-sd-v1"] * 2
    stamp = tiny.cache_stamp(first[0])
    both(rebuild_from=stamp)
    assert len(builds) == 2 and tiny.cache_stamp(first[0]) != stamp
    assert (first[0] / "model_index.json").is_file()


def test_cache_that_is_a_file_is_a_clear_error(tmp_path, monkeypatch, tiny_spec, capsys):
    from omegaconf import OmegaConf

    from syncengine.cli import main

    cache = tmp_path / "cache"
    cache.write_text("not a folder")
    monkeypatch.setenv("SYNCENGINE_CACHE", str(cache))
    spec = tmp_path / "spec.yaml"
    OmegaConf.save(OmegaConf.create(tiny_spec(denoiser={"name": "stable-diffusion", "pretrained": TINY_MODEL})), spec)
    assert main(["generate", str(spec)]) == 2
    err = capsys.readouterr().err
    assert f"SYNCENGINE_CACHE={str(cache)!r} is a file, not a folder" in err and "writable folder" in err, err
    assert "Traceback" not in err and cache.read_text() == "not a folder"


def test_cache_that_cannot_be_written_is_a_clear_error(tmp_path, monkeypatch):
    from syncengine_sd.tiny import tiny_model_path

    if os.geteuid() == 0:  # root writes through permissions; procfs refuses new entries even to root
        cache = Path("/proc/syncengine-cache")
    else:
        cache = tmp_path / "read-only"
        cache.mkdir()
        cache.chmod(0o555)
    monkeypatch.setenv("SYNCENGINE_CACHE", str(cache))
    with pytest.raises(SyncEngineError) as info:
        tiny_model_path()
    msg = one_line_error(info)
    assert f"SYNCENGINE_CACHE={str(cache)!r} cannot be written" in msg and "writable folder" in msg, msg


# -------------------------------------------------------------------------------------------- 4. backbone files


@pytest.mark.parametrize("damage", ["truncated", "garbage", "not these weights"])
def test_damaged_backbone_file_is_named_never_random(damage, tmp_path, monkeypatch):
    import torchvision.models as tvm

    from syncengine_losses.lpips_loss import LPIPSConfig, LPIPSLoss

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    net, weights = ("vgg", tvm.VGG16_Weights) if damage == "truncated" else ("alex", tvm.AlexNet_Weights)
    path = tmp_path / "hub" / "checkpoints" / Path(weights.IMAGENET1K_V1.url).name
    path.parent.mkdir(parents=True)
    torch.save({"features.0.weight": torch.zeros(8, 3, 3, 3)}, path)  # small: its damage is what matters
    if damage == "truncated":
        truncate(path)
    elif damage == "garbage":
        garbage(path, 4096)
    with pytest.raises(ModelNotFoundError) as info:
        LPIPSLoss(LPIPSConfig(net=net))
    msg = one_line_error(info)
    expected = {"truncated": "is truncated or corrupt", "garbage": "is not a checkpoint",
                "not these weights": "could not be loaded"}[damage]
    assert f"{path} {expected}" in msg and "delete it" in msg and weights.IMAGENET1K_V1.url in msg, msg


# ---------------------------------------------------------------------------------------- 5. ControlNet, MVDiffusion


def test_damaged_controlnet_folder_and_file(tiny_controlnet, copy_of, tmp_path, no_network):  # noqa: F811
    from syncengine_controlnet.loading import load_controlnet

    key = "denoiser.controlnets.0.model"
    folder = copy_of(tiny_controlnet)
    weights = folder / "diffusion_pytorch_model.safetensors"
    truncate(weights)
    with pytest.raises(ModelNotFoundError) as info:
        load_controlnet(str(folder), key, torch.float32)
    msg = one_line_error(info)
    assert f"{str(weights)!r} is truncated" in msg and key in msg and "save_pretrained" in msg, msg
    single = garbage(tmp_path / "control.safetensors", 4096)
    with pytest.raises(ModelNotFoundError) as info:
        load_controlnet(str(single), key, torch.float32, single_file_config=str(tiny_controlnet))
    msg = one_line_error(info)
    assert "is not a valid, complete checkpoint: it is not a safetensors file" in msg and key in msg, msg
    assert "single_file_config" not in msg


def test_damaged_mvdiffusion_weights(tiny_sd, copy_of, tmp_path, no_network):
    from syncengine_mvdiffusion.denoiser import MVDiffusionConfig, MVDiffusionDenoiser
    from syncengine_mvdiffusion.loading import read_state_dict
    from syncengine_mvdiffusion.tiny import add_random_blocks

    folder = add_random_blocks(copy_of(tiny_sd), seed=1)
    blocks = folder / "correspondence_attention" / "model.safetensors"
    truncate(blocks)
    with pytest.raises(ModelNotFoundError) as info:
        MVDiffusionDenoiser(MVDiffusionConfig(pretrained=str(folder)))
    msg = one_line_error(info)
    assert f"{str(blocks)!r} is truncated" in msg and "save_pretrained" in msg, msg
    config = folder / "correspondence_attention" / "config.json"
    config.write_text("{oops")
    with pytest.raises(ModelNotFoundError, match="config.json' is not valid JSON"):
        MVDiffusionDenoiser(MVDiffusionConfig(pretrained=str(folder)))

    ckpt = tmp_path / "pano.ckpt"
    torch.save({"state_dict": {"mv_base_model.unet.conv_in.weight": torch.zeros(4, 4, 3, 3)}}, ckpt)
    truncate(ckpt)
    with pytest.raises(ModelNotFoundError) as info:
        read_state_dict(ckpt)
    msg = one_line_error(info)
    assert "is not a valid, complete checkpoint: it is truncated or corrupt" in msg and "pano.ckpt" in msg, msg
    garbage(ckpt, 4096)  # was refused as "holds Python objects beyond tensors"
    with pytest.raises(ModelNotFoundError, match="it is not a checkpoint") as info:
        read_state_dict(ckpt)
    assert "trust_checkpoint" not in str(info.value)


# ----------------------------------------------------------------------------------------------- denoiser.device


@pytest.mark.parametrize("device", ["cuda:99", "cuda", "gpu"])
def test_unavailable_device_is_a_config_error_before_loading(device, tiny_spec):
    from syncengine.config import resolve

    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError) as info:
        resolve(tiny_spec(denoiser={"name": "stable-diffusion", "pretrained": "/nowhere", "device": device}))
    msg = one_line_error(info)
    assert info.value.key == "denoiser.device" and f"{device!r} is not" in msg and "cpu" in msg, msg
    assert ("available: cpu" in msg) if device != "gpu" else ("one of: cpu" in msg)


def test_unavailable_device_through_the_cli_exits_2(tiny_spec, tmp_path, capsys):
    from omegaconf import OmegaConf

    from syncengine.cli import main

    spec = tmp_path / "spec.yaml"
    OmegaConf.save(OmegaConf.create(tiny_spec(denoiser={"name": "stable-diffusion", "device": "cuda:99"})), spec)
    assert main(["config", str(spec)]) == 2
    err = capsys.readouterr().err
    assert "denoiser.device" in err and "'cuda:99' is not available on this machine" in err, err
