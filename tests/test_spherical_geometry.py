import math

import torch

from syncengine_spherical import geometry as g


def test_known_direction_lands_at_expected_pixel():
    # 90° fov, 64 px: a direction 45° to the right of the view axis is the right image edge.
    d = g.lonlat_to_direction(torch.tensor(math.radians(30.0), dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64))
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
