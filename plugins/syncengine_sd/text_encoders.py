"""``text_encoders_to_cpu``: text encoders off the accelerator once a request's prompts are encoded.

Shared by the families whose text encoders are large next to what the sync backward needs (SD3's and FLUX's T5 is
about 9.5 GB in 16 bit): on the model's device while prompts are encoded, on the CPU from a request's first
prediction on (its prompts are all encoded by then), back when the next request encodes.
"""
from __future__ import annotations

from typing import Iterable

import torch


class TextEncoderOffload:
    """Mixin for a denoiser whose config has ``text_encoders_to_cpu``; it lists its encoders in
    :meth:`text_encoder_modules` and sets ``text_encoders_offloaded = False`` once they are on its device."""

    text_encoders_offloaded = False

    def text_encoder_modules(self) -> Iterable[torch.nn.Module | None]:
        raise NotImplementedError

    def text_encoders_to(self, device: torch.device) -> None:
        if not self.config.text_encoders_to_cpu:
            return
        offload = torch.device(device).type == "cpu"
        if offload == self.text_encoders_offloaded:
            return
        for module in self.text_encoder_modules():
            if module is not None:  # an optional encoder left out (SD3's T5 with t5: false)
                module.to(device)
        self.text_encoders_offloaded = offload
        if offload and self.device.type == "cuda":
            torch.cuda.empty_cache()
