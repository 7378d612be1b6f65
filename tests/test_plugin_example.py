"""The example third-party plugin package in docs/examples: registered through its own pyproject's entry points,
listed by `syncengine plugins`, and used by name from a spec in a real (tiny) generation."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

EXAMPLE = Path(__file__).resolve().parent.parent / "docs" / "examples" / "syncengine-colorstats"


def install_by_entry_points(target: Path) -> dict:
    """Install the example as pip would, without pip (fast, offline): a dist-info folder whose entry_points.txt is
    written from the package's own pyproject.toml, plus the package itself, in a folder put on sys.path."""
    project = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]
    name, version = project["name"], project["version"]
    dist = target / f"{name.replace('-', '_')}-{version}.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    lines = []
    for group, entries in project["entry-points"].items():
        lines.append(f"[{group}]")
        lines += [f"{key} = {value}" for key, value in entries.items()]
        lines.append("")
    (dist / "entry_points.txt").write_text("\n".join(lines))
    shutil.copytree(EXAMPLE / "syncengine_colorstats", target / "syncengine_colorstats")
    return project


@pytest.fixture
def example_installed(tmp_path, monkeypatch):
    project = install_by_entry_points(tmp_path / "site")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    yield project
    for mod in [m for m in sys.modules if m.startswith("syncengine_colorstats")]:
        del sys.modules[mod]


def test_plugins_lists_the_example(example_installed, capsys):
    from syncengine.cli import main
    from syncengine.registry import list_plugins

    rows = {(p.kind, p.name): p for p in list_plugins()}
    assert rows[("sync_loss", "color-stats")].distribution == "syncengine-colorstats 0.1.0"
    assert rows[("tiler", "even")].target == "syncengine_colorstats.tiler:EvenTiler"
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "color-stats" in out and "even" in out and "syncengine-colorstats 0.1.0" in out


def test_example_loss_contract(example_installed):
    from syncengine.registry import get

    cls = get("sync_loss", "color-stats")
    loss = cls(cls.Config(pool=4))
    torch.manual_seed(0)
    anchor = torch.rand(1, 3, 16, 16) * 2 - 1
    views = torch.cat([anchor, torch.rand(2, 3, 16, 16) * 2 - 1]).requires_grad_(True)
    values = loss(views, loss.prepare_target(anchor))
    assert values.shape == (3,) and values[0].abs() < 1e-12 and (values[1:] > 0).all()
    values.sum().backward()
    assert views.grad[1:].abs().sum() > 0


def test_generation_uses_the_example_plugins_by_name(example_installed, tiny_spec, tmp_path):
    from syncengine.api import generate, resolve_run

    spec = tiny_spec(tiler={"name": "even", "window": 64, "count": 3},
                     sync={"loss": {"name": "color-stats", "pool": 4}, "weight": 5.0},
                     sampler={"steps": 2})
    del spec["tiler"]["stride"]
    resolved = resolve_run(spec)
    views = resolved.build("tiler").views(resolved.canvas)
    assert [v.left for v in views] == [0, 6, 12]  # 160 px canvas, 64 px windows: 0, 48, 96 px
    summary = generate(spec)
    assert not summary.failed and len(summary.written) == 1
    meta = json.loads(summary.written[0].with_suffix(".json").read_text())
    assert meta["spec"]["tiler"] == {"name": "even", "window": 64, "count": 3}
    assert meta["spec"]["sync"]["loss"] == {"name": "color-stats", "pool": 4, "std_weight": 1.0}


def test_example_options_are_validated_before_loading(example_installed, tiny_spec):
    from syncengine.api import resolve_run
    from syncengine.errors import ConfigError

    spec = tiny_spec(tiler={"name": "even", "window": 64, "count": 2})
    del spec["tiler"]["stride"]
    with pytest.raises(ConfigError, match="tiler.count"):
        resolve_run(spec)  # 2 x 64 px cannot cover 160 px
    spec = tiny_spec(sync={"loss": {"name": "color-stats", "pooling": 4}})
    with pytest.raises(ConfigError, match="pooling"):
        resolve_run(spec)


def test_a_named_plugin_does_not_inherit_the_default_plugins_options(example_installed, tiny_spec):
    """The schema's default sync.loss is {name: lpips, net: vgg}: naming another loss must not hand it `net`."""
    from syncengine.api import resolve_run

    spec = tiny_spec(sync={"loss": {"name": "color-stats"}})
    assert dict(resolve_run(spec).config.sync.loss) == {"name": "color-stats", "pool": 8, "std_weight": 1.0}
    spec = tiny_spec(sync={"loss": {"name": "style", "backbone": "random"}})
    assert resolve_run(spec).config.sync.loss.net == "vgg16"  # style's own default, not LPIPS' vgg
