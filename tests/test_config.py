"""Spec composition and validation: one-line errors naming the key, before any model loads."""
from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from syncengine.config import compose, resolve, validate
from syncengine.errors import ConfigError, SyncEngineError

BASE = {
    "canvas": {"height": 512, "width": 1024},
    "denoiser": {"name": "stable-diffusion", "pretrained": "/nonexistent/model"},  # never loaded by validation
    "requests": [{"prompt": "a photo"}],
}


def _err(spec, overrides=()):
    with pytest.raises(ConfigError) as info:
        resolve(spec, list(overrides))
    msg = str(info.value)
    assert "\n" not in msg
    return info.value


def test_defaults_are_the_paper_settings():
    r = resolve(BASE)
    c = r.config
    sync = (c.sync.weight, c.sync.decay, c.sync.anchor, c.sync.loss.name, c.sync.loss.net)
    assert sync == (20.0, 0.95, "center", "lpips", "vgg")
    assert (c.tiler.name, c.tiler.window, c.tiler.stride) == ("sliding", 512, 128)
    assert (c.sampler.scheduler, c.sampler.steps, c.sampler.guidance_scale) == ("ddim", 50, 7.5)
    assert r.plugin_configs["tiler"].window == 512  # typed plugin options


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["tiler.windw=256"], "tiler.windw"),
        (["sync.wieght=1"], "sync.wieght"),
        (["canvas.width=1004"], "canvas.width"),
        (["canvas.height=abc"], "canvas.height"),
        (["tiler.window=2048"], "tiler.window"),
        (["tiler.stride=0"], "tiler.stride"),
        (["tiler.stride=-8"], "tiler.stride"),
        (["tiler.stride=1024"], "tiler.stride"),
        (["tiler.name=slidng"], "tiler.name"),
        (["sync.loss.name=lpipz"], "sync.loss.name"),
        (["sync.loss.nett=vgg"], "sync.loss.nett"),
        (["sync.decay=1.5"], "sync.decay"),
        (["sync.anchor=middle"], "sync.anchor"),
        (["sampler.scheduler=ddimm"], "sampler.scheduler"),
        (["sampler.steps=0"], "sampler.steps"),
        (["runtime.shard=pixels"], "runtime.shard"),
        (["merger.name=gaussian", "merger.sigma=0"], "merger.sigma"),
    ],
)
def test_bad_values_name_the_key(overrides, key):
    err = _err(BASE, overrides)
    assert err.key == key, str(err)


def test_wrong_type_message():
    err = _err(BASE, ["sampler.steps=many"])
    assert "sampler.steps" in str(err)


def test_duplicate_request_names_and_empty_prompt():
    twice = [{"prompt": "a", "name": "x"}, {"prompt": "b", "name": "x"}]
    assert _err({**BASE, "requests": twice}).key == "requests.1.name"
    assert _err({**BASE, "requests": [{"prompt": ""}]}).key == "requests.0.prompt"


