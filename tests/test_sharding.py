"""Multi-process runs: 2 CPU processes (gloo) launched by Lightning's ``ddp`` strategy from the CLI.

``shard=windows`` must give the single-process image and latents; ``shard=requests`` must write every request exactly
once when the count does not divide by the ranks; a bad request (failing on both ranks, or on rank 1 only before
sampling) is reported by rank 0 and skipped by both; the collectives of each request are counted in its sidecar and
must match the formula in docs/sharding.md.

Tolerance, measured rather than assumed: the 2-process run sums the views' contributions in another order (two
partial canvases, then the all-reduce), so its merged sums differ from one process's in the last bits, and the sync
gradient amplifies those bits over the steps by an amount that depends on the CPU's kernels (AVX2, AVX-512, ...). The
fixture therefore also runs one process whose every all-reduced sum is moved by one unit in the last place, at
random (:class:`LastBitJitter`): the distance of that run from the plain one is this machine's amplification of a
one-ulp reordering. The sharded run must stay within ``REORDER_ULPS`` times that distance (a reordered sum of a few
views differs by a few ulps at most; see tests/_tolerance.py), and within one PNG level plus as many levels as that
many one-ulp runs moved a pixel. The one-process runs use one thread, as the ranks do: a kernel's split over threads
changes its summation order too (on an AVX-512 CPU that alone moved the latents by 1.5e-4).

Run as a script (``python tests/test_sharding.py generate SPEC ...``) this file is the CLI plus one addition: each
finished request's latents are saved next to its PNG (``<name>.latents.pt``), so the test can compare them.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _tolerance import FLOOR, REORDER_ULPS, LastBitJitter

from syncengine.collective import Collective

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path(__file__).resolve()

# One 2-process windows run of five requests, compared with one process:
# - pano: a panorama with sync on (4 views of 64 px on a 64x160 canvas; the 2 ranks own views [0, 1] and [2, 3], so
#   the anchor, view 2, is computed on rank 1 and broadcast), sync on steps 1 and 3 (every=2);
# - bad: its override names a missing model (fails on both ranks);
# - onesided: fails on rank 1 only, before sampling (as if its input file were missing on that node);
# - sphere, sphere-x0: a 360-degree perspective ring with sync on (8 + 2 projected views of 32 px on a 64x128
#   equirectangular canvas, 2 steps; per-request overrides switch the tiler), merging x_t, then merging x0;
# - shifted: shifted windows with sync (32 px windows moved both ways every step on the 64x160 canvas: new views, a
#   new anchor and new shares at each step, built alike on both ranks from the seed).
# The demo preset on the tiny random model: these tests are about sharding, sized for its cost and kernels.
BASE = ["denoiser.pretrained=syncengine:tiny-random", "canvas.height=64", "canvas.width=160", "tiler.window=64",
        "tiler.stride=32", "sampler.steps=4",
        "sampler.view_batch_size=2", "sync.weight=20", "sync.every=2", "runtime.progress=false"]
SPHERICAL = {"canvas.width": 128, "tiler.name": "perspective", "tiler.window": 32, "tiler.fov": 90,
             "tiler.views_per_ring": 8, "tiler.pitches": [0.0], "tiler.poles": True, "sync.weight": 5,
             "sampler.steps": 2}
REQUESTS = [
    {"prompt": "a mountain range", "seed": 0, "name": "pano"},
    {"prompt": "broken", "name": "bad", "overrides": {"denoiser.pretrained": "/no/such/model"}},
    {"prompt": "only rank 1 fails", "name": "onesided"},  # see FAIL_ON_RANK_1
    {"prompt": "a forest clearing", "seed": 3, "name": "sphere", "overrides": SPHERICAL},
    {"prompt": "a forest clearing", "seed": 3, "name": "sphere-x0", "overrides": {**SPHERICAL, "merger.target": "x0"}},
    {"prompt": "a mountain range", "seed": 5, "name": "shifted", "overrides": {"tiler.name": "shifted",
                                                                               "tiler.window": 32}},
]
FAILING = ("bad", "onesided")
FAIL_ON_RANK_1 = "SYNCENGINE_TEST_FAIL_ON_RANK_1"  # a request name: as if its input file were missing on rank 1's node


def saving_latents_too(write):
    """``write_result`` that also saves the latents of each output it writes."""

    def write_result(result, output_dir, overwrite=False):
        png = write(result, output_dir, overwrite)
        torch.save(result.latents, png.with_suffix(".latents.pt"))
        return png

    return write_result


def failing_on_rank_1(run, name: str):
    """``Pipeline.run`` that raises for request ``name`` on rank 1 before doing anything."""
    from syncengine.errors import SyncEngineError

    def wrapped(self, index, progress=None):
        if os.environ.get("LOCAL_RANK") == "1" and self.requests()[index].name == name:
            raise SyncEngineError(f"input file of {name} not found on this node (simulated)")
        return run(self, index, progress)

    return wrapped


if __name__ == "__main__":  # Lightning's ddp launcher re-runs this same command line for rank 1
    from syncengine import lightning_module, pipeline
    from syncengine.cli import main

    lightning_module.write_result = saving_latents_too(lightning_module.write_result)
    if os.environ.get(FAIL_ON_RANK_1):
        pipeline.Pipeline.run = failing_on_rank_1(pipeline.Pipeline.run, os.environ[FAIL_ON_RANK_1])
    sys.exit(main(sys.argv[1:]))


# ------------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    """The tiny demo model, built once here so that the two ranks never build it concurrently."""
    root = os.environ.get("SYNCENGINE_CACHE") or str(tmp_path_factory.mktemp("secache"))
    old = os.environ.get("SYNCENGINE_CACHE")
    os.environ["SYNCENGINE_CACHE"] = root
    try:
        from syncengine_sd.tiny import tiny_model_path

        tiny_model_path()
    finally:
        if old is None:
            del os.environ["SYNCENGINE_CACHE"]
    return root


def cli(cache: str, *args: str, script: bool = False, env: dict | None = None, timeout: int = 480):
    """``syncengine generate ... runtime.devices=2`` in a fresh process (rank 0; Lightning starts rank 1), in its own
    process group so that a hung run is killed with its rank-1 child."""
    entry = [str(SCRIPT)] if script else ["-m", "syncengine"]
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "SYNCENGINE_CACHE": cache, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, **(env or {})}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, *entry, "generate", *args, "runtime.progress=false"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"timed out after {timeout} s (a collective waiting forever?):\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def png_levels(a: Path, b: Path) -> int:
    from PIL import Image

    x, y = (np.asarray(Image.open(p)).astype(int) for p in (a, b))
    assert x.shape == y.shape
    return int(np.abs(x - y).max())


def latent_distance(a: Path, b: Path) -> float:
    return (torch.load(a) - torch.load(b)).abs().max().item()


def assert_same_output(one: Path, two: Path, jitter: Path, name: str) -> dict:
    """``two`` (2 processes) equals ``one`` (1 process) within the measured one-ulp sensitivity (``jitter``)."""
    sensitivity = latent_distance(one / f"{name}.latents.pt", jitter / f"{name}.latents.pt")
    tolerance = max(FLOOR, REORDER_ULPS * sensitivity)
    got = latent_distance(one / f"{name}.latents.pt", two / f"{name}.latents.pt")
    if os.environ.get("SYNCENGINE_TEST_REPORT"):
        ratio = got / max(sensitivity, 1e-30)
        print(f"\n{name}: sharded {got:.3g}, one-ulp sensitivity {sensitivity:.3g}, ratio {ratio:.2f}")
    assert got <= tolerance, f"{name}: latents differ by {got:.3g} > {REORDER_ULPS} x {sensitivity:.3g} (one ulp)"
    levels = png_levels(one / f"{name}.png", two / f"{name}.png")
    allowed = 1 + REORDER_ULPS * png_levels(one / f"{name}.png", jitter / f"{name}.png")
    assert levels <= allowed, f"{name}: PNG differs by {levels} levels > {allowed}"
    return json.loads((two / f"{name}.json").read_text())


def sharded_and_one_process(spec: dict, tmp_path: Path) -> tuple[Path, Path, Path]:
    """A spec's requests with 2 processes sharding windows (the CLI, as users run it), then in this process plainly
    and with every merged sum moved one ulp (one thread, as the ranks run): ``(one, two, jitter)`` output folders
    for :func:`assert_same_output`. Other families' sharding tests use it with their own tiny models."""
    from omegaconf import OmegaConf

    from syncengine import lightning_module
    from syncengine.api import generate

    path = tmp_path / "spec.yaml"
    OmegaConf.save(OmegaConf.create(spec), path)
    cache = str(tmp_path / "cache")
    one, two, jitter = tmp_path / "one", tmp_path / "two", tmp_path / "jitter"
    run = cli(cache, str(path), "runtime.devices=2", "runtime.strategy=ddp", "runtime.shard=windows",
              f"runtime.output_dir={two}", script=True)
    assert run.returncode == 0, run.stderr[-3000:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("SYNCENGINE_CACHE", cache)
            mp.setattr(lightning_module, "write_result", saving_latents_too(lightning_module.write_result))
            for out, collective in ((one, Collective), (jitter, LastBitJitter)):
                mp.setattr(lightning_module, "Collective", collective)
                assert generate(str(path), [f"runtime.output_dir={out}"]).ok
    finally:
        torch.set_num_threads(threads)
    return one, two, jitter


def expected_collectives(meta: dict, channels: int = 4) -> dict:
    """docs/sharding.md, "Communication per step": one all-reduce of the merge weights (H*W fp32) per request (none
    when the views move every step: each rank sums every view's weights itself); one
    all-reduce per step of C*H*W fp32 values (noise sum; x0 sum when merging x0), twice that on sync steps (merging
    x_t: the window sum too) or on the last step (merging x0: the x_t sum); one broadcast of the anchor's decoded
    image (3*h*w fp32) per sync step and sync group."""
    spec = meta["spec"]
    f = 8
    h, w = spec["canvas"]["height"] // f, spec["canvas"]["width"] // f
    steps, sync = spec["sampler"]["steps"], spec["sync"]
    weights = [sync["weight"] * sync["decay"] ** i if (i + 1) % sync["every"] == 0 else 0.0 for i in range(steps)]
    sync_steps = sum(1 for x in weights if x > 0)
    window = spec["tiler"]["window"]
    doubled = 1 if spec["merger"]["target"] == "x0" else sync_steps  # x0: the last step also merges x_t
    weights = 0 if spec["tiler"]["name"] == "shifted" and spec["tiler"]["shift"] else 1
    return {
        "all_reduce_calls": steps + weights,
        "all_reduce_bytes": weights * h * w * 4 + channels * h * w * 4 * (steps + doubled),
        "broadcast_calls": sync_steps,
        "broadcast_bytes": sync_steps * 3 * window * window * 4,
    }


# ------------------------------------------------------------------------------------------------ multi-process


@pytest.fixture(scope="module")
def windows(cache, tmp_path_factory):
    """The 5 requests with 2 processes (``shard=windows``) through the CLI; the 3 good ones in this process, plainly
    and with every all-reduced sum moved by one ulp (the sensitivity the tolerance is measured from)."""
    from syncengine import lightning_module
    from syncengine.api import generate

    tmp = tmp_path_factory.mktemp("windows")
    prompts, good = tmp / "all.jsonl", tmp / "good.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in REQUESTS))
    good.write_text("".join(json.dumps(r) + "\n" for r in REQUESTS if r["name"] not in FAILING))
    two, one = tmp / "two", tmp / "one"
    run = cli(cache, "configs/demo.yaml", "--prompts", str(prompts), *BASE, "runtime.devices=2",
              "runtime.strategy=ddp", "runtime.shard=windows", f"runtime.output_dir={two}", script=True,
              env={FAIL_ON_RANK_1: "onesided"})
    jitter = tmp / "jitter"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks run (OMP_NUM_THREADS=1): a kernel's thread split changes its sum order
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("SYNCENGINE_CACHE", cache)
            mp.setattr(lightning_module, "write_result", saving_latents_too(lightning_module.write_result))
            for out, collective in ((one, Collective), (jitter, LastBitJitter)):  # plain, then every sum moved 1 ulp
                mp.setattr(lightning_module, "Collective", collective)
                summary = generate("configs/demo.yaml", [*BASE, f"runtime.output_dir={out}"], good)
                assert summary.ok and len(summary.written) == 4
    finally:
        torch.set_num_threads(threads)
    return run, one, two, jitter


def test_bad_requests_are_reported_once_and_skipped_in_a_two_process_run(windows):
    run, _, two, _ = windows
    assert run.returncode == 2, run.stderr[-3000:]  # a failed request makes the run exit non-zero...
    assert "4 written, 2 failed" in run.stderr and run.stderr.count(" written, ") == 1  # ...reported once, by rank 0
    assert "failed bad: " in run.stderr and "/no/such/model" in run.stderr
    # a request that fails on one rank only (before sampling) is skipped by both, with that rank's reason
    assert "failed onesided: failed on rank 1: input file of onesided not found" in run.stderr
    assert sorted(p.name for p in two.glob("*.png")) == ["pano.png", "shifted.png", "sphere-x0.png", "sphere.png"]


def test_windows_panorama_with_sync_equals_one_process(windows):
    _, one, two, jitter = windows
    meta = assert_same_output(one, two, jitter, "pano")
    assert meta["stats"]["owned_views"] == 2 and meta["stats"]["views"] == 4 and meta["stats"]["sync_views"] > 0


def test_windows_spherical_ring_with_sync_equals_one_process(windows):
    _, one, two, jitter = windows
    meta = assert_same_output(one, two, jitter, "sphere")
    assert meta["spec"]["tiler"]["name"] == "perspective"
    assert meta["stats"]["owned_views"] == 5 and meta["stats"]["views"] == 10 and meta["stats"]["sync_views"] > 0


def test_windows_x0_merging_equals_one_process(windows):
    _, one, two, jitter = windows
    meta = assert_same_output(one, two, jitter, "sphere-x0")
    assert meta["spec"]["merger"]["target"] == "x0" and meta["stats"]["owned_views"] == 5


def test_windows_shifted_with_sync_equals_one_process(windows):
    _, one, two, jitter = windows
    meta = assert_same_output(one, two, jitter, "shifted")
    assert meta["spec"]["tiler"]["name"] == "shifted" and meta["stats"]["sync_views"] > 0
    assert meta["stats"]["owned_views"] * 2 in (meta["stats"]["views"], meta["stats"]["views"] + 1)  # balanced


@pytest.mark.parametrize("name", ["pano", "sphere", "sphere-x0", "shifted"])
def test_collectives_per_request_match_the_documented_formula(windows, name):
    meta = json.loads((windows[2] / f"{name}.json").read_text())
    counted = {k: meta["stats"][k] for k in ("all_reduce_calls", "all_reduce_bytes", "broadcast_calls",
                                             "broadcast_bytes")}
    assert counted == expected_collectives(meta)  # per request: the counters restart for each request


def test_requests_shard_writes_each_of_three_requests_once(cache, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(f'{{"prompt": "scene {i}", "seed": {i}, "name": "r{i}"}}\n' for i in range(3)))
    out = tmp_path / "out"
    run = cli(cache, "configs/demo.yaml", "--prompts", str(prompts), "denoiser.pretrained=syncengine:tiny-random",
              "canvas.height=64", "canvas.width=128",
              "tiler.window=64", "tiler.stride=32", "sampler.steps=1", "runtime.devices=2", "runtime.shard=requests",
              f"runtime.output_dir={out}")
    assert run.returncode == 0, run.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == sorted(f"r{i}.{ext}" for i in range(3) for ext in ("json", "png"))
    assert run.stdout.count("wrote") == 3 and "3 written, 0 failed" in run.stderr  # rank 0 lists rank 1's too
    for i in range(3):
        meta = json.loads((out / f"r{i}.json").read_text())
        assert meta["seed"] == i and meta["stats"]["owned_views"] == meta["stats"]["views"]  # whole requests
        assert meta["stats"]["all_reduce_calls"] == 0


# --------------------------------------------------------------------------------------------------- in process


@pytest.mark.parametrize("count", range(0, 8))
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_request_indices_cover_every_request_once(count, world):
    from syncengine.lightning_module import rank_indices

    got = [i for r in range(world) for i in rank_indices(count, "requests", r, world)]
    assert sorted(got) == list(range(count))
    assert all(rank_indices(count, "windows", r, world) == list(range(count)) for r in range(world))


def test_balanced_view_shares():
    from syncengine.collective import balanced_slices

    for count in range(0, 12):
        for world in range(1, 5):
            shares = balanced_slices(count, world)
            assert [i for s in shares for i in s] == list(range(count))
            assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_summaries_merge_in_request_order():
    from syncengine.lightning_module import RunSummary

    a, b = RunSummary(), RunSummary()
    a.written, a._order = [Path("o/r0.png"), Path("o/r2.png")], {"o/r0.png": 0, "o/r2.png": 2}
    b.failed, b._order = [("r1", "boom")], {repr(("r1", "boom")): 1}
    b.written, b._order["o/r3.png"] = [Path("o/r3.png")], 3
    a.merge([a, b])
    assert a.written == [Path("o/r0.png"), Path("o/r2.png"), Path("o/r3.png")] and a.failed == [("r1", "boom")]


def test_launched_rank_reads_launcher_variables(monkeypatch):
    from syncengine.lightning_module import launched_rank

    for key in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert launched_rank() == 0
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert launched_rank() == 1
    monkeypatch.setenv("RANK", "0")
    assert launched_rank() == 0


def test_spawn_launchers_are_refused(tiny_spec):
    from syncengine.config import validate
    from syncengine.errors import ConfigError
    from syncengine.lightning_module import OutputWriter, _check_launcher, make_trainer

    resolved = validate(tiny_spec(runtime={"accelerator": "cpu", "devices": 2, "strategy": "ddp_spawn"}))
    trainer = make_trainer(resolved, OutputWriter("unused", False, "windows"))
    with pytest.raises(ConfigError, match="runtime.strategy"):
        _check_launcher(trainer)


def test_collective_counts_a_real_all_reduce(tmp_path):
    """One gloo process: the counters of the flattened all-reduce and the broadcast match the tensors' sizes."""
    import torch.distributed as dist

    from syncengine.collective import TorchDistributedCollective

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        c = TorchDistributedCollective()
        a, b = torch.ones(1, 4, 3, 5), torch.full((1, 1, 3, 5), 2.0)
        c.all_reduce_([a, b])
        assert torch.equal(a, torch.ones(1, 4, 3, 5)) and torch.equal(b, torch.full((1, 1, 3, 5), 2.0))
        c.broadcast_(torch.zeros(1, 3, 8, 8), 0)
        assert c.stats["all_reduce_calls"] == 1 and c.stats["all_reduce_bytes"] == (4 + 1) * 15 * 4
        assert c.stats["broadcast_calls"] == 1 and c.stats["broadcast_bytes"] == 3 * 64 * 4
        c.begin(3)  # a new request: counters restart; the first owned() agrees with the other ranks
        assert c.stats["all_reduce_calls"] == 0 and c.stats["broadcast_bytes"] == 0 and not c.agreed
        assert c.owned(list(range(5))) == list(range(5)) and c.agreed and c.stats["agreement_calls"] == 1
        c.owned(list(range(5)))
        assert c.stats["agreement_calls"] == 1  # once per request
    finally:
        dist.destroy_process_group()


def test_views_fingerprint_tells_different_views_apart():
    from syncengine.collective import views_fingerprint
    from syncengine.views import CanvasSpec
    from syncengine_panorama.sliding import SlidingTiler

    canvas = CanvasSpec(64, 256)

    def views(stride):
        return SlidingTiler(SlidingTiler.Config(window=64, stride=stride)).views(canvas)

    assert views_fingerprint(views(32)) == views_fingerprint(views(32))  # rebuilt the same: equal
    assert views_fingerprint(views(32)) != views_fingerprint(views(16))
    shifted = views(32)
    shifted[1].left += 1
    assert views_fingerprint(shifted) != views_fingerprint(views(32))
