"""Per-request state lives in the RequestContext that prepare_request returns, not on the denoiser: two prepared
requests keep separate contexts, and a second conditioning hook composes with the ControlNet's (issue 14, item 4)."""
from __future__ import annotations

import pytest
import torch
from _controlnet_helpers import random_image, record_conditions, tiny_controlnet  # noqa: F401

from syncengine.denoiser import NO_CONTEXT, Conditioning, RequestContext, Step
from syncengine.sampler import Request
from syncengine.views import CanvasSpec, CropView
from syncengine_controlnet.denoiser import (
    ControlNetConditioning,
    ControlNetConfig,
    ControlNetDenoiser,
    ControlNetUnit,
)
from syncengine_sd.denoiser import StableDiffusionDenoiser

pytestmark = pytest.mark.usefixtures("one_thread")


class LatentOffset(StableDiffusionDenoiser):
    """A stand-in for another family's conditioning hook: a per-request latent offset, read in ``unet_forward``."""

    def prepare_request(self, request, canvas):
        offset = float(request.inputs.get("offset", 0.0))
        return super().prepare_request(request, canvas).with_part("offset", offset)

    def unet_forward(self, latents, step, hidden, views, cond_mask, context=NO_CONTEXT):
        return super().unet_forward(latents + context["offset"], step, hidden, views, cond_mask, context)


class OffsetControlNet(LatentOffset, ControlNetDenoiser):
    """Both hooks in one denoiser, by plain cooperative inheritance: no shared per-request attribute to fight over."""


class PriorResiduals(StableDiffusionDenoiser):
    """A family hook that already fills the UNet call's keyword arguments: residuals (here the ControlNet's own, at
    scale 1) and SDXL-style ``added_cond_kwargs`` (here a row number per row of the batch)."""

    def unet_kwargs(self, latents, step, hidden, views, cond_mask, context=NO_CONTEXT):
        kwargs = super().unet_kwargs(latents, step, hidden, views, cond_mask, context)
        down, mid = self.controlnet_residuals(latents, step, hidden, views, cond_mask, context)
        rows = {"row": torch.arange(latents.shape[0], dtype=torch.float32)}
        return {**kwargs, "down_block_additional_residuals": down, "mid_block_additional_residual": mid,
                "added_cond_kwargs": rows}


class DoubledControlNet(ControlNetConditioning, PriorResiduals):
    Config = ControlNetConfig


def _build(cls, tiny_sd, tiny_controlnet, **options):
    return cls(ControlNetConfig(pretrained=str(tiny_sd), controlnets=[ControlNetUnit(str(tiny_controlnet))],
                                **options))


def _inputs(den):
    views = [CropView(0, top=0, left=0, height=8, width=8), CropView(1, top=0, left=8, height=8, width=8)]
    cond = Conditioning(den.encode_prompt("x"), 7.5)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    return x, Step(0, 2, torch.tensor(500)), [cond] * 2, views


def test_context_parts_are_read_only_and_named_once():
    context = NO_CONTEXT.with_part("a", 1)
    assert "a" in context and context["a"] == 1 and "a" not in NO_CONTEXT  # a new context; the old one unchanged
    with pytest.raises(ValueError, match="already has a part named 'a'"):
        context.with_part("a", 2)
    with pytest.raises(TypeError):
        context.parts["b"] = 2


def test_stable_diffusion_prepares_an_empty_context(tiny_sd):
    from syncengine_sd.denoiser import StableDiffusionConfig

    den = StableDiffusionDenoiser(StableDiffusionConfig(pretrained=str(tiny_sd), device="cpu"))
    context = den.prepare_request(Request("x"), CanvasSpec(64, 128))
    assert isinstance(context, RequestContext) and not context.parts and den.request_images(context) == {}


def test_preparing_a_second_request_leaves_the_first_context_alone(tiny_sd, tiny_controlnet, tmp_path):
    den = _build(ControlNetDenoiser, tiny_sd, tiny_controlnet)
    canvas = CanvasSpec(64, 128)
    a = den.prepare_request(Request("x", inputs={"control": str(random_image(tmp_path / "a.png", 64, 128, 1))}), canvas)
    x, step, conds, views = _inputs(den)
    with torch.no_grad():
        before = den.predict(x, step, conds, views, a)
        kept = [c.clone() for c in a["controlnet"]]
        b = den.prepare_request(Request("x", inputs={"control": str(random_image(tmp_path / "b.png", 64, 128, 2))}),
                                canvas)
        assert all(torch.equal(k, c) for k, c in zip(kept, a["controlnet"]))
        assert not torch.equal(a["controlnet"][0], b["controlnet"][0])
        assert torch.equal(den.predict(x, step, conds, views, a), before)
        assert not torch.equal(den.predict(x, step, conds, views, b), before)
    assert torch.equal(den.request_images(a)["control"], kept[0].cpu())


def test_a_second_hook_composes_with_the_controlnet(tiny_sd, tiny_controlnet, tmp_path):
    both = _build(OffsetControlNet, tiny_sd, tiny_controlnet)
    control = _build(ControlNetDenoiser, tiny_sd, tiny_controlnet)
    canvas = CanvasSpec(64, 128)
    image = str(random_image(tmp_path / "c.png", 64, 128))
    context = both.prepare_request(Request("x", inputs={"control": image, "offset": 0.25}), canvas)
    assert set(context.parts) == {"controlnet", "offset"}
    plain = control.prepare_request(Request("x", inputs={"control": image}), canvas)
    x, step, conds, views = _inputs(both)
    calls = record_conditions(both.controlnets[0])
    with torch.no_grad():
        got = both.predict(x, step, conds, views, context)
        assert calls, "the ControlNet ran inside the composed denoiser"
        assert torch.equal(got, control.predict(x + 0.25, step, conds, views, plain))  # both hooks, one predict
        assert not torch.equal(got, control.predict(x, step, conds, views, plain))


def test_controlnet_residuals_add_to_the_family_kwargs(tiny_sd, tiny_controlnet, tmp_path):
    """The mixin sums its residuals with those already in ``unet_kwargs`` (its own twice == scale 2, bit for bit) and
    hands the family's ``added_cond_kwargs`` to its ControlNets, cut to the rows they run on (guess mode: the
    conditional rows)."""
    doubled = _build(DoubledControlNet, tiny_sd, tiny_controlnet, guess_mode=True)
    twice = ControlNetDenoiser(ControlNetConfig(pretrained=str(tiny_sd), guess_mode=True,
                                                controlnets=[ControlNetUnit(str(tiny_controlnet), scale=2.0)]))
    canvas = CanvasSpec(64, 128)
    request = Request("x", inputs={"control": str(random_image(tmp_path / "d.png", 64, 128))})
    x, step, conds, views = _inputs(doubled)
    net = doubled.controlnets[0]
    received, forward = [], net.forward
    net.forward = lambda *a, **k: received.append(k.get("added_cond_kwargs")) or forward(*a, **k)
    with torch.no_grad():
        got = doubled.predict(x, step, conds, views, doubled.prepare_request(request, canvas))
        assert torch.equal(got, twice.predict(x, step, conds, views, twice.prepare_request(request, canvas)))
    assert received[0] is None and torch.equal(received[1]["row"], torch.tensor([2.0, 3.0]))
