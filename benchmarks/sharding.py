"""Window sharding: seconds per panorama on 1 and 2 processes, the scaling efficiency, and an 8-device projection.

``python -m benchmarks.sharding [--model tiny|bench] [--steps 4] ...`` (from the repository root)

1. The same spec runs through the CLI twice, each in fresh processes with one torch thread per process:
   ``runtime.devices=1`` and ``runtime.devices=2 runtime.shard=windows`` (gloo on CPU). Seconds per panorama is the
   sidecar's ``sample + decode`` of the last request (the first one also loads the models).
   Scaling efficiency = t1 / (2 * t2): 1.0 is perfect.
2. The split per step comes from the sidecars: the views' loop (``seconds_denoise``, divided among ranks), what stays
   serial (the anchor's forward + decode on its owner, the scheduler step: ``sample - seconds_denoise`` of the
   1-process run), and the collectives (``seconds_all_reduce + seconds_broadcast`` of rank 0 in the 2-process run:
   transfer plus waiting for the other rank). A separate 2-process microbenchmark times the all-reduce and the
   broadcast alone with the run's byte counts (pure transfer).
3. Projection to N devices (Amdahl with the measured split, per request):
   ``T(N) = serial + parallel * ceil(V / N) / V + comm(N) + per_request``, where ``comm(N)`` scales the pure
   all-reduce time by the ring factor ``2 (N - 1) / N`` relative to N = 2 and keeps the broadcast; efficiency
   ``T(1) / (N * T(N))``. The CPU's transfer speed is not a GPU interconnect's: the projection says what this
   machine's compute/communication ratio implies, and docs/sharding.md discusses GPUs.

The machine has 2 cores shared with other work: absolute seconds are noisy; the ratios are what to read.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def pythonpath() -> str:
    return os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)


def model_path(kind: str) -> str:
    if kind == "tiny":
        from syncengine_sd.tiny import tiny_model_path

        return str(tiny_model_path())
    from benchmarks.model import bench_model_paths

    return str(bench_model_paths()[0])


def spec(args, model: str, output_dir: str) -> dict:
    return {
        "canvas": {"height": args.height, "width": args.width},
        "tiler": {"name": "sliding", "window": args.window, "stride": args.stride},
        "merger": {"name": "average"},
        "denoiser": {"name": "stable-diffusion", "pretrained": model},
        "sync": {"loss": {"name": "lpips", "net": args.loss_net, "backbone": "random"}, "weight": args.sync_weight,
                 "decay": 0.95},
        "sampler": {"scheduler": "ddim", "steps": args.steps, "guidance_scale": 7.5, "view_batch_size": 1},
        "requests": [{"prompt": "a photo of a mountain range", "seed": s, "name": f"bench{s}"}
                     for s in range(args.requests)],
        "runtime": {"accelerator": "cpu", "devices": 1, "output_dir": output_dir, "progress": False},
    }


def run_cli(spec_file: Path, devices: int, output_dir: Path) -> tuple[float, list[dict]]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": pythonpath()}
    cmd = [sys.executable, "-m", "syncengine", "generate", str(spec_file), f"runtime.devices={devices}",
           f"runtime.output_dir={output_dir}"]
    if devices > 1:
        cmd += ["runtime.strategy=ddp", "runtime.shard=windows"]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    metas = [json.loads(p.read_text()) for p in sorted(output_dir.glob("*.json"))]
    return wall, metas


def _comm_worker(rank: int, world: int, init: str, reduce_bytes: int, bcast_bytes: int, repeats: int, out) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    flat = torch.zeros(reduce_bytes // 4)
    image = torch.zeros(max(bcast_bytes // 4, 1))
    for _ in range(3):
        dist.all_reduce(flat)
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(repeats):
        dist.all_reduce(flat)
    t_reduce = (time.perf_counter() - t0) / repeats
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(repeats):
        dist.broadcast(image, src=0)
    t_bcast = (time.perf_counter() - t0) / repeats
    if rank == 0:
        out.put((t_reduce, t_bcast))
    dist.barrier()
    dist.destroy_process_group()


def pure_comm(reduce_bytes: int, bcast_bytes: int, repeats: int = 50) -> tuple[float, float]:
    """Seconds of one all-reduce and one broadcast of the given sizes between 2 gloo processes, nothing else."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init = f"file://{tmp}/pg"
        procs = [ctx.Process(target=_comm_worker, args=(r, 2, init, reduce_bytes, bcast_bytes, repeats, queue))
                 for r in range(2)]
        for p in procs:
            p.start()
        result = queue.get(timeout=300)
        for p in procs:
            p.join()
    return result


