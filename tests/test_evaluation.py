"""Evaluation metrics: arithmetic on hand-made images and features, checked against closed forms and references."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from _evaluation_helpers import TinyFeatures, build_tiny_clip, tiled, write_panorama

from syncengine.errors import ModelNotFoundError, SyncEngineError
from syncengine.evaluation import metrics as M
from syncengine.evaluation.crops import grid_crops, pairs, random_crops

RANDOM_LPIPS = {"name": "lpips", "net": "alex", "backbone": "random"}
RANDOM_STYLE = {"name": "style", "net": "vgg16", "backbone": "random"}


@pytest.fixture(scope="module")
def lpips_random():
    return M.load_distance(RANDOM_LPIPS)


@pytest.fixture(scope="module")
def style_random():
    return M.load_distance(RANDOM_STYLE)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return build_tiny_clip(tmp_path_factory.mktemp("models") / "tiny-clip")


# ------------------------------------------------------------------------------------------------------ crops


def test_paper_geometry_six_crops_fifteen_pairs():
    crops = grid_crops(torch.zeros(3, 512, 3072), 512)
    assert crops.shape == (6, 3, 512, 512)
    assert len(pairs(6)) == 15 and len(set(pairs(6))) == 15


def test_grid_crops_are_the_non_overlapping_windows_in_order():
    image = torch.arange(3 * 8 * 20, dtype=torch.float32).reshape(3, 8, 20)
    crops = grid_crops(image, 8)  # 20 px wide: two full windows, the 4 px remainder is left out
    assert crops.shape == (2, 3, 8, 8)
    assert torch.equal(crops[1], image[:, :, 8:16])
    assert grid_crops(torch.zeros(3, 16, 16), 8).shape[0] == 4  # 2D grid
    with pytest.raises(SyncEngineError, match="window"):
        grid_crops(torch.zeros(3, 8, 8), 16)


def test_random_crops_are_windows_of_the_image_and_seeded():
    image = torch.rand(3, 16, 64)
    a = random_crops(image, 16, 5, torch.Generator().manual_seed(3))
    b = random_crops(image, 16, 5, torch.Generator().manual_seed(3))
    assert a.shape == (5, 3, 16, 16) and torch.equal(a, b)
    windows = [image[:, :, left : left + 16] for left in range(64 - 16 + 1)]  # every offset
    for crop in a:
        assert any(torch.equal(crop, w) for w in windows)


# ----------------------------------------------------------------------------------------------- intra metrics


@pytest.mark.parametrize("which", ["lpips", "style"])
def test_identical_crops_give_zero(which, lpips_random, style_random):
    distance = lpips_random if which == "lpips" else style_random
    torch.manual_seed(0)
    pano = tiled(torch.rand(3, 32, 32), 6)
    values = M.pairwise_distances(grid_crops(pano, 32), distance)
    assert values.shape == (15,)
    different = torch.cat([torch.rand(3, 32, 32) * (k + 1) / 6 for k in range(6)], dim=2)
    scale = M.intra_distance(grid_crops(different, 32), distance)
    assert scale > 0
    assert values.abs().max() < 1e-4 * scale


def test_pairwise_lpips_matches_the_lpips_package(lpips_random):
    torch.manual_seed(1)
    crops = torch.rand(4, 3, 32, 32)
    values = M.pairwise_distances(crops, lpips_random)
    with torch.no_grad():
        for k, (i, j) in enumerate(pairs(4)):
            ref = lpips_random.model(crops[j : j + 1] * 2 - 1, crops[i : i + 1] * 2 - 1).item()
            assert values[k].item() == pytest.approx(ref, rel=1e-4, abs=1e-6)
    assert M.intra_distance(crops, lpips_random) == pytest.approx(values.mean().item())


def test_pairwise_style_is_the_gram_distance(style_random):
    torch.manual_seed(2)
    crops = torch.rand(3, 3, 32, 32)
    values = M.pairwise_distances(crops, style_random)
    x = crops * 2 - 1
    with torch.no_grad():
        feats = [style_random.grams(x[i : i + 1]) for i in range(3)]
    for k, (i, j) in enumerate(pairs(3)):
        ref = sum(((a - b) ** 2).mean() for a, b in zip(feats[i], feats[j]))
        assert values[k].item() == pytest.approx(ref.item(), rel=1e-4)


def test_intra_needs_two_crops(lpips_random):
    with pytest.raises(SyncEngineError, match="at least 2 crops"):
        M.intra_distance(torch.rand(1, 3, 32, 32), lpips_random)


# ---------------------------------------------------------------------------------------------------- FID / KID


def _fid_reference(a: np.ndarray, b: np.ndarray) -> float:
    from scipy import linalg

    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_fid_matches_the_closed_form_and_is_zero_against_itself():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(200, 4, generator=g, dtype=torch.float64)
    b = torch.randn(150, 4, generator=g, dtype=torch.float64) * 1.5 + 0.7
    assert M.fid(b, a) == pytest.approx(_fid_reference(b.numpy(), a.numpy()), rel=1e-6)
    assert abs(M.fid(a, a)) < 1e-6
    assert M.fid(b, a) > 1.0


def _unbiased_mmd_poly(x: torch.Tensor, y: torch.Tensor) -> float:
    d = x.shape[1]
    k = lambda p, q: (p @ q.T / d + 1) ** 3  # noqa: E731 - torchmetrics' default kernel
    m, n = len(x), len(y)
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    return float((kxx.sum() - kxx.trace()) / (m * (m - 1)) + (kyy.sum() - kyy.trace()) / (n * (n - 1))
                 - 2 * kxy.mean())


def test_kid_matches_the_unbiased_mmd_and_is_near_zero_against_itself():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(60, 4, generator=g, dtype=torch.float64)
    b = torch.randn(60, 4, generator=g, dtype=torch.float64) + 1.0
    mean, std = M.kid(b, a, subset_size=60, subsets=1)  # one subset of everything: the exact estimator
    assert mean == pytest.approx(_unbiased_mmd_poly(b, a), rel=1e-6)
    self_mean, _ = M.kid(a, a, subset_size=40, subsets=50)
    assert abs(self_mean) < 0.05 * mean
    assert M.kid(b, a, subset_size=30, subsets=10) == M.kid(b, a, subset_size=30, subsets=10)  # seeded subsets


def test_kid_subset_shrinks_to_the_smaller_set():
    a = torch.randn(10, 3, dtype=torch.float64)
    mean, _ = M.kid(a + 1, a, subset_size=1000, subsets=3)
    assert math.isfinite(mean)


# ---------------------------------------------------------------------------------------------------------- GIQA


def test_giqa_log_likelihood_matches_scipy(tmp_path):
    from scipy.stats import multivariate_normal

    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 3, generator=g, dtype=torch.float64)
    means = torch.tensor([[0.0, 0.0, 0.0], [2.0, -1.0, 0.5]], dtype=torch.float64)
    var = torch.tensor([[1.0, 2.0, 0.5], [0.3, 1.0, 1.5]], dtype=torch.float64)
    w = torch.tensor([0.3, 0.7], dtype=torch.float64)
    ref = np.log(sum(w[k].item() * multivariate_normal(means[k].numpy(), np.diag(var[k].numpy())).pdf(x.numpy())
                     for k in range(2)))
    diag = M.GIQAModel(w, means, var).log_likelihood(x)
    full = M.GIQAModel(w, means, torch.diag_embed(var)).log_likelihood(x)
    np.testing.assert_allclose(diag.numpy(), ref, rtol=1e-9)
    np.testing.assert_allclose(full.numpy(), ref, rtol=1e-9)
    np.savez(tmp_path / "gmm.npz", weights=w.numpy(), means=means.numpy(), covariances=var.numpy())
    assert M.giqa(x, M.GIQAModel.load(tmp_path / "gmm.npz")) == pytest.approx(float(ref.mean()))
    with pytest.raises(ModelNotFoundError, match="GIQA model"):
        M.GIQAModel.load(tmp_path / "missing.npz")


# ---------------------------------------------------------------------------------------------------------- CLIP


def test_clip_score_is_the_scaled_cosine(tiny_clip):
    from syncengine.evaluation.clip import ClipScorer

    scorer = ClipScorer(str(tiny_clip))
    torch.manual_seed(0)
    images = torch.rand(3, 3, 40, 48)
    prompts = ["a mountain", "a lake at dawn", "a city"]
    scores = scorer.score(images, prompts)
    with torch.no_grad():
        tokens = scorer.tokenizer(prompts, padding=True, return_tensors="pt")
        out = scorer.model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                           pixel_values=scorer.preprocess(images))
    ref = (100 * torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds)).clamp_min(0)
    torch.testing.assert_close(scores, ref, rtol=1e-4, atol=1e-4)
    assert scorer.preprocess(images).shape == (3, 3, 32, 32)


def test_clip_missing_model_is_a_clear_error(tmp_path):
    from syncengine.evaluation.clip import ClipScorer

    with pytest.raises(ModelNotFoundError, match="--clip-model"):
        ClipScorer(str(tmp_path / "no-such-clip"))
    with pytest.raises(ModelNotFoundError, match="local Hugging Face cache"):
        ClipScorer("syncengine-tests/no-such-clip", local_files_only=True)  # no download attempt


def test_fid_inception_missing_weights_is_a_clear_error(tmp_path, monkeypatch):
    from syncengine.evaluation.features import load_inception

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="torch-fidelity|weights-inception-2015-12-05"):
        load_inception("fid")
    with pytest.raises(SyncEngineError, match="unknown Inception backbone"):
        load_inception("resnet")


# ------------------------------------------------------------------------------------------------ runner and CLI


def _two_runs(root):
    """Run A: panoramas of identical tiles (perfectly coherent); run B: different tiles."""
    torch.manual_seed(0)
    for k in range(3):
        write_panorama(root / "a", f"{k:03d}", tiled(torch.rand(3, 32, 32), 4), weight=20.0)
        write_panorama(root / "b", f"{k:03d}", torch.rand(3, 32, 128), weight=0.0)
    for k in range(4):
        write_panorama(root / "ref", f"r{k}", torch.rand(3, 32, 32))
    return root / "a", root / "b", root / "ref"


def test_evaluate_api_with_injected_features(tmp_path, tiny_clip):
    from syncengine.evaluation import EvalOptions, evaluate

    a, b, ref = _two_runs(tmp_path)
    options = EvalOptions(lpips=RANDOM_LPIPS, style=RANDOM_STYLE, clip_model=str(tiny_clip), reference=str(ref),
                          kid_subset_size=3, kid_subsets=5, crops_per_image=2)
    ra, rb = evaluate([a, b], options, features=TinyFeatures())
    assert ra.images == 3 and ra.label == "sync.weight=20.0" and rb.params == {"sync.weight": 0.0}
    assert ra.metrics["intra_lpips"] < 1e-6 and rb.metrics["intra_lpips"] > 1e-4
    assert ra.metrics["intra_style"] < 1e-9 < rb.metrics["intra_style"]
    assert len(ra.per_image["intra_lpips"]) == 3
    for r in (ra, rb):
        assert 0 <= r.metrics["clip"] <= 100
        assert math.isfinite(r.metrics["fid"]) and math.isfinite(r.metrics["kid"])
        assert r.metrics["giqa"] is None and "--giqa-model" in r.unavailable["giqa"]


def test_cli_end_to_end(tmp_path, tiny_clip, capsys):
    from syncengine.cli import main

    a, b, _ = _two_runs(tmp_path)
    out = tmp_path / "report"
    code = main(["evaluate", str(a), str(b), "--out", str(out), "--backbone", "random",
                 "--clip-model", str(tiny_clip)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "Intra-LPIPS" in captured.out and "sync.weight=20.0" in captured.out
    assert "FID: unavailable: FID and KID need --reference" in captured.out  # reported, not silently dropped
    data = json.loads((out / "metrics.json").read_text())
    runs = {r["name"]: r for r in data["runs"]}
    assert runs["a"]["metrics"]["intra_lpips"] < 1e-6 < runs["b"]["metrics"]["intra_lpips"]
    assert runs["a"]["metrics"]["fid"] is None
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header[:4] == ["run", "label", "folder", "images"] and "sync.weight" in header and "intra_lpips" in header
    png = (out / "metrics.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_named_metric_with_missing_input_exits_2(tmp_path, capsys):
    from syncengine.cli import main

    a, _, _ = _two_runs(tmp_path)
    assert main(["evaluate", str(a), "--metrics", "fid", "--out", str(tmp_path / "r")]) == 2
    assert "--reference" in capsys.readouterr().err
    assert main(["evaluate", str(a), "--metrics", "sharpness"]) == 2
    assert "unknown metrics" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "nothing")]) == 2


def test_torchvision_inception_loads_from_the_torch_cache(tmp_path, monkeypatch):
    """Random weights saved under torchvision's file name go through the real loading path (no download)."""
    from pathlib import Path

    import torchvision.models as tvm

    from syncengine.evaluation.features import TorchvisionInception, extract

    ckpt = tmp_path / "hub" / "checkpoints"
    ckpt.mkdir(parents=True)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.manual_seed(0)
    state = tvm.inception_v3(weights=None, aux_logits=True, init_weights=False).state_dict()
    torch.save(state, ckpt / Path(tvm.Inception_V3_Weights.IMAGENET1K_V1.url).name)
    net = TorchvisionInception()
    assert torch.equal(net.net.Conv2d_1a_3x3.conv.weight, state["Conv2d_1a_3x3.conv.weight"])
    feats = extract(net, torch.rand(2, 3, 64, 64))
    assert feats.shape == (2, 2048) and feats.dtype == torch.float64


