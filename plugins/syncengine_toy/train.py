"""Train the toy model on the toy world and save it as a Stable-Diffusion-format folder.

    python -m syncengine_toy.train --out DIR [--minutes M] [--vae-steps N] [--unet-steps N] [--seed S]

Two phases on one fixed set of world images: a small KL autoencoder (L1 + L2 + a small KL term), then, with the
autoencoder frozen, the UNet and the text encoder jointly on epsilon prediction (prompts dropped to "" 10% of the time
for classifier-free guidance; min-SNR loss weights and an EMA of the weights, both for a usable model from a short
run). Work is counted in steps, so the same settings give the same weights on the same machine; ``--minutes`` only
caps wall time, and ``training.json`` records the steps actually taken (rerun with those to reproduce a capped run).
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import math
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Optional

import torch
import torch.nn.functional as F

from .model import (
    ToyModelConfig,
    build_scheduler,
    build_text_encoder,
    build_tokenizer,
    build_training_scheduler,
    build_unet,
    build_vae,
)

log = logging.getLogger("syncengine_toy.train")

CHECKSUMS = "SHA256SUMS"
SETTINGS = "training.json"


@dataclass
class TrainConfig:
    """Every setting of a run (written to ``training.json``)."""

    seed: int = 0
    minutes: float = 25.0  # wall-time cap for both phases together
    vae_share: float = 0.25  # the autoencoder phase stops at this share of ``minutes``
    threads: int = 1  # on a shared 2-core machine one thread ran 2x faster than two (no oversubscription)
    dataset_size: int = 2048  # world images drawn once (plus their mirror images) and reused every epoch
    vae_steps: int = 1400
    vae_batch: int = 8
    vae_crop: int = 64  # the autoencoder (all convolutions) trains on random crops: 4x fewer pixels per image
    vae_lr: float = 1e-3
    kl_weight: float = 1e-3  # per latent element, against per-pixel L1 + L2: keeps the latents smooth and bounded
    unet_steps: int = 2400
    unet_batch: int = 16
    unet_lr: float = 1e-3
    warmup_steps: int = 100
    drop_prompt: float = 0.1  # share of "" prompts (classifier-free guidance)
    min_snr_gamma: float = 5.0
    noise_offset: float = 0.05  # lets the model reach very dark or bright looks (night, snow)
    ema_decay: float = 0.995
    log_every: int = 100
    model: ToyModelConfig = field(default_factory=ToyModelConfig)


def tiny_config() -> TrainConfig:
    """A seconds-long run for tests: tiny networks, a handful of images, two steps per phase."""
    model = ToyModelConfig(image_size=32, vae_channels=(8, 8, 8, 8), unet_channels=(8, 16, 16), attention_head_dim=4,
                           text_hidden=16, text_layers=1, text_heads=2, norm_groups=4)
    return TrainConfig(dataset_size=4, vae_steps=2, vae_batch=2, vae_crop=16, unet_steps=2, unet_batch=2,
                       warmup_steps=1, log_every=1, minutes=5, model=model)


# ------------------------------------------------------------------------------------------------------------ data


def world_images(world: ModuleType, c: TrainConfig) -> tuple[torch.Tensor, list[str], list[str]]:
    """The training images in [-1, 1] with their looks and prompts, and the mirror image of each (same look)."""
    images, looks, prompts = world.sample_training_batch(c.seed, c.dataset_size, c.model.image_size)
    images = images.float().clamp(0, 1) * 2 - 1
    return torch.cat([images, images.flip(-1)]), list(looks) * 2, list(prompts) * 2


def lr_at(step: int, total: int, warmup: int, base: float) -> float:
    """Linear warm-up, then cosine decay to a tenth of ``base``."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


class Clock:
    def __init__(self, minutes: float):
        self.start = time.monotonic()
        self.limit = minutes * 60

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def past(self, share: float = 1.0) -> bool:
        return self.elapsed() > self.limit * share


# ----------------------------------------------------------------------------------------------------- the phases


