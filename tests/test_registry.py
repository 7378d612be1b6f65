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
    entry = {"mine": "my_plugins_mod:MyTiler"}
    _fake_distribution(tmp_path, "my_plugins", "my_plugins_mod", "syncengine.tilers", entry, body)
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


def test_abstract_entry_point_plugin_is_a_one_line_error(tmp_path, monkeypatch):
    body = "from syncengine.tiler import Tiler\nclass Half(Tiler):\n    def views(self, canvas):\n        return []\n"
    _fake_distribution(tmp_path, "half", "half_mod", "syncengine.tilers", {"half": "half_mod:Half"}, body)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(registry.PluginContractError) as info:
        registry.get("tiler", "half")
    msg = str(info.value)
    assert "'half'" in msg and "half_mod.Half" in msg and "validate" in msg and "\n" not in msg


@pytest.fixture
def registered():
    """Names registered by a test, removed after it."""
    added: list[tuple[str, str]] = []
    yield added
    for kind, name in added:
        registry.unregister(kind, name)


def _tiler_class(name="Notebook"):
    from syncengine_panorama.sliding import SlidingTiler

    return type(name, (SlidingTiler,), {"__module__": "notebook_cell"})


def test_register_without_installing(registered):
    cls = registry.register("tiler", "notebook-tiler")(_tiler_class())
    registered.append(("tiler", "notebook-tiler"))
    assert registry.get("tiler", "notebook-tiler") is cls
    assert "notebook-tiler" in registry.names("tiler")
    row = {r.name: r for r in registry.list_plugins() if r.kind == "tiler"}["notebook-tiler"]
    assert row.registered and row.target == "notebook_cell:Notebook" and row.load() is cls
    assert not {r.name: r for r in registry.list_plugins()}["sliding"].registered
    assert registry.name_of("tiler", cls()) == "notebook-tiler"
    registry.unregister("tiler", "notebook-tiler")
    with pytest.raises(PluginNotFoundError):
        registry.get("tiler", "notebook-tiler")


def test_registered_plugin_runs_from_a_spec(registered):
    from syncengine.config import resolve

    registry.register("tiler", "notebook-tiler")(_tiler_class())
    registered.append(("tiler", "notebook-tiler"))
    resolved = resolve({"tiler": {"name": "notebook-tiler", "stride": 16}})
    assert type(resolved.build("tiler")).__name__ == "Notebook"


def test_register_clashes_are_one_line_errors(registered):
    with pytest.raises(registry.PluginContractError) as info:
        registry.register("tiler", "sliding")(_tiler_class())
    assert "already installed by syncengine" in str(info.value) and "replace=True" in str(info.value)
    assert "\n" not in str(info.value)
    registry.register("tiler", "mine")(_tiler_class("A"))
    registered.append(("tiler", "mine"))
    registry.register("tiler", "mine")(_tiler_class("A"))  # the same class again: a re-run notebook cell
    with pytest.raises(registry.PluginContractError, match="already registered as notebook_cell:A"):
        registry.register("tiler", "mine")(_tiler_class("B"))
    b = registry.register("tiler", "mine", replace=True)(_tiler_class("B"))
    assert registry.get("tiler", "mine") is b


def test_register_replace_shadows_an_installed_plugin(registered):
    from syncengine_panorama.sliding import SlidingTiler

    cls = registry.register("tiler", "sliding", replace=True)(_tiler_class())
    registered.append(("tiler", "sliding"))
    assert registry.get("tiler", "sliding") is cls
    assert [r.registered for r in registry.list_plugins() if r.name == "sliding"] == [True]
    registry.unregister("tiler", "sliding")
    registered.clear()
    assert registry.get("tiler", "sliding") is SlidingTiler


def test_register_refuses_abstract_classes_and_unknown_kinds():
    from syncengine.tiler import Tiler

    with pytest.raises(registry.PluginContractError, match="does not implement validate, views"):
        registry.register("tiler", "empty")(type("Empty", (Tiler,), {}))
    assert "empty" not in registry.names("tiler")
    with pytest.raises(PluginNotFoundError, match="unknown plugin kind"):
        registry.register("tilers", "x")


def test_plugins_command_marks_registered(registered, capsys):
    from syncengine.cli import main

    registry.register("tiler", "notebook-tiler")(_tiler_class())
    registered.append(("tiler", "notebook-tiler"))
    assert main(["plugins"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith(" *notebook-tiler") and "registered in-process" in line for line in lines)
    assert any(line.startswith("  sliding") for line in lines)


def test_contract_error_lives_with_the_other_errors():
    from syncengine import errors

    assert registry.PluginContractError is errors.PluginContractError  # re-exported for compatibility
    assert issubclass(errors.PluginContractError, (errors.SyncEngineError, TypeError))
