"""A tiny Stable-Diffusion-shaped model with RANDOM weights: for offline smoke runs and tests only.

It keeps SD's interfaces and geometry (8x latent factor, 4 latent channels, CLIP-style tokenizer, DDIM config) so
that every code path runs, but its images are noise-like: it has never been trained. It is built once, saved with
``save_pretrained`` and then loaded through the same loader as any real model.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from pathlib import Path

import torch

from syncengine.errors import SyncEngineError, one_line

TINY_NOTICE = "using the built-in tiny model with RANDOM weights: images are noise-like (smoke runs only)"


CACHE_VAR = "SYNCENGINE_CACHE"
TINY_FOLDER = "tiny-random-sd-v1"
TINY_CACHE_FIX = f"delete that folder (it is rebuilt on first use) or point {CACHE_VAR} at another writable folder"


def _cache_dir() -> Path:
    root = os.environ.get(CACHE_VAR) or Path.home() / ".cache" / "syncengine"
    return Path(root).expanduser()


def _cache_error(root: Path, problem: str) -> SyncEngineError:
    where = f"{CACHE_VAR}={str(root)!r}" if os.environ.get(CACHE_VAR) else \
        f"the model cache {str(root)!r} ({CACHE_VAR} is unset)"
    return SyncEngineError(f"{where} {problem}; the built-in tiny model is built there: point {CACHE_VAR} at a "
                           f"writable folder")


def writable_cache_dir() -> Path:
    """The cache folder, created; a :class:`SyncEngineError` naming ``SYNCENGINE_CACHE`` when it is a file or cannot
    be written."""
    root = _cache_dir()
    if root.exists() and not root.is_dir():
        raise _cache_error(root, "is a file, not a folder")
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".write-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        problem = "is under a file, not a folder" if isinstance(exc, NotADirectoryError) else \
            f"cannot be written ({one_line(exc, 120)})"
        raise _cache_error(root, problem) from None
    return root


@contextlib.contextmanager
def _build_lock(root: Path, name: str):
    """An exclusive lock between processes building ``name`` in ``root`` (POSIX ``flock``; elsewhere none: the
    atomic rename in :func:`build_tiny_pipeline` still keeps readers from a half-written folder)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    try:
        handle = open(root / f".{name}.lock", "a")
    except OSError as exc:
        raise _cache_error(root, f"cannot be written ({one_line(exc, 120)})") from None
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def cache_stamp(path: Path) -> tuple[int, int] | None:
    """Identifies one build of a cached folder (a rebuild renames a new folder into place)."""
    try:
        st = (path / "model_index.json").stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


def tiny_model_path(rebuild_from: tuple[int, int] | None = None) -> Path:
    """The demo model's folder, built on first use. ``rebuild_from``: the :func:`cache_stamp` of a cached folder that
    failed to load; it is rebuilt unless another process rebuilt it meanwhile. Concurrent builders take turns (a lock
    file), and each build is renamed into place whole."""
    path = _cache_dir() / TINY_FOLDER
    if rebuild_from is None and (path / "model_index.json").is_file():
        return path
    root = writable_cache_dir()
    with _build_lock(root, TINY_FOLDER):
        stamp = cache_stamp(path)
        if stamp is not None and (rebuild_from is None or stamp != rebuild_from):
            return path  # built (or rebuilt) by another process while this one waited
        for stale in root.glob(f"{TINY_FOLDER}.partial-*"):  # left by a builder that died (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            build_tiny_pipeline(path)
        except OSError as exc:
            raise _cache_error(root, f"cannot be written ({one_line(exc, 120)})") from exc
    return path


def tiny_tokenizer(folder: Path):
    """A byte-level CLIP tokenizer (every byte is a token, no merges): works for any text, offline."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols)}
    for s in symbols:
        vocab[s + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def clip_text_encoder(tokenizer, hidden_size: int, intermediate_size: int, layers: int = 2, heads: int = 4):
    """A random-weight CLIP text encoder sized for ``tokenizer`` (SD's text tower, shrunk)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))


def sd_vae(block_out_channels: tuple[int, ...], sample_size: int, **options):
    """A random-weight SD-shaped VAE: four levels (8x latent factor), 4 latent channels, one layer per block."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=block_out_channels,
                         layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=sample_size, **options)


def sd_ddim_scheduler(prediction_type: str = "epsilon"):
    """The DDIM configuration Stable Diffusion ships with."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)


def build_tiny_pipeline(path: str | Path, seed: int = 0, prediction_type: str = "epsilon", sample_size: int = 64):
    """Build and ``save_pretrained`` a tiny random SD pipeline into ``path``; returns the path."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    path = Path(path)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    vae = sd_vae((16, 16, 16, 16), sample_size * 8)
    import tempfile

    with tempfile.TemporaryDirectory() as src:
        tokenizer = tiny_tokenizer(Path(src))
    text_encoder = clip_text_encoder(tokenizer, hidden_size=32, intermediate_size=37)
    scheduler = sd_ddim_scheduler(prediction_type)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    tmp = path.with_name(f"{path.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        pipe.save_pretrained(tmp)
        _replace_folder(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _replace_folder(new: Path, path: Path) -> None:
    """Rename the finished folder ``new`` to ``path``: an old (damaged) ``path`` is renamed aside first and removed
    after, so a reader sees the old folder or the new one, never a half-written one. Where another builder's folder
    won the race for ``path``, ``new`` is left to be removed."""
    old = None
    if path.exists():
        old = path.with_name(f"{path.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            path.rename(old)
        except FileNotFoundError:  # another builder moved it first
            old = None
    try:
        new.rename(path)
    except OSError:
        if not (path / "model_index.json").is_file():  # not a concurrent builder's finished folder: a real failure
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
