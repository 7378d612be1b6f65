"""What a 360° run writes besides the equirectangular PNG: XMP panorama metadata (so 360° viewers open it as a
sphere), optional cube faces / dice / horizon layouts and perspective views, and the projection for the sidecar."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from syncengine.errors import ConfigError

from . import geometry

EXPORTS = ("faces", "dice", "horizon", "views")


@dataclass
class ExportConfig:
    """Options shared by the spherical tilers (they inherit them)."""

    export: list[str] = field(default_factory=list)  # extra images: faces, dice, horizon, views (the tiler's own)
    export_views: list[list[float]] = field(default_factory=list)  # more perspective views: [yaw, pitch, fov] (deg)
    export_size: int = 0  # px of exported faces and views; 0: the tiler window


def check_export(config: ExportConfig) -> None:
    for name in config.export:
        if name not in EXPORTS:
            raise ConfigError("tiler.export", f"{name!r} is not one of {', '.join(EXPORTS)}")
    for k, v in enumerate(config.export_views):
        if len(v) != 3 or not 0 < v[2] < 180:
            raise ConfigError(f"tiler.export_views[{k}]",
                              f"expected [yaw, pitch, fov] with 0 < fov < 180, got {list(v)}")
    if config.export_size < 0:
        raise ConfigError("tiler.export_size", f"must be >= 0, got {config.export_size}")


def xmp_packet(width: int, height: int) -> str:
    """Google Photo Sphere (GPano) XMP for a full 360°x180° equirectangular image whose centre looks at longitude
    0 (heading 0)."""
    attrs = {
        "ProjectionType": "equirectangular",
        "UsePanoramaViewer": "True",
        "FullPanoWidthPixels": width,
        "FullPanoHeightPixels": height,
        "CroppedAreaImageWidthPixels": width,
        "CroppedAreaImageHeightPixels": height,
        "CroppedAreaLeftPixels": 0,
        "CroppedAreaTopPixels": 0,
        "PoseHeadingDegrees": "0.0",
    }
    body = "\n".join(f'    GPano:{k}="{v}"' for k, v in attrs.items())
    return (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>\n'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/">\n'
        ' <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">\n'
        '  <rdf:Description rdf:about="" xmlns:GPano="http://ns.google.com/photos/1.0/panorama/"\n'
        f"{body}/>\n"
        " </rdf:RDF>\n"
        "</x:xmpmeta>\n"
        '<?xpacket end="w"?>'
    )


def _deg(x: float) -> str:
    return f"{x:g}".replace(".", "p")


def finish(image: torch.Tensor, config: ExportConfig, cameras: list[dict[str, float]], window: int,
           tiler: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """From the finished equirectangular image [3, H, 2H] in [0, 1]: the extra images ``{suffix: [3, h, w]}`` and
    the metadata (``xmp`` for the PNG, ``sidecar`` for the JSON)."""
    h, w = image.shape[-2:]
    size = config.export_size or window
    x = image[None].float()
    images: dict[str, torch.Tensor] = {}
    exports: dict[str, Any] = {}
    if {"faces", "dice", "horizon"} & set(config.export):
        faces = geometry.cube_faces(x, size)
        if "faces" in config.export:
            for name, face in faces.items():
                images[f"face-{name}"] = face[0]
                yaw, pitch = geometry.CUBE_FACES[name]
                exports[f"face-{name}"] = {"yaw": yaw, "pitch": pitch, "roll": 0.0, "fov": 90.0, "size": size}
        if "dice" in config.export:
            images["dice"] = geometry.cube_dice(faces)[0]
            exports["dice"] = {"layout": [["", "up", "", ""], ["left", "front", "right", "back"], ["", "down", "", ""]],
                               "face_size": size}
        if "horizon" in config.export:
            images["horizon"] = geometry.cube_horizon(faces)[0]
            exports["horizon"] = {"layout": list(geometry.CUBE_FACES), "face_size": size}
    looks = [dict(cam) for cam in cameras] if "views" in config.export else []
    names = [f"view-{k:02d}" for k in range(len(looks))]
    for yaw, pitch, fov in config.export_views:
        looks.append({"yaw": float(yaw), "pitch": float(pitch), "roll": 0.0, "fov": float(fov)})
        names.append(f"look-y{_deg(yaw)}-p{_deg(pitch)}-f{_deg(fov)}")
    for name, cam in zip(names, looks):
        grid = geometry.equirect_to_perspective_grid(size, size, cam["fov"], cam["yaw"], cam["pitch"], cam["roll"])
        images[name] = geometry.sample_perspective(x, grid).clamp(0, 1)[0]
        exports[name] = {**cam, "size": size}
    sidecar = {
        "projection": {
            "type": "equirectangular",
            "width": w,
            "height": h,
            "longitude_deg": [-180.0, 180.0],  # left edge to right edge; column j centre: (j + 0.5) / W * 360 - 180
            "latitude_deg": [90.0, -90.0],  # top row to bottom row
            "center_longitude_deg": 0.0,
            "axes": "x right, y up, z forward (longitude 0); yaw > 0 right, pitch > 0 up, fov horizontal",
            "tiler": tiler,
            "views": [dict(cam) for cam in cameras],
            "exports": exports,
        }
    }
    return {k: v.clamp(0, 1) for k, v in images.items()}, {"xmp": xmp_packet(w, h), "sidecar": sidecar}
