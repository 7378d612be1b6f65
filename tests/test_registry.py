"""Entry-point registry: lazy loading, third-party plugins, helpful errors."""
from __future__ import annotations

import sys

import pytest

from syncengine import registry
from syncengine.errors import PluginNotFoundError


def _fake_distribution(root, dist, module, group, entries, body):
    info = root / f"{dist}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    lines = "\n".join(f"{name} = {target}" for name, target in entries.items())
    (info / "entry_points.txt").write_text(f"[{group}]\n{lines}\n")
    (root / f"{module}.py").write_text(body)


def test_builtins_are_registered_through_entry_points():
    assert {"sliding"} <= set(registry.names("tiler"))
    assert {"average", "gaussian"} <= set(registry.names("merger"))
    assert "stable-diffusion" in registry.names("denoiser")
    assert {"lpips", "style"} <= set(registry.names("sync_loss"))
    rows = {(r.kind, r.name): r for r in registry.list_plugins()}
    assert rows[("tiler", "sliding")].distribution.startswith("syncengine ")


def test_unknown_name_lists_available_and_closest():
    with pytest.raises(PluginNotFoundError) as info:
        registry.get("tiler", "slidng")
    msg = str(info.value)
    assert "'slidng'" in msg and "sliding" in msg and "Did you mean 'sliding'" in msg and "\n" not in msg


def test_unknown_kind():
    with pytest.raises(PluginNotFoundError, match="unknown plugin kind"):
        registry.get("nope", "x")


def test_third_party_plugin_is_found_and_loaded_lazily(tmp_path, monkeypatch):
    body = (
        "from syncengine_panorama.sliding import SlidingTiler\n"
        "class MyTiler(SlidingTiler):\n    pass\n"
    )
    _fake_distribution(tmp_path, "my_plugins", "my_plugins_mod", "syncengine.tilers", {"mine": "my_plugins_mod:MyTiler"}, body)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "mine" in registry.names("tiler")
    assert "my_plugins_mod" not in sys.modules  # listing does not import
    rows = {r.name: r for r in registry.list_plugins() if r.kind == "tiler"}
    assert rows["mine"].distribution == "my_plugins 0.1"
    assert "my_plugins_mod" not in sys.modules
    cls = registry.get("tiler", "mine")
    assert cls.__name__ == "MyTiler" and "my_plugins_mod" in sys.modules


def test_broken_plugin_import_is_a_clear_error(tmp_path, monkeypatch):
    _fake_distribution(tmp_path, "broken", "broken_mod", "syncengine.tilers", {"broken": "broken_mod:X"},
                       "import not_a_real_module_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PluginNotFoundError, match="cannot be imported"):
        registry.get("tiler", "broken")