def train_vae(vae, images: torch.Tensor, c: TrainConfig, clock: Clock, gen: torch.Generator) -> dict:
    opt = torch.optim.AdamW(vae.parameters(), lr=c.vae_lr, weight_decay=0.0)
    vae.train()
    step, losses = 0, []
    for step in range(c.vae_steps):
        if clock.past(c.vae_share):
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(step, c.vae_steps, c.warmup_steps, c.vae_lr)
        batch = images[torch.randint(0, len(images), (c.vae_batch,), generator=gen)]
        if c.vae_crop < batch.shape[-1]:
            top, left = torch.randint(0, batch.shape[-1] - c.vae_crop + 1, (2,), generator=gen).tolist()
            batch = batch[..., top:top + c.vae_crop, left:left + c.vae_crop]
        posterior = vae.encode(batch).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        recon = vae.decode(z).sample
        rec = F.l1_loss(recon, batch) + F.mse_loss(recon, batch)
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        loss = rec + c.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(rec.item())
        if step % c.log_every == 0 or step == c.vae_steps - 1:
            log.info("vae step %d/%d  rec %.4f  kl %.2f  (%.0f s)", step, c.vae_steps, rec.item(), kl.item(),
                     clock.elapsed())
    else:
        step = c.vae_steps
    vae.eval().requires_grad_(False)
    return {"steps": step, "stopped_by": "steps" if step == c.vae_steps else "minutes",
            "final_rec_loss": _tail_mean(losses), "seconds": round(clock.elapsed(), 1)}


