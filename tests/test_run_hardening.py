"""Hardened runs and outputs (issue 13): concurrent writers of one name, stop signals, unusable output folders, write
failures, per-request isolation of any exception, non-finite latents, and progress during the final decode."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from syncengine.cli import main
from syncengine.errors import SyncEngineError

ROOT = Path(__file__).resolve().parent.parent
SUBPROCESS_TIMEOUT = 600  # generous: the machine may be loaded; a healthy run takes seconds


def _write_spec(tiny_spec, tmp_path: Path, **sections) -> tuple[Path, Path]:
    spec = tiny_spec(**{"canvas": {"height": 64, "width": 128}, "sampler": {"steps": 1}, **sections})
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path, Path(spec["runtime"]["output_dir"])


def _debris(folder: Path) -> list[str]:
    """Hidden files (claims, temporary files, probes) left in an output folder."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) if folder.is_dir() else []


def _env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}


# ----------------------------------------------------------------------------------------- 1. concurrent writers

WRITER = textwrap.dedent("""
    import sys, threading, time
    from pathlib import Path
    import torch
    from syncengine.outputs import write_result
    from syncengine.pipeline import Generated
    from syncengine.sampler import Request

    folder, go, proc, overwrite = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"

    def result(tag, value):
        image = torch.full((3, 32, 48), value / 255.0)
        return Generated(Request(tag, seed=value, name="same"), 0, image, torch.zeros(1), {}, {}, {"total": 1.0})

    def work(thread):
        for k in range(2):
            value = 10 + 40 * proc + 20 * thread + k  # distinct per output, exact in 8 bits
            write_result(result(f"p{proc}-t{thread}-k{k}", value), folder, overwrite)

    while not go.exists():
        time.sleep(0.01)
    threads = [threading.Thread(target=work, args=(t,)) for t in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
""")


def _run_writers(tmp_path: Path, overwrite: bool, processes: int = 3) -> Path:
    folder, go = tmp_path / "out", tmp_path / "go"
    folder.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(folder), str(go), str(p), str(int(overwrite))],
                              env=_env(), stderr=subprocess.PIPE, text=True) for p in range(processes)]
    time.sleep(0.5)  # most of them are importing torch by now; the file starts them together
    go.touch()
    for proc in procs:
        _, err = proc.communicate(timeout=SUBPROCESS_TIMEOUT)
        assert proc.returncode == 0, err
    return folder


def _check_pair(folder: Path, meta_file: Path) -> None:
    meta = json.loads(meta_file.read_text())
    assert meta["image"] == f"{meta_file.stem}.png" and meta["name"] == meta_file.stem
    pixels = np.asarray(Image.open(folder / meta["image"]))
    assert (pixels == meta["seed"]).all(), (meta_file.name, meta["request"]["prompt"])  # the PNG is this run's


def test_concurrent_writers_of_one_name_get_distinct_consistent_pairs(tmp_path):
    folder = _run_writers(tmp_path, overwrite=False)
    metas = sorted(folder.glob("*.json"))
    assert len(metas) == 12 and len(list(folder.glob("*.png"))) == 12  # 3 processes x 2 threads x 2 outputs
    assert {m.stem for m in metas} == {"same", *(f"same-{k}" for k in range(1, 12))}
    assert len({json.loads(m.read_text())["request"]["prompt"] for m in metas}) == 12  # nothing replaced
    for meta in metas:
        _check_pair(folder, meta)
    assert _debris(folder) == []


def test_concurrent_overwriters_leave_one_consistent_pair(tmp_path):
    folder = _run_writers(tmp_path, overwrite=True, processes=2)
    assert sorted(p.name for p in folder.iterdir()) == ["same.json", "same.png"]
    _check_pair(folder, folder / "same.json")


