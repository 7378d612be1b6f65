"""``syncengine`` command line: generate, config, plugins, gallery. Bad input: one line on stderr, exit status 2. A run
stopped by SIGINT/SIGTERM keeps its finished images, lists them and exits 130/143 (128 + the signal number)."""
from __future__ import annotations

import argparse
import logging
import sys

from .errors import SyncEngineError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="syncengine", description="Coherent montages by synchronized joint diffusion.")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate the requests of a spec (PNG + JSON sidecar each)")
    g.add_argument("spec", help="a YAML spec, or a preset name from configs/ (e.g. demo)")
    g.add_argument("overrides", nargs="*", help="key=value overrides, e.g. sync.weight=10 canvas.width=2048")
    g.add_argument("--prompts", help="JSON-lines file of requests (replaces the spec's requests)")
    c = sub.add_parser("config", help="print the resolved spec (validated, plugin defaults filled in)")
    c.add_argument("spec")
    c.add_argument("overrides", nargs="*")
    c.add_argument("--prompts")
    sub.add_parser("plugins", help="list registered plugins by kind, with the package that provides each")
    gal = sub.add_parser("gallery", help="build a static page (opens from disk) of output folders: sweeps side by "
                                         "side, loop strips, 360° viewer")
    gal.add_argument("folders", nargs="+", help="output folders (searched recursively), evaluation folders too")
    gal.add_argument("--out", default="gallery", help="where index.html goes (default: ./gallery)")
    from .evaluation.cli import add_parsers as _evaluation_parsers

    _evaluation_parsers(sub)  # evaluate, sweep
    return p


def _plugins() -> int:
    from .registry import list_plugins

    rows = list_plugins()
    kind = None
    for row in rows:
        if row.kind != kind:
            kind = row.kind
            print(f"{kind}:")
        mark = "*" if row.registered else " "  # added by registry.register in this process, not installed
        print(f" {mark}{row.name:<20} {row.target:<50} ({row.distribution})")
    return 0


def _gallery(args) -> int:
    from .gallery import build_gallery

    result = build_gallery(args.folders, args.out)
    for line in result.skipped:
        print(f"skipped {line}", file=sys.stderr)
    print(f"{result.images} images in {result.groups} groups: open file://{result.page.resolve()}")
    return 0


def _notice_tiny(resolved) -> None:
    if str(resolved.config.denoiser.get("pretrained", "")) == "syncengine:tiny-random":
        print("NOTE: denoiser is the built-in tiny model with RANDOM weights: images are noise-like "
              "(offline smoke run). Use stabilityai/stable-diffusion-2-base for real images.", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)  # overrides may follow options: `generate s.yaml --prompts p a=1`
    unknown = [e for e in extra if e.startswith("-") or "=" not in e]
    if unknown or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "plugins":
            return _plugins()
        if args.command == "gallery":
            return _gallery(args)
        if args.command in ("evaluate", "sweep"):
            from .evaluation import cli as evaluation_cli

            return getattr(evaluation_cli, f"{args.command}_command")(args)
        from .api import resolve_run

        resolved = resolve_run(args.spec, args.overrides, args.prompts)
        if args.command == "config":
            from omegaconf import OmegaConf

            print(OmegaConf.to_yaml(resolved.config), end="")
            return 0
        from .lightning_module import launched_rank, run

        if launched_rank() == 0:  # a multi-process run re-runs this command once per rank: say it once
            _notice_tiny(resolved)

        summary = run(resolved)
    except SyncEngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # RunInterrupted (lightning_module) carries the summary and the signal
        stopped = getattr(exc, "summary", None)
        if stopped is None:
            print("interrupted: images already written are kept", file=sys.stderr)
            return 130
        if not stopped.primary:  # a rank of a multi-process run that wrote nothing of its own
            return exc.exit_code
        _report(stopped)
        kept = ", ".join(str(p) for p in stopped.written) or "none"
        print(f"interrupted by {exc.signal_name}: stopped; any image in progress was dropped; "
              f"{len(stopped.written)} finished kept: {kept}", file=sys.stderr)
        return exc.exit_code
    if not summary.primary:  # rank 0 of a multi-process run reports every rank's outputs and failures
        return 0
    _report(summary)
    print(f"{len(summary.written)} written, {len(summary.failed)} failed", file=sys.stderr)
    return 2 if summary.failed else 0


def _report(summary) -> None:
    for path in summary.written:
        print(f"wrote {path} (+ {path.with_suffix('.json').name})", flush=True)
    for name, error in summary.failed:
        print(f"failed {name}: {error}", file=sys.stderr)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
