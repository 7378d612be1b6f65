"""The regions tiler end to end on the tiny model: equivalence with the plain panorama, locality of a region's prompt,
bootstrapping, per-region seeds, bad input through the CLI, and the preset."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from syncengine.cli import main
from syncengine.config import resolve
from syncengine.denoiser import Step
from syncengine.parameterization import NoiseLevel
from syncengine.pipeline import Pipeline
from syncengine.views import CropView, InputContext
from syncengine_regions.layouts import demo_layout
from syncengine_regions.views import Backgrounds, RegionView


def regions_spec(tiny_spec, regions=None, sampler=None, sync=None, **tiler):
    options = {"name": "regions", "window": 64, "stride": 32, "regions": regions or [], **tiler}
    sampler = {"view_batch_size": 4, **(sampler or {})}
    return tiny_spec(tiler=options, sampler=sampler, **({"sync": sync} if sync else {}))


def latents(spec) -> torch.Tensor:
    return Pipeline(resolve(spec)).run(0).latents


@pytest.mark.parametrize("weight", [0.0, 4.0], ids=["multidiffusion", "sync"])
def test_one_region_covering_the_canvas_equals_the_plain_panorama(tiny_spec, tmp_path, with_torch_home, weight):
    """One region covering the canvas with the request's prompt (a full rect, or a one-colour layout): the same
    windows, prompts, weights and sync group members as the sliding tiler, so the same latents bit for bit."""
    layout = tmp_path / "one.png"
    Image.new("RGB", (4, 2), "#123456").save(layout)
    sync = {"weight": weight}
    plain = latents(tiny_spec(sync=sync, sampler={"view_batch_size": 4, "steps": 2}))
    whole = [{"mask": {"rect": [0, 0, 1.0, 1.0]}, "prompt": "a photo of a mountain", "sync": True}]
    assert torch.equal(latents(regions_spec(tiny_spec, whole, sampler={"steps": 2}, sync=sync)), plain)
    if weight == 0:
        layout_spec = regions_spec(tiny_spec, sampler={"steps": 2}, sync=sync, layout=str(layout),
                                   prompts={"#123456": "a photo of a mountain"})  # layout regions do not sync
        assert torch.equal(latents(layout_spec), plain)


def dependency_closure(views, start: torch.Tensor, steps: int) -> torch.Tensor:
    """Latents a change confined to ``start`` (after the first step) can reach in ``steps`` steps: each later step,
    every view whose window reads a changed latent may change its output wherever its weight is positive."""
    reach = start.clone()
    for _ in range(steps - 1):
        grown = reach.clone()
        for view in views:
            if view.extract(reach.float()).any():
                support = torch.zeros_like(reach, dtype=torch.float32)
                view.scatter_add((view.weight > 0).float(), support)
                grown |= support > 0
        reach = grown
    return reach


def test_a_region_prompt_changes_only_what_its_windows_can_reach(tiny_spec):
    """Changing one region's prompt changes its own views' predictions, which the merge applies only inside its mask;
    from there a change spreads by one window per step through the views that read it. Outside that closure the
    latents are bit-identical (hard mask, no feathering, sync off), and inside the mask they do change."""
    regions = [{"mask": {"rect": [0, 0, 64, 16]}, "prompt": "a red car"}]
    spec = regions_spec(tiny_spec, regions, sampler={"steps": 2, "view_batch_size": 1}, bootstrap=0.5)
    spec["canvas"] = {"height": 64, "width": 256}
    base = latents(spec)
    spec["tiler"]["regions"][0]["prompt"] = "a blue boat"
    other = latents(spec)
    resolved = resolve(spec)
    tiler = resolved.build("tiler")
    views = tiler.views(resolved.canvas)
    mask = tiler.regions(resolved.canvas)[0].latents > 0
    reach = dependency_closure(views, mask, steps=2)
    assert reach.sum() < reach.numel() / 2  # the property says something: most of the canvas is out of reach
    changed = (base != other).any(dim=1, keepdim=True)
    assert changed[mask].all()
    assert not changed[~reach].any()


def test_bootstrapping_composes_the_region_over_a_noised_solid_colour(tiny_sd):
    from syncengine_sd.denoiser import StableDiffusionConfig, StableDiffusionDenoiser

    den = StableDiffusionDenoiser(StableDiffusionConfig(pretrained=str(tiny_sd)))
    m = torch.zeros(1, 1, 8, 8)
    m[..., 2:6, 1:5] = 1
    m[..., 0, 0] = 0.5  # a soft value composes proportionally
    backgrounds = Backgrounds()
    view = RegionView(3, top=0, left=0, height=8, width=8, weight=m, bootstrap=0.5, backgrounds=backgrounds)
    x = torch.randn(1, 4, 8, 8)
    a = torch.tensor(0.3)
    inputs = InputContext(Step(1, 4, torch.tensor(500)), NoiseLevel.diffusion(a), den, seed=7)
    out = view.prepare_input(x, inputs)
    index, noise = backgrounds.draw(7, 3, 1, (1, 4, 8, 8))
    color = backgrounds.colors(7)[index]
    image = (color * 2 - 1).view(1, 3, 1, 1).repeat(1, 1, 64, 64)  # a solid image of that colour in [-1, 1]
    bg = den.encode(image)
    expected = x * m + (a.sqrt() * bg + (1 - a).sqrt() * noise) * (1 - m)
    assert torch.allclose(out, expected, atol=1e-6)
    assert torch.equal(out[..., 2:6, 1:5], x[..., 2:6, 1:5])
    assert torch.equal(view.prepare_input(x, inputs), out)  # reproducible from (seed, view, step)
    # fraction 0.5: bootstrapping is over
    later = InputContext(Step(2, 4, torch.tensor(250)), NoiseLevel.diffusion(a), den, seed=7)
    assert torch.equal(view.prepare_input(x, later), x)
    other_step = InputContext(Step(0, 4, torch.tensor(750)), NoiseLevel.diffusion(a), den, seed=7)
    assert not torch.equal(view.prepare_input(x, other_step), out)
    full = RegionView(4, top=0, left=0, height=8, width=8, weight=torch.ones(1, 1, 8, 8), bootstrap=1.0,
                      backgrounds=backgrounds)
    assert torch.equal(full.prepare_input(x, inputs), x)  # nothing around the region to replace
    assert torch.equal(CropView(5, height=8, width=8, weight=m).prepare_input(x, inputs), x)  # background: as is
    assert backgrounds.colors(7).shape == (16, 3) and not torch.equal(backgrounds.colors(7), backgrounds.colors(8))


def test_bootstrapping_acts_in_a_run(tiny_spec):
    regions = [{"mask": {"rect": [16, 16, 32, 32]}, "prompt": "a red car"}]
    small = {"canvas": {"height": 64, "width": 64}}
    on = latents({**regions_spec(tiny_spec, regions, sampler={"steps": 1}, bootstrap=0.5), **small})
    off = latents({**regions_spec(tiny_spec, regions, sampler={"steps": 1}, bootstrap=0.0), **small})
    assert not torch.equal(on, off)


def test_a_region_seed_redraws_the_initial_noise_inside_the_region_only(tiny_spec):
    regions = [{"mask": {"rect": [0, 40, 64, 48]}, "prompt": "a red car", "seed": 11},
               {"mask": {"rect": [0, 120, 64, 40]}, "prompt": "a dog"}]
    resolved = resolve(regions_spec(tiny_spec, regions, sampler={"steps": 1}))
    tiler, canvas = resolved.build("tiler"), resolved.canvas
    request = torch.randn(canvas.latent_shape(), generator=torch.Generator().manual_seed(0))
    noise = tiler.initial_noise(request.clone(), canvas, 0)
    own = torch.randn(canvas.latent_shape(), generator=torch.Generator().manual_seed(11))
    inside = torch.zeros(canvas.latent_shape(), dtype=torch.bool)
    inside[..., 5:11] = True  # pixels 40..88 are latents 5..10
    assert torch.equal(noise[inside], own[inside]) and torch.equal(noise[~inside], request[~inside])
    # the run uses it: the same latents as the plain sampler given that noise explicitly
    pipe = Pipeline(resolved)
    ours = pipe.run(0).latents
    from syncengine.sampler import JointSampler, Request, SamplerOptions
    from syncengine.sync import SyncSchedule

    sampler = JointSampler(pipe.denoiser_for(resolved), tiler.views(canvas), resolved.build("merger"), None,
                           SyncSchedule(0.0), SamplerOptions(steps=1, view_batch_size=4))
    reference = sampler.sample(Request("a photo of a mountain"), canvas, noise=noise).latents
    assert torch.equal(ours, reference)
    # the request's own seed as a region seed changes nothing
    same = tiler.initial_noise(request.clone(), canvas, 0)
    resolved_same = resolve(regions_spec(tiny_spec, [{**regions[0], "seed": 0}, regions[1]]))
    assert torch.equal(resolved_same.build("tiler").initial_noise(request.clone(), canvas, 0), request)
    assert not torch.equal(same, request)


@pytest.fixture
def layout_file(tmp_path):
    path = tmp_path / "layout.png"
    demo_layout(8, 20).save(path)
    return path


@pytest.mark.parametrize("tiler, needle", [
    ({"regions": [{"mask": {"png": "/no/such/mask.png"}, "prompt": "a"}]}, "file not found: /no/such/mask.png"),
    ({"regions": [{"mask": {"rect": [0, 0, 0, 64]}, "prompt": "a"}]}, "the mask is empty"),
    ({"regions": [{"mask": {"png": "BLACK"}, "prompt": "a"}]}, "the mask is empty"),
    ({"regions": [{"mask": {"layout": "LAYOUT", "color": "#ff00ff"}, "prompt": "a"}]}, "colour #ff00ff is not in"),
    ({"layout": "LAYOUT", "prompts": {"#ff0000": "a balloon"}}, "has no prompt"),
    ({"layout": "LAYOUT", "prompts": {"#ff0000": "a balloon", "#0000ff": "a lake", "#00ff00": "grass"}},
     "colour #ffffff ("),
    ({"background": False, "regions": [{"mask": {"rect": [0, 0, 64, 80]}, "prompt": "a"},
                                       {"mask": {"rect": [0, 72, 64, 40]}, "prompt": "b"}]},
     "the weights sum to 0 at pixel (row 0, col 112)"),
    ({"regions": [{"mask": {"rect": [0, 0, 8, 8]}, "prompt": ""}]}, "tiler.regions.0.prompt"),
    ({"regions": [{"mask": {"rect": [0, 0, 8, 8], "layout": "LAYOUT"}, "prompt": "a"}]}, "exactly one of"),
    ({"regions": [{"mask": {"rect": [0, 0, 8, 8]}, "prompt": "a"}], "bootstrap": 1.5}, "tiler.bootstrap"),
    ({"regions": []}, "no regions"),
])
def test_bad_input_exits_2_with_one_line(tiny_spec, tmp_path, layout_file, capsys, tiler, needle):
    black = tmp_path / "black.png"
    Image.new("L", (16, 16), 0).save(black)
    text = json.dumps(tiler).replace("LAYOUT", str(layout_file)).replace("BLACK", str(black))
    spec = regions_spec(tiny_spec, **json.loads(text))
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    code = main(["generate", str(path)])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [s for s in err.splitlines() if s.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in err, err


def test_demo_preset_runs_shrunk(tmp_path, capsys):
    """The preset as shipped (the built-in tiny model, from SYNCENGINE_CACHE), shrunk by overrides."""
    out = tmp_path / "demo"
    code = main(["generate", "regions-demo", "sampler.steps=1", "canvas.height=128", "canvas.width=384",
                 "tiler.window=128", "tiler.stride=64", "tiler.feather=4", "denoiser.pretrained=syncengine:tiny-random",
                 f"runtime.output_dir={out}"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    image = np.asarray(Image.open(out / "regions-demo.png"))
    assert image.shape == (128, 384, 3)
    meta = json.load(open(out / "regions-demo.json"))
    assert meta["spec"]["tiler"]["name"] == "regions" and meta["stats"]["sync_steps"] == 1
    assert meta["stats"]["views"] > 5  # background windows plus the region windows


def test_committed_demo_layout_is_the_generated_one():
    from syncengine.config import PRESETS_DIR

    committed = np.asarray(Image.open(PRESETS_DIR / "layouts" / "balloons.png").convert("RGB"))
    assert np.array_equal(committed, np.asarray(demo_layout()))


HOME = "/sentinel-home-value"
TEXTS = {"region": "a ${oc.env:HOME} car", "region_negative": "${x}", "layout": "at ${now:%H} o'clock",
         "background": "bg ${oc.env:HOME}", "background_negative": "${a:${b}} nested"}


@pytest.mark.parametrize("given", ["spec", "command_line"])
def test_region_prompts_stay_literal_end_to_end(tiny_spec, tmp_path, capsys, monkeypatch, given):
    """The regions tiler's prompts are the user's words, as requests' prompts are: `${oc.env:HOME}`, `${x}` or
    `${now:%H}` in tiler.regions[].prompt, tiler.prompts or tiler.background_prompt (spec or key=value) reach the
    denoiser and the sidecar's spec as written, and `syncengine config` prints them so that they read back."""
    from syncengine_sd.denoiser import StableDiffusionDenoiser

    monkeypatch.setenv("HOME", HOME)
    encoded = set()
    original = StableDiffusionDenoiser.encode_prompt

    def recording(self, prompt, negative_prompt=""):
        encoded.add((prompt, negative_prompt))
        return original(self, prompt, negative_prompt)

    monkeypatch.setattr(StableDiffusionDenoiser, "encode_prompt", recording)
    layout = tmp_path / "layout.png"
    Image.fromarray(np.array([[[0x12, 0x34, 0x56]] * 2 + [[255, 255, 255]] * 3], np.uint8)).save(layout)  # 5x1
    t = TEXTS
    texts = {"regions": [{"mask": {"rect": [0, 128, 64, 32]}, "prompt": t["region"],
                          "negative_prompt": t["region_negative"]}],
             "prompts": {"#123456": t["layout"]}, "background_prompt": t["background"],
             "background_negative_prompt": t["background_negative"]}
    plain = {"regions": [{"mask": {"rect": [0, 128, 64, 32]}, "prompt": "r"}], "prompts": {"#123456": "l"}}
    spec = regions_spec(tiny_spec, sampler={"steps": 1}, layout=str(layout), layout_background="#ffffff",
                        **(texts if given == "spec" else plain))
    overrides = [] if given == "spec" else [
        f"tiler.regions.0.prompt={t['region']}", f"tiler.regions.0.negative_prompt={t['region_negative']}",
        f"tiler.prompts.#123456={t['layout']}", f"tiler.background_prompt={t['background']}",
        f"tiler.background_negative_prompt={t['background_negative']}"]
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main(["generate", str(path), *overrides]) == 0, capsys.readouterr().err
    assert encoded == {(t["region"], t["region_negative"]), (t["layout"], ""),  # (every window has a region view or
                       (t["background"], t["background_negative"])}                # a background one: no request's)
    meta = json.loads((tmp_path / "out" / "img.json").read_text())
    tiler = meta["spec"]["tiler"]
    region = tiler["regions"][0]
    assert (region["prompt"], region["negative_prompt"]) == (t["region"], t["region_negative"])
    assert tiler["prompts"] == {"#123456": t["layout"]} and tiler["background_prompt"] == t["background"]
    assert tiler["background_negative_prompt"] == t["background_negative"] and HOME not in json.dumps(meta)

    capsys.readouterr()
    assert main(["config", str(path), *overrides]) == 0
    printed = capsys.readouterr().out
    again = tmp_path / "again.yaml"
    again.write_text(printed)
    reread = resolve(again).plugin_configs["tiler"]
    assert HOME not in printed and (reread.regions[0].prompt, reread.prompts["#123456"]) == (t["region"], t["layout"])
    assert (reread.background_prompt, reread.background_negative_prompt) == (t["background"], t["background_negative"])
