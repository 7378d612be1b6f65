"""``python -m benchmarks.coherence``: coherence measured by a metric the sync loss does not optimize.

The trained toy-world model (``syncengine:toy``) makes wide panoramas of the toy world from the plain prompt "a
landscape", which covers every look; MultiDiffusion's windows then pick looks independently and mix them. For each
setting (MultiDiffusion, the paper's sync, the ``fast`` preset's, and any ``--setting``), the same seeds are generated
and each panorama's window-size crops are classified into the world's looks by the toy world's own classifier
(``syncengine_toy.looks``: colour statistics of the generator's bands; no LPIPS, no VGG). Reported per setting: the
mixed-look rate with its 95% Wilson interval, the mean look disagreement (continuous: every crop's posterior) with
its interval and, seed by seed, its difference from the first setting, the look diversity across seeds (sync must
not collapse every seed to one look), the share of unsure crops, and seconds per panorama. Results go to
``benchmarks/results/<device>-coherence-toy.json``.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from syncengine.evaluation.looks import paired_difference

RESULTS = Path(__file__).resolve().parent / "results"
PROMPT = "a landscape"


def settings(steps: int) -> dict[str, dict[str, Any]]:
    """Settings by name: sync keys (weight, decay, every, until, resolution), plus ``tiler`` (sliding at
    ``--stride``, or shifted: non-overlapping windows moved every step), ``net`` (the LPIPS network), ``loss``
    (``style``: the style loss on VGG's first two blocks instead of LPIPS) and ``decode_scale`` (the sync decode's
    ``denoiser.sync_decode_scale``).
    ``paper``: w 20, decay 0.95, every step (the paper's). ``fast``: the fast preset's rule (the first tenth of the
    steps, at twice the weight), scaled to ``steps``."""
    tenth = max(1, round(steps / 10))
    return {
        "multidiffusion": {"weight": 0.0},
        "paper": {"weight": 20.0, "decay": 0.95, "every": 1, "until": None},
        "fast": {"weight": 40.0, "decay": 0.95, "every": 1, "until": tenth},
        "shifted": {"weight": 0.0, "tiler": "shifted"},
    }


def parse_setting(body: str) -> dict[str, Any]:
    """``weight=40,until=2,tiler=shifted`` -> a setting (numbers as numbers, ``none`` as None)."""
    out: dict[str, Any] = {}
    for item in filter(None, body.split(",")):
        key, _, value = item.partition("=")
        if value == "none":
            out[key] = None
        elif key in ("until", "every", "resolution"):
            out[key] = int(value)
        else:
            try:
                out[key] = float(value)
            except ValueError:
                out[key] = value
    return out


def spec(args, setting: dict[str, Any], seed: int, out: str) -> dict[str, Any]:
    sync = dict(setting)
    tiler = sync.pop("tiler", "sliding")
    net = sync.pop("net", "vgg")
    denoiser = {"name": "stable-diffusion", "pretrained": args.model, "device": args.device}
    if "decode_scale" in sync:  # the sync decode on x0 latents shrunk by this factor (denoiser.sync_decode_scale)
        denoiser["sync_decode_scale"] = float(sync.pop("decode_scale"))
    loss = {"name": "lpips", "net": net, "backbone": args.backbone}
    if sync.pop("loss", "lpips") == "style":  # Gram matrices of VGG's first two blocks: colour and texture statistics
        loss = {"name": "style", "layers": ["relu1_2", "relu2_2"], "backbone": args.backbone}
    geometry = {"window": args.window, "stride": args.stride} if tiler == "sliding" else {"window": args.window}
    return {
        "canvas": {"height": args.window, "width": args.width},
        "tiler": {"name": tiler, **geometry},
        "merger": {"name": "average"},
        "denoiser": denoiser,
        "sync": {"loss": loss, **sync},
        "sampler": {"scheduler": "ddim", "steps": args.steps, "guidance_scale": args.guidance,
                    "view_batch_size": args.view_batch_size},
        "requests": [{"prompt": PROMPT, "seed": seed, "name": f"s{seed}"}],
        "runtime": {"accelerator": "cpu" if args.device == "cpu" else "auto", "devices": 1, "output_dir": out,
                    "progress": False},
    }


def run_setting(args, name: str, sync: dict[str, Any], out: Path) -> dict[str, Any]:
    from syncengine.config import resolve
    from syncengine.evaluation.looks import evaluate_looks
    from syncengine.pipeline import Pipeline

    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    pipe = Pipeline(resolve(spec(args, sync, seeds[0], str(out / name))))
    images, seconds = [], []
    for seed in seeds:
        pipe.resolved = resolve(spec(args, sync, seed, str(out / name)))
        t0 = time.perf_counter()
        images.append(pipe.run(0).image)
        seconds.append(time.perf_counter() - t0)
        if args.save:
            from torchvision.utils import save_image

            (out / name).mkdir(parents=True, exist_ok=True)
            save_image(images[-1], out / name / f"s{seed}.png")
    summary = evaluate_looks(images, args.window).as_dict()
    crops = summary.pop("crops")
    summary["mixed_seeds"] = [seed for seed, c in zip(seeds, crops) if c["mixed"]]  # for paired comparisons
    summary["majorities"] = [c.get("majority") for c in crops]
    summary["disagreements"] = [c["disagreement"] for c in crops]
    return {"setting": name, "sync": sync, "seeds": seeds, "seconds_per_panorama": sum(seconds) / len(seconds),
            **summary}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.coherence", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="syncengine:toy")
    parser.add_argument("--seeds", type=int, default=32)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--window", type=int, default=64, help="window in pixels (the toy model's native size)")
    parser.add_argument("--width", type=int, default=384, help="canvas width (6 windows at 64 px)")
    parser.add_argument("--stride", type=int, default=16)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--view-batch-size", type=int, default=8)
    parser.add_argument("--backbone", default="random", help="LPIPS backbone: random here (no ImageNet weights "
                                                              "offline), pretrained where torchvision has them")
    parser.add_argument("--settings", default="multidiffusion,paper,fast")
    parser.add_argument("--setting", action="append", default=[],
                        metavar="NAME:weight=..,decay=..,until=..,resolution=..,tiler=shifted,net=alex,loss=style",
                        help="an extra sync setting")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--save", action="store_true", help="save the panoramas (under --out-images)")
    parser.add_argument("--out-images", default="outputs/coherence")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    table = settings(args.steps)
    for text in args.setting:
        name, _, body = text.partition(":")
        table[name] = parse_setting(body)
        args.settings += f",{name}"
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    rows = []
    for name in args.settings.split(","):
        row = run_setting(args, name, table[name], Path(args.out_images))
        if rows:  # seed by seed against the first setting (the same seeds)
            row["disagreement_vs_first"] = paired_difference(row["disagreements"], rows[0]["disagreements"])
        rows.append(row)
        lo, hi = row["interval"]
        d, dlo, dhi = row["disagreement"], *row["disagreement_interval"]
        paired = row.get("disagreement_vs_first")
        versus = f"  vs {rows[0]['setting']} {paired[0]:+.3f} [{paired[1]:+.3f}, {paired[2]:+.3f}]" if paired else ""
        print(f"{name:16s} mixed {row['mixed']}/{row['panoramas']} = {row['mixed_rate']:.2f} [{lo:.2f}, {hi:.2f}]  "
              f"disagreement {d:.3f} [{dlo:.3f}, {dhi:.3f}]{versus}  diversity {row['diversity']:.2f} "
              f"{row['majority_counts']}  unsure {row['unsure_crops']:.2f}  {row['seconds_per_panorama']:.1f} s",
              flush=True)
    out = Path(args.out) if args.out else RESULTS / f"{args.device.split(':')[0]}-coherence-toy.json"
    out.write_text(json.dumps({"rows": rows, "args": vars(args), "torch": torch.__version__}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
