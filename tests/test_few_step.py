"""Few-step sampling with sync (issue 17, item 3): LCM, TCD and Euler ancestral (turbo settings) on the canvas.

The sampler steps once on the canvas, so a stochastic scheduler draws its step noise once, for the whole canvas, from
a CPU generator seeded by the request's seed + 1. These tests check that this makes one window equal diffusers' own
pipelines, and sync runs independent of the view batches and of 2-process window sharding; that LCM-distilled UNets
(a guidance embedding, no classifier-free batch) are driven as diffusers drives them; and that the preset and the
refusals hold.
"""
from __future__ import annotations

import os
import warnings

import pytest
import torch
from _controlnet_helpers import tiny_controlnet  # noqa: F401 - fixture
from _few_step_helpers import GUIDANCE_DIM, StepNoiseSpy, tiny_lcm  # noqa: F401 - fixture
from _tolerance import KERNEL_ULPS, REORDER_ULPS, assert_reordered_close, reorder_tolerance

from syncengine.collective import Collective
from syncengine.config import PRESETS_DIR, resolve
from syncengine.errors import ConfigError
from syncengine.pipeline import Pipeline
from syncengine.sampler import JointSampler

PROMPT = "a photo of a mountain"
STOCHASTIC = {  # alias -> (model fixture, sampler settings, diffusers module that draws the step noise)
    "lcm": ("tiny_lcm", {"scheduler": "lcm", "guidance_scale": 4.0}, "scheduling_lcm"),
    "tcd": ("tiny_lcm", {"scheduler": "tcd", "guidance_scale": 4.0}, "scheduling_tcd"),
    "euler_a": ("tiny_sd", {"scheduler": "euler_a", "scheduler_options": {"timestep_spacing": "trailing"},
                            "guidance_scale": 0.0}, "scheduling_euler_ancestral_discrete"),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def _latents(spec: dict, collective: Collective | None = None) -> torch.Tensor:
    return Pipeline(resolve(spec), collective=collective).run(0).latents


def _close(got: torch.Tensor, expected: torch.Tensor, tolerance: float, what: str) -> None:
    """assert_reordered_close, printing the measured distance under SYNCENGINE_TEST_REPORT (for docs and reports)."""
    if os.environ.get("SYNCENGINE_TEST_REPORT"):
        d = (got.float() - expected.float()).abs().max().item()
        print(f"\n{what}: distance {d:.3g}, tolerance {tolerance:.3g} ({d / tolerance:.3f} of it)")
    assert_reordered_close(got, expected, tolerance, what)


def _model(request, name: str):
    return request.getfixturevalue(name)


# ------------------------------------------------------------------------------------ one window == diffusers


def _diffusers(pipeline_class: str, folder, scheduler: str, **call):
    import diffusers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = getattr(diffusers, pipeline_class).from_pretrained(str(folder), safety_checker=None,
                                                                  requires_safety_checker=False)
    options = call.pop("scheduler_options", {})
    pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config, **options)
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPT, output_type="latent", **call).images


CASES = {  # engine sampler settings, model, diffusers pipeline + scheduler + call arguments
    "lcm": ({"scheduler": "lcm", "guidance_scale": 4.0}, "tiny_lcm",
            ("LatentConsistencyModelPipeline", "LCMScheduler", {"guidance_scale": 4.0})),
    # TCD on the LCM-style UNet through StableDiffusionPipeline (guidance embedded there too); gamma: the step's 0.3
    "tcd": ({"scheduler": "tcd", "guidance_scale": 4.0}, "tiny_lcm",
            ("StableDiffusionPipeline", "TCDScheduler", {"guidance_scale": 4.0, "eta": 0.3})),
    "euler_a": ({"scheduler": "euler_a", "guidance_scale": 7.5}, "tiny_sd",
                ("StableDiffusionPipeline", "EulerAncestralDiscreteScheduler", {"guidance_scale": 7.5})),
    "euler_a-turbo": ({"scheduler": "euler_a", "scheduler_options": {"timestep_spacing": "trailing"},
                       "guidance_scale": 0.0}, "tiny_sd",
                      ("StableDiffusionPipeline", "EulerAncestralDiscreteScheduler",
                       {"guidance_scale": 0.0, "scheduler_options": {"timestep_spacing": "trailing"}})),
}


