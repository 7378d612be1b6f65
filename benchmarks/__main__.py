"""``python -m benchmarks``: syncengine against diffusers' MultiDiffusion pipeline, side by side, in one run.

Sections (each measurement in a fresh process, see ``worker``):
- speed: (a) diffusers ``StableDiffusionPanoramaPipeline``, (b) syncengine weight 0, (c) the paper's sync settings
  in the reference implementation's structure (``benchmarks.reference``: one window at a time, the anchor's gradient
  included), then in syncengine one window at a time (``sync.batch_size: 1``) and batched, (d) the ``fast`` preset.
  Seconds per panorama, ratio to (a), UNet rows, VAE decodes, backward passes, peak memory.
- shape: weight 0 and the fast preset on the 512x2048 geometry (13 windows) scaled to ``--window`` (CPU default).
- wide: the 512x3072 geometry scaled to ``--window``: diffusers' MultiDiffusion at its own stride (an eighth of the
  window) and at the paper's (a quarter), the engine at weight 0, the paper's settings and ``fast`` (quarter-window
  stride), shifted windows at weight 0 and with the paper's sync, and the ``shifted-sync`` preset.
- memory: peak memory for 4, 8 and 16 windows at a fixed view batch size, and with every window in one batch
  (paper sync settings, one step).
- decode: the final decode of a 512x2048 and a 512x8192 canvas, with and without tiling.
- coherence: intra-window LPIPS (the loss's own network) for weight 0, paper settings and the fast preset, over
  several seeds.

Everything runs on the SD-2-shaped random-weight model of ``benchmarks.model``. The CPU defaults are shrunk (256 px
windows, 10 steps; each section a few minutes on 2 cores, the whole run about 20 minutes on a busy machine);
``--full`` uses the paper's 512x2048-shaped geometry (for a GPU). Timed rows run round-robin and report the fastest
panorama; docs/performance.md explains the numbers.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
PAPER_SYNC = {"weight": 20.0, "decay": 0.95, "every": 1, "until": None}
PRESET_STEPS = 50  # the steps the fast preset's `until` is written for


def fast_sections(model_steps: int, taesd: str | None = None, window: int = 512) -> tuple[dict, dict]:
    """The fast preset's sync options (its loss included) and denoiser options, read from configs/fast.yaml (the
    file users run).

    ``until`` counts steps, so it is scaled to the benchmark's step count (the same fraction of the run). A hub id in
    ``sync_vae`` (no weights here) becomes ``taesd``, the benchmark's TAESD-shaped decoder; ``taesd`` also adds it to
    a preset without one (the "fast+taesd" rows)."""
    from omegaconf import OmegaConf

    from syncengine.config import compose

    sync, _, _ = preset_sections("fast", model_steps)
    if sync.get("resolution") and window != 512:  # written for 512 px windows: keep the same fraction of the window
        sync["resolution"] = max(16, round(sync["resolution"] * window / 512))
    cfg = OmegaConf.to_container(compose("fast"), resolve=True)
    den = {k: v for k, v in cfg["denoiser"].items() if k.startswith("sync_") or k == "gradient_checkpointing"}
    if taesd is not None:
        den["sync_vae"] = taesd
    elif den.get("sync_vae"):
        raise SystemExit("configs/fast.yaml names a sync_vae: the benchmark needs its local TAESD-shaped one")
    return sync, den


def parse_variant(text: str) -> tuple[str, dict, dict]:
    """``NAME:sync.until=10,denoiser.sync_decode_scale=1`` -> a fast-preset variant (an extra coherence row)."""
    import yaml

    name, _, body = text.partition(":")
    sync, den = {}, {}
    for item in filter(None, body.split(",")):
        key, _, value = item.partition("=")
        section, _, field = key.strip().partition(".")
        if section not in ("sync", "denoiser") or not field:
            raise SystemExit(f"--variant {text!r}: keys are sync.<option> or denoiser.<option>")
        (sync if section == "sync" else den)[field] = yaml.safe_load(value)
    return name, sync, den


def _variant_jobs(args, model: str, taesd: str, prefix: str, **common) -> list[dict]:
    steps = common.get("steps", args.steps)
    jobs = []
    for text in args.variant:
        name, sync_over, den_over = parse_variant(text)
        window = common.get("window", args.window)
        sync, den = fast_sections(steps, taesd if den_over.pop("sync_vae", None) else None, window)
        if "until" in sync_over and sync_over["until"] is not None:  # written for 50 steps, like the preset
            sync_over["until"] = max(1, round(sync_over["until"] * steps / PRESET_STEPS))
        if sync_over.get("resolution") and window != 512:  # written for 512 px windows, like the preset
            sync_over["resolution"] = max(16, round(sync_over["resolution"] * window / 512))
        jobs.append(base_job(args, model, name=f"{prefix}{name}", sync={**PAPER_SYNC, **sync, **sync_over},
                             denoiser={**den, **den_over}, **common))
    return jobs


def run_job(job: dict[str, Any], verbose: bool) -> dict[str, Any]:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.worker", json.dumps(job)], capture_output=True, text=True,
                          env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH-RESULT "):
            result = json.loads(line[len("BENCH-RESULT "):])
            result["job"] = job
            if verbose:
                print(f"  {job['name']}: {result['seconds_mean']:.2f} s", file=sys.stderr, flush=True)
            return result
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
    raise RuntimeError(f"benchmark job {job['name']} failed (exit {proc.returncode}):\n" + "\n".join(tail))


def run_interleaved(jobs: list[dict], save) -> list[dict]:
    """Timed jobs one panorama at a time, round-robin (A B C A B C ...): on a shared machine the load drifts, and
    interleaving gives every job the same drift; times are then the fastest of each job's panoramas."""
    merged: dict[str, dict] = {}
    rounds = max(len(j["seeds"]) for j in jobs)
    for r in range(rounds):
        for job in jobs:
            if r >= len(job["seeds"]):
                continue
            one = run_job({**job, "seeds": [job["seeds"][r]]}, verbose=True)
            one["job"] = job
            if job["name"] not in merged:
                merged[job["name"]] = one
            else:
                m = merged[job["name"]]
                m["seconds"] += one["seconds"]
                m["seconds_mean"] = sum(m["seconds"]) / len(m["seconds"])
                for key in ("peak_rss_mib", "peak_over_start_mib", "peak_cuda_mib"):
                    if key in one:
                        m[key] = max(m[key], one[key])
            save([merged[j["name"]] for j in jobs if j["name"] in merged])
    return [merged[j["name"]] for j in jobs]


