"""Sliding windows: coverage, edge snapping, loop wrap, extract/scatter adjointness; merger weights."""
from __future__ import annotations

import pytest
import torch

from syncengine.merger import MergeBuffer
from syncengine.views import CanvasSpec, CropView
from syncengine_mergers.weighted import AverageMerger, GaussianConfig, GaussianMerger
from syncengine_panorama.sliding import SlidingConfig, SlidingTiler, window_starts


def test_window_starts_snap_last_window_to_edge():
    assert window_starts(384, 64, 16) == list(range(0, 321, 16))  # paper: 21 windows, exact fit
    assert len(window_starts(384, 64, 16)) == 21
    assert window_starts(100, 64, 16) == [0, 16, 32, 36]  # last snapped so the edge is covered
    assert window_starts(64, 64, 16) == [0]
    assert window_starts(96, 64, 32, loop=True) == [0, 32, 64]


def _coverage(views, canvas):
    count = torch.zeros(canvas.latent_shape())
    for v in views:
        v.scatter_add(torch.ones(1, canvas.latent_channels, *v.latent_size), count)
    return count


@pytest.mark.parametrize("height,width,loop",
                         [(512, 3072, False), (512, 1000, False), (1024, 1536, False), (512, 2048, True)])
def test_views_cover_canvas(height, width, loop):
    canvas = CanvasSpec(height, width)
    views = SlidingTiler(SlidingConfig(window=512, stride=128, loop=loop)).views(canvas)
    assert (_coverage(views, canvas) > 0).all()
    assert all(v.latent_size == (64, 64) for v in views)
    if height > 512:  # 2D grid
        assert len({v.top for v in views}) > 1
    if (height, width, loop) == (512, 3072, False):
        assert len(views) == 21  # the paper's count


def test_loop_views_wrap_and_count_evenly():
    canvas = CanvasSpec(64, 256)
    views = SlidingTiler(SlidingConfig(window=64, stride=16, loop=True)).views(canvas)
    assert len(views) == 32 // 2
    count = _coverage(views, canvas)
    assert torch.all(count == count.flatten()[0])  # every column covered the same number of times: no seam
    last = views[-1]
    assert last.wraps
    x = torch.arange(32.0).view(1, 1, 1, 32).expand(1, 4, 8, 32)
    cols = last.extract(x)[0, 0, 0].tolist()
    assert cols == [30, 31, 0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("view", [CropView(0, top=2, left=3, height=4, width=5),
                                  CropView(1, top=0, left=14, height=4, width=6, canvas_width=16)])
def test_scatter_is_adjoint_of_extract(view):
    g = torch.Generator().manual_seed(0)
    canvas = torch.randn(1, 4, 8, 16, generator=g)
    window = torch.randn(1, 4, *view.latent_size, generator=g)
    out = torch.zeros_like(canvas)
    view.scatter_add(window, out)
    assert torch.allclose((view.extract(canvas) * window).sum(), (canvas * out).sum(), atol=1e-5)


@pytest.mark.parametrize("merger", [AverageMerger(), GaussianMerger(GaussianConfig(sigma=0.2))])
def test_merging_a_constant_gives_the_constant_and_weights_normalise(merger):
    canvas = CanvasSpec(64, 200)
    views = SlidingTiler(SlidingConfig(window=64, stride=24)).views(canvas)
    buf = MergeBuffer(canvas.latent_shape())
    for v in views:
        buf.add(v, torch.full((1, 4, *v.latent_size), 3.0), merger.weight(v))
    torch.testing.assert_close(buf.result(torch.zeros(canvas.latent_shape())), torch.full(canvas.latent_shape(), 3.0))
    # normalised weights sum to one at every position
    total = torch.zeros(1, 1, canvas.latent_height, canvas.latent_width)
    for v in views:
        contribution = torch.zeros_like(total)
        v.scatter_add(merger.weight(v), contribution)
        total += contribution / buf.weight
    torch.testing.assert_close(total, torch.ones_like(total))


def test_gaussian_weights_favour_window_centres():
    w = GaussianMerger().weight(CropView(0, height=8, width=8))[0, 0]
    assert w[4, 4] > w[0, 4] > w[0, 0] > 0
    torch.testing.assert_close(w, w.flip(0).flip(1))


def test_view_weight_multiplies_merger_weight():
    v = CropView(0, height=2, width=2, weight=torch.tensor([[[[0.0, 1.0], [0.5, 1.0]]]]))
    torch.testing.assert_close(AverageMerger().weight(v), v.weight)


def test_uncovered_positions_keep_fallback():
    buf = MergeBuffer((1, 4, 4, 4))
    v = CropView(0, height=2, width=2)
    buf.add(v, torch.ones(1, 4, 2, 2), torch.ones(1, 1, 2, 2))
    out = buf.result(torch.full((1, 4, 4, 4), 7.0))
    assert out[0, 0, 0, 0] == 1 and out[0, 0, 3, 3] == 7
