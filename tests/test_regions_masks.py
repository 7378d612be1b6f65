"""Region masks: every source fitted to the canvas (closed-form references), feathering, latent pooling, and the
weights the regions tiler gives its views (normalising to 1 wherever regions overlap)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from syncengine.errors import ConfigError
from syncengine.merger import MergeBuffer
from syncengine.views import CanvasSpec
from syncengine_mergers.weighted import AverageMerger, GaussianMerger
from syncengine_regions.layouts import demo_layout
from syncengine_regions.masks import MaskConfig, feather, load_mask, to_latents
from syncengine_regions.tiler import RegionConfig, RegionsConfig, RegionsTiler
from syncengine_regions.views import RegionView

H, W = 64, 128


def save(array: np.ndarray, path, mode=None):
    Image.fromarray(array.astype(np.uint8), mode).save(path)
    return str(path)


def test_png_any_size_is_resized_by_area_then_thresholded_or_kept_soft(tmp_path):
    small = np.zeros((8, 12), np.uint8)
    small[:, :5] = 255  # 5 of 12 columns: 53.33 canvas columns
    path = save(small, tmp_path / "m.png")
    soft = load_mask(MaskConfig(png=path, threshold=None), H, W, "k")
    expected = torch.zeros(H, W)
    expected[:, :53] = 1
    expected[:, 53] = 1 / 3  # canvas column 53 covers source columns 4.969..5.062: a third of it is inside
    assert torch.allclose(soft, expected, atol=1e-6)
    assert soft.sum().item() == pytest.approx(H * W * 5 / 12, rel=1e-6)  # area coverage keeps the covered area
    hard = load_mask(MaskConfig(png=path), H, W, "k")
    expected[:, 53] = 0
    assert torch.equal(hard, expected)
    # a larger PNG shrinks to the canvas the same way; an alpha channel is the mask when there is one
    big = np.kron(small, np.ones((16, 16), np.uint8))
    assert torch.equal(load_mask(MaskConfig(png=save(big, tmp_path / "big.png")), H, W, "k"), hard)
    rgba = np.zeros((8, 12, 4), np.uint8)
    rgba[..., 3] = small
    assert torch.equal(load_mask(MaskConfig(png=save(rgba, tmp_path / "a.png", "RGBA")), H, W, "k"), hard)
    grey = small // 255 * 100  # soft masks keep grey levels
    soft = load_mask(MaskConfig(png=save(grey, tmp_path / "g.png"), threshold=None), H, W, "k")
    assert soft[0, 0].item() == pytest.approx(100 / 255)


def test_rect_in_pixels_and_fractions():
    px = load_mask(MaskConfig(rect=[8, 16, 24, 40]), H, W, "k")
    expected = torch.zeros(H, W)
    expected[8:32, 16:56] = 1
    assert torch.equal(px, expected)
    frac = load_mask(MaskConfig(rect=[0.25, 0.5, 0.5, 0.25]), H, W, "k")
    expected = torch.zeros(H, W)
    expected[16:48, 64:96] = 1
    assert torch.equal(frac, expected)
    whole = load_mask(MaskConfig(rect=[0, 0, 1.0, 1.0]), H, W, "k")  # floats <= 1: fractions
    assert torch.equal(whole, torch.ones(H, W))
    assert load_mask(MaskConfig(rect=[0, 0, 1, 1]), H, W, "k").sum() == 1  # all ints: pixels


def test_layout_color_is_its_nearest_upscaled_region(tmp_path):
    layout = np.asarray(demo_layout(8, 16))
    path = save(layout, tmp_path / "layout.png")
    for color, rgb in (("#ff0000", (255, 0, 0)), ("blue", (0, 0, 255)), ("#0f0", (0, 255, 0))):
        mask = load_mask(MaskConfig(layout=path, color=color), H, W, "k")
        hit = np.all(layout == rgb, axis=-1).astype(np.float32)
        assert hit.any()
        assert torch.equal(mask, torch.from_numpy(np.kron(hit, np.ones((8, 8), np.float32))))


def test_feather_is_a_gaussian_blur_in_pixels():
    step = torch.zeros(H, W)
    step[:, : W // 2] = 1
    sigma = 4.0
    out = feather(step, sigma)
    x = torch.arange(W, dtype=torch.float64) + 0.5 - W / 2
    reference = torch.tensor([0.5 * math.erfc(v / (sigma * math.sqrt(2))) for v in x.tolist()], dtype=torch.float64)
    assert torch.allclose(out[0].double(), reference, atol=0.02)
    assert torch.equal(out[0], out[-1])  # the blur replicates the canvas border: no fading at the top and bottom
    assert torch.equal(feather(step, 0.0), step)
    # on a loop canvas the blur continues across the seam
    wrapped = feather(step, sigma, wrap=True)
    assert wrapped[0, 0] < 0.99 and wrapped[0, -1] > 0.01
    assert torch.allclose(wrapped[0].roll(W // 2), 1 - wrapped[0], atol=1e-6)


def test_latent_weights_are_the_area_mean_of_each_latent():
    mask = torch.rand(H, W)
    pooled = to_latents(mask, 8)
    assert pooled.shape == (1, 1, H // 8, W // 8)
    assert torch.allclose(pooled[0, 0], mask.reshape(H // 8, 8, W // 8, 8).mean(dim=(1, 3)))


def tiler(regions, **options) -> RegionsTiler:
    defaults = {"window": 64, "stride": 32}
    regions = [RegionConfig(**{**r, "mask": MaskConfig(**r["mask"])}) for r in regions]
    return RegionsTiler(RegionsConfig(**{**defaults, **options}, regions=regions))


@pytest.mark.parametrize("merger", [AverageMerger(), GaussianMerger()], ids=["average", "gaussian"])
def test_weights_normalise_to_one_where_regions_overlap(merger):
    """Each group's share of the canvas is its mask over max(sum of masks, 1); the background takes the rest."""
    canvas = CanvasSpec(H, W)
    a = np.zeros((H, W), np.float32)
    a[8:48, 16:80] = 1
    t = tiler([{"mask": {"rect": [8, 16, 40, 64]}, "prompt": "a"}, {"mask": {"rect": [0, 48, 32, 48]}, "prompt": "b"}])
    b = np.zeros((H, W), np.float32)
    b[0:32, 48:96] = 1
    views = t.views(canvas)
    groups = ["background", 0, 1]
    shares = MergeBuffer((1, len(groups), H // 8, W // 8))
    for view in views:
        g = groups.index(view.context.get("region", "background"))
        onehot = torch.zeros(1, len(groups), *view.latent_size)
        onehot[:, g] = 1
        shares.add(view, onehot, merger.weight(view))
    share = shares.result(torch.zeros(1)).squeeze(0)
    m = torch.from_numpy(np.stack([a, b])).reshape(2, H // 8, 8, W // 8, 8).mean(dim=(2, 4))
    total = m.sum(0)
    expected = torch.cat([(1 - total.clamp(max=1))[None], m]) / total.clamp(min=1)
    assert torch.allclose(share, expected, atol=1e-6)
    assert torch.allclose(share.sum(0), torch.ones(H // 8, W // 8), atol=1e-6)
    assert (total > 1).any() and (total == 0).any()  # the case covers overlaps and bare background


def test_region_views_are_the_sliding_windows_their_mask_touches_also_across_a_loop_seam():
    canvas = CanvasSpec(H, 256)
    t = tiler([{"mask": {"rect": [0, 0, 64, 16]}, "prompt": "a", "sync": True},
               {"mask": {"rect": [0, 0, 1.0, 1.0]}, "prompt": "b"}], loop=True)
    views = t.views(canvas)
    assert not any(v.context.get("sync_group") == "background" for v in views)  # fully covered: no background
    regions = t.regions(canvas)
    first = [v for v in views if v.context["region"] == 0]
    assert all(isinstance(v, RegionView) and v.context["sync_group"] == "region-0" for v in first)
    assert sorted(v.left for v in first) == [0, 28]  # latent columns 0..1: the first window and the wrapping last one
    assert any(v.wraps for v in first)
    for v in views:
        assert torch.equal(v.weight, v.extract(regions[v.context["region"]].latents))
    second = [v for v in views if v.context["region"] == 1]
    assert len(second) == 8 and all(v.context["sync_group"] is None and v.context["prompt"] == "b" for v in second)


def test_background_prompt_and_region_options_reach_the_view_context():
    t = tiler([{"mask": {"rect": [0, 0, 32, 32]}, "prompt": "a cat", "negative_prompt": "blur", "guidance_scale": 3.0}],
              background_prompt="a garden", background_negative_prompt="text")
    views = t.views(CanvasSpec(H, W))
    bg = [v for v in views if v.context.get("sync_group") == "background"]
    region = [v for v in views if "region" in v.context]
    assert len(bg) == 3
    assert all(v.context["prompt"] == "a garden" and v.context["negative_prompt"] == "text" for v in bg)
    assert len(region) == 1 and region[0].context == {"prompt": "a cat", "sync_group": None, "region": 0,
                                                      "negative_prompt": "blur", "guidance_scale": 3.0}


def test_layout_shorthand_expands_to_one_region_per_colour(tmp_path):
    path = save(np.asarray(demo_layout(8, 16)), tmp_path / "layout.png")
    t = RegionsTiler(RegionsConfig(window=64, stride=32, layout=path, layout_background="#fff",
                                   prompts={"#ff0000": "balloon", "#00ff00": "meadow", "#0000ff": "lake"}))
    regions = t.regions(CanvasSpec(H, W))
    assert [r.config.prompt for r in regions] == ["balloon", "meadow", "lake"]
    assert torch.equal(regions[0].pixels, load_mask(MaskConfig(layout=path, color="#ff0000"), H, W, "k"))
    with pytest.raises(ConfigError, match="has no prompt"):
        config = RegionsConfig(window=64, stride=32, layout=path, prompts={"#ff0000": "balloon"})
        RegionsTiler(config).validate(CanvasSpec(H, W))


def test_sync_groups_background_and_syncing_regions_each_get_an_anchor():
    from syncengine.sampler import JointSampler, SamplerOptions
    from syncengine.sync import SyncSchedule

    t = tiler([{"mask": {"rect": [0, 0, 64, 40]}, "prompt": "a"},
               {"mask": {"rect": [0, 64, 64, 64]}, "prompt": "b", "sync": True}])
    views = t.views(CanvasSpec(H, W))
    groups = JointSampler(None, views, AverageMerger(), None, SyncSchedule(1.0), SamplerOptions()).groups
    assert set(groups) == {"background", "region-1"}
    anchor, members = groups["background"]
    assert [v.left for v in members] == [0, 4] and anchor is members[1]  # the window at 8 lies under b alone: skipped
    assert all(v.context["region"] == 1 for v in groups["region-1"][1])
