"""Image feature extractors for FID, KID and GIQA, loaded like every other model here: real weights from the local
cache, a clear :class:`~syncengine.errors.ModelNotFoundError` when they are missing, never random weights silently.

Two Inception-v3 backbones:

- ``fid`` (default): the TF-ported Inception of the original FID code, through ``torch-fidelity`` (as torchmetrics
  uses it). Numbers are comparable with papers. Needs ``pip install torch-fidelity`` and its weights file
  ``weights-inception-2015-12-05-6726825d.pth`` in ``$TORCH_HOME/hub/checkpoints/``.
- ``torchvision``: torchvision's ImageNet ``inception_v3`` (file ``inception_v3_google-0cc3c7bd.pth`` in the same
  folder). Good for comparing runs with each other; its FID is not comparable with published numbers.

Any ``torch.nn.Module`` mapping images ``[B, 3, H, W]`` in ``[0, 1]`` to features ``[B, D]`` can be passed instead
(``evaluate(..., features=module)``); that is how the tests check the metric arithmetic without Inception weights.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelNotFoundError, SyncEngineError, one_line

FID_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + FID_WEIGHTS_FILE
BACKBONES = ("fid", "torchvision")


def checkpoints_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


class FidInception(nn.Module):
    """torch-fidelity's FID Inception (2048-d pool features), the network of published FID/KID numbers."""

    num_features = 2048

    def __init__(self, weights_path: str | Path | None = None):
        super().__init__()
        try:
            from torchmetrics.image.fid import NoTrainInceptionV3
            from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE
        except ImportError as exc:  # pragma: no cover - torchmetrics is in the eval extra
            raise SyncEngineError(f"FID needs torchmetrics: pip install 'syncengine[eval]' ({exc})") from exc
        path = Path(weights_path) if weights_path else checkpoints_dir() / FID_WEIGHTS_FILE
        if not _TORCH_FIDELITY_AVAILABLE:
            raise ModelNotFoundError(
                "the FID Inception network needs torch-fidelity: `pip install torch-fidelity`, and its weights "
                f"{FID_WEIGHTS_URL} at {path}; or use --inception torchvision (not comparable with papers)"
            )
        if not path.is_file():
            raise ModelNotFoundError(
                f"FID Inception weights are not at {path}; fetch {FID_WEIGHTS_URL} into that folder (or set "
                "TORCH_HOME, or pass --inception-weights FILE); or use --inception torchvision"
            )
        self.net = NoTrainInceptionV3(
            name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=str(path)
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net((images.clamp(0, 1) * 255).round().to(torch.uint8)).reshape(images.shape[0], -1)


class TorchvisionInception(nn.Module):
    """torchvision's ImageNet Inception-v3 pool features (2048-d): 299 px input, ImageNet normalisation."""

    num_features = 2048

    def __init__(self):
        super().__init__()
        import torchvision.models as tvm

        weights = tvm.Inception_V3_Weights.IMAGENET1K_V1
        path = checkpoints_dir() / Path(weights.url).name
        if not path.is_file():  # torchvision would download it: evaluation reads only local files
            raise ModelNotFoundError(
                f"torchvision Inception-v3 weights are not in the torch cache ({path}); fetch {weights.url} into that "
                "folder where the internet is reachable (or set TORCH_HOME), or use --inception fid"
            )
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = tvm.inception_v3(weights=weights)
        except (OSError, RuntimeError) as exc:  # a damaged file
            raise ModelNotFoundError(
                f"torchvision Inception-v3 weights at {path} could not be loaded ({one_line(exc, 120)}); fetch "
                f"{weights.url} into that folder again (or set TORCH_HOME)"
            ) from exc
        model.fc = nn.Identity()
        self.net = model.eval().requires_grad_(False)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images, size=(299, 299), mode="bilinear", align_corners=False, antialias=True)
        return self.net((x - self.mean) / self.std)


def load_inception(backbone: str = "fid", weights_path: str | Path | None = None) -> nn.Module:
    if backbone == "fid":
        return FidInception(weights_path)
    if backbone == "torchvision":
        return TorchvisionInception()
    raise SyncEngineError(f"unknown Inception backbone {backbone!r}; use one of {', '.join(BACKBONES)}")


@torch.no_grad()
def extract(model: nn.Module, images: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """Features ``[N, D]`` (float64) of images ``[N, 3, H, W]`` in ``[0, 1]``, in batches."""
    device = next(iter(model.parameters()), torch.empty(0)).device
    out = [model(images[i : i + batch_size].to(device)).double().cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(out).reshape(len(images), -1)
