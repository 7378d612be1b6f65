"""Bad input is caught at validation, before any model loads, as one line naming the key (or file and line) and the
fix; the CLI exits 2 with ``error: ...`` and no traceback. User text (prompts, names, paths) is never interpolated."""
from __future__ import annotations

import json

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from syncengine.api import resolve_run
from syncengine.cli import main
from syncengine.config import request_spec, resolve, validate
from syncengine.errors import ConfigError, SyncEngineError
from syncengine.pipeline import requests_of
from syncengine.user_text import literal

BASE = {
    "canvas": {"height": 512, "width": 1024},
    "denoiser": {"name": "stable-diffusion", "pretrained": "/nonexistent/model"},  # never loaded by validation
    "requests": [{"prompt": "a photo"}],
    "runtime": {"accelerator": "cpu"},
}
HOME = "/sentinel-home-value"


@pytest.fixture(autouse=True)
def _home(monkeypatch):
    monkeypatch.setenv("HOME", HOME)


@pytest.fixture
def spec_file(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(BASE))
    return path


def _error(exc_type=SyncEngineError, *args, **kwargs) -> str:
    with pytest.raises(exc_type) as info:
        resolve_run(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def _cli_error(capsys, *argv) -> str:
    """The CLI's one error line for ``argv`` (exit 2, no traceback)."""
    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


# ---------------------------------------------------------------------------------------------- 1. literal user text

TEXTS = ["a photo of ${oc.env:HOME}", "${x}", "at ${now:%H} o'clock", "${a:${b}} nested", "price $5 {not} $ {x}",
         "back\\slash \\${y} \\\\${z} end\\\\", "\\"]


def _literal_everywhere(resolved, text: str, index: int = 0) -> None:
    """The text is literal in what the pipeline reads, in the sidecar's resolved spec, and after validating again."""
    assert requests_of(resolved)[index].prompt == text
    assert resolved.to_container()["requests"][index]["prompt"] == text
    assert request_spec(resolved, index).to_container()["requests"][index]["prompt"] == text
    assert requests_of(validate(resolved.config))[index].prompt == text  # validating twice changes nothing
    assert HOME not in json.dumps(resolved.to_container())


@pytest.mark.parametrize("text", TEXTS)
def test_prompts_file_text_is_literal(tmp_path, text):
    path = tmp_path / "p.jsonl"
    request = {"prompt": text, "negative_prompt": text, "name": "n" + text.replace("/", ""), "seed": 1,
               "inputs": {"control": text, "list": [text]}, "overrides": {"sync.weight": 3}}
    path.write_text(json.dumps(request) + "\n")
    resolved = resolve_run(BASE, prompts=path)
    _literal_everywhere(resolved, text)
    req = requests_of(resolved)[0]
    assert (req.negative_prompt, req.name, req.inputs["control"]) == (text, request["name"], text)
    assert list(req.inputs["list"]) == [text]


@pytest.mark.parametrize("text", TEXTS)
def test_api_prompts_are_literal(text):
    _literal_everywhere(resolve_run(BASE, prompts=["plain", {"prompt": text, "negative_prompt": text}]), text, 1)


# In spec YAML and on the command line the text is OmegaConf text whose interpolations are not resolved: `\${` is
# still an escaped `${` there (what OmegaConf would show), so `syncengine config` output reads back unchanged.
SPEC_TEXTS = ["a photo of ${oc.env:HOME}", "${x}", "at ${now:%H}", "${a:${b}} nested", "$5 {x}"]


@pytest.mark.parametrize("text", SPEC_TEXTS)
def test_spec_and_command_line_text_is_literal(tmp_path, text):
    spec = {**BASE, "requests": [{"prompt": text, "name": "x" + text.replace("/", ""), "inputs": {"control": text}}]}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(spec))
    for resolved in (resolve(path), resolve(spec), resolve(BASE, [f"requests.0.prompt={text}"])):
        _literal_everywhere(resolved, text)
    req = requests_of(resolve(path))[0]
    assert req.inputs["control"] == text and req.name == spec["requests"][0]["name"]
    assert requests_of(resolve(BASE, ["requests.0.prompt=a \\${y}"]))[0].prompt == "a ${y}"  # OmegaConf's escape


