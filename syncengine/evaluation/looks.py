"""The looks metric: coherence as the toy world defines it, measured by a classifier the sync loss never saw.

Each panorama is cut into window-size crops (:func:`~syncengine.evaluation.crops.grid_crops`) and every crop is
classified into a global look of the toy world (day, sunset, night, snow) with a confidence. A panorama is **mixed**
when its confident crops do not all share one look. Crops below the confidence threshold (a crop that straddles two
looks, or shows none) are left out of that decision, not counted as a disagreement: the mixed-look rate is a lower
bound, and the share of unsure crops is reported beside it.

Over a set of panoramas: the **mixed-look rate** with its 95% Wilson interval, and the **look diversity**: the
distribution of each panorama's majority look and its entropy normalised to [0, 1] (1: the looks equally often,
0: every seed the same look). Synchronization should lower the first without collapsing the second.

The mixed-look rate is a yes/no per panorama, so telling two settings apart takes many seeds. The **look
disagreement** uses every crop's full posterior instead: the probability that two different crops of one panorama,
each labelled by drawing from its posterior over the looks, get different looks (0: every crop surely the same look;
about 0.5 for a panorama half one look, half another). Its mean over seeds has a normal interval, and two settings
run on the same seeds compare seed by seed (:func:`paired_difference`), which resolves much smaller effects.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from ..errors import SyncEngineError
from .crops import grid_crops

CONFIDENT = 0.8  # default confidence threshold of a crop's look
Classifier = Callable[[torch.Tensor], tuple[list[str], torch.Tensor]]
Posterior = Callable[[torch.Tensor], torch.Tensor]  # images [N, 3, H, W] -> [N, looks]


def toy_classifier() -> tuple[Classifier, tuple[str, ...]]:
    """The toy world's look classifier and its looks (imported lazily: the metric is optional for other runs)."""
    try:
        from syncengine_toy.looks import classify
        from syncengine_toy.world import LOOKS
    except ImportError as exc:  # pragma: no cover - the package ships with syncengine
        raise SyncEngineError(f"the looks metric needs the syncengine_toy package ({exc})") from None
    return classify, LOOKS


def toy_posterior() -> Posterior:
    """The toy world's classifier's posterior over the looks (``[N, looks]``)."""
    try:
        from syncengine_toy.looks import default_classifier
    except ImportError as exc:  # pragma: no cover - the package ships with syncengine
        raise SyncEngineError(f"the looks metric needs the syncengine_toy package ({exc})") from None
    return default_classifier().posterior


def disagreement(posteriors: torch.Tensor) -> float:
    """``1 - mean_{i != j} p_i . p_j`` over a panorama's crops ``[n, looks]`` (each renormalised to sum 1): the
    chance that two different crops, labelled by drawing from their posteriors, differ. 0 for a single crop."""
    n = posteriors.shape[0]
    if n < 2:
        return 0.0
    p = posteriors.double() / posteriors.double().sum(1, keepdim=True).clamp_min(1e-12)
    gram = p @ p.T
    agree = (gram.sum() - gram.diagonal().sum()) / (n * (n - 1))
    return float(1 - agree)


def mean_interval(values: Sequence[float], z: float = 1.96) -> tuple[float, float, float]:
    """``(mean, low, high)``: the mean and its normal 95% interval (the spread of the values over sqrt(n))."""
    n = len(values)
    if n == 0:
        return (0.0, 0.0, 0.0)
    mean = sum(values) / n
    if n < 2:
        return (mean, mean, mean)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = z * sd / math.sqrt(n)
    return (mean, mean - half, mean + half)


def paired_difference(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float]:
    """``mean(a - b)`` seed by seed with its 95% interval: two settings run on the same seeds."""
    if len(a) != len(b):
        raise ValueError(f"paired values need the same seeds: {len(a)} against {len(b)}")
    return mean_interval([x - y for x, y in zip(a, b)])


@dataclass
class PanoramaLooks:
    """The looks of one panorama's crops, left to right, top to bottom."""

    looks: list[str]
    confidence: list[float]
    threshold: float
    disagreement: float | None = None  # see :func:`disagreement`; None without a posterior

    @property
    def confident(self) -> list[str]:
        return [look for look, c in zip(self.looks, self.confidence) if c >= self.threshold]

    @property
    def unsure(self) -> int:
        return len(self.looks) - len(self.confident)

    @property
    def mixed(self) -> bool:
        return len(set(self.confident)) > 1

    @property
    def majority(self) -> str | None:
        """The most frequent confident look (ties: the larger summed confidence); None without a confident crop."""
        conf = [(look, c) for look, c in zip(self.looks, self.confidence) if c >= self.threshold]
        if not conf:
            return None
        counts = Counter(look for look, _ in conf)
        mass = Counter()
        for look, c in conf:
            mass[look] += c
        return max(counts, key=lambda look: (counts[look], mass[look]))


