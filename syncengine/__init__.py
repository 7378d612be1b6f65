"""syncengine: coherent montages by synchronized joint diffusion (SyncDiffusion) as a plugin-based engine.

Core interfaces: :class:`Tiler`, :class:`Merger`, :class:`Denoiser`, :class:`SyncLoss`; the loop of Algorithm 1 is
:class:`JointSampler`. Plugins are found by name through entry points (:mod:`syncengine.registry`).
"""
from .denoiser import Conditioning, Denoiser, Step
from .errors import ConfigError, ModelNotFoundError, PluginNotFoundError, SyncEngineError
from .merger import MergeBuffer, Merger
from .plugin import Plugin
from .sync_loss import SyncLoss
from .tiler import Tiler
from .views import CanvasSpec, CropView, View

__version__ = "0.1.0"


def generate(*args, **kwargs):
    """See :func:`syncengine.api.generate` (imported lazily: Lightning is slow to import)."""
    from .api import generate as _generate

    return _generate(*args, **kwargs)


__all__ = [
    "CanvasSpec", "Conditioning", "ConfigError", "CropView", "Denoiser", "MergeBuffer", "Merger",
    "ModelNotFoundError", "Plugin", "PluginNotFoundError", "Step", "SyncEngineError", "SyncLoss", "Tiler", "View",
    "generate",
]
