"""One measurement in a fresh process: ``python -m benchmarks.worker '<json job>'`` prints one JSON line.

A fresh process per measurement makes the peak resident memory (``VmHWM``, the kernel's high-water mark, the same
figure as ``ru_maxrss``) belong to that measurement alone. ``peak_over_start_mib`` subtracts the resident memory after
the model is loaded and warmed up, i.e. what the run itself added at its peak.
"""
from __future__ import annotations

import functools
import gc
import json
import os
import sys
import tempfile
import time
import warnings
from typing import Any

import torch

PROMPT = "a photo of a mountain range at twilight"


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


class Counters:
    """UNet rows/calls, decoded images (full VAE and tiny decoder), backward passes: counted at the modules."""

    def __init__(self):
        self.values = {"unet_calls": 0, "unet_rows": 0, "vae_decodes": 0, "tiny_decodes": 0, "backward_calls": 0}

    def unet(self, unet) -> None:
        def hook(module, args, kwargs):
            sample = args[0] if args else kwargs["sample"]
            self.values["unet_calls"] += 1
            self.values["unet_rows"] += int(sample.shape[0])

        unet.register_forward_pre_hook(hook, with_kwargs=True)

    def decoder(self, vae, key: str) -> None:
        original = vae.decode

        def decode(z, *args, **kwargs):
            self.values[key] += int(z.shape[0])
            return original(z, *args, **kwargs)

        vae.decode = decode

    def autograd(self) -> None:
        original = torch.autograd.grad

        def grad(*args, **kwargs):
            self.values["backward_calls"] += 1
            return original(*args, **kwargs)

        torch.autograd.grad = grad


def _warm_up(unet, vae, hidden_dim: int) -> None:
    """First calls pay one-off costs (kernel selection, allocations): pay them before the clock starts."""
    device = unet.device
    with torch.no_grad():
        text = torch.zeros(2, 77, hidden_dim, device=device)
        unet(torch.zeros(2, 4, 64, 64, device=device), 500, encoder_hidden_states=text)
        vae.decode(torch.zeros(1, 4, 8, 8, device=device))
    _sync(device)


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _start_memory(device) -> int:
    """Resident memory now (KiB); on CUDA also resets the allocator's peak so it belongs to this measurement."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    return _status_kib("VmRSS")


def run_diffusers(job: dict[str, Any]) -> dict[str, Any]:
    from diffusers import StableDiffusionPanoramaPipeline

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = StableDiffusionPanoramaPipeline.from_pretrained(
            job["model"], safety_checker=None, requires_safety_checker=False
        )
    pipe.set_progress_bar_config(disable=True)
    pipe.to(job["device"])
    # diffusers fixes the stride at 8 latents (64 px); use the job's stride so both sides run the same views
    pipe.get_views = functools.partial(pipe.get_views, window_size=job["window"] // 8, stride=job["stride"] // 8)
    _warm_up(pipe.unet, pipe.vae, pipe.text_encoder.config.hidden_size)
    counters = Counters()
    counters.unet(pipe.unet)
    counters.decoder(pipe.vae, "vae_decodes")
    start_rss = _start_memory(job["device"])
    seconds = []
    for seed in job["seeds"]:
        _sync(job["device"])
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pipe(PROMPT, height=job["height"], width=job["width"], num_inference_steps=job["steps"],
                 guidance_scale=7.5, view_batch_size=job["view_batch_size"], output_type="pt",
                 generator=torch.Generator("cpu").manual_seed(seed))
        _sync(job["device"])
        seconds.append(time.perf_counter() - t0)
    return _result(job, seconds, counters, start_rss, {})


def syncengine_spec(job: dict[str, Any], seed: int, output_dir: str) -> dict[str, Any]:
    sync = {"loss": {"name": "lpips", "net": "vgg", "backbone": "random"}, "weight": 0.0}
    sync.update(job.get("sync", {}))
    denoiser = {"name": "stable-diffusion", "pretrained": job["model"], "device": job["device"], "dtype": "float32"}
    denoiser.update(job.get("denoiser", {}))
    return {
        "canvas": {"height": job["height"], "width": job["width"]},
        "tiler": job.get("tiler") or {"name": "sliding", "window": job["window"], "stride": job["stride"]},
        "merger": {"name": "average"},
        "denoiser": denoiser,
        "sync": sync,
        "sampler": {"scheduler": "ddim", "steps": job["steps"], "guidance_scale": 7.5,
                    "view_batch_size": job["view_batch_size"]},
        "requests": [{"prompt": PROMPT, "seed": seed, "name": "bench"}],
        "runtime": {"accelerator": torch.device(job["device"]).type, "devices": 1, "output_dir": output_dir,
                    "progress": False,
                    "tiled_decode": bool(job.get("tiled_decode", False))},
    }


def _loaded(job: dict[str, Any]):
    """(resolved spec, pipeline, denoiser, loss, output folder) of a syncengine job, loaded like a run loads them."""
    from syncengine.config import resolve
    from syncengine.pipeline import Pipeline

    tmp = tempfile.mkdtemp(prefix="bench-")
    resolved = resolve(syncengine_spec(job, job["seeds"][0], tmp))
    pipe = Pipeline(resolved)
    den = pipe.denoiser_for(resolved)
    return resolved, pipe, den, pipe.loss_for(resolved, den.device), tmp


def _warm_and_count(den) -> Counters:
    """Warm the models up, then count UNet rows, decodes (full and tiny) and backward passes from here on."""
    _warm_up(den.unet, den.vae, den.pipe.text_encoder.config.hidden_size)
    counters = Counters()
    counters.unet(den.unet)
    counters.decoder(den.vae, "vae_decodes")
    if den.sync_decoder is not None:
        counters.decoder(den.sync_decoder, "tiny_decodes")
    counters.autograd()
    return counters


def run_syncengine(job: dict[str, Any]) -> dict[str, Any]:
    from syncengine.config import resolve

    resolved, pipe, den, loss, tmp = _loaded(job)
    distance = None
    if job.get("coherence"):
        from syncengine.evaluation.metrics import load_distance

        distance = load_distance({"name": "lpips", "net": "vgg", "backbone": "random"})
    counters = _warm_and_count(den)
    start_rss = _start_memory(job["device"])
    seconds, stats, intra = [], [], []
    for seed in job["seeds"]:
        spec = resolve(syncengine_spec(job, seed, tmp))
        pipe.resolved = spec
        _sync(job["device"])
        t0 = time.perf_counter()
        out = pipe.run(0)
        _sync(job["device"])
        seconds.append(time.perf_counter() - t0)
        stats.append(out.stats)
        if distance is not None:
            from syncengine.evaluation.crops import grid_crops
            from syncengine.evaluation.metrics import intra_distance

            intra.append(intra_distance(grid_crops(out.image, job["window"]), distance.to(job["device"])))
    extra = {"stats": stats[0], "loss_loaded": loss is not None}
    if intra:
        extra["intra_lpips"] = intra
    return _result(job, seconds, counters, start_rss, extra)


def run_reference(job: dict[str, Any]) -> dict[str, Any]:
    """The reference implementation's structure (``benchmarks.reference``) on the same model, loss and windows."""
    from syncengine.pipeline import decode_canvas

    from .reference import reference_syncdiffusion

    resolved, _, den, loss, _ = _loaded(job)
    views = resolved.build("tiler").views(resolved.canvas)
    weight, decay = float(job["sync"]["weight"]), float(job["sync"]["decay"])
    counters = _warm_and_count(den)
    start_rss = _start_memory(job["device"])
    seconds = []
    for seed in job["seeds"]:
        noise = torch.randn(resolved.canvas.latent_shape(), generator=torch.Generator("cpu").manual_seed(seed))
        _sync(job["device"])
        t0 = time.perf_counter()
        latents = reference_syncdiffusion(den, loss, views, noise, job["steps"], weight, decay, 7.5, PROMPT)
        decode_canvas(den, latents, False, False)  # as the syncengine rows do
        _sync(job["device"])
        seconds.append(time.perf_counter() - t0)
    return _result(job, seconds, counters, start_rss, {})


