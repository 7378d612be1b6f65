"""``python -m benchmarks.families``: what one view costs per model family, denoised and synced, and the peak memory
of the sync backward, with and without gradient checkpointing and a tiny sync decoder.

For each family and variant, one fresh process (so that the peak resident memory, ``VmHWM``, belongs to that
measurement alone) loads the family's model through the engine's own loader and times, on one window:

- ``denoise``: one guided prediction of the view (no gradient), as every step does for every view;
- ``sync``: the sync update of one view: the prediction with gradient, x0, the decode for the loss, the loss against
  the anchor's target, and the backward to the latents (Eq. 14);
- the peak memory the sync update added over the loaded, warmed-up model (``peak_over_start_mib``; on CUDA the
  allocator's peak).

The loss is the same for every family (``--loss lpips``: LPIPS-VGG with random backbone weights, the paper's loss
network's cost) or a mean square error (``--loss mse``, the default), which leaves the family's own cost: its
network's forward and backward and its VAE decoder's.

Variants: ``base``; ``ckpt`` (``denoiser.gradient_checkpointing``); ``taesd`` (``denoiser.sync_vae``, a tiny
AutoencoderTiny with the family's latent channels); ``ckpt+taesd``.

The models are the families' narrow random-weight test models (sizes say how the structure scales, not how fast
the real models run; SD 2 is the SD-2-shaped benchmark model). Full-size random-weight models built from the
published configurations (for a GPU) are not here yet: ``FAMILIES`` maps a family to its model builder, the place to
add them. Results go to ``benchmarks/results/<device>-families.json``.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = {"base": {}, "ckpt": {"gradient_checkpointing": True}, "taesd": {"sync_vae": "TAESD"},
            "ckpt+taesd": {"gradient_checkpointing": True, "sync_vae": "TAESD"}}
PROMPT = "a photo of a mountain range at twilight"


def _cache_root() -> Path:
    return Path(os.environ.get("SYNCENGINE_CACHE") or Path.home() / ".cache" / "syncengine") / "bench-families"


def _saved(folder: Path, build: Callable[[Path], Any]) -> str:
    """Build a model folder once (``build(folder)`` saves it), reuse it after."""
    if not (folder / "model_index.json").is_file() and not (folder / "config.json").is_file():
        folder.parent.mkdir(parents=True, exist_ok=True)
        build(folder)
    return str(folder)


def _sd(root: Path) -> tuple[dict[str, Any], int]:
    from benchmarks.model import bench_model_paths

    pipe, _ = bench_model_paths()
    return {"name": "stable-diffusion", "pretrained": str(pipe)}, 512


def _sdxl(root: Path) -> tuple[dict[str, Any], int]:
    from syncengine_sdxl.tiny import build_tiny_sdxl_pipeline

    return {"name": "stable-diffusion-xl", "pretrained": _saved(root / "sdxl", build_tiny_sdxl_pipeline)}, 256


def _sd3(root: Path) -> tuple[dict[str, Any], int]:
    from syncengine_sd3.tiny import build_tiny_sd3

    return {"name": "sd3", "pretrained": _saved(root / "sd3", build_tiny_sd3)}, 256


def _flux(root: Path) -> tuple[dict[str, Any], int]:
    from syncengine_flux.tiny import build_tiny_flux

    return {"name": "flux", "pretrained": _saved(root / "flux", build_tiny_flux)}, 256


FAMILIES: dict[str, Callable[[Path], tuple[dict[str, Any], int]]] = {
    "sd2": _sd, "sdxl": _sdxl, "sd3": _sd3, "flux": _flux}


def _tiny_decoder(root: Path, channels: int) -> str:
    """A TAESD-shaped AutoencoderTiny for ``channels`` latent channels (TAESD/TAESDXL: 4, TAESD3/TAEF1: 16)."""
    def build(folder: Path) -> None:
        from diffusers import AutoencoderTiny

        torch.manual_seed(0)
        AutoencoderTiny(encoder_block_out_channels=(16,) * 4, decoder_block_out_channels=(16,) * 4,
                        latent_channels=channels).save_pretrained(folder)

    return _saved(root / f"taesd-{channels}ch", build)


class MeanSquare(torch.nn.Module):
    """The loss without a network: what remains of the sync update's cost is the family's."""

    def prepare_target(self, anchor: torch.Tensor) -> torch.Tensor:
        return anchor

    def forward(self, images: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (images - target).flatten(1).pow(2).mean(1)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(job: dict[str, Any]) -> dict[str, Any]:
    """One family x variant, in this (fresh) process."""
    from syncengine import registry
    from syncengine.denoiser import Conditioning, Step
    from syncengine.parameterization import noise_level
    from syncengine.sync import decoded_x0
    from syncengine.views import CropView
    from syncengine_losses.lpips_loss import LPIPSConfig, LPIPSLoss

    root = Path(job["root"])
    section, window = FAMILIES[job["family"]](root)
    window = job.get("window") or window
    options = dict(VARIANTS[job["variant"]])
    cls = registry.get("denoiser", section.pop("name"))
    probe_channels = job.get("latent_channels")
    if options.get("sync_vae"):
        options["sync_vae"] = _tiny_decoder(root, probe_channels)
    den = cls(cls.Config(**section, **options, device=job["device"]))
    device = den.device
    loss = (LPIPSLoss(LPIPSConfig(net="vgg", backbone="random")) if job["loss"] == "lpips" else MeanSquare()).to(device)
    latent = window // den.latent_factor
    view = CropView(0, top=0, left=0, height=latent, width=latent)
    scheduler = den.make_scheduler(job["scheduler"])
    den.set_timesteps(scheduler, job["steps"], [view])
    i = job["steps"] // 2
    t = scheduler.timesteps[i]
    step, level = Step(i, job["steps"], t), noise_level(scheduler, i, t)
    with torch.no_grad():
        cond = Conditioning(den.encode_prompt(PROMPT, ""), job["guidance"])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, den.latent_channels, latent, latent, generator=g).to(device)
    with torch.no_grad():
        target = loss.prepare_target(decoded_x0(den, x, step, [cond], [view], level).float())

    def denoise() -> None:
        with torch.no_grad():
            den.predict(x, step, [cond], [view])

    def sync() -> None:
        xg = x.clone().requires_grad_(True)
        with torch.enable_grad():
            image = decoded_x0(den, xg, step, [cond], [view], level).float()
            torch.autograd.grad(loss(image, target).sum(), xg)

    def timed(fn: Callable[[], None]) -> float:
        best = float("inf")
        for _ in range(job["repeats"]):
            _sync_device(device)
            t0 = time.perf_counter()
            fn()
            _sync_device(device)
            best = min(best, time.perf_counter() - t0)
        return best

    denoise(), sync()  # warm-up: kernel selection and allocations before the clock and the memory baseline
    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = _status_kib("VmRSS")
    seconds_sync = timed(sync)
    peak = _status_kib("VmHWM")
    out = {"family": job["family"], "variant": job["variant"], "window": window, "loss": job["loss"],
           "device": str(device), "dtype": str(den.dtype).replace("torch.", ""), "seconds_denoise": timed(denoise),
           "seconds_sync": seconds_sync, "peak_over_start_mib": (peak - start) / 1024,
           "threads": torch.get_num_threads()}
    if device.type == "cuda":
        out["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    out["sync_over_denoise"] = out["seconds_sync"] / out["seconds_denoise"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.families", description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", default=",".join(FAMILIES), help="comma-separated: " + ", ".join(FAMILIES))
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated: " + ", ".join(VARIANTS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--window", type=int, default=None, help="window in pixels (default: per family)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--loss", choices=("mse", "lpips"), default="mse")
    parser.add_argument("--out", default=None)
    parser.add_argument("--job", default=None, help=argparse.SUPPRESS)  # internal: one measurement
    args = parser.parse_args(argv)
    if args.job:
        print(json.dumps(measure(json.loads(args.job))))
        return 0
    rows = []
    for family in args.families.split(","):
        flow = family in ("sd3", "flux")
        for variant in args.variants.split(","):
            job = {"family": family, "variant": variant, "device": args.device, "window": args.window,
                   "repeats": args.repeats, "loss": args.loss, "root": str(_cache_root()),
                   "scheduler": "flow_euler" if flow else "ddim", "steps": 10, "guidance": 3.5 if flow else 7.5,
                   "latent_channels": 16 if flow else 4}
            proc = subprocess.run([sys.executable, "-m", "benchmarks.families", "--job", json.dumps(job)],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                rows.append({"family": family, "variant": variant, "error": proc.stderr.strip().splitlines()[-1:]})
            else:
                rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out) if args.out else RESULTS / f"{args.device.split(':')[0]}-families.json"
    out.write_text(json.dumps({"rows": rows, "argv": sys.argv[1:], "torch": torch.__version__}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
