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
    w = _weights(faces, spec)
    assert w[..., 2:-2, :].min() > 0  # see geometry test: pole rows are a known gap


def test_equirect_canvas_must_be_two_to_one():
    with pytest.raises(ConfigError):
        PerspectiveTiler().validate(CanvasSpec(256, 768))
