"""The paper's metrics (section 5.1) as plain functions over tensors: images in ``[0, 1]``, ``[N, 3, H, W]``.

- Intra-LPIPS / Intra-Style-L: mean distance over every pair of non-overlapping window-size crops of one panorama.
  The distance is any sync-loss plugin (``lpips``, ``style``, or a third-party one): a sync loss *is* a distance
  between window-size images, so the metric and the loss share one implementation.
- FID / KID: torchmetrics' arithmetic over features computed once (so FID, KID and GIQA share one forward pass).
- GIQA (GMM-GIQA, Gu et al. 2020): mean log-likelihood of the crops' features under a Gaussian mixture fitted on
  real images.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ModelNotFoundError, SyncEngineError
from .crops import pairs


def load_distance(section: dict[str, Any]):
    """A sync-loss plugin built from ``{"name": ..., **options}``, validated like a spec section."""
    from omegaconf import OmegaConf

    from ..config import typed_config
    from ..registry import get

    section = dict(section)
    name = section.pop("name")
    cls = get("sync_loss", name)
    options = OmegaConf.to_object(typed_config(cls.Config, section, f"metric {name}"))
    require_cached_backbone(cls, options)
    return cls(options).eval()


def require_cached_backbone(cls: type, options: Any) -> None:
    """The built-in losses (``lpips``, ``style``) load torchvision ImageNet backbones, which torchvision downloads
    when they are missing; evaluation reads only local files, so a missing file is an error before any attempt."""
    if cls.__module__.split(".")[0] != "syncengine_losses" or getattr(options, "backbone", None) != "pretrained":
        return
    from syncengine_losses.backbones import checkpoint_path, weights_url

    try:
        path = checkpoint_path(options.net)
    except KeyError:  # an unknown net: the plugin itself says which ones there are
        return
    if not path.is_file():
        raise ModelNotFoundError(
            f"ImageNet weights of the {options.net} backbone are not in the torch cache ({path}); evaluate reads "
            f"only local files: fetch {weights_url(options.net)} into that folder where the internet is "
            "reachable (or set TORCH_HOME), or use --backbone random for a smoke run"
        )


@torch.no_grad()
def pairwise_distances(crops: torch.Tensor, distance) -> torch.Tensor:
    """Distances ``[n (n - 1) / 2]`` between every pair of crops, in :func:`~.crops.pairs` order.

    ``distance`` follows the :class:`~syncengine.sync_loss.SyncLoss` contract (images in ``[-1, 1]``): crop ``i``
    is the target, crops ``i+1..n-1`` are compared against it in one batch.
    """
    device = next(iter(distance.parameters()), torch.empty(0)).device
    x = crops.float().to(device) * 2 - 1
    out = []
    for i in range(len(x) - 1):
        target = distance.prepare_target(x[i : i + 1])
        out.append(distance(x[i + 1 :], target).reshape(-1).float().cpu())
    values = torch.cat(out) if out else torch.zeros(0)
    assert len(values) == len(pairs(len(x)))
    return values


def intra_distance(crops: torch.Tensor, distance) -> float:
    """Mean pairwise distance of one panorama's crops (Intra-LPIPS with LPIPS, Intra-Style-L with the style loss)."""
    if len(crops) < 2:
        raise SyncEngineError(f"an intra metric needs at least 2 crops, got {len(crops)}; use a smaller --window")
    return float(pairwise_distances(crops, distance).mean())


class _Features(nn.Module):
    """Identity over precomputed features, so torchmetrics does the FID/KID arithmetic without an image model."""

    def __init__(self, dim: int):
        super().__init__()
        self.num_features = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def fid(fake: torch.Tensor, real: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets ``[N, D]`` (torchmetrics' arithmetic)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if len(fake) < 2 or len(real) < 2:
        raise SyncEngineError("FID needs at least 2 generated crops and 2 reference images")
    metric = FrechetInceptionDistance(feature=_Features(fake.shape[1])).double()
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    return float(metric.compute())


def kid(fake: torch.Tensor, real: torch.Tensor, subset_size: int = 1000, subsets: int = 100, seed: int = 0):
    """Kernel Inception Distance (mean, std over subsets); subsets shrink to the smaller set when needed."""
    import warnings

    from torchmetrics.image.kid import KernelInceptionDistance

    size = min(subset_size, len(fake), len(real))
    if size < 2:
        raise SyncEngineError("KID needs at least 2 generated crops and 2 reference images")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "will save all extracted features in buffer"
        metric = KernelInceptionDistance(feature=_Features(fake.shape[1]), subsets=subsets, subset_size=size)
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # subsets are drawn with the global generator: make them reproducible
        mean, std = metric.compute()
    return float(mean), float(std)


class GIQAModel:
    """A Gaussian mixture over image features (GMM-GIQA): ``.npz`` with ``weights [K]``, ``means [K, D]`` and
    ``covariances`` (``[K, D]`` diagonal or ``[K, D, D]`` full), e.g. saved from ``sklearn.mixture.GaussianMixture``
    fitted on the Inception features of real images (``weights_``, ``means_``, ``covariances_``)."""

    def __init__(self, weights: torch.Tensor, means: torch.Tensor, covariances: torch.Tensor):
        self.weights = weights.double()
        self.means = means.double()
        self.covariances = covariances.double()

    @classmethod
    def load(cls, path: str | Path) -> "GIQAModel":
        import numpy as np

        path = Path(path)
        if not path.is_file():
            raise ModelNotFoundError(
                f"GIQA model {str(path)!r} not found; fit a Gaussian mixture on the Inception features of real "
                "images and save weights/means/covariances to an .npz (see docs/evaluation.md)"
            )
        data = np.load(path)
        missing = {"weights", "means", "covariances"} - set(data.files)
        if missing:
            raise SyncEngineError(f"GIQA model {path} lacks arrays {sorted(missing)}; "
                                  "it needs weights, means, covariances")
        return cls(*(torch.from_numpy(data[k]) for k in ("weights", "means", "covariances")))

    def log_likelihood(self, features: torch.Tensor) -> torch.Tensor:
        """``[N]`` log p(x) under the mixture."""
        x = features.double()
        d = x.shape[1]
        if self.means.shape[1] != d:
            raise SyncEngineError(f"GIQA model has {self.means.shape[1]}-d means but features are {d}-d")
        diff = x[:, None, :] - self.means[None]  # [N, K, D]
        if self.covariances.dim() == 2:
            var = self.covariances
            maha = (diff**2 / var[None]).sum(-1)
            logdet = var.log().sum(-1)
        else:
            chol = torch.linalg.cholesky(self.covariances)  # [K, D, D]
            sol = torch.linalg.solve_triangular(chol[None], diff[..., None], upper=False)[..., 0]
            maha = (sol**2).sum(-1)
            logdet = 2 * chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        log_comp = -0.5 * (maha + logdet[None] + d * torch.log(torch.tensor(2 * torch.pi, dtype=x.dtype)))
        return torch.logsumexp(log_comp + self.weights.log()[None], dim=1)


def giqa(features: torch.Tensor, model: GIQAModel) -> float:
    return float(model.log_likelihood(features).mean())