@pytest.mark.parametrize("case", list(CASES))
def test_one_window_at_weight_zero_equals_diffusers(tiny_spec, request, case):
    """The engine's step noise is diffusers' ``generator=Generator().manual_seed(seed + 1)``: one window over the
    canvas equals the model's own pipeline given the same initial latents."""
    sampler, model, (pipeline_class, scheduler, call) = CASES[case]
    folder, steps, seed = _model(request, model), 3, 5
    spec = tiny_spec(canvas={"height": 64, "width": 64}, tiler={"name": "sliding", "window": 64, "stride": 32},
                     denoiser={"pretrained": str(folder)}, sampler={"steps": steps, "view_batch_size": 1, **sampler},
                     requests=[{"prompt": PROMPT, "seed": seed}])
    ours = _latents(spec)
    noise = JointSampler.initial_noise(None, resolve(spec).canvas, seed)
    ref = _diffusers(pipeline_class, folder, scheduler, height=64, width=64, num_inference_steps=steps,
                     latents=noise.clone(), generator=torch.Generator().manual_seed(seed + 1), **dict(call))
    # diffusers' loop runs the same kernels on the same single window: within the kernel-reordering model
    tolerance = reorder_tolerance(lambda c: _latents(spec, c), KERNEL_ULPS)
    _close(ours, ref.float(), tolerance, f"{case} vs diffusers")
    other = _diffusers(pipeline_class, folder, scheduler, height=64, width=64, num_inference_steps=steps,
                       latents=noise.clone(), generator=torch.Generator().manual_seed(seed + 2), **dict(call))
    assert (other.float() - ours).abs().max() > 100 * tolerance  # the step noise matters: the seed + 1 rule is tested


def test_lcm_unet_gets_the_guidance_embedding_per_view_and_no_cfg_batch(tiny_spec, tiny_lcm):
    """A guidance-embedding UNet runs one row per view with ``timestep_cond`` = diffusers' embedding of that view's
    scale - 1 (per-view scales honoured), through ``unet_kwargs``; its prediction does not depend on the batch."""
    from diffusers import LatentConsistencyModelPipeline

    from syncengine.denoiser import Conditioning, Step

    resolved = resolve(tiny_spec(denoiser={"pretrained": str(tiny_lcm)}, sampler={"scheduler": "lcm"}))
    den = Pipeline(resolved).denoiser_for(resolved)
    assert den.guidance_embedding == GUIDANCE_DIM
    views = resolved.build("tiler").views(resolved.canvas)[:2]
    embedding = den.encode_prompt(PROMPT)
    conds = [Conditioning(embedding, 8.0), Conditioning(embedding, 2.0)]
    seen = []
    den.unet.register_forward_pre_hook(lambda m, args, kwargs: seen.append((args[0].shape[0], kwargs)),
                                       with_kwargs=True)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    step = Step(0, 4, torch.tensor(999))
    with torch.no_grad():
        both = den.predict(x, step, conds, views)
        alone = [den.predict(x[k : k + 1], step, [conds[k]], [views[k]]) for k in range(2)]
    rows, kwargs = seen[0]
    assert rows == 2  # no unconditional half
    expected = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, torch.tensor([7.0, 1.0]),
                                                                           GUIDANCE_DIM)
    torch.testing.assert_close(kwargs["timestep_cond"], expected, atol=0, rtol=0)
    torch.testing.assert_close(both, torch.cat(alone), atol=1e-5, rtol=1e-5)
    assert (alone[0] - alone[1]).abs().max() > 1e-3  # the scale reached the UNet