@torch.no_grad()
def encode_all(vae, images: torch.Tensor, batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for i in range(0, len(images), batch):
        dist = vae.encode(images[i:i + batch]).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


def prompt_ids(tokenizer, prompts: list[str]) -> torch.Tensor:
    """Token ids exactly as StableDiffusionPipeline.encode_prompt makes them (padded to the model's length)."""
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def train_unet(unet, text_encoder, tokenizer, mean: torch.Tensor, std: torch.Tensor, prompts: list[str],
               c: TrainConfig, clock: Clock, gen: torch.Generator) -> tuple[dict, torch.nn.Module, torch.nn.Module]:
    """Epsilon prediction on the frozen autoencoder's latents; returns the EMA copies of UNet and text encoder."""
    schedule = build_training_scheduler()
    alphas = schedule.alphas_cumprod.float()
    snr = alphas / (1 - alphas)
    weights = torch.clamp(snr, max=c.min_snr_gamma) / snr  # min-SNR-gamma for epsilon prediction
    vocabulary = sorted(set(prompts) | {""})
    ids = prompt_ids(tokenizer, vocabulary)
    index = torch.tensor([vocabulary.index(p) for p in prompts])
    empty = vocabulary.index("")
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=c.unet_lr, weight_decay=1e-2)
    ema_unet, ema_text = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text_encoder).requires_grad_(False)
    unet.train()
    text_encoder.train()
    step, losses = 0, []
    for step in range(c.unet_steps):
        if clock.past():
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(step, c.unet_steps, c.warmup_steps, c.unet_lr)
        pick = torch.randint(0, len(mean), (c.unet_batch,), generator=gen)
        x0 = (mean[pick] + std[pick] * torch.randn(mean[pick].shape, generator=gen)) * c.model.extra["scaling_factor"]
        which = index[pick].clone()
        which[torch.rand(c.unet_batch, generator=gen) < c.drop_prompt] = empty
        used, inverse = torch.unique(which, return_inverse=True)
        context = text_encoder(ids[used])[0][inverse]
        noise = torch.randn(x0.shape, generator=gen)
        if c.noise_offset:
            noise = noise + c.noise_offset * torch.randn((*x0.shape[:2], 1, 1), generator=gen)
        t = torch.randint(0, len(alphas), (c.unet_batch,), generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        pred = unet(xt, t, encoder_hidden_states=context).sample
        loss = ((pred - noise) ** 2).mean(dim=(1, 2, 3))
        loss = (loss * weights[t]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(c.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for ema, live in ((ema_unet, unet), (ema_text, text_encoder)):
                for e, p in zip(ema.parameters(), live.parameters()):
                    e.lerp_(p, 1 - decay)
        losses.append(loss.item())
        if step % c.log_every == 0 or step == c.unet_steps - 1:
            log.info("unet step %d/%d  loss %.4f (mean of last 100 %.4f)  lr %.2e  (%.0f s)", step, c.unet_steps,
                     loss.item(), _tail_mean(losses), opt.param_groups[0]["lr"], clock.elapsed())
    else:
        step = c.unet_steps
    return ({"steps": step, "stopped_by": "steps" if step == c.unet_steps else "minutes",
             "final_loss": _tail_mean(losses), "seconds": round(clock.elapsed(), 1)},
            ema_unet.eval(), ema_text.eval())


def _tail_mean(values: list[float], n: int = 100) -> Optional[float]:
    tail = values[-n:]
    return round(sum(tail) / len(tail), 5) if tail else None


# ------------------------------------------------------------------------------------------------------ the folder


def checksums(folder: Path) -> str:
    """``sha256sum`` format over every file of the folder except the list itself, sorted by path."""
    lines = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != CHECKSUMS):
        lines.append(f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {path.relative_to(folder).as_posix()}")
    return "\n".join(lines) + "\n"


def script_revision() -> dict:
    """The git commit of this script and whether the files it ran from differed from that commit."""
    here = Path(__file__).resolve().parent
    files = [here / "train.py", here / "model.py"]
    out = {"sha256": {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}}
    try:
        out["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                                       check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", *map(str, files)], cwd=here,
                               capture_output=True, text=True, check=True).stdout.strip()
        out["uncommitted_changes"] = bool(dirty)
    except (OSError, subprocess.CalledProcessError):
        out["commit"] = None
    return out


def save_folder(out: Path, vae, unet, text_encoder, tokenizer, record: dict) -> Path:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=build_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)
    (out / SETTINGS).write_text(json.dumps(record, indent=2) + "\n")
    (out / CHECKSUMS).write_text(checksums(out))
    return out


def train(out: str | Path, c: TrainConfig, world: ModuleType | None = None) -> dict:
    """Run both phases and save the folder; returns what ``training.json`` holds."""
    if world is None:
        from . import world as world_module

        world = world_module
    torch.set_num_threads(c.threads)
    torch.manual_seed(c.seed)
    gen = torch.Generator().manual_seed(c.seed)
    clock = Clock(c.minutes)
    images, looks, prompts = world_images(world, c)
    log.info("%d training images (%d with mirrors) at %d px in %.0f s", c.dataset_size, len(images),
             c.model.image_size, clock.elapsed())

    vae = build_vae(c.model)
    vae_record = train_vae(vae, images, c, clock, gen)
    mean, std = encode_all(vae, images)
    scaling = 1.0 / float((mean + std * torch.randn(mean.shape, generator=gen)).std())
    c.model.extra["scaling_factor"] = round(scaling, 5)
    vae.register_to_config(scaling_factor=c.model.extra["scaling_factor"])
    log.info("vae: %s; latents scaled by %.4f", vae_record, scaling)

    with tempfile.TemporaryDirectory() as folder:
        tokenizer = build_tokenizer(Path(folder))
    text_encoder = build_text_encoder(tokenizer, c.model)
    unet = build_unet(c.model)
    unet_record, unet, text_encoder = train_unet(unet, text_encoder, tokenizer, mean, std, prompts, c, clock, gen)
    log.info("unet: %s", unet_record)

    record = {
        "settings": asdict(c),
        "script": script_revision(),
        "world": {"module": world.__name__, "looks": list(getattr(world, "LOOKS", ())),
                  "prompts": sorted(set(prompts)), "images_per_look": {k: looks.count(k) for k in sorted(set(looks))}},
        "vae": vae_record,
        "unet": unet_record,
        "minutes": round(clock.elapsed() / 60, 2),
        "machine": {"torch": torch.__version__, "threads": c.threads, "device": "cpu"},
        "parameters": {"vae": _count(vae), "unet": _count(unet), "text_encoder": _count(text_encoder)},
        "reproduce": f"python -m syncengine_toy.train --out DIR --seed {c.seed} --minutes 1000 --vae-steps "
                     f"{vae_record['steps']} --unet-steps {unet_record['steps']}",
    }
    save_folder(Path(out), vae, unet, text_encoder, tokenizer, record)
    log.info("saved %s in %.1f minutes", out, record["minutes"])
    return record


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m syncengine_toy.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder to write the SD-format model into")
    d = TrainConfig()
    p.add_argument("--minutes", type=float, default=d.minutes, help="wall-time cap (default %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--vae-steps", type=int, default=d.vae_steps)
    p.add_argument("--unet-steps", type=int, default=d.unet_steps)
    p.add_argument("--dataset-size", type=int, default=d.dataset_size)
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument("--tiny", action="store_true", help="a seconds-long smoke run on tiny networks")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    c = tiny_config() if args.tiny else TrainConfig()
    c.minutes, c.seed, c.threads = args.minutes, args.seed, args.threads
    if not args.tiny:
        c.vae_steps, c.unet_steps, c.dataset_size = args.vae_steps, args.unet_steps, args.dataset_size
    train(args.out, c)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
