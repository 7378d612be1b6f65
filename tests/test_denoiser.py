"""The stable-diffusion denoiser: real diffusers loading of locally saved tiny models, clear errors, v-prediction."""
from __future__ import annotations

import pytest
import torch

from syncengine.denoiser import Conditioning, Step
from syncengine.errors import ModelNotFoundError
from syncengine.parameterization import NoiseLevel, alpha_bar, predicted_epsilon, predicted_x0
from syncengine_sd.denoiser import StableDiffusionConfig, StableDiffusionDenoiser


def test_loads_a_saved_pipeline_through_the_loader(tiny_sd):
    den = StableDiffusionDenoiser(StableDiffusionConfig(pretrained=str(tiny_sd)))
    assert (den.latent_factor, den.latent_channels, den.prediction_type) == (8, 4, "epsilon")
    assert den.default_window == 512
    neg, pos = den.encode_prompt("a cat", "blurry")
    assert pos.shape == neg.shape and not torch.equal(pos, neg)
    # the tokenizer is real: different prompts give different embeddings
    assert not torch.equal(den.encode_prompt("a dog")[1], pos)
    x = torch.randn(2, 4, 8, 8)
    out = den.predict(x, Step(0, 1, torch.tensor(500)), [Conditioning((neg, pos), 7.5)] * 2, [None, None])
    assert out.shape == x.shape
    assert den.decode(x[:1]).shape == (1, 3, 64, 64)


def test_missing_local_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        StableDiffusionDenoiser(StableDiffusionConfig(pretrained=str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="model_index.json"):
        StableDiffusionDenoiser(StableDiffusionConfig(pretrained=str(tmp_path / "empty")))
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        StableDiffusionDenoiser(StableDiffusionConfig(pretrained=str(tmp_path / "model.safetensors")))


def test_uncached_hub_model_says_how_to_get_it(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError) as info:
        StableDiffusionDenoiser(StableDiffusionConfig(pretrained="someone/not-a-cached-model"))
    msg = str(info.value)
    assert "huggingface-cli download someone/not-a-cached-model" in msg and "\n" not in msg


def test_degenerate_tokenizer_is_refused(tiny_sd, monkeypatch):
    from syncengine_sd import loading

    class Two:
        def __len__(self):
            return 2

    with pytest.raises(ModelNotFoundError, match="tokenizer"):
        loading.check_tokenizer(Two(), "stabilityai/stable-diffusion-2-base")


def test_parameterizations_agree_with_diffusers_ddim(tiny_sd_v):
    from diffusers import DDIMScheduler

    den = StableDiffusionDenoiser(StableDiffusionConfig(pretrained=str(tiny_sd_v)))
    assert den.prediction_type == "v_prediction"
    sched = den.make_scheduler("ddim")
    assert isinstance(sched, DDIMScheduler) and sched.config.prediction_type == "v_prediction"
    sched.set_timesteps(10)
    t = sched.timesteps[3]
    x = torch.randn(1, 4, 8, 8)
    v = torch.randn(1, 4, 8, 8)
    a = alpha_bar(sched.alphas_cumprod, t)
    level = NoiseLevel.diffusion(a)
    ref = sched.step(v, t, x).pred_original_sample
    torch.testing.assert_close(predicted_x0(v, x, level, "v_prediction"), ref, atol=1e-5, rtol=1e-5)
    # x_t = sqrt(a) x0 + sqrt(1-a) eps is recovered from both conversions
    x0, eps = predicted_x0(v, x, level, "v_prediction"), predicted_epsilon(v, x, level, "v_prediction")
    torch.testing.assert_close(a.sqrt() * x0 + (1 - a).sqrt() * eps, x, atol=1e-5, rtol=1e-5)
    e = torch.randn(1, 4, 8, 8)
    sched_e = den.make_scheduler("ddim", prediction_type="epsilon")
    sched_e.set_timesteps(10)
    torch.testing.assert_close(predicted_x0(e, x, level, "epsilon"), sched_e.step(e, t, x).pred_original_sample,
                               atol=1e-5, rtol=1e-5)


def test_v_prediction_model_runs_with_sync(tiny_spec, tiny_sd_v):
    from syncengine.config import resolve
    from syncengine.pipeline import Pipeline

    spec = tiny_spec(denoiser={"name": "stable-diffusion", "pretrained": str(tiny_sd_v)}, sync={"weight": 5.0})
    result = Pipeline(resolve(spec)).run(0)
    assert result.model["prediction_type"] == "v_prediction" and result.stats["sync_steps"] == 3
    assert torch.isfinite(result.latents).all()


@pytest.mark.parametrize("name", ["euler", "dpm++", "DDPMScheduler"])
def test_any_diffusers_scheduler_by_name(tiny_spec, name):
    from syncengine.config import resolve
    from syncengine.pipeline import Pipeline

    result = Pipeline(resolve(tiny_spec(sampler={"scheduler": name, "steps": 2}, sync={"weight": 2.0}))).run(0)
    assert torch.isfinite(result.image).all()


def test_prediction_type_override(tiny_sd):
    den = StableDiffusionDenoiser(StableDiffusionConfig(pretrained=str(tiny_sd), prediction_type="v_prediction"))
    assert den.prediction_type == "v_prediction" and den.make_scheduler("ddim").config.prediction_type == "v_prediction"


def _with_vae_levels(tiny_sd, folder, levels: int):
    """The tiny SD model with a VAE of ``levels`` levels (latent factor 2 ** (levels - 1))."""
    import shutil

    from diffusers import AutoencoderKL

    shutil.copytree(tiny_sd, folder)
    shutil.rmtree(folder / "vae")
    torch.manual_seed(0)
    AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
                  block_out_channels=(16,) * levels, layers_per_block=1, latent_channels=4,
                  norm_num_groups=8).save_pretrained(folder / "vae")
    return folder


def test_a_model_with_another_latent_factor_gets_its_own_canvas(tiny_spec, tiny_sd, tmp_path):
    """Validation sizes the canvas from the denoiser class (SD: 8x); a loaded model whose VAE has another factor
    samples the canvas at its own (not at half or twice the size), and a canvas it cannot divide is one line."""
    from syncengine.config import resolve
    from syncengine.errors import ConfigError
    from syncengine.pipeline import Pipeline

    spec = tiny_spec(canvas={"height": 64, "width": 96}, tiler={"name": "sliding", "window": 64, "stride": 32},
                     sampler={"steps": 2})
    spec["denoiser"]["pretrained"] = str(_with_vae_levels(tiny_sd, tmp_path / "factor4", 3))
    out = Pipeline(resolve(spec)).run(0)
    assert tuple(out.latents.shape) == (1, 4, 16, 24)  # 4x, not the class's 8x
    assert tuple(out.image.shape) == (3, 64, 96)
    spec["denoiser"]["pretrained"] = str(_with_vae_levels(tiny_sd, tmp_path / "factor16", 5))
    spec["canvas"]["width"] = 104  # a multiple of 8 (validation passes), not of 16
    with pytest.raises(ConfigError, match=r"canvas.width.*104 is not divisible by this model's latent factor 16"):
        Pipeline(resolve(spec)).run(0)
