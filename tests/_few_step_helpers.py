"""Helpers for the few-step tests: a tiny LCM-style SD pipeline (a guidance-embedding UNet) and a spy on the step
noise that stochastic schedulers draw."""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

GUIDANCE_DIM = 32  # time_cond_proj_dim of the tiny LCM-style UNet (LCM_Dreamshaper_v7: 256)


def build_tiny_lcm(path: Path, seed: int = 1) -> Path:
    """The tiny SD pipeline with an LCM-distilled UNet's shape (``time_cond_proj_dim`` set: the guidance scale is an
    embedding) and an LCMScheduler, as LCM_Dreamshaper_v7 ships; saved with ``save_pretrained``."""
    from diffusers import LCMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from syncengine_sd.tiny import build_tiny_pipeline

    base = build_tiny_pipeline(path.with_name(path.name + "-base"), seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = StableDiffusionPipeline.from_pretrained(str(base), safety_checker=None, requires_safety_checker=False)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(pipe.unet.config, time_cond_proj_dim=GUIDANCE_DIM)
    scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.unet, pipe.scheduler = unet, scheduler
    pipe.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_lcm(tmp_path_factory) -> Path:
    return build_tiny_lcm(tmp_path_factory.mktemp("models") / "tiny-lcm")


class StepNoiseSpy:
    """Records each draw of a scheduler module's ``randn_tensor`` (shape, generator device); draws unchanged."""

    def __init__(self, module):
        self.draws: list[tuple[tuple[int, ...], str]] = []
        self.original = module.randn_tensor

    def __call__(self, shape, generator=None, **kwargs):
        self.draws.append((tuple(shape), str(generator.device) if generator is not None else "none"))
        return self.original(shape, generator=generator, **kwargs)
