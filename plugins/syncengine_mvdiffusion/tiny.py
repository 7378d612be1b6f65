"""A tiny MVDiffusion folder with RANDOM weights (the tiny SD pipeline + random correspondence blocks): tests and
offline smoke runs only. Saved with :func:`~.loading.save_blocks` and loaded through the denoiser's own loader."""
from __future__ import annotations

from pathlib import Path

import torch

from .loading import save_blocks
from .model import CorrespondenceBlocks


def randomize(blocks: CorrespondenceBlocks, seed: int = 0, std: float = 0.3) -> CorrespondenceBlocks:
    """Give the zero-initialised output projections random values, so that the blocks do something."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in blocks.named_parameters():
            if name.endswith(("attn1.to_out.weight", "attn1.to_out.bias", "ff.net.2.weight", "ff.net.2.bias")):
                p.copy_(torch.randn(p.shape, generator=generator) * std)
    return blocks


def add_random_blocks(path: str | Path, seed: int = 0) -> Path:
    """Add random correspondence blocks to a saved SD pipeline folder (its UNet fixes their sizes)."""
    from diffusers import UNet2DConditionModel

    path = Path(path)
    torch.manual_seed(seed)
    blocks = randomize(CorrespondenceBlocks(UNet2DConditionModel.from_pretrained(str(path / "unet"))), seed)
    save_blocks(blocks, path)
    return path


def build_tiny_mvdiffusion(path: str | Path, seed: int = 0) -> Path:
    """Build the tiny SD pipeline into ``path`` and add random correspondence blocks; returns ``path``."""
    from syncengine_sd.tiny import build_tiny_pipeline

    return add_random_blocks(build_tiny_pipeline(path, seed=seed), seed)