def panorama_looks(image: torch.Tensor, window: int, window_height: int | None = None,
                   classifier: Classifier | None = None, threshold: float = CONFIDENT,
                   posterior: Posterior | None = None) -> PanoramaLooks:
    """Classify the non-overlapping window-size crops of ``image`` ``[3, H, W]`` in [0, 1]; with ``posterior``
    (the toy world's when the classifier is), also their look disagreement."""
    if classifier is None:
        classifier, posterior = toy_classifier()[0], posterior or toy_posterior()
    crops = grid_crops(image, window, window_height)
    looks, conf = classifier(crops)
    spread = disagreement(posterior(crops)) if posterior is not None else None
    return PanoramaLooks(list(looks), [float(c) for c in conf], threshold, spread)


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion ``k / n`` (95% for z = 1.96); (0, 1) when n is 0."""
    if n <= 0:
        return (0.0, 1.0)
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def look_diversity(majorities: Sequence[str | None], looks: Sequence[str]) -> tuple[dict[str, int], float]:
    """Counts of each look as a panorama's majority, and their entropy over ``looks`` normalised to [0, 1].

    Panoramas without a confident crop (None) are left out; with none left the diversity is 0.
    """
    counts = {look: 0 for look in looks}
    for m in majorities:
        if m is not None:
            counts[m] = counts.get(m, 0) + 1
    total = sum(counts.values())
    if total == 0 or len(counts) < 2:
        return counts, 0.0
    entropy = -sum(c / total * math.log(c / total) for c in counts.values() if c)
    return counts, max(0.0, entropy / math.log(len(counts)))  # max: no "-0.0" when one look takes all


@dataclass
class LooksSummary:
    """The looks metric over a set of panoramas."""

    panoramas: int
    mixed: int
    mixed_rate: float
    interval: tuple[float, float]  # 95% Wilson interval of mixed_rate
    majority_counts: dict[str, int]
    diversity: float  # normalised entropy of majority_counts, in [0, 1]
    unsure_crops: float  # share of crops below the confidence threshold
    threshold: float
    per_panorama: list[PanoramaLooks] = field(default_factory=list)

    @property
    def disagreements(self) -> list[float]:
        return [p.disagreement for p in self.per_panorama if p.disagreement is not None]

    @property
    def disagreement(self) -> tuple[float, float, float] | None:
        """Mean look disagreement and its 95% interval; None without posteriors."""
        values = self.disagreements
        return mean_interval(values) if values else None

    def as_dict(self) -> dict:
        spread = self.disagreement
        return {
            "panoramas": self.panoramas, "mixed": self.mixed, "mixed_rate": self.mixed_rate,
            "interval": list(self.interval), "majority_counts": self.majority_counts, "diversity": self.diversity,
            "unsure_crops": self.unsure_crops, "threshold": self.threshold,
            **({"disagreement": spread[0], "disagreement_interval": list(spread[1:])} if spread else {}),
            "crops": [{"looks": p.looks, "confidence": [round(c, 4) for c in p.confidence], "mixed": p.mixed,
                       "majority": p.majority,
                       **({"disagreement": round(p.disagreement, 6)} if p.disagreement is not None else {})}
                      for p in self.per_panorama],
        }


def summarize(per_panorama: list[PanoramaLooks], looks: Sequence[str]) -> LooksSummary:
    """Mixed-look rate, its interval and the look diversity of already classified panoramas."""
    if not per_panorama:
        raise SyncEngineError("the looks metric needs at least one panorama")
    n = len(per_panorama)
    k = sum(p.mixed for p in per_panorama)
    counts, diversity = look_diversity([p.majority for p in per_panorama], looks)
    crops = sum(len(p.looks) for p in per_panorama)
    unsure = sum(p.unsure for p in per_panorama) / max(crops, 1)
    return LooksSummary(n, k, k / n, wilson_interval(k, n), counts, diversity, unsure, per_panorama[0].threshold,
                        per_panorama)


def evaluate_looks(images: Sequence[torch.Tensor], window: int, window_height: int | None = None,
                   classifier: Classifier | None = None, looks: Sequence[str] | None = None,
                   threshold: float = CONFIDENT) -> LooksSummary:
    """The looks metric of panoramas ``[3, H, W]`` in [0, 1] (for benchmarks; ``syncengine evaluate --metrics
    looks`` runs the same). ``classifier`` and ``looks`` default to the toy world's."""
    posterior = None
    if classifier is None or looks is None:
        default_classify, default_looks = toy_classifier()
        posterior = toy_posterior() if classifier is None else None
        classifier = classifier or default_classify
        looks = looks or default_looks
    per = [panorama_looks(img, window, window_height, classifier, threshold, posterior) for img in images]
    return summarize(per, looks)
