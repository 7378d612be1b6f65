"""Shared fixtures: tiny random-weight models built by the tests and saved locally, loaded through the engine's own
loaders (never a fake). Nothing here downloads anything."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from _specs import spec_maker

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> Path:
    """A tiny random SD pipeline folder (epsilon prediction), saved with save_pretrained."""
    from syncengine_sd.tiny import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd", seed=0)


@pytest.fixture(scope="session")
def tiny_sd_v(tmp_path_factory) -> Path:
    """The same tiny pipeline configured for v-prediction."""
    from syncengine_sd.tiny import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd-v", seed=0, prediction_type="v_prediction")


@pytest.fixture(scope="session")
def torch_home(tmp_path_factory) -> Path:
    """A TORCH_HOME whose hub cache holds random-weight vgg16/alexnet state dicts under torchvision's file names,
    so LPIPS and the style loss go through torchvision's real loading path."""
    import torchvision.models as tvm

    home = tmp_path_factory.mktemp("torch_home")
    ckpt = home / "hub" / "checkpoints"
    ckpt.mkdir(parents=True)
    torch.manual_seed(0)
    models = ((tvm.vgg16, tvm.VGG16_Weights.IMAGENET1K_V1), (tvm.alexnet, tvm.AlexNet_Weights.IMAGENET1K_V1))
    for builder, weights in models:
        torch.save(builder(weights=None).state_dict(), ckpt / Path(weights.url).name)
    return home


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``): the tiny models'
    kernels are too small to share, and on a busy 2-core machine two OpenMP threads spin (a decode and its backward
    took 1.6 s instead of 0.02 s). Both sides of every comparison in the module run under it; restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def with_torch_home(torch_home, monkeypatch) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    return torch_home


@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt (name lookup or connect) fails at once: proves a code path never reaches a hub."""
    import socket

    def refuse(*args, **kwargs):
        raise OSError("network access is disabled in this test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture
def tiny_spec(tiny_sd, tmp_path):
    """A small, fast spec dict on the tiny model (tests override what they need)."""
    return spec_maker({"name": "stable-diffusion", "pretrained": str(tiny_sd)},
                      {"scheduler": "ddim", "guidance_scale": 7.5}, tmp_path)