@pytest.mark.parametrize("text", SPEC_TEXTS)
def test_config_command_output_is_literal_and_round_trips(tmp_path, capsys, spec_file, text):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": text}) + "\n")
    assert main(["config", str(spec_file), "--prompts", str(prompts), f"requests.0.negative_prompt={text}"]) == 0
    printed = capsys.readouterr().out
    assert HOME not in printed
    again = tmp_path / "again.yaml"
    again.write_text(printed)
    req = requests_of(resolve(again))[0]
    assert (req.prompt, req.negative_prompt) == (text, text)


def test_interpolation_in_spec_keys_still_works(tmp_path, monkeypatch):
    monkeypatch.setenv("SE_OUT", "/tmp/se-out")
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({**BASE, "canvas": {"height": 512, "width": "${canvas.height}"},
                                    "runtime": {"accelerator": "cpu", "output_dir": "${oc.env:SE_OUT}/x"}}))
    resolved = resolve(path)
    assert resolved.config.canvas.width == 512 and resolved.to_container()["runtime"]["output_dir"] == "/tmp/se-out/x"
    assert resolve(BASE, ["canvas.width=${canvas.height}"]).config.canvas.width == 512  # command line too


@pytest.mark.parametrize("value, needle", [("${nope}", "nope"), ("${now:%H}", "now")])
def test_bad_interpolation_in_a_spec_key_is_a_one_line_error(value, needle, capsys, spec_file):
    line = _cli_error(capsys, "config", str(spec_file), f"runtime.output_dir={value}")
    assert "runtime.output_dir" in line and needle in line and "\\${" in line


def test_literal_escapes_exactly():
    for text in TEXTS:
        assert OmegaConf.create({"t": literal(text)}).t == text


# ------------------------------------------------------------------------------------------ 2. non-finite numbers

@pytest.mark.parametrize("overrides, key", [
    (["sampler.guidance_scale=nan"], "sampler.guidance_scale"),
    (["sampler.guidance_scale=inf"], "sampler.guidance_scale"),
    (["sampler.guidance_scale=.inf"], "sampler.guidance_scale"),
    (["sampler.guidance_scale=-inf"], "sampler.guidance_scale"),
    (["sync.weight=inf"], "sync.weight"),
    (["sync.weight=.nan"], "sync.weight"),
    (["sync.decay=nan"], "sync.decay"),
    (["runtime.max_megapixels=inf"], "runtime.max_megapixels"),
    (["merger.name=gaussian", "merger.sigma=nan"], "merger.sigma"),
    (["denoiser.sync_decode_scale=inf"], "denoiser.sync_decode_scale"),
    (["tiler.name=regions", "tiler.feather=nan"], "tiler.feather"),
    (["tiler.name=regions", "tiler.regions=[{prompt: a, guidance_scale: .nan}]"], "tiler.regions.0.guidance_scale"),
    (["sampler.scheduler_options={beta_end: .inf}"], "sampler.scheduler_options.beta_end"),
    (["requests.0.overrides={sync.weight: .nan}"], "requests.0.overrides.sync.weight"),
    (["requests.0.inputs={scale: .inf}"], "requests.0.inputs.scale"),
])
def test_non_finite_numbers_are_rejected(overrides, key):
    with pytest.raises(ConfigError) as info:
        resolve(BASE, overrides)
    assert info.value.key == key and "finite" in str(info.value), str(info.value)


def test_non_finite_number_cli(capsys, spec_file):
    line = _cli_error(capsys, "generate", str(spec_file), "sampler.guidance_scale=nan")
    assert "sampler.guidance_scale" in line and "finite" in line


# ----------------------------------------------------------------------------------------------------------- 3. seeds

@pytest.mark.parametrize("seed", [1.7, 2.0, "x", True, False, -1, 2**63, 2**64, [1], None, float("nan")])
def test_bad_seeds_in_a_spec(seed):
    with pytest.raises(ConfigError) as info:
        resolve({**BASE, "requests": [{"prompt": "a"}, {"prompt": "b", "seed": seed}]})
    assert info.value.key == "requests.1.seed" and "2**63" in str(info.value), str(info.value)