def per_panorama(meta: dict) -> float:
    return meta["timings_s"]["sample"] + meta["timings_s"]["decode"]


def project(one: dict, t_reduce: float, t_bcast: float, n: int) -> float:
    """Efficiency at n devices from the 1-process split (seconds per request) and the pure collective times
    (``t_reduce`` per all-reduce at 2 processes, ``t_bcast`` per broadcast)."""
    s = one["stats"]
    t1 = per_panorama(one)
    parallel = s["seconds_denoise"]
    rest = t1 - parallel  # anchor branch, scheduler steps, final decode: every rank does them (or waits for them)
    ring = 2 * (n - 1) / n  # ring all-reduce: bytes sent per rank relative to the buffer, 1.0 at n = 2
    comm = t_reduce * ring * one["sampler_steps"] + t_bcast * s["sync_steps"]
    tn = rest + parallel * math.ceil(s["views"] / n) / s["views"] + comm
    return t1 / (n * tn)


def build_sd2_random(path: Path) -> Path:
    """An SD-2-base-sized pipeline (full UNet and VAE widths, 865M + 84M parameters) with RANDOM weights, saved once:
    per-view GPU costs of the real architecture without downloading it. The text encoder is shrunk to 2 layers (it
    runs once per request); the tokenizer is the tiny byte-level one."""
    if (path / "model_index.json").is_file():
        return path
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from syncengine_sd.tiny import tiny_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
        latent_channels=4, sample_size=512, scaling_factor=0.18215,
    )
    tokenizer = tiny_tokenizer(path.with_name(path.name + ".tokenizer"))
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=1024, intermediate_size=4096, num_hidden_layers=2,
        num_attention_heads=16, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                            safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(path)
    return path


INTERCONNECTS = {  # name: (bus bandwidth bytes/s for ~1-3 MB messages, latency s per collective); assumptions
    "NVLink/NVSwitch": (100e9, 30e-6),
    "PCIe 4 x16": (10e9, 50e-6),
    "2 nodes, 100 Gb/s": (10e9, 100e-6),
}


