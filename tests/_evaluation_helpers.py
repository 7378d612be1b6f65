"""Helpers for the evaluation tests: hand-made panoramas with sidecars, a tiny random CLIP, a tiny feature net."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn


def write_panorama(folder: Path, name: str, image: torch.Tensor, prompt: str = "a photo of a mountain",
                   weight: float = 20.0, window: int = 32) -> Path:
    """A PNG plus a sidecar shaped like syncengine.outputs writes it (prompt in request, resolved spec)."""
    from syncengine.outputs import to_pil

    folder.mkdir(parents=True, exist_ok=True)
    png = folder / f"{name}.png"
    to_pil(image).save(png)
    spec = {"canvas": {"height": image.shape[1], "width": image.shape[2]},
            "tiler": {"name": "sliding", "window": window, "stride": window // 2, "window_height": None},
            "sync": {"weight": weight, "decay": 0.95}, "runtime": {"output_dir": str(folder)}}
    meta = {"name": name, "image": png.name, "request": {"index": 0, "prompt": prompt, "seed": 0}, "spec": spec}
    (folder / f"{name}.json").write_text(json.dumps(meta))
    return png


def tiled(tile: torch.Tensor, n: int) -> torch.Tensor:
    """A panorama made of ``n`` copies of one tile side by side: its crops are identical."""
    return tile.repeat(1, 1, n)


def build_tiny_clip(path: Path) -> Path:
    """A random-weight CLIP with a byte-level tokenizer, saved with save_pretrained (never downloaded)."""
    from transformers import CLIPConfig, CLIPModel

    from syncengine_sd.tiny import tiny_tokenizer

    tokenizer = tiny_tokenizer(path / "tok-src")
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    model = CLIPModel(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


class TinyFeatures(nn.Module):
    """A fixed random conv net standing in for Inception: images [B, 3, H, W] in [0, 1] -> [B, 8]."""

    num_features = 8

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x):
        return self.net(x)
