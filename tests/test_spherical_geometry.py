import math

import pytest
import torch

from syncengine_spherical import geometry as g
from syncengine_spherical.views import ProjectedView


def test_known_direction_lands_at_expected_pixel():
    # 90° fov, 64 px: a direction 45° to the right of the view axis is the right image edge.
    lon, lat = torch.tensor(math.radians(30.0), dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64)
    d = g.lonlat_to_direction(lon, lat)
    u, v = g.perspective_pixel(d, 64, 64, 90.0, yaw_deg=30.0, pitch_deg=0.0)
    assert abs(u - 32) < 1e-9 and abs(v - 32) < 1e-9
    u, v = g.perspective_pixel(d, 64, 64, 90.0, yaw_deg=0.0, pitch_deg=0.0)
    assert abs(u - (32 + 32 * math.tan(math.radians(30)))) < 1e-9
    assert g.perspective_pixel(d, 64, 64, 90.0, yaw_deg=210.0, pitch_deg=0.0) is None


def test_projection_of_a_smooth_function_matches_closed_form():
    h = 64
    lat = math.pi / 2 - (torch.arange(h) + 0.5) / h * math.pi
    lon = (torch.arange(2 * h) + 0.5) / (2 * h) * 2 * math.pi - math.pi
    la, lo = torch.meshgrid(lat, lon, indexing="ij")
    eq = g.lonlat_to_direction(lo, la).permute(2, 0, 1).unsqueeze(0).float()  # image of directions
    grid = g.equirect_to_perspective_grid(32, 32, 90.0, yaw_deg=170.0, pitch_deg=20.0)  # crosses the seam
    view = g.sample_perspective(eq, grid)[0].permute(1, 2, 0).double()
    expected = g.perspective_rays(32, 32, 90.0) @ g.rotation(170.0, 20.0).T
    expected = expected / expected.norm(dim=-1, keepdim=True)
    assert (view - expected).abs().max() < 0.03  # bilinear error of a smooth field at 64x128


def test_scatter_is_the_adjoint_of_sample():
    torch.manual_seed(0)
    grid = g.equirect_to_perspective_grid(8, 8, 90.0, yaw_deg=175.0, pitch_deg=-10.0)
    x, y = torch.randn(1, 2, 16, 32, dtype=torch.float64), torch.randn(1, 2, 8, 8, dtype=torch.float64)
    lhs = (g.sample_perspective(x, grid.double()) * y).sum()
    rhs = (x * g.scatter_perspective(y, grid.double(), (16, 32))).sum()
    assert torch.allclose(lhs, rhs, atol=1e-10)


@pytest.mark.parametrize("canvas_h, face", [(32, 32), (16, 8), (64, 32), (128, 64)])
def test_cube_faces_cover_the_sphere_without_gaps(canvas_h, face):
    # Bilinear sampling alone leaves the rows nearest the poles (up to 20 of 128) with uncovered columns; the pole
    # prefilter gives every canvas pixel a positive weight, at every canvas/face size ratio tried.
    weight = torch.zeros(1, 1, canvas_h, 2 * canvas_h)
    for yaw, pitch in g.CUBE_FACES.values():
        view = ProjectedView(0, grid=g.equirect_to_perspective_grid(face, face, 90.0, yaw_deg=yaw, pitch_deg=pitch))
        view.scatter_add(torch.ones(1, 1, face, face), weight)
    assert weight.min() > 0
    assert torch.allclose(weight[..., 0], weight[..., -1], rtol=0.5)  # seam columns get comparable density


def test_pole_filter_is_a_row_average_that_leaves_low_latitudes_alone():
    x = torch.randn(2, 3, 32, 64, generator=torch.Generator().manual_seed(0))
    y = g.pole_filter(x)
    lat = 90 - (torch.arange(32) + 0.5) / 32 * 180
    untouched = lat.abs() < 50
    assert torch.equal(y[..., untouched, :], x[..., untouched, :])
    assert not torch.allclose(y[..., 0, :], x[..., 0, :])
    torch.testing.assert_close(y.sum(-1), x.sum(-1), atol=1e-4, rtol=1e-5)  # circular box filter keeps row sums
    torch.testing.assert_close(g.pole_filter(torch.ones(1, 1, 32, 64)), torch.ones(1, 1, 32, 64))


def test_pole_view_scatter_is_the_adjoint_of_extract():
    x, y = torch.randn(1, 2, 16, 32, dtype=torch.float64), torch.randn(1, 2, 8, 8, dtype=torch.float64)
    for sampling in ("bilinear", "nearest"):
        view = ProjectedView(0, grid=g.equirect_to_perspective_grid(8, 8, 90.0, 0.0, 90.0).double(), sampling=sampling)
        out = torch.zeros_like(x)
        view.scatter_add(y, out)
        assert torch.allclose((view.extract(x) * y).sum(), (x * out).sum(), atol=1e-10)