def run_decode(job: dict[str, Any]) -> dict[str, Any]:
    """The final decode alone (no sampling): latents of a wide canvas, tiled or not."""
    from syncengine.config import resolve
    from syncengine.pipeline import Pipeline, decode_canvas

    tmp = tempfile.mkdtemp(prefix="bench-")
    resolved = resolve(syncengine_spec({**job, "steps": 1, "view_batch_size": 1, "seeds": [0]}, 0, tmp))
    den = Pipeline(resolved).denoiser_for(resolved)
    latents = torch.randn(resolved.canvas.latent_shape(), generator=torch.Generator().manual_seed(0)).to(den.device)
    _warm_up(den.unet, den.vae, den.pipe.text_encoder.config.hidden_size)
    counters = Counters()
    counters.decoder(den.vae, "vae_decodes")
    start_rss = _start_memory(job["device"])
    t0 = time.perf_counter()
    image = decode_canvas(den, latents, False, bool(job["tiled_decode"]))
    _sync(job["device"])
    seconds = [time.perf_counter() - t0]
    return _result(job, seconds, counters, start_rss, {"image_shape": list(image.shape)})


def _result(job, seconds, counters, start_rss, extra) -> dict[str, Any]:
    peak = _status_kib("VmHWM")
    n = len(seconds)
    per = {k: v / n for k, v in counters.values.items()}
    out = {"name": job["name"], "seconds": seconds, "seconds_mean": sum(seconds) / n, "per_panorama": per,
           "peak_rss_mib": peak / 1024, "start_rss_mib": start_rss / 1024,
           "peak_over_start_mib": (peak - start_rss) / 1024, "threads": torch.get_num_threads(), **extra}
    if torch.device(job["device"]).type == "cuda":  # on a GPU the allocator's peak is the memory that matters
        out["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


KINDS = {"diffusers": run_diffusers, "syncengine": run_syncengine, "reference": run_reference, "decode": run_decode}


def main(argv: list[str]) -> int:
    job = json.loads(argv[0])
    threads = job.get("threads") or int(os.environ.get("BENCH_THREADS", "0")) or (os.cpu_count() or 1)
    torch.set_num_threads(threads)
    import logging

    logging.disable(logging.WARNING)  # the random-weight notices are expected here
    result = KINDS[job["kind"]](job)
    sys.stdout.write("BENCH-RESULT " + json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