def test_default_backbones_load_from_the_torch_cache(tmp_path, with_torch_home):
    """Without --backbone random, LPIPS and the style loss load ImageNet weights from $TORCH_HOME (here: random
    weights under torchvision's file names), through the same path as a real machine."""
    from syncengine.evaluation import EvalOptions, evaluate

    a, b, _ = _two_runs(tmp_path)
    options = EvalOptions(metrics=["intra_lpips", "intra_style"])
    assert options.lpips["backbone"] == "pretrained" and options.style["backbone"] == "pretrained"
    ra, rb = evaluate([a, b], options)
    assert ra.metrics["intra_lpips"] < 1e-6 < rb.metrics["intra_lpips"]
    assert ra.metrics["intra_style"] < 1e-4 * rb.metrics["intra_style"]
    assert not ra.unavailable


def test_giqa_through_the_runner(tmp_path):
    from syncengine.evaluation import EvalOptions, evaluate
    from syncengine.evaluation.runs import load_image

    a, _, _ = _two_runs(tmp_path)
    np.savez(tmp_path / "gmm.npz", weights=np.ones(1), means=np.zeros((1, 8)), covariances=np.ones((1, 8)))
    features = TinyFeatures()
    (r,) = evaluate([a], EvalOptions(metrics=["giqa"], giqa_model=str(tmp_path / "gmm.npz")), features=features)
    # the runner's crops: one per image, seeded by the image's index
    crops = [random_crops(load_image(a / f"{k:03d}.png"), 32, 1, torch.Generator().manual_seed(k)) for k in range(3)]
    with torch.no_grad():
        feats = features(torch.cat(crops)).double()
    expected = (-0.5 * (feats**2).sum(1) - 4 * math.log(2 * math.pi)).mean().item()
    assert r.metrics["giqa"] == pytest.approx(expected, rel=1e-6)


def test_images_without_sidecars(tmp_path, capsys):
    from syncengine.cli import main
    from syncengine.outputs import to_pil

    folder = tmp_path / "plain"
    folder.mkdir()
    to_pil(tiled(torch.rand(3, 32, 32), 3)).save(folder / "x.png")
    assert main(["evaluate", str(folder), "--out", str(tmp_path / "r"), "--backbone", "random"]) == 2
    assert "--window" in capsys.readouterr().err
    assert main(["evaluate", str(folder), "--window", "32", "--out", str(tmp_path / "r"), "--backbone", "random",
                 "--no-plot"]) == 0
    out = capsys.readouterr().out
    assert "Mean-CLIP-S: unavailable: CLIP score needs each image's prompt" in out