def gpu_split(args) -> dict:
    """One GPU, the SD-2-sized random model, 1 process: the per-step split of a real-sized panorama, and the
    projected window-sharding efficiency at N GPUs for assumed interconnects (bytes from the formula)."""
    import torch

    cache = Path(os.environ.get("SYNCENGINE_CACHE") or Path.home() / ".cache" / "syncengine")
    model = build_sd2_random(cache / "bench-sd2-base-random")
    with tempfile.TemporaryDirectory(prefix="bench-sharding-gpu-") as tmp:
        tmp = Path(tmp)
        cfg = spec(args, str(model), str(tmp / "out"))
        cfg["runtime"].update(accelerator="gpu", devices=1)
        cfg["sync"]["loss"]["net"] = "vgg"
        cfg["sampler"]["view_batch_size"] = args.view_batch_size
        spec_file = tmp / "spec.json"
        spec_file.write_text(json.dumps(cfg))
        env = {**os.environ, "PYTHONPATH": pythonpath()}
        cmd = [sys.executable, "-m", "syncengine", "generate", str(spec_file)]
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
        meta = [json.loads(p.read_text()) for p in sorted((tmp / "out").glob("*.json"))][-1]
    st, tm = meta["stats"], meta["timings_s"]
    steps, views = args.steps, st["views"]
    c, h, w = 4, args.height // 8, args.width // 8
    reduce_bytes = (c + 1) * h * w * 4 * (steps + st["sync_steps"])  # per request, docs/sharding.md
    bcast_bytes = 3 * args.window * args.window * 4
    parallel, serial = st["seconds_denoise"], tm["sample"] - st["seconds_denoise"]
    t1 = tm["sample"] + tm["decode"]
    out = {"device": torch.cuda.get_device_name(0), "canvas": [args.height, args.width], "views": views,
           "steps": steps, "sync_steps": st["sync_steps"], "view_batch_size": args.view_batch_size,
           "dtype": meta["spec"]["denoiser"].get("dtype"), "t1_s": round(t1, 3),
           "per_step": {"views_loop_s": round(parallel / steps, 4), "serial_s": round(serial / steps, 4)},
           "final_decode_s": round(tm["decode"], 3),
           "all_reduce_bytes_per_step": reduce_bytes // steps, "broadcast_bytes_per_sync_step": bcast_bytes,
           "projected_efficiency": {}}
    for name, (bandwidth, latency) in INTERCONNECTS.items():
        row = {}
        for n in args.project:
            ring = 2 * (n - 1) / n
            comm = steps * latency + ring * reduce_bytes / bandwidth
            comm += st["sync_steps"] * (latency + bcast_bytes / bandwidth)
            tn = serial + tm["decode"] + parallel * math.ceil(views / n) / views + comm
            row[n] = round(t1 / (n * tn), 3)
        out["projected_efficiency"][name] = row
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["tiny", "bench"], default="tiny",
                   help="tiny: the demo's random model; bench: benchmarks.model's SD-2-shaped narrow model")
    p.add_argument("--height", type=int, default=128)
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--window", type=int, default=128)
    p.add_argument("--stride", type=int, default=64)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--requests", type=int, default=2, help="the last one is timed (the first also loads models)")
    p.add_argument("--sync-weight", type=float, default=20.0)
    p.add_argument("--loss-net", default="alex")
    p.add_argument("--project", type=int, nargs="*", default=[2, 4, 8])
    p.add_argument("--json", help="also write the figures to this file")
    p.add_argument("--gpu", action="store_true",
                   help="instead: 1 GPU, SD-2-sized random model, per-step split and N-GPU projection")
    p.add_argument("--view-batch-size", type=int, default=1, help="with --gpu")
    args = p.parse_args(argv)
    if args.gpu:
        figures = gpu_split(args)
        print(json.dumps(figures, indent=2))
        if args.json:
            Path(args.json).write_text(json.dumps(figures, indent=2))
        return 0

    model = model_path(args.model)
    with tempfile.TemporaryDirectory(prefix="bench-sharding-") as tmp:
        tmp = Path(tmp)
        spec_file = tmp / "spec.json"  # JSON is YAML
        spec_file.write_text(json.dumps(spec(args, model, str(tmp / "unused"))))
        wall1, metas1 = run_cli(spec_file, 1, tmp / "one")
        wall2, metas2 = run_cli(spec_file, 2, tmp / "two")
    one, two = metas1[-1], metas2[-1]
    t1, t2 = per_panorama(one), per_panorama(two)
    s1, s2 = one["stats"], two["stats"]
    steps = one["sampler_steps"] = args.steps
    reduce_bytes = s2["all_reduce_bytes"] // max(s2["all_reduce_calls"], 1)  # mean over sync and plain steps
    bcast_bytes = s2["broadcast_bytes"] // max(s2["broadcast_calls"], 1)
    t_reduce, t_bcast = pure_comm(reduce_bytes, bcast_bytes)

    figures = {
        "model": args.model, "canvas": [args.height, args.width], "window": args.window, "stride": args.stride,
        "views": s1["views"], "steps": steps, "sync_steps": s1["sync_steps"], "threads_per_process": 1,
        "t1_s": round(t1, 3), "t2_s": round(t2, 3), "efficiency_2": round(t1 / (2 * t2), 3),
        "wall_1_s": round(wall1, 1), "wall_2_s": round(wall2, 1),
        "per_step_1proc": {
            "views_loop_s": round(s1["seconds_denoise"] / steps, 4),
            "serial_s": round((one["timings_s"]["sample"] - s1["seconds_denoise"]) / steps, 4),
        },
        "per_step_2proc_rank0": {
            "views_loop_s": round(s2["seconds_denoise"] / steps, 4),
            "all_reduce_s": round(s2["seconds_all_reduce"] / steps, 4),
            "broadcast_s": round(s2["seconds_broadcast"] / steps, 4),
            "all_reduce_bytes": s2["all_reduce_bytes"] // steps,
            "broadcast_bytes": s2["broadcast_bytes"] // steps,
        },
        "pure_comm_2proc": {"all_reduce_s": round(t_reduce, 5), "all_reduce_bytes": reduce_bytes,
                            "broadcast_s": round(t_bcast, 5), "broadcast_bytes": bcast_bytes},
        "final_decode_s": round(one["timings_s"]["decode"], 3),
        "projected_efficiency": {n: round(project(one, t_reduce, t_bcast, n), 3) for n in args.project},
    }
    print(json.dumps(figures, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
