"""The CLI end to end: PNG + JSON sidecar, no silent overwrite, exit codes, config and plugins commands."""
from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from PIL import Image

from syncengine.cli import main


@pytest.fixture
def spec_file(tiny_spec, tmp_path):
    spec = tiny_spec(sync={"weight": 5.0}, sampler={"steps": 2})
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path, spec


def test_generate_writes_png_and_sidecar_and_never_overwrites(spec_file, capsys):
    path, spec = spec_file
    out = spec["runtime"]["output_dir"]
    assert main(["generate", str(path), "sync.decay=0.9"]) == 0
    png, meta_file = f"{out}/img.png", f"{out}/img.json"
    image = np.asarray(Image.open(png))
    assert image.shape == (64, 160, 3)
    meta = json.load(open(meta_file))
    assert meta["seed"] == 0 and meta["request"]["prompt"] == "a photo of a mountain"
    assert meta["spec"]["sync"]["decay"] == 0.9 and meta["spec"]["tiler"]["stride"] == 32  # fully resolved
    assert meta["spec"]["sync"]["loss"]["backbone"] == "random"
    assert {"torch", "diffusers", "syncengine"} <= set(meta["versions"])
    assert meta["timings_s"]["total"] > 0 and meta["stats"]["sync_steps"] == 2
    # a second run does not overwrite: it writes img-1.*
    assert main(["generate", str(path), "sync.decay=0.9"]) == 0
    again = np.asarray(Image.open(f"{out}/img-1.png"))
    assert np.array_equal(image, again)  # same spec and seed: same image
    assert "wrote" in capsys.readouterr().out


def test_sidecar_regenerates_the_image(spec_file, tmp_path):
    path, spec = spec_file
    assert main(["generate", str(path)]) == 0
    out = spec["runtime"]["output_dir"]
    meta = json.load(open(f"{out}/img.json"))
    replay = tmp_path / "replay.yaml"
    meta["spec"]["runtime"]["output_dir"] = str(tmp_path / "replay")
    replay.write_text(yaml.safe_dump(meta["spec"]))
    assert main(["generate", str(replay)]) == 0
    a = np.asarray(Image.open(f"{out}/img.png"))
    b = np.asarray(Image.open(tmp_path / "replay" / "img.png"))
    assert np.array_equal(a, b)


@pytest.mark.parametrize("args, needle", [
    (["tiler.window=999"], "tiler.window"),
    (["tiler.name=nope"], "tiler.name"),
    (["denoiser.pretrained=/no/such/model"], "does not exist"),
])
def test_bad_input_exits_2_with_one_line(spec_file, capsys, args, needle):
    path, _ = spec_file
    code = main(["generate", str(path), *args])
    err = capsys.readouterr().err
    assert code == 2
    line = [s for s in err.splitlines() if s.startswith("error:") or s.startswith("failed")]
    assert line and needle in line[0] and "Traceback" not in err


def test_failed_request_is_reported_and_others_are_kept(tiny_spec, tmp_path, capsys):
    spec = tiny_spec(requests=[
        {"prompt": "a", "name": "good"},
        {"prompt": "b", "name": "bad", "overrides": {"denoiser.pretrained": "/no/such/model"}},
    ], sampler={"steps": 1})
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main(["generate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "failed bad" in err and "1 written, 1 failed" in err
    assert (tmp_path / "out" / "good.png").is_file() and not (tmp_path / "out" / "bad.png").exists()


def test_config_command_prints_resolved_spec(spec_file, capsys):
    path, _ = spec_file
    assert main(["config", str(path), "sync.weight=3"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["sync"]["weight"] == 3.0 and printed["merger"]["target"] == "xt"


def test_plugins_command(capsys):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "sliding" in out and "stable-diffusion" in out and "(syncengine" in out


def test_prompts_file(spec_file, tmp_path):
    path, spec = spec_file
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "one", "seed": 1, "name": "p1"}\n"two"\n')
    assert main(["generate", str(path), "--prompts", str(prompts), "sampler.steps=1"]) == 0
    out = tmp_path / "out"
    assert (out / "p1.png").is_file() and len(list(out.glob("*.png"))) == 2
    prompts.write_text("{not json}\n")
    assert main(["generate", str(path), "--prompts", str(prompts)]) == 2


def test_offline_demo_runs_on_the_shipped_toy_model(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SYNCENGINE_CACHE", str(tmp_path / "cache"))
    code = main(["generate", "demo", "sampler.steps=1", "canvas.width=384", f"runtime.output_dir={tmp_path / 'demo'}"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "RANDOM weights" not in captured.err  # a trained model: the tiny model's notice does not apply
    assert not (tmp_path / "cache" / "tiny-random-sd-v1").exists()  # nothing built: the weights ship
    meta = json.load(open(tmp_path / "demo" / "demo.json"))
    assert meta["spec"]["denoiser"]["pretrained"] == "syncengine:toy" and "warning" not in meta["model"]


def test_tiny_random_model_is_labelled_random(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SYNCENGINE_CACHE", str(tmp_path / "cache"))
    code = main(["generate", "demo", "denoiser.pretrained=syncengine:tiny-random", "sampler.steps=1",
                 "canvas.width=384", "tiler.window=256", "tiler.stride=128", "canvas.height=256",
                 f"runtime.output_dir={tmp_path / 'demo'}"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "RANDOM weights" in captured.err
    assert (tmp_path / "cache" / "tiny-random-sd-v1" / "model_index.json").is_file()  # built, saved, then loaded
    meta = json.load(open(tmp_path / "demo" / "demo.json"))
    assert meta["model"]["warning"].startswith("random weights")


def test_interrupted_run_keeps_finished_images(tiny_spec, tmp_path, monkeypatch, capsys):
    from syncengine.pipeline import Pipeline

    spec = tiny_spec(requests=[{"prompt": "a", "name": "first"}, {"prompt": "b", "name": "second"}],
                     sampler={"steps": 1})
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(spec))
    original = Pipeline.run

    def run(self, index, progress=None):
        if index == 1:
            raise KeyboardInterrupt
        return original(self, index, progress)

    monkeypatch.setattr(Pipeline, "run", run)
    assert main(["generate", str(path)]) == 130  # a stop, not Lightning's own sys.exit(1) on KeyboardInterrupt
    err = capsys.readouterr().err
    assert "interrupted by SIGINT" in err and "first.png" in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["first.json", "first.png"]  # nothing partial
