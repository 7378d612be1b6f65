"""Test-only: turn a diffusers Stable Diffusion pipeline into ONE original-format (LDM / CompVis) state dict.

No real SD checkpoint can be downloaded here, so the single-file loading path is tested on the tiny model written out
in the layout original checkpoints use (``model.diffusion_model.*``, ``first_stage_model.*``,
``cond_stage_model.transformer.*``). The mapping is derived from what diffusers' single-file conversion reads; a test
runs diffusers' own conversion on the result and requires it to give back the original state dicts exactly.
Covers the block types SD 1.x/2.x use with an integer ``layers_per_block``.
"""
from __future__ import annotations

import re
from typing import Mapping

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."

# diffusers ResnetBlock2D member -> LDM ResBlock member
_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
                "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
# diffusers VAE mid-block Attention member -> LDM AttnBlock member (q/k/v/proj_out are 1x1 convs there)
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _layers_per_block(config: Mapping) -> int:
    n = config["layers_per_block"]
    if not isinstance(n, int):
        raise ValueError(f"only an integer layers_per_block is supported, got {n!r}")
    return n


def unet_to_ldm(state: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """UNet2DConditionModel keys -> ``openaimodel.UNetModel`` keys (without the ``model.diffusion_model.`` prefix).

    LDM numbers its blocks flat: ``input_blocks[0]`` is conv_in, then each down block owns ``layers_per_block`` slots
    ``[resnet, attention?]`` plus one slot for its downsampler; each up block owns ``layers_per_block + 1`` slots, the
    last of which also carries the upsampler after the resnet (and the attention, when there is one)."""
    n = _layers_per_block(config)
    up_has_attention = {int(m.group(1)) for k in state if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        head, _, param = key.rpartition(".")
        if head in _UNET_TOP:
            new = f"{_UNET_TOP[head]}.{param}"
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)", head):
            b, layer, member = int(m.group(1)), int(m.group(2)), m.group(3)
            new = f"input_blocks.{1 + b * (n + 1) + layer}.0.{_UNET_RESNET[member]}.{param}"
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", head):
            b, layer, rest = int(m.group(1)), int(m.group(2)), m.group(3)
            new = f"input_blocks.{1 + b * (n + 1) + layer}.1.{rest}.{param}"
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", head):
            new = f"input_blocks.{1 + int(m.group(1)) * (n + 1) + n}.0.op.{param}"
        elif m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(\w+)", head):
            new = f"middle_block.{2 * int(m.group(1))}.{_UNET_RESNET[m.group(2)]}.{param}"
        elif m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", head):
            new = f"middle_block.1.{m.group(1)}.{param}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)", head):
            b, layer, member = int(m.group(1)), int(m.group(2)), m.group(3)
            new = f"output_blocks.{b * (n + 1) + layer}.0.{_UNET_RESNET[member]}.{param}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", head):
            b, layer, rest = int(m.group(1)), int(m.group(2)), m.group(3)
            new = f"output_blocks.{b * (n + 1) + layer}.1.{rest}.{param}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv", head):
            b = int(m.group(1))
            slot = 2 if b in up_has_attention else 1
            new = f"output_blocks.{b * (n + 1) + n}.{slot}.conv.{param}"
        else:
            raise KeyError(f"no LDM name for UNet key {key!r}")
        out[new] = value
    return out


def vae_to_ldm(state: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """AutoencoderKL keys -> LDM ``AutoencoderKL`` keys (without ``first_stage_model.``).

    The decoder's up blocks are numbered from the lowest resolution in diffusers and from the highest in LDM; the
    mid-block attention's linear projections are stored as 1x1 conv kernels."""
    num_up = len(config["up_block_types"])
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        head, _, param = key.rpartition(".")
        if m := re.fullmatch(r"(encoder|decoder)\.conv_norm_out", head):
            new = f"{m.group(1)}.norm_out.{param}"
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)", head):
            new = f"encoder.down.{m.group(1)}.block.{m.group(2)}.{_vae_resnet(m.group(3))}.{param}"
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv", head):
            new = f"encoder.down.{m.group(1)}.downsample.conv.{param}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)", head):
            level = num_up - 1 - int(m.group(1))
            new = f"decoder.up.{level}.block.{m.group(2)}.{_vae_resnet(m.group(3))}.{param}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv", head):
            new = f"decoder.up.{num_up - 1 - int(m.group(1))}.upsample.conv.{param}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(\w+)", head):
            new = f"{m.group(1)}.mid.block_{int(m.group(2)) + 1}.{_vae_resnet(m.group(3))}.{param}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", head):
            member = _VAE_ATTN[m.group(2)]
            new = f"{m.group(1)}.mid.attn_1.{member}.{param}"
            if member != "norm" and param == "weight":
                value = value[:, :, None, None]
        elif re.fullmatch(r"(encoder|decoder)\.conv_(in|out)|(post_)?quant_conv", head):
            new = key
        else:
            raise KeyError(f"no LDM name for VAE key {key!r}")
        out[new] = value
    return out


def _vae_resnet(member: str) -> str:
    return "nin_shortcut" if member == "conv_shortcut" else member


def clip_to_ldm(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIPTextModel keys -> ``FrozenCLIPEmbedder`` keys (without ``cond_stage_model.transformer.``): the original
    wraps the HF model, so its names are transformers' own under ``text_model.`` (which transformers >= 5.6 dropped)."""
    return {(key if key.startswith("text_model.") else f"text_model.{key}"): value for key, value in state.items()}


def pipeline_to_ldm(pipe) -> dict[str, torch.Tensor]:
    """One original-format state dict holding the pipeline's UNet, VAE and CLIP text encoder (contiguous copies, so
    safetensors can write it)."""
    parts = (
        (UNET_PREFIX, unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config)),
        (VAE_PREFIX, vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config)),
        (CLIP_PREFIX, clip_to_ldm(pipe.text_encoder.state_dict())),
    )
    return {prefix + key: value.detach().clone().contiguous() for prefix, part in parts for key, value in part.items()}
