"""CLIP score of images against their prompts (Mean-CLIP-S of the paper): ``100 * max(cos(image, text), 0)``, the
definition torchmetrics' ``CLIPScore`` uses, computed with a transformers ``CLIPModel`` loaded from a local folder or
a hub id already in the local Hugging Face cache (default ``openai/clip-vit-base-patch16``): evaluation never
downloads."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import ModelNotFoundError, one_line

DEFAULT_CLIP = "openai/clip-vit-base-patch16"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def _not_found(ref: str, cause: BaseException | None = None) -> ModelNotFoundError:
    reason = f" ({one_line(cause, 160)})" if cause else ""
    return ModelNotFoundError(
        f"CLIP model {ref!r} could not be loaded{reason}. Download it where the Hugging Face hub is reachable "
        f"(`huggingface-cli download {ref}`) and copy the cache (HF_HOME), or pass --clip-model a local folder "
        f"saved with CLIPModel.save_pretrained (with its tokenizer); or leave CLIP out with --metrics"
    )


def cached_snapshot(ref: str) -> str:
    """The local Hugging Face cache folder of hub id ``ref`` (found on disk alone). transformers is given that
    folder, not the id: even with ``local_files_only`` it builds request headers, and huggingface_hub 2.x then
    fetches a registry from the hub once per process (a network attempt evaluation must not make)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(ref, "config.json")
    except ValueError as exc:  # not a valid hub id (HFValidationError)
        raise _not_found(ref, exc) from None
    if not isinstance(found, str):
        raise _not_found(ref, OSError("not in the local Hugging Face cache; evaluate reads only local files"))
    return str(Path(found).parent)


class ClipScorer:
    """A CLIP model, its tokenizer and its image preprocessing (shorter side resize, centre crop, normalise)."""

    def __init__(self, ref: str = DEFAULT_CLIP, device: str | torch.device = "cpu", local_files_only: bool = True):
        """``local_files_only`` (default): look in the local Hugging Face cache only, as the rest of evaluation does
        (no download attempt, which offline retries for about a minute before failing)."""
        from transformers import CLIPModel, CLIPTokenizer

        self.ref = ref
        path = Path(ref).expanduser()
        is_path = path.exists() or ref.startswith(("/", "./", "../", "~"))
        if is_path and not (path / "config.json").is_file():
            raise _not_found(ref, FileNotFoundError(f"no config.json in {path}"))
        source = str(path) if is_path else cached_snapshot(ref) if local_files_only else ref
        local = {"local_files_only": True} if local_files_only else {}
        try:
            self.model = CLIPModel.from_pretrained(source, **local).eval().requires_grad_(False)
            self.tokenizer = CLIPTokenizer.from_pretrained(source, **local)
        except (OSError, ValueError) as exc:
            raise _not_found(ref, exc) from exc
        if len(self.tokenizer) < 10:  # transformers 5 returns a 2-token tokenizer for an uncached hub id
            raise _not_found(ref, ValueError("its tokenizer files are missing"))
        self.model.to(device)
        self.device = torch.device(device)
        self.size = int(self.model.config.vision_config.image_size)
        mean, std = OPENAI_MEAN, OPENAI_STD
        try:
            from transformers import CLIPImageProcessor

            proc = CLIPImageProcessor.from_pretrained(source, **local)
            mean, std = tuple(proc.image_mean), tuple(proc.image_std)
        except (OSError, ValueError, ImportError):
            pass  # no preprocessor_config.json: CLIP's own statistics
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        h, w = images.shape[-2:]
        scale = self.size / min(h, w)
        size = (max(self.size, round(h * scale)), max(self.size, round(w * scale)))
        x = F.interpolate(images.float(), size=size, mode="bicubic", align_corners=False, antialias=True)
        top, left = (size[0] - self.size) // 2, (size[1] - self.size) // 2
        x = x[..., top : top + self.size, left : left + self.size].clamp(0, 1)
        return ((x - self.mean) / self.std).to(self.device)

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """``[B]`` CLIP scores of images ``[B, 3, H, W]`` in ``[0, 1]`` against one prompt each."""
        tokens = self.tokenizer(prompts, padding=True, truncation=True, return_tensors="pt").to(self.device)
        img = self.model.get_image_features(pixel_values=self.preprocess(images))
        txt = self.model.get_text_features(**tokens)
        img = getattr(img, "pooler_output", img)  # transformers 5 may return an output object
        txt = getattr(txt, "pooler_output", txt)
        cos = F.cosine_similarity(img.float(), txt.float(), dim=-1)
        return (100 * cos).clamp_min(0).cpu()
