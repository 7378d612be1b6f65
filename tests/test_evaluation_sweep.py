"""``syncengine sweep``: one output folder per value of one key, then ``syncengine evaluate`` compares them."""
from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from syncengine.errors import SyncEngineError
from syncengine.evaluation.sweep import folder_name, parse_sweep, plan


def test_parse_sweep():
    assert parse_sweep("sync.weight=0,10,20") == ("sync.weight", ["0", "10", "20"])
    for bad in ("sync.weight", "sync.weight=", "=1,2", "sync.weight=1,,2", "sync.weight=1,1"):
        with pytest.raises(SyncEngineError, match="sweep"):
            parse_sweep(bad)
    assert folder_name("tiler.name", "a/b c") == "tiler.name=a_b_c"


def test_plan_validates_every_value_before_running(tiny_spec, tmp_path):
    spec = tiny_spec()
    runs = plan(spec, "sync.weight=0,5")
    assert [(v, r.config.sync.weight) for v, _, r in runs] == [("0", 0.0), ("5", 5.0)]
    assert [f.name for _, f, _ in runs] == ["sync.weight=0", "sync.weight=5"]
    assert all(str(r.config.runtime.output_dir) == str(f) for _, f, r in runs)
    with pytest.raises(SyncEngineError, match="sync.weight"):
        plan(spec, "sync.weight=0,-1")  # the bad value fails before anything runs
    with pytest.raises(SyncEngineError, match="both swept and overridden"):
        plan(spec, "sync.weight=0,5", ["sync.weight=3"])


def test_sweep_then_evaluate_cli(tiny_spec, tmp_path, capsys):
    from syncengine.cli import main

    spec_file = tmp_path / "spec.yaml"
    OmegaConf.save(OmegaConf.create(tiny_spec()), spec_file)
    out = tmp_path / "out"
    assert main(["sweep", str(spec_file), "sync.weight=0,5", "sampler.steps=2"]) == 0
    err = capsys.readouterr().err
    folders = [out / "sync.weight=0", out / "sync.weight=5"]
    assert f"syncengine evaluate {folders[0]} {folders[1]}" in err
    pngs = []
    for folder, weight in zip(folders, (0.0, 5.0)):
        meta = json.loads((folder / "img.json").read_text())
        assert meta["spec"]["sync"]["weight"] == weight and meta["spec"]["sampler"]["steps"] == 2
        pngs.append((folder / "img.png").read_bytes())
    assert pngs[0] != pngs[1]  # the swept key reached the sampler

    report = tmp_path / "report"
    code = main(["evaluate", *map(str, folders), "--out", str(report), "--backbone", "random",
                 "--metrics", "intra_lpips", "--window", "32", "--no-plot"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "sync.weight=0.0" in captured.out and "sync.weight=5.0" in captured.out
    runs = json.loads((report / "metrics.json").read_text())["runs"]
    assert [r["params"] for r in runs] == [{"sync.weight": 0.0}, {"sync.weight": 5.0}]
    assert all(r["metrics"]["intra_lpips"] > 0 for r in runs)
    assert not (report / "metrics.png").exists()
