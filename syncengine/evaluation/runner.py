"""``syncengine evaluate``: the paper's metrics over one or more runs (folders of generated images), as a table,
CSV, JSON and a bar plot.

Every model is loaded once and shared by all runs. A metric whose model or data is missing is reported as
*unavailable* with the reason when it was not asked for by name; asked for by name (``--metrics fid``), it is an
error that says how to get it.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import SyncEngineError
from .crops import grid_crops, random_crops
from .runs import Sample, flatten, image_files, load_images, read_run, window_of

log = logging.getLogger(__name__)

METRICS: dict[str, str] = {  # key -> the paper's name
    "intra_lpips": "Intra-LPIPS",
    "intra_style": "Intra-Style-L",
    "clip": "Mean-CLIP-S",
    "fid": "FID",
    "kid": "KID",
    "giqa": "Mean-GIQA",
    "looks": "Mixed-look rate",  # toy world only: see syncengine.evaluation.looks
}
LOWER_IS_BETTER = {"intra_lpips": True, "intra_style": True, "clip": False, "fid": True, "kid": True, "giqa": False,
                   "looks": True}
EXTRA_COLUMNS = {  # values reported beside a metric: key -> (the metric it follows, its table heading)
    "kid_std": ("kid", "KID std"),
    "looks_low": ("looks", "mixed 95% low"),
    "looks_high": ("looks", "mixed 95% high"),
    "look_diversity": ("looks", "Look diversity"),
    "look_disagreement": ("looks", "Look disagreement"),
}


@dataclass
class EvalOptions:
    metrics: list[str] | None = None  # None: all, unavailable ones reported; a list: these, missing models are errors
    window: int | None = None  # crop width in px; default: the tiler window of the sidecars
    window_height: int | None = None  # default: window
    lpips: dict[str, Any] = field(default_factory=lambda: {"name": "lpips", "net": "alex", "backbone": "pretrained"})
    style: dict[str, Any] = field(default_factory=lambda: {"name": "style", "net": "vgg16", "backbone": "pretrained"})
    clip_model: str = "openai/clip-vit-base-patch16"
    reference: str | None = None  # folder of real/base-model images for FID, KID
    inception: str = "fid"  # fid (torch-fidelity, paper-comparable) | torchvision
    inception_weights: str | None = None
    giqa_model: str | None = None  # .npz Gaussian mixture over Inception features
    crops_per_image: int = 1  # random crops per panorama for CLIP, FID, KID, GIQA
    kid_subset_size: int = 1000
    kid_subsets: int = 100
    seed: int = 0
    device: str = "cpu"
    look_threshold: float = 0.8  # confidence below which a crop's look does not count (looks metric)


@dataclass
class RunResult:
    name: str
    folder: str
    images: int
    metrics: dict[str, float | None]
    unavailable: dict[str, str]
    params: dict[str, Any] = field(default_factory=dict)  # spec keys that differ between the compared runs
    per_image: dict[str, list[float]] = field(default_factory=dict)
    label: str = ""
    skipped: dict[str, str] = field(default_factory=dict)  # image file -> why it was left out (it does not decode)
    details: dict[str, Any] = field(default_factory=dict)  # per-metric detail for the JSON (looks: each crop's look)


class _Models:
    """Lazily loaded models shared by every run; a load failure is remembered (reported once per metric)."""

    def __init__(self, options: EvalOptions, features: torch.nn.Module | None = None):
        self.options = options
        self._cache: dict[str, Any] = {}
        self._features = features

    def get(self, key: str, build: Callable[[], Any]):
        if key not in self._cache:
            try:
                self._cache[key] = build()
            except SyncEngineError as exc:
                self._cache[key] = exc  # the next run gets the same answer without trying again
        found = self._cache[key]
        if isinstance(found, SyncEngineError):
            raise found
        return found

    def lpips(self):
        from .metrics import load_distance

        return self.get("lpips", lambda: load_distance(self.options.lpips).to(self.options.device))

    def style(self):
        from .metrics import load_distance

        return self.get("style", lambda: load_distance(self.options.style).to(self.options.device))

    def clip(self):
        from .clip import ClipScorer

        return self.get("clip", lambda: ClipScorer(self.options.clip_model, self.options.device))

    def features(self):
        from .features import load_inception

        if self._features is not None:
            return self._features
        o = self.options
        return self.get("inception", lambda: load_inception(o.inception, o.inception_weights).to(o.device))

    def reference_features(self) -> torch.Tensor:
        from .features import extract

        def build():
            if not self.options.reference:
                raise SyncEngineError("FID and KID need --reference FOLDER "
                                      "(real or base-model images of the window size)")
            images = _readable(image_files(Path(self.options.reference)), self.options.reference)[0]
            return torch.cat([extract(self.features(), img[None]) for img in images])

        return self.get("reference", build)

    def giqa(self):
        from .metrics import GIQAModel

        def build():
            if not self.options.giqa_model:
                raise SyncEngineError("GIQA needs --giqa-model FILE.npz (a Gaussian mixture over Inception features)")
            return GIQAModel.load(self.options.giqa_model)

        return self.get("giqa", build)


def _readable(paths: list[Path], folder: str | Path) -> tuple[list[torch.Tensor], list[int], dict[str, str]]:
    """The images that decode; each one that does not is skipped with one warning line (and listed in the result),
    so a damaged file does not cost the rest of the evaluation. A folder with none left is an error."""
    images, kept, skipped = load_images(paths)
    for reason in skipped.values():
        log.warning("skipped %s", reason)
    if not images:
        raise SyncEngineError(f"no readable images in {str(folder)!r}: all {len(paths)} failed to decode")
    return images, kept, skipped


def _window(options: EvalOptions, samples: list[Sample]) -> tuple[int, int]:
    if options.window:
        return (options.window_height or options.window, options.window)
    for s in samples:
        found = window_of(s.spec)
        if found:
            return found
    raise SyncEngineError("cannot tell the window size from the sidecars; pass --window PX (e.g. 512)")


def evaluate_run(folder: str | Path, options: EvalOptions, models: _Models) -> RunResult:
    from . import metrics as M
    from .features import extract

    samples = read_run(folder)
    wanted = options.metrics or list(METRICS)
    wh, ww = _window(options, samples)
    images, kept, skipped = _readable([s.path for s in samples], folder)
    samples = [samples[i] for i in kept]
    values: dict[str, float | None] = {}
    per_image: dict[str, list[float]] = {}
    unavailable: dict[str, str] = {}
    details: dict[str, Any] = {}

    def attempt(key: str, compute: Callable[[], Any]) -> None:
        try:
            result = compute()
        except SyncEngineError as exc:
            if options.metrics is not None:  # asked for by name: an error, with its fix
                raise
            unavailable[key] = str(exc)
            values[key] = None
            return
        if isinstance(result, tuple):  # (mean, per-image values)
            values[key], per_image[key] = result
        else:
            values[key] = result

    def intra(distance_fn):
        vals = [M.intra_distance(grid_crops(img, ww, wh), distance_fn()) for img in images]
        return sum(vals) / len(vals), vals

    # Random crops: the same positions for the i-th image of every run (seed + its index in the folder, skipped
    # files included), so runs are compared fairly.
    crops = [random_crops(img, ww, options.crops_per_image, torch.Generator().manual_seed(options.seed + i), wh)
             for i, img in zip(kept, images)]

    if "intra_lpips" in wanted:
        attempt("intra_lpips", lambda: intra(models.lpips))
    if "intra_style" in wanted:
        attempt("intra_style", lambda: intra(models.style))
    if "clip" in wanted:
        def clip():
            if any(s.prompt is None for s in samples):
                raise SyncEngineError(f"CLIP score needs each image's prompt: {folder} has images without a sidecar")
            scorer = models.clip()
            vals = [float(scorer.score(c, [s.prompt] * len(c)).mean()) for c, s in zip(crops, samples)]
            return sum(vals) / len(vals), vals

        attempt("clip", clip)
    cached: list[torch.Tensor] = []

    def crop_features() -> torch.Tensor:
        if not cached:
            cached.append(extract(models.features(), torch.cat(crops)))
        return cached[0]

    # FID and KID read the reference first: a missing --reference is reported before any model loads.
    if "fid" in wanted:
        def fid():
            ref = models.reference_features()
            return M.fid(crop_features(), ref)

        attempt("fid", fid)
    if "kid" in wanted:
        def kid():
            ref = models.reference_features()
            mean, std = M.kid(crop_features(), ref, options.kid_subset_size, options.kid_subsets, options.seed)
            values["kid_std"] = std
            return mean

        attempt("kid", kid)
    if "giqa" in wanted:
        def giqa():
            model = models.giqa()
            vals = model.log_likelihood(crop_features()).tolist()
            return sum(vals) / len(vals), vals

        attempt("giqa", giqa)
    if "looks" in wanted:
        def looks():
            from .looks import evaluate_looks

            summary = evaluate_looks(images, ww, wh, threshold=options.look_threshold)
            if options.metrics is None and summary.unsure_crops > 0.5:  # not toy-world images: not a measurement
                raise SyncEngineError(f"{summary.unsure_crops:.0%} of the crops show no toy-world look with "
                                      f"confidence (not toy-world images?); --metrics looks computes it anyway")
            values["looks_low"], values["looks_high"] = summary.interval
            values["look_diversity"] = summary.diversity
            if summary.disagreement is not None:
                values["look_disagreement"] = summary.disagreement[0]
            details["looks"] = summary.as_dict()
            return summary.mixed_rate, [float(p.mixed) for p in summary.per_panorama]

        attempt("looks", looks)
    folder = Path(folder)
    return RunResult(folder.name, str(folder), len(samples), values, unavailable, per_image=per_image,
                     skipped=skipped, details=details)


def _label_runs(results: list[RunResult], specs: list[dict[str, Any]]) -> None:
    """Name each run by the spec keys that differ between runs (e.g. ``sync.weight=20``), else by its folder."""
    keys = sorted({k for s in specs for k in s})
    varying = [k for k in keys if len({json.dumps(s.get(k), sort_keys=True, default=str) for s in specs}) > 1
               and not k.startswith(("runtime.", "requests"))]
    for r, s in zip(results, specs):
        r.params = {k: s.get(k) for k in varying}
        shown = [f"{k.split('.')[-1] if len(varying) > 2 else k}={s.get(k)}" for k in varying[:3]]
        r.label = ", ".join(shown) if shown and len(results) > 1 else r.name


def evaluate(folders: list[str | Path], options: EvalOptions | None = None,
             features: torch.nn.Module | None = None) -> list[RunResult]:
    """Evaluate each folder (one run each). ``features`` replaces the Inception network (any module mapping
    ``[B, 3, H, W]`` images in ``[0, 1]`` to ``[B, D]``)."""
    options = options or EvalOptions()
    unknown = [m for m in options.metrics or [] if m not in METRICS]
    if unknown:
        raise SyncEngineError(f"unknown metrics {unknown}; choose from {', '.join(METRICS)}")
    if not folders:
        raise SyncEngineError("give at least one folder of generated images")
    models = _Models(options, features)
    results, specs = [], []
    for folder in folders:
        results.append(evaluate_run(folder, options, models))
        run_specs = [flatten(s.spec) for s in read_run(folder)]
        # a run's own params: keys constant over its images
        specs.append({k: v for k, v in run_specs[0].items() if all(rs.get(k) == v for rs in run_specs)})
    _label_runs(results, specs)
    return results


# ---------------------------------------------------------------------------------------------------- reporting


def columns(results: list[RunResult]) -> list[str]:
    cols = []
    for k in METRICS:
        if any(k in r.metrics for r in results):
            cols.append(k)
            cols += [extra for extra, (after, _) in EXTRA_COLUMNS.items() if after == k]
    return cols


def _fmt(value: float | None) -> str:
    if value is None:
        return "n/a"
    if value != 0 and (abs(value) < 1e-2 or abs(value) >= 1e5):
        return f"{value:.3e}"
    return f"{value:.4f}"


def table(results: list[RunResult]) -> str:
    cols = columns(results)
    head = ["run", "images"] + [METRICS[c] if c in METRICS else EXTRA_COLUMNS[c][1] for c in cols]
    rows = [[r.label or r.name, str(r.images)] + [_fmt(r.metrics.get(c)) for c in cols] for r in results]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    out = [line(head), line(["-" * w for w in widths])] + [line(r) for r in rows]
    notes = sorted({f"{METRICS[k]}: unavailable: {why}" for r in results for k, why in r.unavailable.items()})
    return "\n".join(out + notes)


def write_csv(results: list[RunResult], path: Path) -> None:
    cols = columns(results)
    params = sorted({k for r in results for k in r.params})
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "label", "folder", "images", *params, *cols])
        for r in results:
            w.writerow([r.name, r.label, r.folder, r.images, *(r.params.get(k) for k in params),
                        *("" if r.metrics.get(c) is None else r.metrics[c] for c in cols)])


def write_json(results: list[RunResult], path: Path, options: EvalOptions) -> None:
    def clean(x):
        return None if isinstance(x, float) and not math.isfinite(x) else x

    data = {
        "metrics": {k: {"name": v, "lower_is_better": LOWER_IS_BETTER[k]} for k, v in METRICS.items()},
        "options": asdict(options),
        "runs": [{**asdict(r), "metrics": {k: clean(v) for k, v in r.metrics.items()}} for r in results],
    }
    path.write_text(json.dumps(data, indent=2, default=str))


REPORT_FILES = ("metrics.csv", "metrics.json", "metrics.png")


def check_out_dir(out_dir: str | Path) -> Path:
    """The report folder, checked before any metric is computed (the CLI does so first): a file in its place, a
    file among its parents or a folder that cannot be written fails now, not after minutes of model forwards."""
    out = Path(out_dir)
    for path in (out, *out.parents):
        if not path.exists():
            continue
        if not path.is_dir():
            raise SyncEngineError(f"report folder {str(out)!r}: {str(path)!r} is a file, not a folder; give --out a "
                                  f"folder (it gets {', '.join(REPORT_FILES)})")
        if not os.access(path, os.W_OK | os.X_OK):
            raise SyncEngineError(f"report folder {str(out)!r}: cannot write in {str(path)!r}; give --out a "
                                  f"writable folder")
        break
    for name in REPORT_FILES:
        if (out / name).is_dir():
            raise SyncEngineError(f"report folder {str(out)!r}: {name} is a folder there; remove it or give --out "
                                  f"another folder")
    return out


def write_reports(results: list[RunResult], out_dir: str | Path, options: EvalOptions, plot: bool = True) -> list[Path]:
    out = check_out_dir(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / REPORT_FILES[0], out / REPORT_FILES[1]]
    write_csv(results, paths[0])
    write_json(results, paths[1], options)
    if plot:
        from .plot import plot_runs

        paths.append(plot_runs(results, out / REPORT_FILES[2]))
    return paths