def test_controlnet_composes_with_the_lcm_guidance_embedding(tiny_spec, tiny_lcm, tiny_controlnet, tmp_path):
    """ControlNet residuals and the guidance embedding meet in ``unet_kwargs``: one window of an LCM UNet with a
    ControlNet equals diffusers' StableDiffusionControlNetPipeline (timestep_cond to the UNet, no CFG batch). The
    ControlNet is the tiny SD's (diffusers' from_unet cannot copy a guidance-embedding UNet's time embedding)."""
    from _controlnet_helpers import controlnet_spec, random_image
    from diffusers import ControlNetModel, LCMScheduler, StableDiffusionControlNetPipeline
    from PIL import Image

    net_dir = tiny_controlnet
    image = random_image(tmp_path / "c.png", 64, 64)
    spec = controlnet_spec(tiny_spec, {"model": str(net_dir), "scale": 0.8}, inputs={"control": str(image)},
                           pretrained=str(tiny_lcm))
    spec.update(canvas={"height": 64, "width": 64}, tiler={"name": "sliding", "window": 64, "stride": 64})
    spec["sampler"].update(scheduler="lcm", steps=3, guidance_scale=4.0)
    spec["requests"][0]["seed"] = 3
    ours = _latents(spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = StableDiffusionControlNetPipeline.from_pretrained(
            str(tiny_lcm), controlnet=ControlNetModel.from_pretrained(net_dir), safety_checker=None,
            requires_safety_checker=False)
    ref.scheduler = LCMScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    noise = JointSampler.initial_noise(None, resolve(spec).canvas, 3)
    out = ref(PROMPT, image=Image.open(image).convert("RGB"), num_inference_steps=3, guidance_scale=4.0,
              latents=noise.clone(), generator=torch.Generator().manual_seed(4), output_type="latent",
              controlnet_conditioning_scale=0.8).images
    tolerance = reorder_tolerance(lambda c: _latents(spec, c), KERNEL_ULPS)
    _close(ours, out.float(), tolerance, "controlnet + lcm vs diffusers")
    spec["denoiser"]["controlnets"][0]["scale"] = 0.0
    assert (_latents(spec) - ours).abs().max() > 100 * tolerance  # the ControlNet did act


# ------------------------------------------------------------------------------- sync: batches and reproducibility


@pytest.mark.parametrize("alias", list(STOCHASTIC))
def test_sync_runs_are_reproducible_and_equal_across_view_batch_sizes(tiny_spec, with_torch_home, request, monkeypatch,
                                                                       alias):
    """With sync on, a stochastic scheduler's run repeats exactly from its seed and gives the same canvas for view
    batches of 1 and 3 (within the kernel-reordering tolerance); its step noise is one canvas-sized draw per step
    (not the last) from a CPU generator."""
    import importlib

    model, sampler, module_name = STOCHASTIC[alias]
    folder = _model(request, model)
    steps = 3

    def spec(vbs: int, seed: int = 1) -> dict:
        return tiny_spec(denoiser={"pretrained": str(folder)}, sync={"weight": 10.0},
                         sampler={"steps": steps, "view_batch_size": vbs, **sampler},
                         requests=[{"prompt": PROMPT, "seed": seed}])

    module = importlib.import_module(f"diffusers.schedulers.{module_name}")
    spy = StepNoiseSpy(module)
    monkeypatch.setattr(module, "randn_tensor", spy)
    pipe = Pipeline(resolve(spec(3)))
    first = pipe.run(0)
    canvas = tuple(JointSampler.initial_noise(None, resolve(spec(3)).canvas, 1).shape)
    draws = steps if alias == "euler_a" else steps - 1  # consistency schedulers return x0 on the last step
    assert spy.draws == [(canvas, "cpu")] * draws and first.stats["sync_steps"] == steps
    again = Pipeline(resolve(spec(3))).run(0).latents
    assert torch.equal(first.latents, again)
    one = _latents(spec(1))
    tolerance = reorder_tolerance(lambda c: _latents(spec(3), c), KERNEL_ULPS)
    _close(one, first.latents, tolerance, f"{alias}: view_batch_size 1 vs 3")
    assert (_latents(spec(3, seed=2)) - first.latents).abs().max() > 100 * tolerance


# ------------------------------------------------------------------------------------------------------ sharding


@pytest.mark.slow
def test_window_sharding_with_lcm_and_sync_equals_one_process(tiny_lcm, tmp_path):
    """2 processes (gloo) sharding the windows of an LCM run with sync give the one-process latents within the
    measured one-ulp reordering tolerance (tests/test_sharding.py's harness): rank 1 draws the same step noise."""
    from test_sharding import assert_same_output, sharded_and_one_process

    one, two, jitter = sharded_and_one_process({
        "canvas": {"height": 64, "width": 160},
        "tiler": {"name": "sliding", "window": 64, "stride": 32},
        "merger": {"name": "average"},
        "denoiser": {"name": "stable-diffusion", "pretrained": str(tiny_lcm)},
        "sync": {"loss": {"name": "lpips", "net": "alex", "backbone": "random"}, "weight": 10.0},
        "sampler": {"scheduler": "lcm", "steps": 3, "guidance_scale": 4.0, "view_batch_size": 2},
        "requests": [{"prompt": PROMPT, "seed": 0, "name": "pano"}],
        "runtime": {"accelerator": "cpu", "devices": 1, "progress": False},
    }, tmp_path)
    meta = assert_same_output(one, two, jitter, "pano")
    assert meta["stats"]["owned_views"] == 2 and meta["stats"]["views"] == 4 and meta["stats"]["sync_steps"] == 3
    assert REORDER_ULPS == 8  # the rule of tests/_tolerance.py, shared with the other sharding tests


# -------------------------------------------------------------------------------------------- preset and refusals


def test_lcm_preset_validates_offline_and_runs_shrunk_on_a_tiny_lcm(tiny_lcm, tmp_path, with_torch_home, no_network):
    import json

    from syncengine.api import generate

    resolved = resolve("sd15-lcm-panorama")
    c = resolved.config
    assert (c.denoiser.pretrained, c.sampler.scheduler, c.sampler.steps) == ("SimianLuo/LCM_Dreamshaper_v7", "lcm", 4)
    assert len(resolved.build("tiler").views(resolved.canvas)) == 13 and c.sync.weight > 0
    assert (PRESETS_DIR.parent.parent / "configs" / "sd15-lcm-panorama.yaml").read_text() == \
        (PRESETS_DIR / "sd15-lcm-panorama.yaml").read_text()
    assert resolve("flux-schnell-panorama").config.sampler.steps == 4  # the other few-step presets still validate
    assert resolve("sdxl-turbo-panorama").config.sampler.scheduler == "euler_a"
    out = tmp_path / "out"
    summary = generate(str(PRESETS_DIR / "sd15-lcm-panorama.yaml"), [
        f"denoiser.pretrained={tiny_lcm}", "canvas.height=64", "canvas.width=160", "tiler.window=64",
        "tiler.stride=32", "sampler.steps=2", "sync.loss.net=alex", "sync.loss.backbone=random",
        "runtime.accelerator=cpu", "runtime.progress=false", f"runtime.output_dir={out}"])
    assert summary.ok and len(summary.written) == 1
    meta = json.loads(summary.written[0].with_suffix(".json").read_text())
    assert meta["stats"]["sync_steps"] == 2 and meta["stats"]["views"] == 4


@pytest.mark.parametrize("alias", ["lcm", "tcd", "euler_a"])
def test_x0_merging_refuses_few_step_schedulers_in_one_line(tiny_spec, alias):
    with pytest.raises(ConfigError) as info:
        resolve(tiny_spec(merger={"name": "average", "target": "x0"}, sampler={"scheduler": alias}))
    assert info.value.key == "sampler.scheduler" and "\n" not in str(info.value) and alias in str(info.value)


def test_more_steps_than_the_distillation_grid_is_one_line(tiny_spec, tiny_lcm):
    spec = tiny_spec(denoiser={"pretrained": str(tiny_lcm)}, sampler={"scheduler": "lcm", "steps": 51})
    with pytest.raises(ConfigError) as info:
        Pipeline(resolve(spec)).run(0)
    assert info.value.key == "sampler.steps" and "original_inference_steps=50" in str(info.value)
    assert "\n" not in str(info.value)
