import numpy as np
import pytest
from PIL import Image

from syncengine.api import generate


@pytest.mark.parametrize("target", ["xt", "x0"])
def test_perspective_ring_generates_a_2to1_image_with_a_continuous_seam(tiny_spec, tmp_path, target):
    spec = tiny_spec(canvas={"height": 64, "width": 128}, sampler={"steps": 2, "view_batch_size": 10},
                     merger={"name": "average", "target": target})
    spec["tiler"] = {"name": "perspective", "window": 32, "views_per_ring": 8, "poles": True}
    generate(spec)
    img = np.asarray(Image.open(tmp_path / "out" / "img.png")).astype(float)
    assert img.shape[:2] == (64, 128)
    seam = np.abs(img[:, 0] - img[:, -1]).mean()
    inside = np.abs(img[:, 1:] - img[:, :-1]).mean()
    assert seam < 2 * inside + 1  # first and last columns are neighbours like any other pair
