"""``syncengine gallery`` page building (no browser): grouping, differing settings, thumbnails once, bad input."""
from __future__ import annotations

import json
import re

from _gallery_helpers import sample_outputs, spec, write_output
from PIL import Image

from syncengine.cli import main
from syncengine.gallery import build_gallery


def sections(page: str) -> list[str]:
    return re.findall(r'<section class="group (\w+)">(.*?)</section>', page, re.S)


def test_sweep_grouped_by_prompt_and_seed_with_differing_settings(tmp_path):
    sample_outputs(tmp_path / "in")
    result = build_gallery([tmp_path / "in"], tmp_path / "page")
    assert result.skipped == [] and result.images == 5 and result.groups == 4
    page = result.page.read_text()
    groups = sections(page)
    sweeps = [body for kind, body in groups if kind == "sweep"]
    assert len(sweeps) == 1 and sweeps[0].count('<figure class="card') == 2
    assert "varies: sync.weight</span>" in sweeps[0]  # runtime.output_dir differs too but is not a setting
    assert "<th>sync.weight</th><td>0</td>" in sweeps[0] and "<th>sync.weight</th><td>20</td>" in sweeps[0]
    assert "<th>intra_lpips</th><td>0.5</td>" in sweeps[0] and "fid" not in sweeps[0]  # a None metric is not shown
    assert page.count('class="card loop"') == 1 and page.count('<div class="pano"') == 1
    assert "control.png" in page and "exports: face-front" in page and "sample 1.25 s" in page
    for ref in re.findall(r'(?:src|href|data-pano)="([^"]+)"', page):  # every link resolves from the page's folder
        assert ref.startswith("data:") or (result.page.parent / ref).exists(), ref


def test_thumbnails_written_once(tmp_path):
    sample_outputs(tmp_path / "in")
    build_gallery([tmp_path / "in"], tmp_path / "page")
    made = sorted((tmp_path / "page").glob("thumbs/*.jpg")) + sorted((tmp_path / "page").glob("panos/*.js"))
    assert len(made) == 7  # 5 images, 1 condition image, 1 viewer script
    before = {p: p.stat().st_mtime_ns for p in made}
    build_gallery([tmp_path / "in"], tmp_path / "page")
    assert {p: p.stat().st_mtime_ns for p in made} == before
    for p in made:
        if p.suffix == ".jpg":
            assert Image.open(p).height <= 256


def test_bad_input_builds_and_says_what_it_skipped(tmp_path, capsys):
    root = tmp_path / "in"
    (root / "empty").mkdir(parents=True)
    (root / "no-sidecars").mkdir()
    Image.new("RGB", (8, 8)).save(root / "no-sidecars" / "a.png")
    write_output(root / "old", "old", spec())
    old = json.loads((root / "old" / "old.json").read_text())
    del old["spec"], old["request"]
    old["versions"] = {"syncengine": "0.0.1"}
    (root / "old" / "old.json").write_text(json.dumps(old))
    write_output(root / "missing", "gone", spec())
    (root / "missing" / "gone.png").unlink()
    write_output(root / "good", "good", spec())
    folders = [str(root / n) for n in ("empty", "no-sidecars", "old", "missing", "good")]
    assert main(["gallery", *folders, "--out", str(tmp_path / "page")]) == 0
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert all(line.startswith("skipped ") for line in lines) and "Traceback" not in captured.err
    assert any("empty: no outputs" in s for s in lines)
    assert any("no-sidecars: 1 PNG(s) but no sidecars" in s for s in lines)
    assert any("old.json: sidecar from another version (syncengine 0.0.1), no spec, request" in s for s in lines)
    assert any("gone.json: its image gone.png is missing" in s for s in lines)
    assert len(lines) == 4, lines  # one line per problem
    assert "1 images in 1 groups" in captured.out
    page = (tmp_path / "page" / "index.html").read_text()
    assert "4 skipped" in page and page.count('<figure class="card') == 1


def test_odd_sidecar_shapes_and_region_layout(tmp_path):
    write_output(tmp_path / "in", "odd", spec())
    odd = json.loads((tmp_path / "in" / "odd.json").read_text())
    (tmp_path / "in" / "odd.json").write_text(json.dumps({**odd, "spec": "x", "request": [1]}))
    write_output(tmp_path / "in", "regions", spec(tiler__layout="layouts/balloons.png"))  # found among the presets
    (tmp_path / "in" / "notes.json").write_text("[1, 2]")
    result = build_gallery([tmp_path / "in"], tmp_path / "page")
    assert len(result.skipped) == 2 and "odd.json: sidecar from another version" in result.skipped[1]
    assert "notes.json: not a sidecar" in result.skipped[0]
    page = result.page.read_text()
    assert page.count('<figure class="card') == 1 and "<span>layout</span>" in page


def test_out_is_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "f").write_text("")
    assert main(["gallery", str(tmp_path), "--out", str(tmp_path / "f")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a file" in err


def test_offline_presets_build_a_page(tmp_path, capsys):
    """The issue's 'done when': real outputs of the offline presets (shrunk), a sweep among them."""
    out = tmp_path / "outputs"
    tiny = ["sampler.steps=1", "runtime.progress=false"]
    assert main(["generate", "spherical-demo", *tiny, f"runtime.output_dir={out / 'spherical'}"]) == 0
    assert main(["sweep", "demo", "sync.weight=0,1", *tiny, "canvas.height=64", "canvas.width=192",
                 "tiler.window=64", "tiler.stride=64", f"runtime.output_dir={out / 'sweep'}"]) == 0
    err = capsys.readouterr().err
    sweep = out / "sweep"
    assert f"syncengine gallery {sweep / 'sync.weight=0'} {sweep / 'sync.weight=1'} --out {sweep / 'gallery'}" in err
    assert main(["gallery", str(out), "--out", str(tmp_path / "page")]) == 0
    captured = capsys.readouterr()
    assert "3 images in 2 groups" in captured.out and captured.err == ""
    page = (tmp_path / "page" / "index.html").read_text()
    assert page.count('<div class="pano"') == 1 and "varies: sync.weight</span>" in page
