"""FLUX's token layout: the canvas stays an unpacked latent image; each window is packed into 2x2 patches only for the
transformer, with the position ids of a standalone image of its size (each window is sampled as the model was
trained, wherever it sits on the canvas)."""
from __future__ import annotations

import torch


def pack(latents: torch.Tensor) -> torch.Tensor:
    """``[B, C, h, w]`` -> ``[B, (h/2)(w/2), 4C]`` tokens, in the order of FluxPipeline's ``_pack_latents``."""
    b, c, h, w = latents.shape
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of :func:`pack` for a ``height`` x ``width`` latent window."""
    b, _, d = tokens.shape
    x = tokens.reshape(b, height // 2, width // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, height, width)


def image_ids(height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``[(h/2)(w/2), 3]`` position ids (0, row, column) of a standalone ``height`` x ``width`` latent image."""
    rows = torch.arange(height // 2).repeat_interleave(width // 2)
    cols = torch.arange(width // 2).repeat(height // 2)
    ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1)
    return ids.to(device=device, dtype=dtype)


def window_sequence_length(latent_size: tuple[int, int]) -> int:
    """Image tokens of one window: what FLUX's resolution-dependent shift is computed from."""
    return (latent_size[0] // 2) * (latent_size[1] // 2)
