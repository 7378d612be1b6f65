"""torchvision backbones for the losses, loaded from torchvision's cache with a clear error when missing.

LPIPS and the style loss use ImageNet-trained torchvision networks. torchvision looks for their weights in
``$TORCH_HOME/hub/checkpoints/`` (default ``~/.cache/torch``) and downloads them when they are absent; where that
fails, the user gets the file name, the folder and the URL instead of a network traceback.
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path

import torch

from syncengine.errors import ModelNotFoundError, one_line

log = logging.getLogger(__name__)

RANDOM_NOTICE = "RANDOM backbone weights (smoke runs only): the loss is not a perceptual distance"


def _weights_enum(net: str):
    import torchvision.models as tvm

    table = {
        "vgg": tvm.VGG16_Weights.IMAGENET1K_V1,
        "vgg16": tvm.VGG16_Weights.IMAGENET1K_V1,
        "vgg19": tvm.VGG19_Weights.IMAGENET1K_V1,
        "alex": tvm.AlexNet_Weights.IMAGENET1K_V1,
        "squeeze": tvm.SqueezeNet1_1_Weights.IMAGENET1K_V1,
    }
    return table[net]


def checkpoint_path(net: str) -> Path:
    url = _weights_enum(net).url
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name


@contextlib.contextmanager
def backbone_errors(net: str):
    """Turn a failed load/download of a torchvision backbone into a one-line, actionable error."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision's 'pretrained' deprecation noise from lpips
            yield
    except (OSError, RuntimeError, ValueError) as exc:  # URLError is an OSError
        if not isinstance(exc, OSError) and "download" not in str(exc).lower() and "checkpoint" not in str(exc).lower():
            raise
        path = checkpoint_path(net)
        raise ModelNotFoundError(
            f"ImageNet weights for the {net} backbone are not at {path} and could not be downloaded "
            f"({one_line(exc, 120)}); fetch {_weights_enum(net).url} into that folder (or set TORCH_HOME), "
            f"or use backbone: random for a smoke run"
        ) from exc


def vgg_features(net: str, random: bool) -> torch.nn.Module:
    """The convolutional part of VGG16/19 (ImageNet weights unless ``random``)."""
    import torchvision.models as tvm

    builder = tvm.vgg19 if net == "vgg19" else tvm.vgg16
    with backbone_errors(net), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # a random backbone is the same one every run (reproducible smoke runs)
        model = builder(weights=None if random else _weights_enum(net))
    return model.features