@pytest.mark.parametrize("seed", [0, 1, 2**63 - 1, "5"])
def test_good_seeds(seed):
    assert requests_of(resolve({**BASE, "requests": [{"prompt": "a", "seed": seed}]}))[0].seed == int(seed)


@pytest.mark.parametrize("seeds, needle", [
    ([1.7], "seeds[0]: must be an integer"),
    (["x"], "seeds[0]: must be an integer"),
    ([True], "seeds[0]: must be an integer"),
    ([2**63], "seeds[0]: must be an integer"),
    ([-3], "seeds[0]: must be an integer"),
    (5, "seeds is int 5; give a list"),
    ("5", "seeds is str '5'; give a list"),
    ({"a": 1}, "seeds is dict"),
])
def test_bad_api_seeds(seeds, needle):
    assert needle in _error(SyncEngineError, BASE, prompts=["a"], seeds=seeds)


def test_api_seed_one_point_seven_is_not_one():
    with pytest.raises(ConfigError):
        resolve_run(BASE, prompts=["a"], seeds=[1.7])
    assert requests_of(resolve_run(BASE, prompts=["a"], seeds=[7]))[0].seed == 7


# ----------------------------------------------------------------------------------- 4. errors at the right place

@pytest.mark.parametrize("bad, field, needle", [
    ({"seed": "x"}, "seed", "must be an integer"),
    ({"seed": 2**63}, "seed", "must be an integer"),
    ({"seed": 1.5}, "seed", "must be an integer"),
    ({"prompt": ""}, "prompt", "empty prompt"),
    ({"prompt": None}, "prompt", "empty prompt"),
    ({"prompt": "  \t"}, "prompt", "empty prompt"),
    ({"name": "a/b"}, "name", "not a file name"),
    ({"name": "dup"}, "name", "duplicate"),
    ({"inputs": 5}, "inputs", ""),
    ({"overrides": {"sync.weight": float("inf")}}, "overrides.sync.weight", "finite"),
])
def test_prompts_file_errors_name_file_and_line(tmp_path, capsys, spec_file, bad, field, needle):
    path = tmp_path / "prompts.jsonl"
    lines = ['{"prompt": "one", "name": "dup"}', "# a comment", json.dumps({"prompt": "three", **bad}), '"four"']
    path.write_text("\n".join(lines) + "\n")
    msg = _error(SyncEngineError, BASE, prompts=path)
    assert msg.startswith(f"{path}:3: {field}: ") and needle in msg, msg
    line = _cli_error(capsys, "generate", str(spec_file), "--prompts", str(path))
    assert line.startswith(f"error: {path}:3: {field}: "), line


def test_errors_in_api_prompts_name_their_index():
    assert _error(SyncEngineError, BASE, prompts=["a", {"prompt": "b", "seed": -1}]).startswith("prompts[1]: seed: ")
    assert _error(SyncEngineError, BASE, prompts=["a", "  "]).startswith("prompts[1]: prompt: empty prompt")