# ------------------------------------------------------------------------------------------------ 2. stop signals


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_stop_signal_keeps_finished_images_and_exits_128_plus_signal(tiny_spec, tmp_path, signum, code):
    path, out = _write_spec(tiny_spec, tmp_path, requests=[
        {"prompt": "a", "name": "first"},
        {"prompt": "b", "name": "second", "overrides": {"sampler.steps": 400}},  # still running when signalled
        {"prompt": "c", "name": "third"},
    ])
    proc = subprocess.Popen([sys.executable, "-m", "syncengine", "generate", str(path)], cwd=tmp_path, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + SUBPROCESS_TIMEOUT
        while not (out / "first.json").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (out / "first.json").exists(), proc.communicate()[1] if proc.poll() is not None else "timed out"
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=SUBPROCESS_TIMEOUT)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == code, stderr
    line = [s for s in stderr.splitlines() if s.startswith("interrupted by")]
    assert line and signal.Signals(signum).name in line[0] and "first.png" in line[0], stderr
    assert "Traceback" not in stderr and f"wrote {out / 'first.png'}" in stdout
    meta = json.loads((out / "first.json").read_text())
    assert meta["image"] == "first.png" and np.asarray(Image.open(out / "first.png")).shape == (64, 128, 3)
    assert sorted(p.name for p in out.iterdir()) == ["first.json", "first.png"]  # nothing partial, no claims


def test_signal_in_process_stops_within_a_step_and_restores_handlers(tiny_spec, tmp_path, monkeypatch):
    import syncengine
    from syncengine.lightning_module import RunInterrupted
    from syncengine.pipeline import Pipeline

    spec = tiny_spec(canvas={"height": 64, "width": 128}, sampler={"steps": 3},
                     requests=[{"prompt": "a", "name": "first"}, {"prompt": "b", "name": "second"},
                               {"prompt": "c", "name": "third"}])
    steps_seen: list[int] = []
    original = Pipeline.run

    def run(self, index, progress=None):
        def step(done, total):
            steps_seen.append(index)
            if index == 1 and done == 1:
                os.kill(os.getpid(), signal.SIGTERM)  # handled: sets the stop flag
            progress(done, total)

        step.views = getattr(progress, "views", None)
        return original(self, index, step)

    monkeypatch.setattr(Pipeline, "run", run)
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with pytest.raises(RunInterrupted) as info:
        syncengine.generate(spec)
    assert info.value.exit_code == 143 and info.value.signal_name == "SIGTERM"
    assert [p.name for p in info.value.summary.written] == ["first.png"]
    assert steps_seen == [0, 0, 0, 1]  # stopped at the step it was signalled in; the third never started
    assert {s: signal.getsignal(s) for s in before} == before
    out = Path(spec["runtime"]["output_dir"])
    assert sorted(p.name for p in out.iterdir()) == ["first.json", "first.png"]

    summary = syncengine.generate(spec, prompts=[{"prompt": "d", "name": "fine"}])  # a normal run restores them too
    assert summary.ok and {s: signal.getsignal(s) for s in before} == before


# ----------------------------------------------------------------------------------------- 3. output failures


@pytest.fixture
def no_trainer(monkeypatch):
    """Fails the test if a Trainer (hence any model) would start."""
    from syncengine import lightning_module

    def refuse(*args, **kwargs):
        raise AssertionError("the Trainer started before the output folder was checked")

    monkeypatch.setattr(lightning_module, "make_trainer", refuse)


@pytest.mark.parametrize("where, needle", [("file", "is a file"), ("under-file", "a parent is a file"),
                                           ("read-only", "not writable")])
