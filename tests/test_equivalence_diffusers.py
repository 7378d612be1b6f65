"""With sync weight 0, syncengine is MultiDiffusion: it must match diffusers' StableDiffusionPanoramaPipeline."""
from __future__ import annotations

import warnings

import pytest
import torch

from syncengine.config import resolve
from syncengine.pipeline import Pipeline


def _diffusers_latents(model_dir, height, width, steps, seed, circular=False, view_batch_size=1):
    from diffusers import DDIMScheduler, StableDiffusionPanoramaPipeline

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = StableDiffusionPanoramaPipeline.from_pretrained(
            str(model_dir), safety_checker=None, requires_safety_checker=False
        )
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator("cpu").manual_seed(seed)
    out = pipe(
        "a photo of a mountain",
        height=height,
        width=width,
        num_inference_steps=steps,
        guidance_scale=7.5,
        generator=generator,
        output_type="latent",
        circular_padding=circular,
        view_batch_size=view_batch_size,
    )
    return out.images


@pytest.mark.parametrize("loop", [False, True])
def test_weight_zero_matches_diffusers_panorama(tiny_spec, tiny_sd, loop):
    # diffusers' window is fixed at 64 latents (512 px) with stride 8 latents (64 px).
    height, width, steps, seed = 512, 640, 3, 7
    spec = tiny_spec(
        canvas={"height": height, "width": width},
        tiler={"name": "sliding", "window": 512, "stride": 64, "loop": loop},
        sampler={"steps": steps, "view_batch_size": 3},
        requests=[{"prompt": "a photo of a mountain", "seed": seed}],
    )
    resolved = resolve(spec)
    ours = Pipeline(resolved).run(0).latents
    reference = _diffusers_latents(tiny_sd, height, width, steps, seed, circular=loop)
    assert ours.shape == reference.shape
    torch.testing.assert_close(ours, reference.float(), atol=2e-5, rtol=1e-4)
