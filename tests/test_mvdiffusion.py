"""The mvdiffusion denoiser: correspondences against the spherical geometry in closed form, attention locality, the
reduction to plain Stable Diffusion, loading (own folders and the official checkpoint's key names), end to end."""
from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from _controlnet_helpers import random_image, record_conditions, tiny_controlnet  # noqa: F401

from syncengine.denoiser import NO_CONTEXT, Conditioning, Step
from syncengine.errors import ConfigError, ModelNotFoundError
from syncengine.sampler import Request
from syncengine.views import CanvasSpec
from syncengine_controlnet.denoiser import (
    ControlNetConditioning,
    ControlNetConfig,
    ControlNetDenoiser,
    ControlNetOptions,
    ControlNetUnit,
)
from syncengine_mvdiffusion.correspondence import Camera, homography
from syncengine_mvdiffusion.denoiser import MVDiffusionConfig, MVDiffusionDenoiser, MVRequest
from syncengine_mvdiffusion.loading import save_pretrained
from syncengine_mvdiffusion.model import CorrespondenceAttention, CorrespondenceBlocks, Plan, view_group
from syncengine_mvdiffusion.tiny import add_random_blocks, randomize
from syncengine_sd.denoiser import StableDiffusionConfig, StableDiffusionDenoiser
from syncengine_spherical import geometry
from syncengine_spherical.tilers import PerspectiveConfig, PerspectiveTiler
from syncengine_spherical.views import ProjectedView

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_mv(tiny_sd, tmp_path_factory):
    """The tiny SD pipeline plus random correspondence blocks, saved as an mvdiffusion folder."""
    path = tmp_path_factory.mktemp("models") / "tiny-mv"
    shutil.copytree(tiny_sd, path)
    return add_random_blocks(path, seed=1)


def load(folder, **options) -> MVDiffusionDenoiser:
    return MVDiffusionDenoiser(MVDiffusionConfig(pretrained=str(folder), device="cpu", **options))


def ring(n: int = 8, window: int = 64, canvas=(64, 128)):
    return PerspectiveTiler(PerspectiveConfig(window=window, views_per_ring=n)).views(CanvasSpec(*canvas))


def step_of(den, index: int = 0) -> Step:
    scheduler = den.make_scheduler("ddim")
    scheduler.set_timesteps(3)
    return Step(index, 3, scheduler.timesteps[index])


def conds_for(den, views, prompt="a photo of a kitchen", scale=7.5):
    cond = Conditioning(den.encode_prompt(prompt), scale)
    return [cond] * len(views)


# ------------------------------------------------------------------------------------------------ correspondences


def closed_form_pixel(src: Camera, dst: Camera, x: float, y: float, inside: bool = True):
    """Pixel index coordinates in ``dst`` of pixel ``(x, y)`` of ``src``, through world directions (the spherical
    geometry's rays and projection, whose pixel k spans [k, k + 1)); ``inside=False`` extends the destination image
    plane beyond its borders. None behind the destination camera (or outside it)."""
    f = src.focal
    ray = torch.tensor([(x + 0.5 - src.width / 2) / f, -(y + 0.5 - src.height / 2) / f, 1.0], dtype=torch.float64)
    direction = geometry.rotation(src.yaw, src.pitch, src.roll) @ ray
    if inside:
        hit = geometry.perspective_pixel(direction, dst.height, dst.width, dst.fov, dst.yaw, dst.pitch, dst.roll)
        return None if hit is None else (hit[0] - 0.5, hit[1] - 0.5)
    c = geometry.rotation(dst.yaw, dst.pitch, dst.roll).T @ direction
    if c[2] <= 0:
        return None
    u, v = c[0] / c[2] * dst.focal + dst.width / 2, -c[1] / c[2] * dst.focal + dst.height / 2
    return (float(u) - 0.5, float(v) - 0.5)


@pytest.mark.parametrize("src,dst", [((0, 0, 0), (45, 0, 0)), ((45, 0, 0), (0, 0, 0)), ((10, 20, 5), (40, -10, 0)),
                                     ((-90, 30, 0), (-60, 60, 10))])
