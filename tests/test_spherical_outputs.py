"""360° outputs: XMP panorama metadata in the PNG, cube faces / layouts / perspective views, sidecar projection."""
from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch
from PIL import Image

from syncengine.api import generate
from syncengine.config import resolve
from syncengine.errors import ConfigError
from syncengine_spherical import geometry as g

GPANO = "{http://ns.google.com/photos/1.0/panorama/}"


def _direction_image(h: int) -> torch.Tensor:
    return g.equirect_directions(h, 2 * h).permute(2, 0, 1)[None].float()


def test_equirect_perspective_equirect_round_trip():
    # A smooth field (the unit direction of each pixel) survives projection and inverse mapping to within
    # bilinear error: max 0.02 on the covered area of a 64x128 canvas with a 48 px, 90° view.
    eq = _direction_image(64)
    view = g.sample_perspective(eq, g.equirect_to_perspective_grid(48, 48, 90.0, 170.0, 20.0))  # crosses the seam
    back, mask = g.equirect_from_perspective(view, (64, 128), 90.0, 170.0, 20.0)
    assert 0.1 < mask.mean() < 0.2  # a square 90° view sees 1/6 of the sphere's solid angle
    assert ((back - eq) * mask).abs().max() < 0.02


def test_cube_round_trip_covers_the_sphere():
    eq = _direction_image(64)
    back = g.equirect_from_cube(g.cube_faces(eq, 48), 64)
    assert (back - eq).abs().max() < 0.02  # every pixel, poles and seam included


def test_known_direction_lands_at_the_expected_pixel_in_every_view():
    from syncengine.views import CanvasSpec
    from syncengine_spherical.tilers import CubemapTiler, PerspectiveTiler

    eq = _direction_image(128)
    tilers = [CubemapTiler(CubemapTiler.Config(window=256)),
              PerspectiveTiler(PerspectiveTiler.Config(window=256, poles=True, pitches=[-30.0, 30.0]))]
    d = torch.nn.functional.normalize(torch.tensor([0.3, 0.5, -0.8], dtype=torch.float64), dim=0)
    for tiler in tilers:
        seen = 0
        for view in tiler.views(CanvasSpec(1024, 2048)):
            cam = view.context["camera"]
            h, w = view.latent_size
            hit = g.perspective_pixel(d, h, w, cam["fov"], cam["yaw"], cam["pitch"])
            if hit is None:
                continue
            seen += 1
            u, v = hit
            image = g.sample_perspective(eq, view.grid)[0, :, int(v), int(u)].double()  # the pixel containing it
            angle = torch.arccos((image / image.norm()) @ d)
            assert angle < math.pi / w  # within a pixel's diagonal (a 90° view's pitch is about pi / (2 w))
        assert seen >= 1


def test_cube_layouts():
    faces = {name: torch.full((1, 3, 4, 4), float(k)) for k, name in enumerate(g.CUBE_FACES)}
    dice = g.cube_dice(faces)
    assert dice.shape == (1, 3, 12, 16)
    for name, (row, col) in g.DICE.items():
        assert dice[0, 0, row * 4, col * 4] == list(g.CUBE_FACES).index(name)
    assert dice[0, 0, 0, 0] == 0 and dice[0, 0, 0, 8] == 0  # empty cells
    horizon = g.cube_horizon(faces)
    assert horizon.shape == (1, 3, 4, 24)
    assert [horizon[0, 0, 0, 4 * k].item() for k in range(6)] == list(range(6))


def test_dice_faces_meet_along_shared_edges():
    # The up face's bottom row and the front face's top row look at (almost) the same directions, etc.
    faces = g.cube_faces(_direction_image(128), 32)
    dice = g.cube_dice(faces)[0]
    s = 32
    for upper, lower in (("up", "front"), ("front", "down")):
        (r0, c0), (r1, c1) = g.DICE[upper], g.DICE[lower]
        above = dice[:, (r0 + 1) * s - 1, c0 * s : (c0 + 1) * s]
        below = dice[:, r1 * s, c1 * s : (c1 + 1) * s]
        assert (above - below).abs().max() < 0.1
    for left, right in (("left", "front"), ("front", "right"), ("right", "back")):
        (r0, c0), (r1, c1) = g.DICE[left], g.DICE[right]
        edge0, edge1 = dice[:, r0 * s : (r0 + 1) * s, (c0 + 1) * s - 1], dice[:, r1 * s : (r1 + 1) * s, c1 * s]
        assert (edge0 - edge1).abs().max() < 0.1


def test_equirect_png_carries_gpano_xmp_and_extra_images(tiny_spec, tmp_path):
    spec = tiny_spec(canvas={"height": 64, "width": 128}, sampler={"steps": 1, "view_batch_size": 6})
    spec["tiler"] = {"name": "cubemap", "window": 32, "export": ["faces", "dice", "horizon", "views"],
                     "export_views": [[30, -10, 60]], "export_size": 16}
    generate(spec)
    out = tmp_path / "out"
    with Image.open(out / "img.png") as im:
        assert im.size == (128, 64)
        xmp = im.info["XML:com.adobe.xmp"]
    desc = ET.fromstring(xmp.split("?>", 1)[1].rsplit("<?xpacket", 1)[0]).find(".//{*}Description")
    assert desc.get(f"{GPANO}ProjectionType") == "equirectangular"
    assert desc.get(f"{GPANO}FullPanoWidthPixels") == "128" and desc.get(f"{GPANO}FullPanoHeightPixels") == "64"
    assert desc.get(f"{GPANO}CroppedAreaImageWidthPixels") == "128"
    meta = json.loads((out / "img.json").read_text())
    proj = meta["projection"]
    assert proj["type"] == "equirectangular" and proj["tiler"] == "cubemap" and len(proj["views"]) == 6
    assert proj["views"][4] == {"yaw": 0.0, "pitch": 90.0, "roll": 0.0, "fov": 90.0}
    expected = {f"face-{n}" for n in g.CUBE_FACES} | {"dice", "horizon"} | {f"view-{k:02d}" for k in range(6)}
    expected |= {"look-y30-p-10-f60"}
    assert set(meta["extra_images"]) == expected == set(proj["exports"])
    assert proj["exports"]["look-y30-p-10-f60"] == {"yaw": 30.0, "pitch": -10.0, "roll": 0.0, "fov": 60.0, "size": 16}
    with Image.open(out / "img.dice.png") as im:
        assert im.size == (64, 48)
    # The exported front face is the projection of the written equirectangular image.
    eq = torch.from_numpy(np.asarray(Image.open(out / "img.png")).astype(np.float32) / 255).permute(2, 0, 1)[None]
    front = np.asarray(Image.open(out / "img.face-front.png")).astype(np.float32) / 255
    expected_front = g.cube_faces(eq, 16)["front"][0].permute(1, 2, 0).numpy()
    assert np.abs(front - expected_front).max() <= 1 / 255 + 1e-6


@pytest.mark.parametrize("bad, key", [({"export": ["cube"]}, "tiler.export"),
                                      ({"export_views": [[0, 0]]}, "tiler.export_views[0]"),
                                      ({"sampling": "area"}, "tiler.sampling")])
def test_export_options_are_validated(tiny_spec, bad, key):
    spec = tiny_spec(canvas={"height": 64, "width": 128})
    spec["tiler"] = {"name": "perspective", "window": 32, **bad}
    with pytest.raises(ConfigError) as err:
        resolved = resolve(spec)
        resolved.build("tiler").validate(resolved.canvas)
    assert key in str(err.value)
