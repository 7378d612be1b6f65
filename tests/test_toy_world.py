"""The toy world generator: the API the trainer codes against, determinism, global looks, local variety, speed."""
from __future__ import annotations

import time

import pytest
import torch

from syncengine_toy import world as W
from syncengine_toy.looks import classify

pytestmark = pytest.mark.usefixtures("one_thread")


def test_api_constants():
    assert len(W.LOOKS) >= 4 and len(set(W.LOOKS)) == len(W.LOOKS)
    assert set(W.PROMPTS) == set(W.LOOKS)
    assert W.PLAIN_PROMPT == "a landscape"
    phrases = [p for look in W.LOOKS for p in W.PROMPTS[look]]
    assert len(phrases) == len(set(phrases)) and W.PLAIN_PROMPT not in phrases  # a phrase names one look


@pytest.mark.parametrize("look", W.LOOKS)
def test_render_scene_shape_range_and_determinism(look):
    a = W.render_scene(3, look, 64, 256)
    assert a.shape == (3, 64, 256) and a.dtype == torch.float32
    assert 0 <= float(a.min()) and float(a.max()) <= 1
    assert torch.equal(a, W.render_scene(3, look, 64, 256))
    assert (a - W.render_scene(4, look, 64, 256)).abs().mean() > 0.005  # another seed, another layout


def test_unknown_look_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown look 'dusk'"):
        W.render_scene(0, "dusk", 64, 64)


def test_a_crop_is_the_same_pixels_as_the_whole_scene():
    """Training crops are rendered directly: they must be exactly windows of the scene they come from."""
    for look in W.LOOKS:
        params = W.draw_scene(11, look, 1024 / 128)
        whole = W.render_crop(params, look, 128, 0, 1024)
        assert torch.equal(whole, W.render_scene(11, look, 128, 1024))
        for left in (0, 77, 500, 896):
            assert torch.equal(W.render_crop(params, look, 128, left, 128), whole[:, :, left:left + 128])


@pytest.mark.parametrize("look", W.LOOKS)
def test_the_look_is_global_and_windows_differ(look):
    """Every window of a wide scene shows the scene's look (the classifier says so, confidently), yet windows at
    different x differ: local variety, not one tile repeated."""
    scene = W.render_scene(5, look, 128, 1024)
    windows = scene.unfold(2, 128, 128).permute(2, 0, 1, 3)  # [8, 3, 128, 128]
    looks, conf = classify(windows)
    assert looks == [look] * 8 and float(conf.min()) > 0.9
    diffs = [(windows[i] - windows[j]).abs().mean().item() for i in range(8) for j in range(i + 1, 8)]
    assert min(diffs) > 0.005, min(diffs)


def test_sample_training_batch_contract():
    images, looks, prompts = W.sample_training_batch(0, 96, 64)
    assert images.shape == (96, 3, 64, 64) and images.dtype == torch.float32
    assert 0 <= float(images.min()) and float(images.max()) <= 1
    assert len(looks) == len(prompts) == 96
    assert set(looks) == set(W.LOOKS)
    for look, prompt in zip(looks, prompts):
        assert prompt == W.PLAIN_PROMPT or prompt in W.PROMPTS[look]
    again = W.sample_training_batch(0, 96, 64)
    assert torch.equal(images, again[0]) and looks == again[1] and prompts == again[2]
    other = W.sample_training_batch(1, 96, 64)
    assert not torch.equal(images, other[0])
    predicted, _ = classify(images)
    assert predicted == looks  # the labels are the looks the crops show


def test_prompt_mix_and_look_balance():
    _, looks, prompts = W.sample_training_batch(2, 1200, 16)
    plain = sum(p == W.PLAIN_PROMPT for p in prompts) / len(prompts)
    assert abs(plain - W.PLAIN_FRACTION) < 0.05  # 1200 draws: the standard error is 0.014
    for look in W.LOOKS:
        share = looks.count(look) / len(looks)
        assert abs(share - 1 / len(W.LOOKS)) < 0.05
        plain_of_look = [p for p, lk in zip(prompts, looks) if lk == look and p == W.PLAIN_PROMPT]
        assert plain_of_look  # the plain prompt covers every look


@pytest.mark.parametrize("size", [64, 128])
def test_batch_is_fast_enough_to_feed_training(size):
    W.sample_training_batch(0, 8, size)  # warm up
    start = time.perf_counter()
    W.sample_training_batch(1, 256, 64 if size == 64 else 128)
    elapsed = time.perf_counter() - start
    # measured: 0.3 s (64 px) and 0.5 s (128 px) on one core; the bound leaves room for a busy machine
    assert elapsed < 3.0, elapsed


def test_examples_command_writes_one_strip_per_look(tmp_path, capsys):
    from PIL import Image

    W.main(["--examples", str(tmp_path / "ex"), "--height", "32", "--width", "96"])
    for look in W.LOOKS:
        with Image.open(tmp_path / "ex" / f"{look}.png") as img:
            assert img.size == (96, 32)
    assert capsys.readouterr().out.count(".png") == len(W.LOOKS)


def _ideal_multidiffusion(data: torch.Tensor, width: int, stride: int, steps: int, seed: int) -> torch.Tensor:
    """MultiDiffusion (sync weight 0) in pixel space with the *ideal* denoiser of a finite set of world crops: the
    posterior mean over the set, per window; overlapping windows' x0 averaged per pixel (for deterministic DDIM this
    is averaging their next latents). A model that learned the world perfectly, without the sync term."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2  # SD's scaled-linear schedule
    alpha_bar = torch.cumprod(1 - betas, 0)
    ts = torch.linspace(999, 0, steps).round().long()
    flat = (data.double() * 2 - 1).flatten(1)
    _, _, h, w = data.shape
    x = torch.randn(3, h, width, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    lefts = range(0, width - w + 1, stride)
    for i, t in enumerate(ts):
        a = alpha_bar[t]
        crops = torch.stack([x[:, :, left:left + w] for left in lefts]).flatten(1)
        weights = torch.softmax(-torch.cdist(crops, a.sqrt() * flat) ** 2 / (2 * (1 - a)), dim=1)
        x0_windows = (weights @ flat).view(-1, 3, h, w)
        total, count = torch.zeros_like(x), torch.zeros_like(x)
        for k, left in enumerate(lefts):
            total[:, :, left:left + w] += x0_windows[k]
            count[:, :, left:left + w] += 1
        x0 = total / count
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        a_next = alpha_bar[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0, dtype=torch.float64)
        x = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
    return ((x.clamp(-1, 1) + 1) / 2).float()


def test_multidiffusion_with_an_ideal_denoiser_mixes_looks():
    """The world is designed so that windows far apart draw their looks independently: MultiDiffusion over a model
    that knows the world exactly (the ideal denoiser of world crops) mixes looks in wide panoramas. Measured at
    32 px, 8 windows, stride 8: 16 of 16 seeds mixed with 1024 crops and 25 steps (docs/toy-world.md); here 512
    crops, 20 steps, 4 seeds: 4 of 4 mixed, 31% of crops unsure (patchwork windows)."""
    from syncengine.evaluation.looks import evaluate_looks

    data, _, _ = W.sample_training_batch(0, 512, 32)
    panoramas = [_ideal_multidiffusion(data, 32 * 8, 8, 20, seed) for seed in range(4)]
    summary = evaluate_looks(panoramas, 32)
    assert summary.mixed >= 3, [p.looks for p in summary.per_panorama]
    assert summary.unsure_crops < 0.5
