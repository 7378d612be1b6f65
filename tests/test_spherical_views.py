import torch

from syncengine_spherical import geometry as g
from syncengine_spherical.views import ProjectedView


def test_projected_view_extract_and_scatter_are_adjoint():
    torch.manual_seed(0)
    view = ProjectedView(0, grid=g.equirect_to_perspective_grid(8, 8, 90.0, yaw_deg=-170.0, pitch_deg=15.0))
    assert view.latent_size == (8, 8)
    x, y = torch.randn(1, 4, 16, 32), torch.randn(1, 4, 8, 8)
    out = torch.zeros_like(x)
    view.scatter_add(y, out)
    assert torch.allclose((view.extract(x) * y).sum(), (x * out).sum(), atol=1e-4)
    weights = torch.zeros(1, 1, 16, 32)
    view.scatter_add(torch.ones(1, 1, 8, 8), weights)
    assert abs(weights.sum().item() - 64) < 1e-3  # bilinear weights of every sample sum to one


def test_projected_unit_noise_loses_variance():
    # Measured: bilinear projection of N(0, 1) latent noise (64x128 canvas, 32x32 90° view) has variance ~0.5, the
    # reason the x0 (SyncTweedies) merge target exists (its variance: tests/test_spherical_x0.py).
    torch.manual_seed(0)
    x = torch.randn(1, 4, 64, 128)
    v = ProjectedView(0, grid=g.equirect_to_perspective_grid(32, 32, 90.0, yaw_deg=30.0, pitch_deg=0.0)).extract(x)
    assert 0.3 < v.var().item() < 0.7
