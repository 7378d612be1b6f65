"""The ``evaluate`` and ``sweep`` subcommands (registered by :mod:`syncengine.cli`)."""
from __future__ import annotations

import sys

from ..errors import SyncEngineError


def add_parsers(sub) -> None:
    e = sub.add_parser("evaluate", help="the paper's metrics over folders of generated images: table, CSV, JSON, plot")
    e.add_argument("folders", nargs="+", help="one folder of PNGs (+ JSON sidecars) per run to compare")
    e.add_argument("--out", default="evaluation", help="where metrics.csv/.json/.png go (default: ./evaluation)")
    e.add_argument("--metrics", help="comma-separated subset of intra_lpips,intra_style,clip,fid,kid,giqa,looks; "
                   "named metrics whose model is missing are errors (default: all, missing ones reported unavailable)")
    e.add_argument("--window", type=int, help="crop size in px (default: the tiler window in the sidecars)")
    e.add_argument("--window-height", type=int)
    e.add_argument("--reference", help="folder of reference images (real or base-model) for FID/KID/GIQA")
    e.add_argument("--clip-model", default="openai/clip-vit-base-patch16", help="hub id or local CLIP folder")
    e.add_argument("--lpips-net", default="alex", help="LPIPS network for Intra-LPIPS: alex (default), vgg, squeeze")
    e.add_argument("--backbone", default="pretrained", choices=["pretrained", "random"],
                   help="LPIPS/style backbones: pretrained (ImageNet) or random (smoke runs only; not a metric)")
    e.add_argument("--inception", default="fid", choices=["fid", "torchvision"],
                   help="feature network for FID/KID/GIQA: fid (torch-fidelity, paper-comparable) or torchvision")
    e.add_argument("--inception-weights", help="path of the FID Inception weights file")
    e.add_argument("--giqa-model", help=".npz Gaussian mixture over Inception features (GMM-GIQA)")
    e.add_argument("--crops-per-image", type=int, default=1, help="random crops per panorama for CLIP/FID/KID/GIQA")
    e.add_argument("--kid-subset-size", type=int, default=1000)
    e.add_argument("--kid-subsets", type=int, default=100)
    e.add_argument("--look-threshold", type=float, default=0.8,
                   help="looks metric: confidence below which a crop's look does not count (default 0.8)")
    e.add_argument("--seed", type=int, default=0, help="seed of the random crop positions")
    e.add_argument("--device", default="cpu")
    e.add_argument("--no-plot", action="store_true")
    s = sub.add_parser("sweep", help="generate a spec's requests once per value of one key (one folder per value)")
    s.add_argument("spec", help="a YAML spec, or a preset name from configs/")
    s.add_argument("sweep", help="key=v1,v2,... e.g. sync.weight=0,10,20")
    s.add_argument("overrides", nargs="*", help="key=value overrides applied to every value")
    s.add_argument("--prompts", help="JSON-lines file of requests (replaces the spec's requests)")


def _options(args):
    from .runner import EvalOptions

    if not 0 < args.look_threshold <= 1:
        raise SyncEngineError(f"--look-threshold must be in (0, 1], got {args.look_threshold}")
    if args.crops_per_image < 1:
        raise SyncEngineError(f"--crops-per-image must be >= 1, got {args.crops_per_image}")
    return EvalOptions(
        metrics=[m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None,
        window=args.window,
        window_height=args.window_height,
        lpips={"name": "lpips", "net": args.lpips_net, "backbone": args.backbone},
        style={"name": "style", "net": "vgg16", "backbone": args.backbone},
        clip_model=args.clip_model,
        reference=args.reference,
        inception=args.inception,
        inception_weights=args.inception_weights,
        giqa_model=args.giqa_model,
        crops_per_image=args.crops_per_image,
        kid_subset_size=args.kid_subset_size,
        kid_subsets=args.kid_subsets,
        seed=args.seed,
        look_threshold=args.look_threshold,
        device=args.device,
    )


def evaluate_command(args) -> int:
    from .runner import check_out_dir, evaluate, table, write_reports

    options = _options(args)
    check_out_dir(args.out)  # before the metrics, not after them
    results = evaluate(args.folders, options)
    print(table(results))
    for path in write_reports(results, args.out, options, plot=not args.no_plot):
        print(f"wrote {path}", file=sys.stderr)
    print(f"look at them: syncengine gallery {' '.join(map(str, args.folders))} {args.out} --out {args.out}/gallery",
          file=sys.stderr)
    return 0


def sweep_command(args) -> int:
    from .sweep import sweep

    def announce(value, folder, resolved):
        print(f"== {args.sweep.split('=')[0]}={value} -> {folder}", file=sys.stderr)

    runs = sweep(args.spec, args.sweep, args.overrides, args.prompts, on_value=announce)
    failed = 0
    for r in runs:
        for path in r.written:
            print(f"wrote {path}")
        for name, error in r.failed:
            print(f"failed {name} ({r.value}): {error}", file=sys.stderr)
        failed += len(r.failed)
    folders = " ".join(str(r.output_dir) for r in runs)
    print(f"compare them: syncengine evaluate {folders}", file=sys.stderr)
    print(f"look at them: syncengine gallery {folders} --out {runs[0].output_dir.parent}/gallery", file=sys.stderr)
    return 2 if failed else 0
