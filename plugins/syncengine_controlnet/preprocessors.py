"""Preprocessors: an input photo -> a condition image (edges, depth, pose) of the same size.

They are plugins in the entry-point group ``syncengine.preprocessors`` so that a package can add one without touching
the ControlNet denoiser. Canny runs offline (OpenCV, no weights). The others wrap ``controlnet_aux`` detectors and
load their weights the way a user of that library would (``Detector.from_pretrained("lllyasviel/Annotators")``: the
Hugging Face cache, or a local folder): when the weights are not there the error says how to get them.
"""
from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Dict

from syncengine import registry
from syncengine.errors import ConfigError, ModelNotFoundError, SyncEngineError, one_line
from syncengine.plugin import Plugin

if TYPE_CHECKING:
    import torch

ANNOTATORS = "lllyasviel/Annotators"


class Preprocessor(Plugin):
    """The call signature of a preprocessor plugin.

    - ``load(device)`` loads weights once, when the denoiser is built; a missing model raises
      :class:`~syncengine.errors.ModelNotFoundError` that says how to get it.
    - ``__call__(image)`` maps an RGB ``PIL.Image`` to an RGB ``PIL.Image`` of the same size, deterministically.
      The denoiser has already resized the photo to the canvas, so the condition is computed at canvas resolution.
    """

    def load(self, device: torch.device | str = "cpu") -> None:
        """Load weights (default: none)."""

    @abstractmethod
    def __call__(self, image): ...


# --------------------------------------------------------------------------------------------------------- canny


@dataclass
class CannyConfig:
    low_threshold: int = 100  # hysteresis thresholds of cv2.Canny (controlnet_aux's defaults)
    high_threshold: int = 200


class CannyPreprocessor(Preprocessor):
    """Canny edges with OpenCV at the image's own resolution (controlnet_aux's CannyDetector without its resize to
    multiples of 64, which would distort a panorama's aspect ratio)."""

    Config = CannyConfig

    def __init__(self, config: CannyConfig | None = None):
        super().__init__(config)
        c = self.config
        if not 0 <= c.low_threshold <= c.high_threshold:
            raise ConfigError("preprocessor.low_threshold", f"need 0 <= low_threshold <= high_threshold, got "
                              f"{c.low_threshold} and {c.high_threshold}")

    def __call__(self, image):
        import cv2
        import numpy as np
        from PIL import Image

        edges = cv2.Canny(np.asarray(image.convert("RGB"), dtype=np.uint8), self.config.low_threshold,
                          self.config.high_threshold)
        return Image.fromarray(np.repeat(edges[:, :, None], 3, axis=2))


# ------------------------------------------------------------------------------------------ controlnet_aux models


@dataclass
class AuxConfig:
    pretrained: str = ANNOTATORS  # hub id or local folder holding the detector's checkpoint (controlnet_aux layout)
    detect_resolution: int = 512  # shorter side (px) the detector runs at; the result is resized back to the input
    options: Dict[str, Any] = field(default_factory=dict)  # extra keyword arguments of the detector's __call__