def test_homography_lands_where_the_spherical_geometry_says(src, dst):
    a, b = Camera(*src, fov=90, height=64, width=64), Camera(*dst, fov=80, height=64, width=64)
    h = homography(a, b)
    checked = 0
    for x in range(0, 64, 7):
        for y in range(0, 64, 9):
            expected = closed_form_pixel(a, b, x, y)
            q = h @ torch.tensor([x, y, 1.0], dtype=torch.float64)
            if expected is None:
                continue
            assert q[2] > 0
            assert torch.allclose(q[:2] / q[2], torch.tensor(expected, dtype=torch.float64), atol=1e-6)
            checked += 1
    assert checked > 10


def test_points_behind_the_destination_camera_are_flagged_by_the_depth():
    front, back = Camera(0, 0, 0, 90, 64, 64), Camera(180, 0, 0, 90, 64, 64)
    q = homography(front, back) @ torch.tensor([31.5, 31.5, 1.0], dtype=torch.float64)
    assert q[2] < 0  # without the check this would pair the centre with the antipodal view's centre


# ----------------------------------------------------------------------------------------------------- locality


@pytest.mark.parametrize("feature,perturbed", [(8, (4, 2)), (8, (6, 5)), (4, (1, 2))])
def test_attention_reaches_only_the_corresponding_neighbourhoods(feature, perturbed):
    """Perturb one feature pixel of view 1; in its ring neighbours exactly the queries whose correspondence lies
    within the bilinear reach of a 3x3 neighbourhood (|p - x| < 2 on both axes) change; nothing else does."""
    torch.manual_seed(0)
    cams = [Camera(yaw, 0, 0, 90, 64, 64) for yaw in (0, 45, 90, 180)]
    group = view_group([0, 1, 2, 3], cams)  # ring: view 1's neighbours are 0 and 2; view 3's are 2 and 0
    block = randomize(CorrespondenceAttention(16), seed=2).eval()
    plan = Plan(4, [group])
    x = torch.randn(4, 16, feature, feature)
    py, px = perturbed
    y = x.clone()
    y[1, :, py, px] += 3 * torch.randn(16)
    with torch.no_grad():
        changed = (block(y, plan) - block(x, plan)).abs().amax(1) > 1e-5  # [4, h, w]
    stride = 64 // feature
    for view in (0, 2):
        for r in range(feature):
            for c in range(feature):
                hit = closed_form_pixel(cams[view], cams[1], c * stride + stride // 2, r * stride + stride // 2, False)
                if hit is None:
                    assert not changed[view, r, c]
                    continue
                fx, fy = hit[0] / stride - 0.5, hit[1] / stride - 0.5
                reach = max(abs(px - fx), abs(py - fy))
                if abs(reach - 2) > 1e-3:
                    assert bool(changed[view, r, c]) == (reach < 2), (view, r, c, reach)
        assert changed[view].any()
    assert not changed[3].any()  # not a neighbour of view 1
    only = torch.zeros(feature, feature, dtype=torch.bool)
    only[py, px] = True
    assert torch.equal(changed[1], only)  # the view itself: only the perturbed query


def test_zeroed_block_is_the_identity_and_untrained_blocks_are_zeroed():
    block = CorrespondenceAttention(32)  # official initialisation: output projections zero
    cams = [Camera(yaw, 0, 0, 90, 64, 64) for yaw in (0, 45, 90)]
    x = torch.randn(3, 32, 8, 8)
    assert torch.equal(block(x, Plan(3, [view_group([0, 1, 2], cams)])), x)


def test_two_views_in_a_ring_equal_all_neighbours():
    """A ring of two pairs each view with the other twice; duplicated keys leave softmax attention unchanged, so
    it equals `neighbors: all` (one copy of each key)."""
    block = randomize(CorrespondenceAttention(16), seed=3).eval()
    cams = [Camera(yaw, 0, 0, 90, 64, 64) for yaw in (0, 45)]
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        ring2 = block(x, Plan(2, [view_group([0, 1], cams, "ring")]))
        all2 = block(x, Plan(2, [view_group([0, 1], cams, "all")]))
    assert torch.allclose(ring2, all2, atol=1e-5)
    assert not torch.allclose(ring2, x, atol=1e-3)


# ---------------------------------------------------------------------------------------------- full denoiser


def test_zeroed_correspondence_attention_equals_the_stable_diffusion_denoiser(tiny_mv):
    views = ring(8)
    mv = load(tiny_mv)
    sd = StableDiffusionDenoiser(StableDiffusionConfig(pretrained=str(tiny_mv), device="cpu"))
    x = torch.randn(8, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = sd.predict(x, step_of(sd), conds_for(sd, views), views)
        live = mv.predict(x, step_of(mv), conds_for(mv, views), views)
        assert not torch.allclose(live, base, atol=1e-4)  # the random blocks do act ...
        assert all(mv.blocks.calls.get(name, 0) >= 1 for name, _ in CorrespondenceBlocks.sites(mv.unet))
        for name, p in mv.blocks.named_parameters():
            if name.endswith(("attn1.to_out.weight", "attn1.to_out.bias", "ff.net.2.weight", "ff.net.2.bias")):
                p.zero_()
        zeroed = mv.predict(x, step_of(mv), conds_for(mv, views), views)
    assert torch.equal(zeroed, base)  # ... and without them the UNet is SD's, bit for bit


def test_a_view_alone_is_plain_stable_diffusion_and_distant_views_do_not_interact(tiny_mv):
    mv = load(tiny_mv)
    sd = StableDiffusionDenoiser(StableDiffusionConfig(pretrained=str(tiny_mv), device="cpu"))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=g)
    opposite = ring(2)  # yaw 0 and 180: no pixel of one is seen by the other
    near = ring(8)[:2]  # yaw 0 and 45
    with torch.no_grad():
        alone = mv.predict(x[:1], step_of(mv), conds_for(mv, opposite[:1]), opposite[:1])
        assert torch.equal(alone, sd.predict(x[:1], step_of(sd), conds_for(sd, opposite[:1]), opposite[:1]))
        y = x.clone()
        y[1] += torch.randn(4, 8, 8, generator=g)
        for views, interacts in ((opposite, False), (near, True)):
            a = mv.predict(x, step_of(mv), conds_for(mv, views), views)
            b = mv.predict(y, step_of(mv), conds_for(mv, views), views)
            assert torch.equal(a[0], b[0]) != interacts
            assert not torch.equal(a[1], b[1])


def test_per_view_prompts_condition_their_own_view(tiny_mv):
    mv = load(tiny_mv)
    views = ring(4)
    prompts = ["a red wall", "a window", "a red wall", "a door"]
    x = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = mv.predict(x, step_of(mv), [Conditioning(mv.encode_prompt(p), 7.5) for p in prompts], views)
        context = mv.prepare_request(Request("ignored", inputs={"view_prompts": prompts}), None)
        got = mv.predict(x, step_of(mv), conds_for(mv, views, "ignored"), views, context)
    assert torch.equal(got, expected)
    with pytest.raises(ConfigError, match="view_prompts"):
        mv.prepare_request(Request("p", inputs={"view_prompts": "one string"}), None)


# ------------------------------------------------------------------------------------------------------- loading


def test_saved_folder_reloads_to_the_same_predictions(tiny_mv, tmp_path):
    mv = load(tiny_mv)
    save_pretrained(mv.pipe, mv.blocks, tmp_path / "saved")
    again = load(tmp_path / "saved")
    views = ring(8)
    x = torch.randn(8, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(mv.predict(x, step_of(mv), conds_for(mv, views), views),
                           again.predict(x, step_of(again), conds_for(again, views), views))


OFFICIAL_BLOCK_KEYS = {  # CPAttn parameter names of the official release, shapes for a block of `d` channels
    "transformer.attn1.to_q.weight": lambda d: (d, d), "transformer.attn1.to_k.weight": lambda d: (d, d),
    "transformer.attn1.to_v.weight": lambda d: (d, d), "transformer.attn1.to_out.weight": lambda d: (d, d),
    "transformer.attn1.to_out.bias": lambda d: (d,), "transformer.ff.net.0.proj.weight": lambda d: (8 * d, d),
    "transformer.ff.net.0.proj.bias": lambda d: (8 * d,), "transformer.ff.net.2.weight": lambda d: (d, 4 * d),
    "transformer.ff.net.2.bias": lambda d: (d,), "transformer.norm1.weight": lambda d: (d,),
    "transformer.norm1.bias": lambda d: (d,), "transformer.norm2.weight": lambda d: (d,),
    "transformer.norm2.bias": lambda d: (d,), "pe.freq_bands": lambda d: (1, 1, d // 4),
}
TINY_BLOCKS = {"cp_blocks_encoder.0": 16, "cp_blocks_encoder.1": 32, "cp_blocks_mid": 32, "cp_blocks_decoder.0": 32,
               "cp_blocks_decoder.1": 16}  # the tiny UNet's block_out_channels (16, 32)
LEGACY_VAE = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}  # diffusers 0.16 names


def official_state_dict(sd_folder) -> dict[str, torch.Tensor]:
    """A state dict laid out like the official PanoGenerator's, with random values."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    g = torch.Generator().manual_seed(4)
    state = {}
    for name, d in TINY_BLOCKS.items():
        for key, shape in OFFICIAL_BLOCK_KEYS.items():
            state[f"mv_base_model.{name}.{key}"] = torch.randn(shape(d), generator=g)
    for key, value in UNet2DConditionModel.from_pretrained(str(sd_folder / "unet")).state_dict().items():
        state[f"mv_base_model.unet.{key}"] = torch.randn(value.shape, generator=g)
    for key, value in AutoencoderKL.from_pretrained(str(sd_folder / "vae")).state_dict().items():
        if ".attentions." in key:
            for new, old in LEGACY_VAE.items():
                key = key.replace(f".{new}.", f".{old}.")
        state[f"vae.{key}"] = torch.randn(value.shape, generator=g)
    text = CLIPTextModel.from_pretrained(str(sd_folder / "text_encoder"))
    for key, value in text.state_dict().items():  # transformers 4.28 names (5.x dropped the text_model level)
        state[f"text_encoder.text_model.{key.removeprefix('text_model.')}"] = torch.randn(value.shape, generator=g)
    state["text_encoder.text_model.embeddings.position_ids"] = torch.arange(77)[None]  # transformers 4.28 saved it
    return state


def test_official_checkpoint_loads_by_its_key_names(tiny_sd, tmp_path):
    state = official_state_dict(tiny_sd)
    ckpt = tmp_path / "pano.ckpt"
    torch.save({"state_dict": state, "epoch": 3, "pytorch-lightning_version": "1.5.0",
                "hyper_parameters": {"config": {"model": {"guidance_scale": 9.0}}}}, ckpt)
    mv = MVDiffusionDenoiser(MVDiffusionConfig(pretrained=str(tiny_sd), checkpoint=str(ckpt), device="cpu"))
    ours = mv.blocks.state_dict()
    for name in TINY_BLOCKS:
        for key in OFFICIAL_BLOCK_KEYS:
            assert torch.equal(ours[f"{name}.{key}"], state[f"mv_base_model.{name}.{key}"])
    assert torch.equal(mv.unet.state_dict()["conv_in.weight"], state["mv_base_model.unet.conv_in.weight"])
    vae_q = next(k for k in state if k.startswith("vae.") and k.endswith(".query.weight"))
    assert torch.equal(mv.vae.state_dict()[vae_q[4:].replace(".query.", ".to_q.")], state[vae_q])
    text = mv.pipe.text_encoder.state_dict()
    text_key = "final_layer_norm.weight" if "final_layer_norm.weight" in text else "text_model.final_layer_norm.weight"
    assert torch.equal(text[text_key], state["text_encoder.text_model.final_layer_norm.weight"])
    assert mv.loaded["blocks"] == len(TINY_BLOCKS) * len(OFFICIAL_BLOCK_KEYS)

    broken = dict(state)
    del broken["mv_base_model.cp_blocks_mid.transformer.attn1.to_q.weight"]
    broken["mv_base_model.cp_blocks_extra.weight"] = torch.zeros(1)
    broken["mv_base_model.unet.conv_in.weight"] = torch.zeros(3, 3)
    torch.save({"state_dict": broken}, tmp_path / "broken.ckpt")
    with pytest.raises(ConfigError) as err:
        MVDiffusionDenoiser(MVDiffusionConfig(pretrained=str(tiny_sd), checkpoint=str(tmp_path / "broken.ckpt"),
                                              device="cpu"))
    assert "mv_base_model.unet.conv_in.weight (3, 3)" in str(err.value)  # the UNet is checked first
    broken["mv_base_model.unet.conv_in.weight"] = state["mv_base_model.unet.conv_in.weight"]
    torch.save({"state_dict": broken}, tmp_path / "broken.ckpt")
    with pytest.raises(ConfigError) as err:
        MVDiffusionDenoiser(MVDiffusionConfig(pretrained=str(tiny_sd), checkpoint=str(tmp_path / "broken.ckpt"),
                                              device="cpu"))
    message = str(err.value)
    assert "missing keys: mv_base_model.cp_blocks_mid.transformer.attn1.to_q.weight" in message
    assert "unexpected keys: mv_base_model.cp_blocks_extra.weight" in message


def test_neighbors_is_a_closed_set_for_specs_and_config_objects(tiny_mv):
    from syncengine.config import resolve

    spec = {"extends": "demo", "denoiser": {"name": "mvdiffusion", "neighbors": "few"}}
    for build in (lambda: resolve(spec), lambda: load(tiny_mv, neighbors="few")):
        with pytest.raises(ConfigError) as info:
            build()
        assert info.value.key == "denoiser.neighbors" and str(info.value).endswith("'few' is not one of ring, all")


def test_missing_weights_say_how_to_get_them(tiny_sd, tmp_path):
    with pytest.raises(ModelNotFoundError, match=r"does not exist; download the official panorama checkpoint"):
        MVDiffusionDenoiser(MVDiffusionConfig(pretrained=str(tiny_sd), checkpoint=str(tmp_path / "pano.ckpt")))
    with pytest.raises(ModelNotFoundError, match="needs correspondence-attention weights.*denoiser.checkpoint"):
        MVDiffusionDenoiser(MVDiffusionConfig(pretrained=str(tiny_sd)))


# ---------------------------------------------------------------------------------------------------- end to end


def shrunk(tiny_mv, tmp_path, *more):
    return ["canvas.height=64", "canvas.width=128", "tiler.window=32", f"denoiser.pretrained={tiny_mv}",
            "denoiser.checkpoint=null", "sync.loss.net=alex", "sync.loss.backbone=random", "sampler.steps=2",
            "runtime.accelerator=cpu", "runtime.progress=false", f"runtime.output_dir={tmp_path / 'out'}", *more]


def test_preset_generates_a_360_panorama_with_sync_on_tiny_weights(tiny_mv, tmp_path):
    from PIL import Image

    from syncengine.api import generate

    summary = generate("configs/mvdiffusion-panorama.yaml", shrunk(tiny_mv, tmp_path, "sync.weight=5"))
    assert not summary.failed
    out = tmp_path / "out" / "mvdiffusion-kitchen.png"
    assert Image.open(out).size == (128, 64)
    sidecar = json.loads(out.with_suffix(".json").read_text())
    text = json.dumps(sidecar)
    assert '"neighbors": "ring"' in text and '"sync_steps": 2' in text


def test_views_split_across_batches_are_refused_before_loading(tiny_mv, tmp_path):
    from syncengine.api import resolve_run

    with pytest.raises(ConfigError, match="all 8 views of a request in one batch; set it to 8") as info:
        resolve_run("configs/mvdiffusion-panorama.yaml", shrunk(tiny_mv, tmp_path, "sampler.view_batch_size=4"))
    assert info.value.key == "sampler.view_batch_size"
    with pytest.raises(ConfigError, match="runtime.shard: requests") as info:
        resolve_run("configs/mvdiffusion-panorama.yaml", shrunk(tiny_mv, tmp_path, "runtime.devices=2"))
    assert info.value.key == "runtime.shard"
    resolve_run("configs/mvdiffusion-panorama.yaml", shrunk(tiny_mv, tmp_path, "runtime.devices=2",
                                                            "runtime.shard=requests"))


def test_split_batches_are_refused_at_run_time_too(tiny_mv):
    """A sampler built by hand (no spec validation) that splits the views of a prepared request still fails clearly
    on step 0; each request keeps its own watch."""
    den = MVDiffusionDenoiser(MVDiffusionConfig(pretrained=str(tiny_mv), checkpoint=None))
    views = PerspectiveTiler(PerspectiveConfig(window=32, views_per_ring=4)).views(CanvasSpec(64, 128))
    conds = [Conditioning(den.encode_prompt("a room"), 1.0)] * 2
    step = Step(0, 2, torch.tensor(999))
    x = torch.zeros(2, 4, 4, 4)
    first, second = (den.prepare_request(Request("a room"), CanvasSpec(64, 128)) for _ in range(2))
    with torch.no_grad():
        den.predict(x, step, conds, views[:2], first)
        den.predict(x, step, conds, views[2:], second)  # another request: its own watch
        with pytest.raises(ConfigError, match="came apart"):
            den.predict(x, step, conds, views[2:], first)


def test_predictions_without_a_prepared_context_keep_no_state(tiny_mv):
    """Without prepare_request's context a prediction is a pure function of its arguments: the conds as given (no
    view prompts), no batch watch, nothing left on the denoiser for the next call."""
    den = load(tiny_mv)
    views = ring(4)
    x = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    step = step_of(den)
    conds = conds_for(den, views, "a door")
    prompts = {"view_prompts": ["a red wall", "a window", "a red wall", "a door"]}
    with torch.no_grad():
        before = den.predict(x[:2], step, conds[:2], views[:2])
        den.predict(x[2:], step, conds[2:], views[2:])  # split batches: nothing to watch them with, no error
        prepared = den.predict(x, step, conds, views, den.prepare_request(Request("p", inputs=prompts), None))
        assert torch.equal(den.predict(x[:2], step, conds[:2], views[:2]), before)  # the request left nothing behind
        assert torch.equal(den.predict(x, step, conds, views, NO_CONTEXT), den.predict(x, step, conds, views))
        assert not torch.equal(den.predict(x, step, conds, views), prepared)  # no view prompts without a context
    assert not [k for k, v in vars(den).items() if isinstance(v, MVRequest)]


# -------------------------------------------------------------------------------------- composed with ControlNet


@dataclass
class MVControlNetConfig(ControlNetOptions, MVDiffusionConfig):
    """MVDiffusion's options plus the ControlNet ones."""


class MVControlNet(ControlNetConditioning, MVDiffusionDenoiser):
    """Correspondence attention and ControlNet residuals in one UNet call, by plain inheritance."""

    Config = MVControlNetConfig


@dataclass
class PixelView(ProjectedView):
    """A perspective view that gives a ControlNet its pixels of the equirectangular condition (extract_image)."""

    def extract_image(self, image: torch.Tensor, factor: int) -> torch.Tensor:
        grid = F.interpolate(self.grid.permute(0, 3, 1, 2), scale_factor=factor, mode="bilinear",
                             align_corners=True).permute(0, 2, 3, 1)
        return F.grid_sample(image, grid.to(image), align_corners=False)


def test_controlnet_conditioning_composes_with_mvdiffusion(tiny_mv, tiny_controlnet, tmp_path):
    views = [PixelView(**{f.name: getattr(v, f.name) for f in dataclasses.fields(v) if f.init})
             for v in ring(4)]
    unit = ControlNetUnit(str(tiny_controlnet))
    both = MVControlNet(MVControlNetConfig(pretrained=str(tiny_mv), device="cpu", controlnets=[unit]))
    mv, canvas = load(tiny_mv), CanvasSpec(64, 128)
    image = str(random_image(tmp_path / "condition.png", 64, 128))
    context = both.prepare_request(Request("p", inputs={"control": image}), canvas)
    assert set(context.parts) == {"controlnet", "mvdiffusion"}
    x = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    step = step_of(both)
    calls = record_conditions(both.controlnets[0])
    with torch.no_grad():
        plain = mv.predict(x, step, conds_for(mv, views), views, mv.prepare_request(Request("p"), canvas))
        controlled = both.predict(x, step, conds_for(both, views), views, context)
        assert len(calls) == 1 and calls[0].shape == (8, 3, 64, 64)  # one ControlNet call, both CFG branches
        assert both.blocks.calls.get("cp_blocks_decoder.0", 0) >= 1  # the correspondence attention ran too
        assert not torch.allclose(controlled, plain, atol=1e-4)  # the residuals change the joint prediction
        unit.scale = 0.0
        assert torch.equal(both.predict(x, step, conds_for(both, views), views, context), plain)
        unit.scale = 1.0
        # The residuals reach the UNet as in plain ControlNet: without correspondence attention, its output exactly.
        sd = ControlNetDenoiser(ControlNetConfig(pretrained=str(tiny_mv), device="cpu", controlnets=[unit]))
        for name, param in both.blocks.named_parameters():
            if name.endswith(("attn1.to_out.weight", "attn1.to_out.bias", "ff.net.2.weight", "ff.net.2.bias")):
                param.zero_()
        expected = sd.predict(x, step, conds_for(sd, views), views, sd.prepare_request(Request("p", inputs={
            "control": image}), canvas))
        assert torch.equal(both.predict(x, step, conds_for(both, views), views, context), expected)


def test_views_without_cameras_are_refused_before_loading(tiny_mv, tmp_path):
    from syncengine.api import resolve_run

    with pytest.raises(ConfigError, match="needs views with a camera"):
        resolve_run("configs/mvdiffusion-panorama.yaml", shrunk(
            tiny_mv, tmp_path, "tiler.name=sliding", "tiler.window=64", "tiler.stride=16"))