def test_unusable_output_dir_is_one_line_before_models_load(tiny_spec, tmp_path, capsys, monkeypatch, no_trainer,
                                                             where, needle):
    blocker = tmp_path / "blocker"
    blocker.write_text("a regular file")
    target = {"file": blocker, "under-file": blocker / "out", "read-only": tmp_path / "ro"}[where]
    if where == "read-only":  # tests run as root, whom chmod does not stop: the probe write fails as on a RO mount
        real_open = os.open

        def read_only(path, flags, *args):
            if str(path).startswith(str(target)) and flags & os.O_CREAT:
                raise OSError(errno.EROFS, "Read-only file system", str(path))
            return real_open(path, flags, *args)

        monkeypatch.setattr(os, "open", read_only)
    path, _ = _write_spec(tiny_spec, tmp_path, runtime={"output_dir": str(target)})
    assert main(["generate", str(path)]) == 2
    err = capsys.readouterr().err
    lines = [s for s in err.splitlines() if s.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: runtime.output_dir") and needle in lines[0], err
    assert _debris(target) == []


def test_disk_full_while_writing_a_sidecar_leaves_nothing_and_the_run_goes_on(tiny_spec, tmp_path, monkeypatch, capsys):
    from syncengine import outputs

    path, out = _write_spec(tiny_spec, tmp_path, requests=[{"prompt": "a", "name": "full"},
                                                           {"prompt": "b", "name": "fine"}])
    real = outputs._write_json

    def write_json(tmp, data):
        if data["name"] == "full":
            tmp.write_text('{"name": "fu')  # half written, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tmp, data)

    monkeypatch.setattr(outputs, "_write_json", write_json)
    assert main(["generate", str(path)]) == 2
    err = capsys.readouterr().err
    failed = [s for s in err.splitlines() if s.startswith("failed full:")]
    assert failed and "disk full" in failed[0] and "Traceback" not in err
    assert "1 written, 1 failed" in err
    assert sorted(p.name for p in out.iterdir()) == ["fine.json", "fine.png"]  # no PNG without JSON, no temp file


def test_write_failure_with_overwrite_does_not_leave_half_a_pair(tmp_path, monkeypatch):
    from syncengine import outputs
    from syncengine.pipeline import Generated
    from syncengine.sampler import Request

    def result(value):
        return Generated(Request("p", seed=value, name="x"), 0, torch.full((3, 8, 8), value / 255), torch.zeros(1),
                         {}, {}, {})

    outputs.write_result(result(1), tmp_path, overwrite=True)
    monkeypatch.setattr(outputs, "_write_json", lambda p, d: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    with pytest.raises(SyncEngineError, match="disk full"):
        outputs.write_result(result(2), tmp_path, overwrite=True)
    assert list(tmp_path.iterdir()) == []  # the new PNG would have been paired with the old sidecar


# ------------------------------------------------------------------------------------- 4. any request failure


@pytest.mark.parametrize("debug", [False, True])
def test_any_exception_fails_one_request_only(tiny_spec, tmp_path, monkeypatch, capsys, debug):
    from syncengine.pipeline import Pipeline

    if debug:
        monkeypatch.setenv("SYNCENGINE_DEBUG", "1")
    path, out = _write_spec(tiny_spec, tmp_path, requests=[{"prompt": "a", "name": "broken"},
                                                           {"prompt": "b", "name": "fine"}])
    original = Pipeline.run

    def run(self, index, progress=None):
        if index == 0:
            raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore detail")
        return original(self, index, progress)

    monkeypatch.setattr(Pipeline, "run", run)
    assert main(["generate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "failed broken: RuntimeError: CUDA error: an illegal memory access was encountered" in err.splitlines()
    assert "1 written, 1 failed" in err and (out / "fine.png").is_file()
    assert ("Traceback" in err) == debug


def test_failure_before_sampling_still_tells_the_other_ranks(tiny_spec, tmp_path):
    """A rank whose request fails before its first collective joins the agreement with its error (else the other
    ranks would wait forever), whatever the exception."""
    from syncengine.api import resolve_run
    from syncengine.collective import Collective
    from syncengine.lightning_module import JointDiffusionModule
    from syncengine.pipeline import Failed

    class Recording(Collective):
        def agree(self, items=(), error=None):
            self.errors = [*getattr(self, "errors", []), error]
            super().agree(items, error)

    class Broken:
        collective = Recording()

        def requests(self):
            from syncengine.sampler import Request

            return [Request("a", name="a")]

        def run(self, index, progress=None):
            raise ValueError("bad input tensor")

    module = JointDiffusionModule(resolve_run(tiny_spec(runtime={"progress": False})))
    module.pipeline = Broken()
    failed = module.predict_step(0)
    assert isinstance(failed, Failed) and failed.error == "ValueError: bad input tensor"
    assert Broken.collective.errors == ["ValueError: bad input tensor"]


# ------------------------------------------------------------------------------------------ 5. non-finite latents


@pytest.mark.parametrize("target", ["xt", "x0"])
def test_non_finite_latents_fail_the_request_clearly(tiny_spec, tmp_path, monkeypatch, capsys, target):
    from syncengine_sd.denoiser import StableDiffusionDenoiser

    original = StableDiffusionDenoiser.predict

    def predict(self, x, step, *args, **kwargs):
        out = original(self, x, step, *args, **kwargs)
        return out * float("nan") if step.index == 1 else out

    monkeypatch.setattr(StableDiffusionDenoiser, "predict", predict)
    path, out = _write_spec(tiny_spec, tmp_path, sampler={"steps": 2}, merger={"name": "average", "target": target})
    assert main(["generate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "failed img: latents became non-finite at step 2/2; lower sync.weight / guidance_scale" in err, err
    assert not list(out.glob("*.png"))


# --------------------------------------------------------------------------------------------------- 6. progress


def test_final_decode_is_announced_when_progress_is_on(tiny_spec, tmp_path, capsys):
    path, out = _write_spec(tiny_spec, tmp_path, runtime={"progress": True})
    assert main(["generate", str(path)]) == 0
    assert "img: decoding 64x128 canvas" in capsys.readouterr().err
    assert (out / "img.png").is_file()


@pytest.mark.parametrize("steps, ok", [(999, True), (1000, False)])
def test_more_steps_than_the_model_has_timesteps_is_one_line(tiny_spec, steps, ok):
    """The tiny model's DDIM has 1000 training timesteps and offset 1: 999 steps is its most (1000 indexed past the
    schedule inside diffusers with an IndexError)."""
    from syncengine.config import resolve
    from syncengine.errors import ConfigError
    from syncengine.pipeline import Pipeline
    from syncengine.sampler import check_step_count

    pipe = Pipeline(resolve(tiny_spec(sampler={"steps": steps})))
    scheduler = pipe.denoiser_for(pipe.resolved).make_scheduler("ddim")
    if ok:
        check_step_count(scheduler, steps)
        return
    with pytest.raises(ConfigError, match=r"sampler\.steps.*sampler\.steps=999 or fewer"):
        pipe.run(0)


@pytest.fixture
def small_filesystem(tmp_path):
    """A 64 KiB tmpfs (real ENOSPC, page-granular), where the machine lets the test mount one (root, not refused)."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.decode().strip() or done.returncode})")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


@pytest.mark.parametrize("room", ["nothing", "the image only"])
def test_real_disk_full_leaves_no_half_pair(small_filesystem, tmp_path, room):
    """A real full disk (not a simulated error): with room for nothing, or for the PNG but not its sidecar, the
    write fails as one line and leaves no file behind, no PNG without its JSON and no empty temporary file."""
    from syncengine import outputs
    from syncengine.pipeline import Generated
    from syncengine.sampler import Request

    noise = torch.rand((3, 64, 96), generator=torch.Generator().manual_seed(0))  # incompressible: ~18 KiB of PNG
    result = Generated(Request("p", seed=1, name="x"), 0, noise, torch.zeros(1), {"spec": "x" * 6000}, {}, {})
    png = outputs.write_result(result, tmp_path / "sizes")
    page = 4096
    pages = -(-png.stat().st_size // page)  # the PNG's pages; its sidecar needs two more (> 4 KiB)
    assert png.with_suffix(".json").stat().st_size > page
    free = 0 if room == "nothing" else pages * page
    filler = small_filesystem / "filler"
    with open(filler, "wb") as f:
        try:
            f.write(b"\0" * (64 * 1024 - free))
        except OSError:
            pass
    out = small_filesystem / "out"
    out.mkdir()
    with pytest.raises(SyncEngineError, match="disk full|No space left") as info:
        outputs.write_result(result, out)
    assert "\n" not in str(info.value)
    assert sorted(p.name for p in out.iterdir()) == []