class AuxPreprocessor(Preprocessor):
    """A ``controlnet_aux`` detector loaded with ``from_pretrained``; subclasses name the detector class."""

    Config = AuxConfig
    detector: ClassVar[str] = ""
    call_options: ClassVar[dict[str, Any]] = {}

    def __init__(self, config: AuxConfig | None = None):
        super().__init__(config)
        if self.config.detect_resolution < 64:
            raise ConfigError("preprocessor.detect_resolution",
                              f"must be >= 64 px, got {self.config.detect_resolution}")
        self.model = None

    def load(self, device: torch.device | str = "cpu") -> None:
        try:
            import controlnet_aux
        except ImportError as exc:
            raise SyncEngineError(f"preprocessor {self.detector} needs controlnet_aux: "
                                  f"pip install controlnet_aux ({exc})")
        ref = self.config.pretrained
        try:
            model = getattr(controlnet_aux, self.detector).from_pretrained(ref)
        except ImportError as exc:  # optional dependencies; MiDaS imports basicsr only to download missing weights
            raise SyncEngineError(
                f"preprocessor {self.detector} could not be loaded from {ref!r}: {exc}. Install that package, or put "
                f"the weights in place first (`huggingface-cli download {ANNOTATORS}` where the hub is reachable)"
            ) from exc
        except (OSError, ValueError) as exc:
            reason = one_line(exc)
            raise ModelNotFoundError(
                f"weights of the {self.detector} preprocessor could not be loaded from {ref!r} ({reason}). Download "
                f"them where the Hugging Face hub is reachable (`huggingface-cli download {ANNOTATORS}`) and copy the "
                f"cache (HF_HOME), or set the preprocessor's pretrained to a local folder holding the checkpoint"
            ) from exc
        if hasattr(model, "to"):
            model = model.to(device) or model
        self.model = model

    def __call__(self, image):
        from PIL import Image

        if self.model is None:
            self.load()
        r = self.config.detect_resolution
        options = {**self.call_options, **self.config.options}
        out = self.model(image.convert("RGB"), detect_resolution=r, image_resolution=r, output_type="pil", **options)
        if not isinstance(out, Image.Image):
            out = Image.fromarray(out)
        return out.convert("RGB").resize(image.size, Image.BILINEAR)


class DepthMidasPreprocessor(AuxPreprocessor):
    """MiDaS depth (for depth ControlNets)."""

    detector = "MidasDetector"


class DepthZoePreprocessor(AuxPreprocessor):
    """ZoeDepth (for depth ControlNets such as control_v11f1p_sd15_depth)."""

    detector = "ZoeDetector"


class SoftEdgeHEDPreprocessor(AuxPreprocessor):
    """HED soft edges (softedge/scribble ControlNets)."""

    detector = "HEDdetector"


class LineartPreprocessor(AuxPreprocessor):
    """Line art (lineart ControlNets)."""

    detector = "LineartDetector"


class MLSDPreprocessor(AuxPreprocessor):
    """M-LSD straight lines (mlsd ControlNets)."""

    detector = "MLSDdetector"


class OpenposePreprocessor(AuxPreprocessor):
    """OpenPose body keypoints (openpose ControlNets)."""

    detector = "OpenposeDetector"


class NormalBaePreprocessor(AuxPreprocessor):
    """Surface normals (normalbae ControlNets)."""

    detector = "NormalBaeDetector"


# -------------------------------------------------------------------------------------------------------- building


def preprocessor_spec(value: Any, key: str) -> dict[str, Any] | None:
    """``canny`` or ``{name: canny, low_threshold: 50}`` -> a mapping with a name; ``None`` stays ``None``."""
    if value is None:
        return None
    if isinstance(value, str):
        return {"name": value}
    if isinstance(value, dict) and isinstance(value.get("name"), str):
        return dict(value)
    raise ConfigError(key, "give a preprocessor name (e.g. canny) or a mapping with a name and its options, "
                           f"got {value!r}")


def build_preprocessor(value: Any, key: str) -> Preprocessor | None:
    """Look the plugin up by name (an unknown name lists the available ones) and validate its options."""
    from syncengine.config import typed_config  # the same validation (and messages) as every other plugin section

    spec = preprocessor_spec(value, key)
    if spec is None:
        return None
    name = spec.pop("name")
    try:
        cls = registry.get("preprocessor", name)
    except SyncEngineError as exc:
        raise ConfigError(f"{key}.name", str(exc)) from None
    from omegaconf import OmegaConf

    options = OmegaConf.to_object(typed_config(cls.Config, spec, key))
    try:
        return cls(options)
    except ConfigError as exc:
        raise ConfigError(f"{key}.{exc.key.split('.', 1)[-1]}", str(exc).split("': ", 1)[-1]) from None