def base_job(args, model: str, **overrides) -> dict[str, Any]:
    job = {"kind": "syncengine", "model": model, "device": args.device, "height": args.height, "width": args.width,
           "window": args.window, "stride": args.stride, "steps": args.steps, "view_batch_size": args.view_batch_size,
           "seeds": list(range(args.seeds)), "threads": args.threads}
    job.update(overrides)
    return job


def speed_jobs(args, model: str, taesd: str) -> list[dict]:
    fast_sync, fast_den = fast_sections(args.steps, window=args.window)
    tae_sync, tae_den = fast_sections(args.steps, taesd, args.window)
    cheap = {"seeds": list(range(max(args.seeds, args.cheap_seeds)))}  # more repeats where they cost little
    return [
        base_job(args, model, kind="diffusers", name="diffusers", **cheap),
        base_job(args, model, name="weight0", sync={"weight": 0.0}, **cheap),
        base_job(args, model, kind="reference", name="reference", sync=dict(PAPER_SYNC)),
        base_job(args, model, name="paper-bs1", sync={**PAPER_SYNC, "batch_size": 1}),
        base_job(args, model, name="paper-batched", sync={**PAPER_SYNC, "batch_size": args.view_batch_size}),
        base_job(args, model, name="fast", sync={**PAPER_SYNC, **fast_sync}, denoiser=fast_den, **cheap),
        base_job(args, model, name="fast+taesd", sync={**PAPER_SYNC, **tae_sync}, denoiser=tae_den, **cheap),
    ]


