"""Helpers for the ControlNet tests: tiny random ControlNets built from the tiny UNet, coordinate-coded condition
images, a spy that records what each ControlNet call receives."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch


def build_tiny_controlnet(sd_folder: Path, out: Path, seed: int) -> Path:
    """``ControlNetModel.from_unet`` of a saved pipeline's UNet (the tiny SD or SDXL), saved with ``save_pretrained``.

    from_unet zero-initialises the output convolutions (a fresh ControlNet changes nothing); they are re-drawn here
    so that control has an effect the tests can see."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(sd_folder, subfolder="unet")
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 8, 16))
    g = torch.Generator().manual_seed(seed)
    zero_convs = [*net.controlnet_down_blocks, net.controlnet_mid_block, net.controlnet_cond_embedding.conv_out]
    with torch.no_grad():
        for conv in zero_convs:
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.3)
            conv.bias.copy_(torch.randn(conv.bias.shape, generator=g) * 0.1)
    net.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_controlnet(tiny_sd, tmp_path_factory) -> Path:
    return build_tiny_controlnet(tiny_sd, tmp_path_factory.mktemp("models") / "tiny-controlnet-a", seed=1)


@pytest.fixture(scope="session")
def tiny_controlnet_b(tiny_sd, tmp_path_factory) -> Path:
    return build_tiny_controlnet(tiny_sd, tmp_path_factory.mktemp("models") / "tiny-controlnet-b", seed=2)


@pytest.fixture(scope="session")
def tiny_sdxl_controlnet(tiny_sdxl, tmp_path_factory) -> Path:
    """A ControlNet of the tiny SDXL UNet (text_time added conditions), for the mixin on the SDXL denoiser."""
    return build_tiny_controlnet(tiny_sdxl, tmp_path_factory.mktemp("models") / "tiny-sdxl-controlnet", seed=3)


def coordinate_image(path: Path, height: int, width: int) -> Path:
    """A PNG whose pixel (y, x) is (x mod 256, y, x // 256): a crop's values say where it came from."""
    from PIL import Image

    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    array = torch.stack([xs % 256, ys % 256, xs // 256], -1).to(torch.uint8).numpy()
    Image.fromarray(array).save(path)
    return path


def random_image(path: Path, height: int, width: int, seed: int = 0) -> Path:
    """A random RGB PNG (a stand-in for a condition image or a photo)."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    array = torch.randint(0, 256, (height, width, 3), generator=g, dtype=torch.uint8).numpy()
    Image.fromarray(array).save(path)
    return path


def record_conditions(net) -> list[torch.Tensor]:
    """Make ``net`` record the ``controlnet_cond`` batch of every call (it still runs normally)."""
    calls: list[torch.Tensor] = []
    forward = net.forward

    def spy(*args, **kwargs):
        calls.append(kwargs["controlnet_cond"].detach().clone())
        return forward(*args, **kwargs)

    net.forward = spy
    return calls


def controlnet_spec(tiny_spec, *models, inputs=None, **denoiser):
    """A tiny spec on the controlnet denoiser with one unit per model folder."""
    units = [m if isinstance(m, dict) else {"model": str(m)} for m in models]
    den = {"name": "controlnet", "pretrained": tiny_spec()["denoiser"]["pretrained"], "controlnets": units, **denoiser}
    spec = tiny_spec(denoiser=den)
    if inputs is not None:
        spec["requests"][0]["inputs"] = inputs
    return spec
