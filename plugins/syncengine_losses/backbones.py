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


def weights_url(net: str) -> str:
    """Where torchvision downloads ``net``'s ImageNet weights: what an error tells a user to fetch by hand
    (``evaluate`` never downloads). A KeyError for a net the losses do not know."""
    return _weights_enum(net).url


def checkpoint_path(net: str) -> Path:
    url = weights_url(net)
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name


@contextlib.contextmanager
def backbone_errors(net: str, pretrained: bool = True):
    """Turn a failed load/download of a torchvision backbone into a one-line, actionable error: a damaged file in
    torchvision's cache is named (never replaced by random weights); a missing one says where to put it. A random
    backbone (``pretrained`` False) reads no file: its failures keep their tracebacks."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision's 'pretrained' deprecation noise from lpips
            yield
    except Exception as exc:  # noqa: BLE001 - narrowed below; anything else is re-raised
        from syncengine.errors import SyncEngineError
        from syncengine_sd.model_files import LOAD_ERRORS, file_problem

        if isinstance(exc, SyncEngineError) or not pretrained:
            raise
        path = checkpoint_path(net)
        url = weights_url(net)
        fix = f"delete it (torchvision downloads it again where the network is reachable) or put {url} there"
        if path.is_file():
            problem = file_problem(path)
            if problem:
                raise ModelNotFoundError(f"the {net} backbone's weights file {path} {problem}; {fix}") from exc
            if isinstance(exc, (*LOAD_ERRORS, RuntimeError)):  # a sound file that is not these weights
                raise ModelNotFoundError(f"the {net} backbone's weights file {path} could not be loaded "
                                         f"({one_line(exc, 120)}); {fix}") from exc
            raise
        if not isinstance(exc, (OSError, RuntimeError, ValueError)):
            raise
        if not isinstance(exc, OSError) and "download" not in str(exc).lower() and "checkpoint" not in str(exc).lower():
            raise
        raise ModelNotFoundError(
            f"ImageNet weights for the {net} backbone are not at {path} and could not be downloaded "
            f"({one_line(exc, 120)}); fetch {url} into that folder (or set TORCH_HOME), "
            f"or use backbone: random for a smoke run"
        ) from exc


def vgg_features(net: str, random: bool) -> torch.nn.Module:
    """The convolutional part of VGG16/19 (ImageNet weights unless ``random``)."""
    import torchvision.models as tvm

    builder = tvm.vgg19 if net == "vgg19" else tvm.vgg16
    with backbone_errors(net, not random), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # a random backbone is the same one every run (reproducible smoke runs)
        model = builder(weights=None if random else _weights_enum(net))
    return model.features
