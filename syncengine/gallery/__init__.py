"""``syncengine gallery``: a static page (opens from disk, offline) to look at output folders: sweeps side by side,
loop panoramas in a wrapping strip, equirectangular outputs in a 360° viewer (vendored Pannellum)."""
from .page import GalleryResult, build_gallery

__all__ = ["GalleryResult", "build_gallery"]
