"""docs/config.md is generated from the schema and must be current."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from syncengine import config_docs
from syncengine.config import Spec


def test_config_md_is_current():
    expected = config_docs.generate()
    current = config_docs.DOC_PATH.read_text() if config_docs.DOC_PATH.is_file() else ""
    assert current == expected, "docs/config.md is stale: run `python -m syncengine.config_docs` and commit it"


def test_every_schema_key_is_documented_with_type_and_default():
    text = config_docs.generate()
    for section in dataclasses.fields(Spec):
        default = section.default_factory()
        if dataclasses.is_dataclass(default):
            for f in dataclasses.fields(default):
                assert f"| `{section.name}.{f.name}` |" in text
    for kind, section in config_docs.KIND_SECTIONS.items():
        infos = list(config_docs._builtin_plugins(kind))
        assert infos, kind
        for info in infos:
            assert f"### `{section}.name: {info.name}`" in text
            for f in dataclasses.fields(info.load().Config):
                assert f"| `{section}.{f.name}` |" in text
    assert "| `requests[].prompt` | str | `required` |" in text
    assert "| `sync.weight` | float | `20.0` | w of Eq. 14; 0 is exactly MultiDiffusion |" in text


@dataclass
class _Base:
    a: int = 1  # the a option


@dataclass
class _Example(_Base):
    b: Optional[str] = None  # the b option
    c: list = field(default_factory=lambda: [1, 2], metadata={"doc": "from metadata"})  # from the comment
    d: float = 0.5


def test_meanings_come_from_metadata_then_comments_including_bases():
    rows = {key: (typ, default, meaning) for key, typ, default, meaning in config_docs.field_rows(_Example, "x.")}
    assert rows["x.a"] == ("int", "1", "the a option")
    assert rows["x.b"] == ("str or null", "null", "the b option")
    assert rows["x.c"] == ("list", "[1, 2]", "from metadata")
    assert rows["x.d"] == ("float", "0.5", "")


def test_check_mode(tmp_path, capsys):
    out = tmp_path / "config.md"
    assert config_docs.main(["--check", "-o", str(out)]) == 1
    assert "python -m syncengine.config_docs" in capsys.readouterr().err
    assert config_docs.main(["-o", str(out)]) == 0
    assert config_docs.main(["--check", "-o", str(out)]) == 0


def test_structured_options_document_their_own_keys():
    """Lists of option dataclasses (regions, ControlNets) list their items' keys, with meanings."""
    from syncengine.config_docs import generate

    doc = generate()
    for key in ("tiler.regions[].mask.png", "tiler.regions[].seed", "denoiser.controlnets[].scale"):
        row = next((line for line in doc.splitlines() if line.startswith(f"| `{key}` |")), None)
        assert row is not None, key
        assert not row.rstrip().endswith("|  |"), f"{key} has no meaning"
