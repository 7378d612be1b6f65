"""Flow matching in the core: rectified-flow noise levels and velocity conversions against diffusers' flow scheduler,
and Algorithm 1 on a flow model whose exact velocity is known in closed form (so the expected result is too)."""
from __future__ import annotations

import pytest
import torch
from _tolerance import KERNEL_ULPS, assert_reordered_close, reorder_tolerance

from benchmarks.reference import reference_syncdiffusion
from syncengine.denoiser import Denoiser, PromptEmbedding
from syncengine.errors import ConfigError
from syncengine.merger import Merger, MergerConfig
from syncengine.parameterization import (
    NoiseLevel,
    ddim_step,
    is_flow_scheduler,
    model_output_of,
    noise_level,
    predicted_epsilon,
    predicted_x0,
)
from syncengine.sampler import JointSampler, Request, SamplerOptions, check_x0_scheduler
from syncengine.schedulers import check_flow_scheduler, make_scheduler
from syncengine.sync import SyncSchedule
from syncengine.sync_loss import SyncLoss
from syncengine.views import CanvasSpec
from syncengine_panorama.sliding import SlidingConfig, SlidingTiler

FLOW_CONFIG = {"num_train_timesteps": 1000, "shift": 3.0}


def _flow_scheduler(steps: int = 6):
    scheduler = make_scheduler("flow_euler", FLOW_CONFIG)
    scheduler.set_timesteps(steps)
    return scheduler


def test_flow_level_is_diffusers_noising():
    scheduler = _flow_scheduler()
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 1, 4, 8, 8, generator=g).unbind(0)
    for i, t in enumerate(scheduler.timesteps):
        level = noise_level(scheduler, i, t)
        torch.testing.assert_close(level.noised(x0, eps), scheduler.scale_noise(x0, t.reshape(1), eps))
    assert is_flow_scheduler(scheduler) and not is_flow_scheduler(make_scheduler("ddim", {}))


def test_flow_conversions_are_diffusers_euler_step():
    """x0 from the velocity, then the closed-form step to the next level, is FlowMatchEulerDiscreteScheduler.step."""
    scheduler = _flow_scheduler()
    g = torch.Generator().manual_seed(1)
    x, v = torch.randn(2, 1, 4, 8, 8, generator=g).unbind(0)
    for i, t in enumerate(scheduler.timesteps):
        level, after = noise_level(scheduler, i, t), NoiseLevel.flow(scheduler.sigmas[i + 1])
        x0 = predicted_x0(v, x, level, "flow_prediction")
        # identities in float64 (1/sigma amplifies float32 rounding at the last steps)
        sigma64 = scheduler.sigmas[i].double()
        x64, v64, level64 = x.double(), v.double(), NoiseLevel(1 - sigma64, sigma64)
        x0_64 = predicted_x0(v64, x64, level64, "flow_prediction")
        eps64 = predicted_epsilon(v64, x64, level64, "flow_prediction")
        torch.testing.assert_close(level64.noised(x0_64, eps64), x64)  # x_t = (1 - sigma) x0 + sigma eps
        torch.testing.assert_close(model_output_of(x0_64, x64, level64, "flow_prediction"), v64)
        expected = scheduler.step(v, t, x).prev_sample
        torch.testing.assert_close(ddim_step(x0, x, level, after), expected, atol=1e-5, rtol=1e-5)
        x = expected


def test_flow_scheduler_rules():
    check_x0_scheduler("flow_euler")  # the x0 merge target takes flows' Euler step
    check_flow_scheduler("flow_euler", {}, "flux")
    check_flow_scheduler("dpm++", {"use_flow_sigmas": True}, "flux")
    with pytest.raises(ConfigError, match="rectified-flow model.*use flow_euler"):
        check_flow_scheduler("ddim", {}, "flux")


