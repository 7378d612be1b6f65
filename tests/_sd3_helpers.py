"""Tiny random SD3 models for the sd3 tests, built in code and saved locally (loaded through the engine's loader)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _specs import spec_maker

SEQ = 8  # T5 tokens: the tests need the path, not the length


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory) -> Path:
    """A tiny random SD3 pipeline folder (fixed shift 3, as SD3.5 ships)."""
    from syncengine_sd3.tiny import build_tiny_sd3

    return build_tiny_sd3(tmp_path_factory.mktemp("models") / "tiny-sd3", seed=0)


@pytest.fixture(scope="session")
def tiny_sd3_dynamic(tiny_sd3, tmp_path_factory) -> Path:
    """The same weights with a resolution-dependent shift (``use_dynamic_shifting``: ``mu`` from the window size);
    only the scheduler's config differs, so it is a copy with that file rewritten."""
    import json
    import shutil

    path = shutil.copytree(tiny_sd3, tmp_path_factory.mktemp("models") / "tiny-sd3-dyn")
    config_file = path / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config["use_dynamic_shifting"] = True
    config_file.write_text(json.dumps(config))
    return path


@pytest.fixture
def sd3_spec(tiny_sd3, tmp_path):
    """A small, fast spec dict on the tiny SD3 (tests override what they need, section by section)."""
    return spec_maker({"name": "sd3", "pretrained": str(tiny_sd3), "max_sequence_length": SEQ},
                      {"scheduler": "flow_euler", "guidance_scale": 5.0}, tmp_path)


# ------------------------------------------------------------------------------------------- single-file checkpoints

SD3_PREFIX = "model.diffusion_model."


def _swap_halves(t):
    """SD3's original final modulations store (shift, scale); diffusers (scale, shift): the swap is its own inverse."""
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def transformer_to_original(state, num_layers: int) -> dict:
    """SD3Transformer2DModel keys -> the original MMDiT names (without ``model.diffusion_model.``): the inverse of
    what diffusers' single-file conversion reads (fused qkv, adaLN modulations, the last block's context side)."""
    out = {"pos_embed": state["pos_embed.pos_embed"]}
    pairs = {"x_embedder.proj": "pos_embed.proj", "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
             "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2", "context_embedder": "context_embedder",
             "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
             "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2", "final_layer.linear": "proj_out"}
    for i in range(num_layers):
        b, d = f"joint_blocks.{i}", f"transformer_blocks.{i}"
        last = i == num_layers - 1
        pairs.update({f"{b}.x_block.attn.proj": f"{d}.attn.to_out.0",
                      f"{b}.x_block.adaLN_modulation.1": f"{d}.norm1.linear",
                      f"{b}.x_block.mlp.fc1": f"{d}.ff.net.0.proj", f"{b}.x_block.mlp.fc2": f"{d}.ff.net.2"})
        for side, names in (("x_block.attn", ("to_q", "to_k", "to_v")),
                            ("context_block.attn", ("add_q_proj", "add_k_proj", "add_v_proj")),
                            ("x_block.attn2", ("to_q", "to_k", "to_v"))):
            attn = "attn2" if side.endswith("attn2") else "attn"
            if f"{d}.{attn}.{names[0]}.weight" not in state:
                continue
            for param in ("weight", "bias"):
                out[f"{b}.{side}.qkv.{param}"] = torch.cat([state[f"{d}.{attn}.{n}.{param}"] for n in names])
        for ours, theirs in (("x_block.attn", "attn.norm_q"), ("x_block.attn", "attn.norm_k"),
                             ("context_block.attn", "attn.norm_added_q"), ("context_block.attn", "attn.norm_added_k"),
                             ("x_block.attn2", "attn2.norm_q"), ("x_block.attn2", "attn2.norm_k")):
            if f"{d}.{theirs}.weight" in state:
                out[f"{b}.{ours}.ln_{theirs[-1]}.weight"] = state[f"{d}.{theirs}.weight"]
        if f"{d}.attn2.to_out.0.weight" in state:
            pairs[f"{b}.x_block.attn2.proj"] = f"{d}.attn2.to_out.0"
        if not last:
            pairs.update({f"{b}.context_block.attn.proj": f"{d}.attn.to_add_out",
                          f"{b}.context_block.adaLN_modulation.1": f"{d}.norm1_context.linear",
                          f"{b}.context_block.mlp.fc1": f"{d}.ff_context.net.0.proj",
                          f"{b}.context_block.mlp.fc2": f"{d}.ff_context.net.2"})
        else:
            for param in ("weight", "bias"):
                out[f"{b}.context_block.adaLN_modulation.1.{param}"] = _swap_halves(
                    state[f"{d}.norm1_context.linear.{param}"])
    for param in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{param}"] = _swap_halves(state[f"norm_out.linear.{param}"])
        for ours, theirs in pairs.items():
            out[f"{ours}.{param}"] = state[f"{theirs}.{param}"]
    return out


def sd3_single_file(pipe) -> dict:
    """One original-format state dict holding the pipeline's transformer and VAE (SD3.5's files without the text
    encoders; those come from ``single_file_config``), contiguous copies for safetensors."""
    from _ldm_checkpoint import VAE_PREFIX, vae_to_ldm

    t = transformer_to_original(pipe.transformer.state_dict(), pipe.transformer.config.num_layers)
    parts = ((SD3_PREFIX, t), (VAE_PREFIX, vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config)))
    return {prefix + key: value.detach().clone().contiguous() for prefix, part in parts for key, value in part.items()}