def test_an_override_error_names_the_override_not_the_file(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('"a"\n"b"\n')
    with pytest.raises(ConfigError) as info:
        resolve_run(BASE, ["requests.1.seed=-1"], prompts=path)
    assert info.value.key == "requests.1.seed" and str(info.value).startswith("config error at 'requests.1.seed'")


@pytest.mark.parametrize("index", [0, 1, 2])
def test_request_errors_in_a_spec_name_the_right_index(index):
    requests = [{"prompt": "a", "seed": 1}, {"prompt": "b", "seed": 2}, {"prompt": "c", "seed": 3}]
    requests[index] = {**requests[index], "seed": "x"}
    with pytest.raises(ConfigError) as info:
        resolve({**BASE, "requests": requests})
    assert info.value.key == f"requests.{index}.seed"
    requests[index] = {"prompt": "c", "sed": 3}
    with pytest.raises(ConfigError) as info:
        resolve({**BASE, "requests": requests})
    assert info.value.key == f"requests.{index}.sed" and "valid keys" in str(info.value)


# ------------------------------------------------------------------------------- 5. one line instead of tracebacks

@pytest.mark.parametrize("override, key", [
    ("canvas.width=[1,", "canvas.width"),
    ("tiler.window={a: 1", "tiler.window"),
    ("requests.0.prompt='unclosed", "requests.0.prompt"),
    ("runtime.devices=abc", "runtime.devices"),
    ("runtime.devices=0", "runtime.devices"),
    ("runtime.devices=-2", "runtime.devices"),
    ("runtime.devices=[]", "runtime.devices"),
    ("runtime.devices=[0,x]", "runtime.devices"),
    ("runtime.devices=true", "runtime.devices"),
    ("runtime.precision=99-mixed", "runtime.precision"),
    ("runtime.strategy=ddpp", "runtime.strategy"),
    ("runtime.accelerator=quantum", "runtime.accelerator"),
    ("runtime.max_megapixels=0", "runtime.max_megapixels"),
])
def test_cli_one_line_errors(capsys, spec_file, override, key):
    line = _cli_error(capsys, "generate", str(spec_file), override)
    assert f"'{key}'" in line, line


@pytest.mark.skipif(torch.cuda.is_available() or torch.backends.mps.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("override", ["runtime.accelerator=gpu", "runtime.accelerator=cuda"])
def test_gpu_accelerator_without_a_gpu(capsys, spec_file, override):
    line = _cli_error(capsys, "generate", str(spec_file), override)
    assert "runtime.accelerator" in line and "cpu" in line


@pytest.mark.parametrize("override", ["runtime.devices=2", "runtime.devices='3'", "runtime.devices=auto",
                                      "runtime.precision=bf16-mixed", "runtime.precision=32", "runtime.strategy=ddp"])
def test_valid_runtime_values(override):
    resolve(BASE, [override])


def test_binary_prompts_file(tmp_path, capsys, spec_file):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b"\x80\x81\xfe\x00{}" + bytes(range(256)))
    line = _cli_error(capsys, "generate", str(spec_file), "--prompts", str(path))
    assert str(path) in line and "UTF-8" in line


@pytest.mark.parametrize("kwargs, needle", [
    ({"spec": 123}, "spec is int 123"),
    ({"spec": BASE, "prompts": [1]}, "prompts[0] is int 1"),
    ({"spec": BASE, "prompts": [None]}, "prompts[0] is NoneType"),
    ({"spec": BASE, "prompts": 7}, "prompts is int 7"),
    ({"spec": BASE, "prompts": []}, "prompts is empty"),
    ({"spec": BASE, "prompts": ["a"], "seeds": ["x"]}, "seeds[0]"),
    ({"spec": BASE, "prompts": ["a"], "seeds": 5}, "seeds is int 5"),
    ({"spec": BASE, "overrides": "sync.weight=1"}, "give a list of 'key=value'"),
    ({"spec": BASE, "overrides": [3]}, "override 3 is not a 'key=value' string"),
])
def test_api_wrong_types(kwargs, needle):
    assert needle in _error(SyncEngineError, **kwargs)


def test_generate_with_a_wrong_type_is_one_line():
    from syncengine.api import generate

    with pytest.raises(SyncEngineError, match="spec is int 123"):
        generate(123)


@pytest.mark.parametrize("prompt", ["", None, " ", "\n\t"])
def test_empty_prompt_message(prompt):
    with pytest.raises(ConfigError) as info:
        resolve({**BASE, "requests": [{"prompt": "a"}, {"prompt": prompt}]})
    assert info.value.key == "requests.1.prompt" and "empty prompt; give the text" in str(info.value)
    with pytest.raises(ConfigError, match="empty prompt"):
        resolve({**BASE, "requests": [{"seed": 1}]})  # no prompt at all


@pytest.mark.parametrize("text", ["a beach", "mountains"])
def test_prompts_string_that_is_not_a_file(text):
    msg = _error(SyncEngineError, BASE, prompts=text)
    assert "is not a file" in msg and f"prompts=[{text!r}]" in msg


def test_missing_prompts_file_is_named(tmp_path):
    assert "not found" in _error(SyncEngineError, BASE, prompts=str(tmp_path / "p.jsonl"))


# ------------------------------------------------------------------------------------------ 6. silently accepted

@pytest.mark.parametrize("scheduler, option, valid", [
    ("ddim", "timestep_spacin", "timestep_spacing"),
    ("euler", "use_karras", "use_karras_sigmas"),
    ("dpm++_sde", "solver_ordr", "solver_order"),
    ("DDPMScheduler", "variance", "variance_type"),
])
def test_unknown_scheduler_options(scheduler, option, valid):
    with pytest.raises(ConfigError) as info:
        resolve(BASE, [f"sampler.scheduler={scheduler}", f"sampler.scheduler_options.{option}=1"])
    assert info.value.key == f"sampler.scheduler_options.{option}" and repr(valid) in str(info.value)


def test_known_scheduler_options_pass():
    r = resolve(BASE, ["sampler.scheduler=euler", "sampler.scheduler_options.timestep_spacing=trailing"])
    assert r.config.sampler.scheduler_options.timestep_spacing == "trailing"


@pytest.mark.parametrize("scale", [-1, -0.5, -7.5])
def test_negative_guidance_is_rejected(scale):
    with pytest.raises(ConfigError) as info:
        resolve(BASE, [f"sampler.guidance_scale={scale}"])
    assert info.value.key == "sampler.guidance_scale" and "<= 1 turn guidance off" in str(info.value)


@pytest.mark.parametrize("scale", [0, 1, 7.5])
def test_guidance_from_zero_is_accepted(scale):
    assert resolve(BASE, [f"sampler.guidance_scale={scale}"]).config.sampler.guidance_scale == scale


# ------------------------------------------------------------------------------------------------- 7. huge canvases

def test_huge_canvas_names_the_override(capsys, spec_file):
    line = _cli_error(capsys, "generate", str(spec_file), "canvas.width=1000000")
    assert "canvas 512x1000000 = 512 MP is above runtime.max_megapixels=100" in line
    assert "runtime.max_megapixels=512" in line


@pytest.mark.parametrize("height, width, limit, ok", [
    (512, 1024, 0.5, False), (512, 512, 0.5, True), (8192, 8192, 100, True), (512, 131072, 100, True),
    (512, 200704, 100, False), (512, 1000000, 600, True),
])
def test_max_megapixels(height, width, limit, ok):
    overrides = [f"canvas.height={height}", f"canvas.width={width}", f"runtime.max_megapixels={limit}"]
    if ok:
        assert resolve(BASE, overrides).config.runtime.max_megapixels == limit
    else:
        with pytest.raises(ConfigError, match="raise it if you mean it"):
            resolve(BASE, overrides)


@pytest.mark.parametrize("text", SPEC_TEXTS)
def test_plugin_text_fields_are_literal_like_requests_text(text):
    """A plugin Config names its user text in ``literal_text`` (the regions tiler: its prompts); the request-text
    rule then applies there too: from the spec, key=value, a request's overrides, and after validating again."""
    tiler = {"name": "regions", "window": 64, "stride": 32, "background_prompt": text,
             "regions": [{"mask": {"rect": [0, 0, 64, 64]}, "prompt": text}]}
    spec = {**BASE, "tiler": tiler, "requests": [{"prompt": "a", "overrides": {"tiler.background_prompt": "o" + text}}]}
    for resolved in (resolve(spec), resolve({**spec, "tiler": {**tiler, "background_prompt": None}},
                                            [f"tiler.background_prompt={text}"])):
        for again in (resolved, validate(resolved.config)):
            options = again.plugin_configs["tiler"]
            assert (options.background_prompt, options.regions[0].prompt) == (text, text)
            assert again.to_container()["tiler"]["background_prompt"] == text
        assert request_spec(resolved, 0).plugin_configs["tiler"].background_prompt == "o" + text
        assert HOME not in json.dumps(resolved.to_container())
    assert resolve(spec, ["tiler.background_prompt=a \\${y}"]).plugin_configs["tiler"].background_prompt == "a ${y}"
