"""Single-file (original LDM / CompVis format) checkpoints load through the engine's loader and give the same model.

The tiny SD pipeline is written out as one original-format state dict (tests/_ldm_checkpoint.py), saved as
.safetensors and as .ckpt, loaded by ``StableDiffusionDenoiser`` via diffusers ``from_single_file`` with
``single_file_config`` pointing at the tiny diffusers folder, and compared with the folder-loaded denoiser. The network
is cut off in these tests, so anything that tried the hub would fail.
"""
from __future__ import annotations

import pytest
import torch
from _ldm_checkpoint import pipeline_to_ldm

from syncengine.denoiser import Conditioning, Step
from syncengine.errors import ModelNotFoundError
from syncengine_sd.denoiser import StableDiffusionConfig, StableDiffusionDenoiser


@pytest.fixture(scope="module")
def folder_denoiser(tiny_sd):
    return StableDiffusionDenoiser(StableDiffusionConfig(pretrained=str(tiny_sd)))


@pytest.fixture(scope="module")
def ldm_state(folder_denoiser):
    return pipeline_to_ldm(folder_denoiser.pipe)


def _assert_same_state(actual: dict, expected: dict, what: str) -> None:
    assert sorted(actual) == sorted(expected), what
    for key, value in expected.items():
        assert actual[key].shape == value.shape and torch.equal(actual[key], value), f"{what}: {key}"


def test_original_format_names_and_diffusers_conversion_inverts_it(folder_denoiser, ldm_state):
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )

    pipe = folder_denoiser.pipe
    for key in ("model.diffusion_model.input_blocks.1.0.in_layers.0.weight",
                "model.diffusion_model.output_blocks.1.1.conv.weight",  # upsampler of the attention-free up block
                "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight",
                "first_stage_model.encoder.down.0.block.0.norm1.weight",
                "first_stage_model.decoder.up.3.block.1.conv2.weight",
                "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight"):
        assert key in ldm_state, key
    q = ldm_state["first_stage_model.decoder.mid.attn_1.q.weight"]
    assert q.ndim == 4 and q.shape[2:] == (1, 1)  # 1x1 conv kernel in LDM, a linear layer in diffusers

    _assert_same_state(convert_ldm_unet_checkpoint(ldm_state, pipe.unet.config), pipe.unet.state_dict(), "unet")
    _assert_same_state(convert_ldm_vae_checkpoint(ldm_state, pipe.vae.config), pipe.vae.state_dict(), "vae")
    clip = convert_ldm_clip_checkpoint(ldm_state)
    expected = pipe.text_encoder.state_dict()
    if not any(k.startswith("text_model.") for k in expected):  # transformers >= 5.6 flattened CLIPTextModel
        clip = {k.removeprefix("text_model."): v for k, v in clip.items()}
    _assert_same_state(clip, expected, "text encoder")
    n_parts = len(pipe.unet.state_dict()) + len(pipe.vae.state_dict()) + len(expected)
    assert len(ldm_state) == n_parts  # nothing dropped, nothing extra


def test_conversion_inverts_diffusers_for_other_layouts():
    """Layouts the tiny model lacks: two layers per block, an up block with attention AND an upsampler, VAE channel
    changes (shortcut convs)."""
    from _ldm_checkpoint import unet_to_ldm, vae_to_ldm
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, layers_per_block=2, block_out_channels=(8, 16, 16), norm_num_groups=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, attention_head_dim=2,
    )
    ldm = {"model.diffusion_model." + k: v for k, v in unet_to_ldm(unet.state_dict(), unet.config).items()}
    assert "model.diffusion_model.output_blocks.5.2.conv.weight" in ldm  # upsampler after resnet and attention
    _assert_same_state(convert_ldm_unet_checkpoint(ldm, unet.config), unet.state_dict(), "unet")
    vae = AutoencoderKL(block_out_channels=(8, 16), layers_per_block=2, norm_num_groups=4, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    ldm = {"first_stage_model." + k: v for k, v in vae_to_ldm(vae.state_dict(), vae.config).items()}
    assert "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight" in ldm
    _assert_same_state(convert_ldm_vae_checkpoint(ldm, vae.config), vae.state_dict(), "vae")


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_single_file_checkpoint_equals_the_folder_model(suffix, tiny_sd, folder_denoiser, ldm_state, tmp_path,
                                                       no_network):
    path = tmp_path / f"tiny-sd{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(ldm_state, str(path))
    else:
        torch.save({"state_dict": ldm_state}, path)  # the layout of original CompVis .ckpt files
    den = StableDiffusionDenoiser(StableDiffusionConfig(pretrained=str(path), single_file_config=str(tiny_sd)))
    ref = folder_denoiser
    assert type(den.pipe.scheduler) is type(ref.pipe.scheduler)
    assert den.scheduler_config == ref.scheduler_config
    assert len(den.pipe.tokenizer) == len(ref.pipe.tokenizer)
    for name in ("unet", "vae", "text_encoder"):
        _assert_same_state(getattr(den.pipe, name).state_dict(), getattr(ref.pipe, name).state_dict(), name)

    with torch.no_grad():
        neg, pos = den.encode_prompt("a photo of a mountain", "blurry")
        ref_neg, ref_pos = ref.encode_prompt("a photo of a mountain", "blurry")
        assert torch.equal(pos, ref_pos) and torch.equal(neg, ref_neg)
        gen = torch.Generator().manual_seed(0)
        latents = torch.randn(2, 4, 8, 8, generator=gen)
        step = Step(0, 1, torch.tensor(500))
        out = den.predict(latents, step, [Conditioning((neg, pos), 7.5)] * 2, [None, None])
        expected = ref.predict(latents, step, [Conditioning((ref_neg, ref_pos), 7.5)] * 2, [None, None])
        assert torch.equal(out, expected)
        assert torch.equal(den.decode(latents[:1]), ref.decode(latents[:1]))


def test_single_file_without_a_config_says_to_set_one(ldm_state, tmp_path, no_network):
    from safetensors.torch import save_file

    path = tmp_path / "tiny-sd.safetensors"
    save_file(ldm_state, str(path))
    with pytest.raises(ModelNotFoundError, match="set denoiser.single_file_config to a local diffusers") as info:
        StableDiffusionDenoiser(StableDiffusionConfig(pretrained=str(path)))
    assert "huggingface-cli download" not in str(info.value)  # no download hint for a local file
    assert "\n" not in str(info.value)