def shape_jobs(args, model: str, taesd: str) -> list[dict]:
    """The 512x2048 geometry (13 windows at a quarter-window stride) scaled to ``--window``: the fast target's shape."""
    w = args.window
    geometry = dict(height=w, width=4 * w, stride=w // 4, seeds=list(range(max(args.seeds, args.cheap_seeds))))
    fast_sync, fast_den = fast_sections(args.steps, window=w)
    tae_sync, tae_den = fast_sections(args.steps, taesd, w)
    return [
        base_job(args, model, name="shape-weight0", sync={"weight": 0.0}, **geometry),
        base_job(args, model, name="shape-fast", sync={**PAPER_SYNC, **fast_sync}, denoiser=fast_den, **geometry),
        base_job(args, model, name="shape-fast+taesd", sync={**PAPER_SYNC, **tae_sync}, denoiser=tae_den, **geometry),
    ]


def preset_sections(name: str, model_steps: int) -> tuple[dict, dict, dict]:
    """A preset's sync (its loss included), tiler and sync-decode options, from the file users run; ``until``
    scaled to the benchmark's steps."""
    from omegaconf import OmegaConf

    from syncengine.config import compose

    cfg = OmegaConf.to_container(compose(name), resolve=True)
    sync = {k: v for k, v in cfg["sync"].items() if k != "anchor"}
    if sync.get("until") is not None:
        sync["until"] = max(1, round(sync["until"] * model_steps / int(cfg["sampler"].get("steps", PRESET_STEPS))))
    tiler = {k: v for k, v in cfg["tiler"].items() if k not in ("window", "window_height")}
    den = {k: v for k, v in cfg["denoiser"].items() if k.startswith("sync_") and k != "sync_vae"}
    return sync, tiler, den


def wide_jobs(args, model: str) -> list[dict]:
    """The 512x3072 geometry scaled to ``--window`` (6 windows wide): every way the engine makes such a panorama,
    against diffusers' MultiDiffusion on the same model and steps."""
    w = args.window
    seeds = {"seeds": list(range(max(args.seeds, args.cheap_seeds)))}
    geometry = dict(height=w, width=6 * w, stride=w // 4)
    fast_sync, fast_den = fast_sections(args.steps, window=w)
    preset_sync, preset_tiler, preset_den = preset_sections("shifted-sync", args.steps)
    shifted = {"name": "shifted", "window": w}
    return [
        base_job(args, model, kind="diffusers", name="diffusers", **{**geometry, "stride": w // 8}, **seeds),
        base_job(args, model, kind="diffusers", name="diffusers-quarter", **geometry, **seeds),
        base_job(args, model, name="weight0", sync={"weight": 0.0}, **geometry, **seeds),
        base_job(args, model, name="paper", sync={**PAPER_SYNC, "batch_size": 1}, **geometry),
        base_job(args, model, name="fast", sync={**PAPER_SYNC, **fast_sync}, denoiser=fast_den, **geometry, **seeds),
        base_job(args, model, name="shifted-weight0", sync={"weight": 0.0}, tiler=shifted, **geometry, **seeds),
        base_job(args, model, name="shifted-paper", sync={**PAPER_SYNC, "batch_size": 1}, tiler=shifted, **geometry),
        base_job(args, model, name="shifted-sync", sync={**PAPER_SYNC, **preset_sync}, denoiser=preset_den,
                 tiler={**preset_tiler, "window": w}, **geometry, **seeds),
    ]


def memory_jobs(args, model: str) -> list[dict]:
    """Fixed view batch size (bounded) and, for contrast, every window in one batch (what bounding avoids)."""
    jobs = []
    for batch in ("fixed", "all"):
        for n in args.memory_windows:
            width = args.memory_window + (n - 1) * args.memory_stride
            vbs = args.view_batch_size if batch == "fixed" else n
            if batch == "all" and n <= args.view_batch_size:
                continue  # the same run as the fixed one
            jobs.append(base_job(args, model, name=f"memory-{n}-{batch}", height=args.memory_window, width=width,
                                 window=args.memory_window, stride=args.memory_stride, steps=1, seeds=[0],
                                 view_batch_size=vbs, sync={**PAPER_SYNC, "batch_size": vbs}, windows=n))
    return jobs


def decode_jobs(args, model: str) -> list[dict]:
    return [
        base_job(args, model, kind="decode", name=f"decode-512x{w}-{'tiled' if tiled else 'full'}",
                 height=512, width=w, window=512, stride=128, tiled_decode=tiled, seeds=[0])
        for w in args.decode_widths
        for tiled in (False, True)
    ]


def coherence_jobs(args, model: str, taesd: str) -> list[dict]:
    c = dict(height=args.coherence_window, width=args.coherence_window * args.coherence_crops,
             window=args.coherence_window, stride=args.coherence_stride, steps=args.coherence_steps,
             seeds=list(range(args.coherence_seeds)), coherence=True)
    fast_sync, fast_den = fast_sections(args.coherence_steps, window=args.coherence_window)
    tae_sync, tae_den = fast_sections(args.coherence_steps, taesd, args.coherence_window)
    return [
        base_job(args, model, name="coherence-weight0", sync={"weight": 0.0}, **c),
        base_job(args, model, name="coherence-paper", sync=dict(PAPER_SYNC), **c),
        base_job(args, model, name="coherence-fast", sync={**PAPER_SYNC, **fast_sync}, denoiser=fast_den, **c),
        base_job(args, model, name="coherence-fast+taesd", sync={**PAPER_SYNC, **tae_sync}, denoiser=tae_den, **c),
    ] + _variant_jobs(args, model, taesd, "coherence-", **c)


# ---------------------------------------------------------------------------------------------------------- tables


def _mem(r: dict) -> str:
    if "peak_cuda_mib" in r:
        return f"{r['peak_cuda_mib']:.0f} (GPU)"
    return f"{r['peak_over_start_mib']:.0f}"


def seconds(r: dict) -> float:
    """The fastest of a measurement's panoramas: on a shared machine, load only ever adds time."""
    return min(r["seconds"])


def speed_table(results: list[dict]) -> str:
    base = next((seconds(r) for r in results if r["name"] == "diffusers"), None)
    rows = ["| run | s / panorama | x diffusers | UNet rows | VAE decodes | tiny decodes | backward | peak MiB |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        p = r["per_panorama"]
        ratio = f"{seconds(r) / base:.2f}" if base else "-"
        rows.append(f"| {r['name']} | {seconds(r):.2f} | {ratio} | {p['unet_rows']:.0f} | {p['vae_decodes']:.0f}"
                    f" | {p['tiny_decodes']:.0f} | {p['backward_calls']:.0f} | {_mem(r)} |")
    return "\n".join(rows)


def memory_table(results: list[dict]) -> str:
    rows = ["| windows | view batch | canvas | s | peak MiB over start |", "| ---: | ---: | --- | ---: | ---: |"]
    for r in results:
        j = r["job"]
        rows.append(f"| {j['windows']} | {j['view_batch_size']} | {j['height']}x{j['width']} | {r['seconds_mean']:.1f}"
                    f" | {_mem(r)} |")
    return "\n".join(rows)


def decode_table(results: list[dict]) -> str:
    rows = ["| canvas | tiled | s | peak MiB over start |", "| --- | --- | ---: | ---: |"]
    for r in results:
        j = r["job"]
        rows.append(f"| {j['height']}x{j['width']} | {j['tiled_decode']} | {r['seconds_mean']:.1f} | {_mem(r)} |")
    return "\n".join(rows)


def coherence_summary(results: list[dict]) -> dict[str, Any]:
    mean = {r["name"].removeprefix("coherence-"): sum(r["intra_lpips"]) / len(r["intra_lpips"]) for r in results}
    out: dict[str, Any] = {"intra_lpips_mean": mean}
    if {"weight0", "paper"} <= mean.keys():
        gain = mean["weight0"] - mean["paper"]
        out["paper_improvement"] = gain
        for name in mean:
            if name not in ("weight0", "paper") and gain > 0:
                out[f"{name}_share_of_paper_improvement"] = (mean["weight0"] - mean[name]) / gain
    return out


def coherence_table(results: list[dict], summary: dict) -> str:
    rows = ["| run | intra-LPIPS per seed | mean | improvement over weight 0 | share of paper's |",
            "| --- | --- | ---: | ---: | ---: |"]
    m = summary["intra_lpips_mean"]
    for r in results:
        name = r["name"].removeprefix("coherence-")
        seeds = ", ".join(f"{v:.5f}" for v in r["intra_lpips"])
        gain = m.get("weight0", m[name]) - m[name]
        share = summary.get(f"{name}_share_of_paper_improvement", 1.0 if name == "paper" else None)
        rows.append(f"| {name} | {seeds} | {m[name]:.5f} | {gain:.5f} | {'-' if share is None else f'{share:.0%}'} |")
    return "\n".join(rows)


def targets(speed: list[dict]) -> dict[str, float]:
    s = {r["name"]: seconds(r) for r in speed}
    out = {}
    if {"weight0", "diffusers"} <= s.keys():
        out["weight0_over_diffusers"] = s["weight0"] / s["diffusers"]
    for name in ("paper-batched", "paper-bs1"):
        if {name, "reference"} <= s.keys():
            out[f"{name.replace('-', '_')}_over_reference"] = s[name] / s["reference"]
    if {"paper-batched", "paper-bs1"} <= s.keys():
        out["paper_batched_over_bs1"] = s["paper-batched"] / s["paper-bs1"]
    if {"fast", "weight0"} <= s.keys():
        out["fast_over_weight0"] = s["fast"] / s["weight0"]
    if {"paper-batched", "weight0"} <= s.keys():
        out["paper_over_weight0"] = s["paper-batched"] / s["weight0"]
    for name in ("shifted-sync", "shifted-weight0", "fast", "paper"):
        if {name, "diffusers", "diffusers-quarter", "shifted-weight0"} <= s.keys():
            out[f"{name}_over_diffusers"] = s[name] / s["diffusers"]
            out[f"{name}_over_diffusers_quarter_stride"] = s[name] / s["diffusers-quarter"]
    for name in s:
        if name.startswith("shape-fast") and "shape-weight0" in s:
            out[f"{name.removeprefix('shape-')}_over_weight0_2048_shaped"] = s[name] / s["shape-weight0"]
    return out


def per_view_seconds(results: list[dict]) -> dict[str, dict[str, float]]:
    """Seconds per denoised view-step and per synced view, from the sampler's own timers: the cost model's unit
    costs, so a ratio measured at one window count can be carried to another (docs/performance.md)."""
    out = {}
    for r in results:
        st, j = r.get("stats"), r["job"]
        if not st:
            continue
        row = {"denoise_per_view_step": (st["seconds_denoise"] - st["seconds_sync"]) / (st["views"] * j["steps"])}
        if st["sync_views"]:
            row["sync_per_synced_view"] = st["seconds_sync"] / st["sync_views"]
        out[r["name"]] = row
    return out


# ------------------------------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    p.add_argument("--name", default=None, help="results file stem (default: cpu or cuda, plus -full)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per measurement (default: 1 on CPU, robust on a shared machine; GPU: all)")
    p.add_argument("--full", action="store_true", help="paper-shaped sizes: 512x2048, stride 128, 50 steps (GPU)")
    p.add_argument("--sections", default=None,
                   help="comma-separated subset of speed,shape,wide,memory,decode,coherence "
                        "(shape, wide: not in the defaults)")
    p.add_argument("--rows", default=None, help="comma-separated row names to run (default: every row of a section)")
    p.add_argument("--height", type=int, default=None, help="speed canvas height (default 256; --full 512)")
    p.add_argument("--width", type=int, default=None, help="speed canvas width (default 512; --full 2048)")
    p.add_argument("--window", type=int, default=None, help="window px (default 256; --full 512)")
    p.add_argument("--stride", type=int, default=None, help="window stride px (default 128; --full 128)")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default 10; --full 50)")
    p.add_argument("--seeds", type=int, default=1, help="panoramas per speed measurement")
    p.add_argument("--cheap-seeds", type=int, default=3,
                   help="panoramas for the cheap speed rows (diffusers, weight 0, fast); times are the minimum")
    p.add_argument("--view-batch-size", type=int, default=4)
    p.add_argument("--memory-windows", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--memory-window", type=int, default=None,
                   help="window px of the memory runs (default 128; --full 512)")
    p.add_argument("--memory-stride", type=int, default=None, help="default: half the memory window")
    p.add_argument("--decode-widths", type=int, nargs="+", default=[2048, 8192])
    p.add_argument("--coherence-window", type=int, default=None, help="default 128; --full 512")
    p.add_argument("--coherence-crops", type=int, default=4, help="canvas width in windows")
    p.add_argument("--coherence-stride", type=int, default=None, help="default: half the window; --full a quarter")
    p.add_argument("--coherence-steps", type=int, default=50, help="DDIM steps (the presets' 50)")
    p.add_argument("--coherence-seeds", type=int, default=4)
    p.add_argument("--variant", action="append", default=[],
                   help="extra fast-preset variant rows in the coherence section, "
                        "NAME:sync.until=10,denoiser.sync_decode_scale=1 "
                        "(until written for 50 steps; denoiser.sync_vae=1 uses the benchmark TAESD)")
    a = p.parse_args(argv)
    full = a.full
    a.threads = a.threads if a.threads is not None else (1 if a.device == "cpu" else 0)
    a.window = a.window or (512 if full else 256)
    a.height = a.height or a.window
    a.width = a.width or (2048 if full else 2 * a.window)
    a.stride = a.stride or (128 if full else a.window // 2)
    a.sections = a.sections or ("speed,memory,decode,coherence" if full else "speed,shape,memory,decode,coherence")
    a.steps = a.steps or (50 if full else 10)
    a.memory_window = a.memory_window or (512 if full else 128)
    a.memory_stride = a.memory_stride or a.memory_window // 2
    a.coherence_window = a.coherence_window or (512 if full else 128)
    a.coherence_stride = a.coherence_stride or a.coherence_window // (4 if full else 2)
    a.name = a.name or (a.device.split(":")[0] + ("-full" if full else ""))
    return a


def environment(args) -> dict[str, Any]:
    import diffusers
    import torch

    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
           "cpu_count": os.cpu_count(), "load_average": os.getloadavg(), "device": args.device}
    if args.device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from .model import bench_model_paths

    model, taesd = (str(p) for p in bench_model_paths())
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    out: dict[str, Any] = {"args": vars(args), "environment": environment(args)}
    builders = {"speed": lambda: speed_jobs(args, model, taesd), "shape": lambda: shape_jobs(args, model, taesd),
                "memory": lambda: memory_jobs(args, model), "wide": lambda: wide_jobs(args, model),
                "decode": lambda: decode_jobs(args, model), "coherence": lambda: coherence_jobs(args, model, taesd)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{args.name}.json"
    for section in sections:
        print(f"[{section}]", file=sys.stderr, flush=True)
        out[section] = []
        jobs = builders[section]()
        if args.rows:
            jobs = [j for j in jobs if j["name"] in args.rows.split(",")]
        if section in ("speed", "shape", "wide"):
            def save(partial, section=section):
                out[section] = partial
                path.write_text(json.dumps(out, indent=1) + "\n")

            out[section] = run_interleaved(jobs, save)
            continue
        for job in jobs:
            out[section].append(run_job(job, verbose=True))
            path.write_text(json.dumps(out, indent=1) + "\n")  # partial results survive an interrupted run
    timed = out.get("speed", []) + out.get("shape", []) + out.get("wide", [])
    if timed:
        out["targets"] = targets(timed)
        out["per_view_seconds"] = per_view_seconds(timed)
    if "speed" in out:
        print(f"\n## speed ({args.height}x{args.width}, window {args.window}, stride {args.stride}, {args.steps} steps,"
              f" view batch {args.view_batch_size}, {args.device})\n\n{speed_table(out['speed'])}\n")
    if "shape" in out:
        j = out["shape"][0]["job"]
        print(f"\n## 512x2048-shaped ({j['height']}x{j['width']}, stride {j['stride']}, {args.steps} steps)\n\n"
              f"{speed_table(out['shape'])}\n")
    if "wide" in out:
        j, quarter = out["wide"][0]["job"], out["wide"][1]["job"]["stride"]
        print(f"\n## 512x3072-shaped ({j['height']}x{j['width']}, {args.steps} steps; diffusers at stride "
              f"{j['stride']}, the rest at {quarter})\n\n{speed_table(out['wide'])}\n")
    if timed:
        print("targets: " + ", ".join(f"{k} = {v:.2f}" for k, v in out["targets"].items()))
    if "memory" in out:
        print(f"\n## memory (paper sync, 1 step)\n\n{memory_table(out['memory'])}")
    if "decode" in out:
        print(f"\n## final decode\n\n{decode_table(out['decode'])}")
    if "coherence" in out:
        out["coherence_summary"] = coherence_summary(out["coherence"])
        print(f"\n## coherence ({args.coherence_window}x{args.coherence_window * args.coherence_crops}, "
              f"{args.coherence_steps} steps)\n\n{coherence_table(out['coherence'], out['coherence_summary'])}")
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