class ToyFlow(Denoiser):
    """A rectified flow whose data is Gaussian around a known latent canvas, ``x0 ~ N(target, tau^2)`` per position:
    its exact velocity is ``(x_t - E[x0 | x_t]) / sigma`` in closed form. With ``tau = 0`` every sample is ``target``
    and Euler steps are exact, so sampling must end there. Views cut their window of ``target`` themselves; the prompt
    changes nothing (guidance leaves an exact velocity unchanged)."""

    prediction_type = "flow_prediction"
    latent_channels = 4

    def __init__(self, target: torch.Tensor, tau: float = 0.0):
        super().__init__()
        self.target, self.tau = target, tau

    def make_scheduler(self, name, **options):
        return make_scheduler(name, FLOW_CONFIG, **options)

    def encode_prompt(self, prompt, negative_prompt=""):
        return PromptEmbedding(torch.zeros(1, 1, 1), torch.ones(1, 1, 1))

    def predict(self, latents, step, conds, views, context=None):
        sigma = step.timestep.float() / 1000
        c = torch.cat([view.extract(self.target) for view in views])
        gain = (1 - sigma) * self.tau**2 / ((1 - sigma) ** 2 * self.tau**2 + sigma**2)
        x0 = c + gain * (latents - (1 - sigma) * c)  # the posterior mean E[x0 | x_t]
        return (latents - x0) / sigma

    def decode(self, latents):
        return torch.nn.functional.interpolate(latents[:, :3], scale_factor=8, mode="nearest").tanh()


class MeanSquare(SyncLoss):
    def prepare_target(self, anchor):
        return anchor

    def forward(self, images, target):
        return (images - target).flatten(1).pow(2).mean(1)


class _Average(Merger):
    def window_weight(self, view):
        return torch.ones(1, 1, *view.latent_size)


def _setup(loop: bool = False, tau: float = 0.0):
    canvas = CanvasSpec(64, 160)
    target = torch.randn(canvas.latent_shape(), generator=torch.Generator().manual_seed(5))
    views = SlidingTiler(SlidingConfig(window=64, stride=32, loop=loop)).views(canvas)
    return canvas, ToyFlow(target, tau), views


@pytest.mark.parametrize("merge_target", ["xt", "x0"])
@pytest.mark.parametrize("loop", [False, True])
def test_sampling_a_flow_ends_on_its_data(merge_target, loop):
    canvas, den, views = _setup(loop)
    merger = _Average(MergerConfig(target=merge_target))
    sampler = JointSampler(den, views, merger, None, SyncSchedule(0.0), SamplerOptions(scheduler="flow_euler", steps=5))
    out = sampler.sample(Request("p", seed=1), canvas).latents
    torch.testing.assert_close(out, den.target, atol=1e-5, rtol=1e-5)


def test_flow_sync_matches_per_window_reference():
    """Algorithm 1 on a flow model (sync weight > 0) equals the literal per-window loop stepping each window with
    the Euler step of the flow, then averaging."""
    canvas, den, views = _setup(tau=0.5)
    steps, weight, decay = 4, 2.0, 0.9
    request = Request("p", seed=2)

    def sampler(collective=None):
        return JointSampler(den, views, _Average(), MeanSquare(), SyncSchedule(weight, decay),
                            SamplerOptions(scheduler="flow_euler", steps=steps, guidance_scale=1.0,
                                           view_batch_size=2), collective)

    first = sampler()
    ours = first.sample(request, canvas)
    assert ours.stats["sync_steps"] == steps and ours.stats["sync_views"] == steps * (len(views) - 1)
    ref = reference_syncdiffusion(den, MeanSquare(), views, first.initial_noise(canvas, 2), steps, weight, decay, 1.0,
                                  "p", scheduler="flow_euler")
    tolerance = reorder_tolerance(lambda c: sampler(c).sample(request, canvas).latents, KERNEL_ULPS)
    assert_reordered_close(ours.latents, ref, tolerance, "flow sync vs per-window reference")
    plain = JointSampler(den, views, _Average(), None, SyncSchedule(0.0),
                         SamplerOptions(scheduler="flow_euler", steps=steps)).sample(request, canvas)
    assert (ours.latents - plain.latents).abs().max() > 1e-3  # the sync update did move the windows


@pytest.mark.parametrize("name", ["stable-diffusion", "mvdiffusion", "stable-diffusion-xl"])
def test_diffusion_models_refuse_a_flow_scheduler_before_loading(tiny_spec, name, no_network):
    from syncengine.config import resolve

    spec = tiny_spec(sampler={"scheduler": "flow_euler"})
    spec["denoiser"] = {"name": name, "pretrained": "/nonexistent/model"}  # never loaded: validation comes first
    if name == "mvdiffusion":
        spec["tiler"] = {"name": "perspective", "window": 64}
        spec["canvas"] = {"height": 128, "width": 256}
    with pytest.raises(ConfigError, match=r"sampler.scheduler.*diffusion model; 'flow_euler' steps a rectified flow"):
        resolve(spec)