def test_extends_and_overrides_compose(tmp_path):
    (tmp_path / "base.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(BASE)))
    (tmp_path / "child.yaml").write_text("extends: base.yaml\nsync: {weight: 10}\ntiler: {loop: true}\n")
    r = resolve(tmp_path / "child.yaml", ["sync.decay=0.9"])
    assert (r.config.sync.weight, r.config.sync.decay, r.config.tiler.loop) == (10.0, 0.9, True)
    assert r.config.canvas.width == 1024  # from the base


def test_extends_cycle_and_missing_file(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(SyncEngineError, match="cycle"):
        compose(tmp_path / "a.yaml")
    with pytest.raises(SyncEngineError, match="not found"):
        compose(tmp_path / "missing.yaml")


def test_bad_override_syntax():
    with pytest.raises(SyncEngineError, match="key=value"):
        resolve(BASE, ["sync.weight"])


def test_presets_validate():
    for name in ("sd2-panorama", "sd2-loop", "demo"):
        r = resolve(name)
        assert r.config.requests
    assert resolve("sd2-loop").config.tiler.loop is True


def test_per_request_overrides():
    from syncengine.config import request_spec

    r = resolve({**BASE, "requests": [{"prompt": "a"}, {"prompt": "b", "overrides": {"sync.weight": 5}}]})
    assert request_spec(r, 0).config.sync.weight == 20.0
    assert request_spec(r, 1).config.sync.weight == 5.0
    bad = resolve({**BASE, "requests": [{"prompt": "b", "overrides": {"sync.weight": -1}}]})
    with pytest.raises(ConfigError, match="sync.weight"):
        request_spec(bad, 0)


def test_validation_does_not_load_models():
    # the denoiser path does not exist: validation still passes because it never loads weights
    assert validate(compose(BASE)).config.denoiser.pretrained == "/nonexistent/model"


def test_switching_a_plugin_replaces_its_section(tmp_path):
    """The old plugin's options (lpips' net=alex) must not leak into the newly named one (style's own defaults)."""
    spec = {**BASE, "sync": {"loss": {"name": "lpips", "net": "alex", "backbone": "random"}}}
    by_override = resolve(spec, ["sync.loss.name=style"]).config.sync.loss
    assert (by_override.name, by_override.net, by_override.backbone) == ("style", "vgg16", "pretrained")
    # order of overrides does not matter: options given next to the new name are kept
    kept = resolve(spec, ["sync.loss.backbone=random", "sync.loss.name=style"]).config.sync.loss
    assert (kept.backbone, kept.net) == ("random", "vgg16")
    # same name: options merge key by key as before
    assert resolve(spec, ["sync.loss.net=vgg"]).config.sync.loss.backbone == "random"
    (tmp_path / "base.yaml").write_text(OmegaConf.to_yaml(spec))
    (tmp_path / "child.yaml").write_text("extends: base.yaml\nsync:\n  loss:\n    name: style\n")
    assert resolve(tmp_path / "child.yaml").config.sync.loss.net == "vgg16"


def test_list_items_can_be_overridden_by_index():
    spec = {**BASE, "requests": [{"prompt": "a"}, {"prompt": "b"}]}
    c = resolve(spec, ["requests.1.seed=7", "requests.0.inputs.control=x.png"]).config
    assert c.requests[1].seed == 7 and c.requests[0].inputs.control == "x.png"
    err = _err(spec, ["requests.2.seed=1"])
    assert err.key == "requests.2.seed" and "no item '2' (indices 0..1)" in str(err)


def test_per_request_override_can_switch_plugin():
    from syncengine.config import request_spec

    spec = {**BASE, "sync": {"loss": {"name": "lpips", "net": "alex"}},
            "requests": [{"prompt": "a", "overrides": {"sync.loss.name": "style"}}]}
    loss = request_spec(resolve(spec), 0).config.sync.loss
    assert (loss.name, loss.net) == ("style", "vgg16")


def test_api_prompts_and_seeds():
    from syncengine.api import resolve_run

    r = resolve_run(BASE, ["requests.1.name=second"], prompts=["a beach", {"prompt": "a forest"}], seeds=[3, 4])
    assert [(q.prompt, q.seed) for q in r.config.requests] == [("a beach", 3), ("a forest", 4)]
    assert r.config.requests[1].name == "second"  # overrides apply after the prompts
    with pytest.raises(SyncEngineError, match="2 seeds for 3 prompts"):
        resolve_run(BASE, prompts=["a", "b", "c"], seeds=[1, 2])
    with pytest.raises(SyncEngineError, match="seeds given without prompts"):
        resolve_run(BASE, seeds=[1])


def test_unknown_key_inside_a_list_of_options_names_its_index():
    spec = {**BASE, "canvas": {"height": 256, "width": 512},
            "tiler": {"name": "regions", "window": 256, "stride": 128,
                      "regions": [{"prompt": "a"}, {"prompt": "b", "mask": {"foo": 1}}]}}
    err = _err(spec)
    assert err.key == "tiler.regions.1.mask.foo" and "valid keys" in str(err)


def test_x0_merging_needs_ddim_before_any_model_loads():
    err = _err({**BASE, "merger": {"name": "average", "target": "x0"}}, ["sampler.scheduler=euler"])
    assert err.key == "sampler.scheduler" and "ddim" in str(err)
    assert resolve({**BASE, "merger": {"name": "average", "target": "x0"}}).config.merger.target == "x0"


def test_one_line_reasons_never_fail_on_empty_messages():
    from syncengine.errors import one_line

    assert one_line(OSError("first\nsecond")) == "first"
    assert one_line(ValueError("x" * 500), 10) == "x" * 10
    assert one_line(OSError()) == "OSError"  # str(exc) == "": no IndexError while reporting an error
    assert one_line(ValueError("  \n  ")) == "ValueError"


def test_closed_sets_name_the_allowed_values():
    """Literal fields: OmegaConf checks them while typing; the message lists the values (and the other type taken)."""
    err = _err(BASE, ["runtime.shard=pixels"])
    assert err.key == "runtime.shard" and str(err).endswith("'pixels' is not one of windows, requests")
    err = _err(BASE, ["sync.anchor=middle"])
    assert err.key == "sync.anchor" and str(err).endswith("'middle' is not one of center, first, last or a view index")
    assert _err(BASE, ["sync.anchor=true"]).key == "sync.anchor"  # a bool is not a view index
    c = resolve(BASE, ["sync.anchor=2", "runtime.shard=requests"]).config
    assert (c.sync.anchor, c.runtime.shard) == (2, "requests")
    assert resolve(BASE, ["sync.anchor=last"]).config.sync.anchor == "last"


def test_resolved_spec_is_plain_yaml_and_json():
    import json

    data = resolve(BASE).to_container()
    assert json.loads(json.dumps(data))["runtime"]["shard"] == "windows"
    assert type(data["sync"]["anchor"]) is str and "!!python" not in OmegaConf.to_yaml(data)


def test_extends_in_a_mapping_and_naming_another_plugin_than_the_default(tmp_path):
    """A mapping follows ``extends`` as a file does; a spec naming another plugin than the schema's default keeps
    none of the default's options (LPIPS' ``net: vgg`` would be an unknown value for the style loss)."""
    (tmp_path / "base.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(BASE)))
    r = resolve({"extends": str(tmp_path / "base.yaml"), "sync": {"weight": 3, "loss": {"name": "style"}}})
    assert (r.config.canvas.width, r.config.sync.weight, r.config.sync.loss.net) == (1024, 3.0, "vgg16")
