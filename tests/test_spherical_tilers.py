import pytest
import torch

from syncengine.errors import ConfigError
from syncengine.views import CanvasSpec
from syncengine_spherical.tilers import CubemapTiler, PerspectiveTiler


def _weights(views, spec):
    w = torch.zeros(1, 1, spec.latent_height, spec.latent_width)
    for v in views:
        v.scatter_add(torch.ones(1, 1, *v.latent_size), w)
    return w


def test_perspective_ring_and_cubemap_views():
    spec = CanvasSpec(256, 512)
    ring = PerspectiveTiler(PerspectiveTiler.Config(window=128, poles=True))
    ring.validate(spec)
    views = ring.views(spec)
    assert len(views) == 10 and ring.periodic_width
    assert [v.context["camera"]["yaw"] for v in views[:8]] == [45.0 * k for k in range(8)]
    cube = CubemapTiler(CubemapTiler.Config(window=256))
    faces = cube.views(spec)
    assert [v.context["face"] for v in faces] == ["front", "right", "back", "left", "up", "down"]
    assert _weights(faces, spec).min() > 0  # the whole sphere, poles included
    assert _weights(views, spec).min() > 0
    assert _weights(views[:8], spec)[..., spec.latent_height // 2, :].min() > 0  # the ring alone: the horizon


@pytest.mark.parametrize("tiler", [CubemapTiler(CubemapTiler.Config(window=128)),
                                   PerspectiveTiler(PerspectiveTiler.Config(window=128, poles=True,
                                                                            pitches=[-30, 30]))])
def test_merger_weights_normalise_over_the_sphere(tiler):
    # Each view reads a constant canvas; merging those reads with the merger's weights gives the constant back at
    # every position: the adjoint scatter of the weights is exactly the normaliser.
    from syncengine.merger import MergeBuffer
    from syncengine_mergers.weighted import GaussianMerger

    spec = CanvasSpec(128, 256)
    merger = GaussianMerger(GaussianMerger.Config(sigma=0.3))
    canvas = torch.full(spec.latent_shape(), 0.7)
    buf = MergeBuffer(canvas.shape)
    for view in tiler.views(spec):
        buf.add(view, view.extract(canvas), merger.weight(view))
    assert buf.weight.min() > 0
    torch.testing.assert_close(buf.result(torch.zeros_like(canvas)), canvas)


def test_sampling_option_is_validated():
    with pytest.raises(ConfigError, match="tiler.sampling"):
        CubemapTiler(CubemapTiler.Config(sampling="bicubic")).validate(CanvasSpec(256, 512))


def test_equirect_canvas_must_be_two_to_one():
    with pytest.raises(ConfigError):
        PerspectiveTiler().validate(CanvasSpec(256, 768))
