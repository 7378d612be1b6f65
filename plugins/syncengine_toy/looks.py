"""The look classifier: which global look (day, sunset, night, snow) an image of the toy world shows.

It measures coherence independently of any sync loss: no LPIPS, VGG or AlexNet, only colour statistics that the
generator fixes by construction. An image is summarised by the mean colour of three horizontal bands (upper sky,
lower sky and far ridge, foreground ground), and each look by a Gaussian over those nine numbers fitted on generator
crops (its mean, and a per-feature spread pooled over the looks and floored, so that blurrier or slightly off-colour
model outputs still land near their look). The confidence is the posterior of the nearest look against the other
looks *and* against an "unlike any look" alternative at a fixed distance, taken as the smallest over the whole image
and its left and right halves: an image between two looks (half day, half night: its halves disagree; a cross-fade)
or unlike all of them (noise) gets a low confidence rather than a confident guess.

The outlier distance is calibrated on a trained toy model's MultiDiffusion panoramas, whose colours are muted
(3.5 to 9.5 spreads from the nearest look): at 6 spreads only 27% of their crops counted, at 8 spreads 67%, while
half/half crops, cross-fades, noise and flat grey stay below 0.5.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from .world import LOOKS, sample_training_batch

BANDS: tuple[tuple[float, float], ...] = ((0.0, 0.3), (0.3, 0.55), (0.82, 1.0))  # fractions of the height
SPREAD_FLOOR = 0.08  # minimum per-feature spread (colour units, about 2.5x the generator's): blur and colour drift
OUTLIER_D2 = 64.0  # squared (spread-normalised) distance at which "unlike any look" is as likely as a look
FIT_SEED, FIT_COUNT, FIT_SIZE = 1234, 512, 64


def band_features(images: torch.Tensor) -> torch.Tensor:
    """``[N, 9]``: the mean RGB of each band of ``BANDS`` (any height: bands are fractions of it)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images [N, 3, H, W], got {tuple(images.shape)}")
    H = images.shape[2]
    feats = []
    for top, bottom in BANDS:
        a = min(int(round(top * H)), H - 1)
        b = max(int(round(bottom * H)), a + 1)
        feats.append(images[:, :, a:b, :].float().mean(dim=(2, 3)))
    return torch.cat(feats, dim=1)


@dataclass(frozen=True)
class LookClassifier:
    """Nearest look by spread-normalised distance in band-colour space, with an outlier alternative."""

    looks: tuple[str, ...]
    means: torch.Tensor  # [L, 9]
    spread: torch.Tensor  # [9]
    outlier_d2: float = OUTLIER_D2

    @classmethod
    def fit(cls, seed: int = FIT_SEED, count: int = FIT_COUNT, size: int = FIT_SIZE) -> "LookClassifier":
        """Fit on ``count`` generator crops: class means, pooled within-look spread (floored)."""
        images, looks, _ = sample_training_batch(seed, count, size)
        feats = band_features(images)
        labels = torch.tensor([LOOKS.index(look) for look in looks])
        means = torch.stack([feats[labels == k].mean(0) for k in range(len(LOOKS))])
        resid = feats - means[labels]
        spread = resid.pow(2).mean(0).sqrt().clamp_min(SPREAD_FLOOR)
        return cls(LOOKS, means, spread)

    def distances(self, images: torch.Tensor) -> torch.Tensor:
        """``[N, L]`` squared spread-normalised distances to each look's mean."""
        f = band_features(images)
        return (((f[:, None, :] - self.means[None]) / self.spread) ** 2).sum(-1)

    def posterior(self, images: torch.Tensor) -> torch.Tensor:
        """``[N, L]``: each look's posterior against the others and the "unlike any look" alternative."""
        logits = -0.5 * self.distances(images)
        outlier = torch.full((logits.shape[0], 1), -0.5 * self.outlier_d2)
        return torch.softmax(torch.cat([logits, outlier], dim=1), dim=1)[:, :-1]

    def classify(self, images: torch.Tensor) -> tuple[list[str], torch.Tensor]:
        """``(looks, confidence [N])`` for images ``[N, 3, H, W]`` in [0, 1]: the whole image's nearest look, and
        its smallest posterior over the whole image and its two halves (halves that disagree: a transition)."""
        post = self.posterior(images)
        idx = post.argmax(dim=1, keepdim=True)
        W = images.shape[-1]
        conf = post.gather(1, idx)[:, 0]
        if W >= 2:
            for half in (images[..., : W // 2], images[..., W // 2 :]):
                conf = torch.minimum(conf, self.posterior(half).gather(1, idx)[:, 0])
        return [self.looks[i] for i in idx[:, 0].tolist()], conf


@lru_cache(maxsize=1)
def default_classifier() -> LookClassifier:
    """The classifier fitted once per process on a fixed seed (about a second): deterministic everywhere."""
    return LookClassifier.fit()


def classify(images: torch.Tensor) -> tuple[list[str], torch.Tensor]:
    """``(looks, confidence [N])`` of images ``[N, 3, H, W]`` in [0, 1] with the default classifier."""
    return default_classifier().classify(images)


def chance_confidence() -> float:
    """The confidence of an image exactly between two looks when both are near: about 1/2 (for docs and tests)."""
    return 1 / (2 + math.exp(-0.5 * OUTLIER_D2))
