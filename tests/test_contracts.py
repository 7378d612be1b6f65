"""Abstract methods of the plugin bases are enforced: an incomplete plugin fails when built, naming what it lacks."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Union

import pytest
import torch

from syncengine.denoiser import Denoiser
from syncengine.merger import Merger
from syncengine.plugin import Plugin
from syncengine.sync_loss import SyncLoss
from syncengine.tiler import Tiler


def test_tiler_without_validate_cannot_be_built():
    class NoValidate(Tiler):
        def views(self, canvas):
            return []

    with pytest.raises(TypeError) as info:
        NoValidate()
    msg = str(info.value)
    assert "NoValidate" in msg and "validate" in msg and "views" not in msg and "\n" not in msg


@pytest.mark.parametrize("base, missing", [
    (Tiler, "validate, views"),
    (Merger, "window_weight"),
    (Denoiser, "decode, encode_prompt, make_scheduler, predict"),
    (SyncLoss, "forward, prepare_target"),
])
def test_every_base_names_its_missing_methods(base, missing):
    empty = type("Empty", (base,), {})
    with pytest.raises(TypeError, match=f"does not implement {missing}"):
        empty()


def test_sync_loss_is_both_an_abc_and_a_module():
    class Complete(SyncLoss):
        def prepare_target(self, anchor):
            return anchor

        def forward(self, images, target):
            return (images - target).flatten(1).pow(2).mean(1)

    loss = Complete()
    assert isinstance(loss, torch.nn.Module) and isinstance(loss, Plugin)
    assert loss(torch.zeros(2, 3, 4, 4), torch.ones(1, 3, 4, 4)).shape == (2,)


def test_builtin_plugins_are_complete():
    from syncengine import registry
    from syncengine.plugin import missing_methods

    for info in registry.list_plugins():
        if info.distribution.startswith("syncengine "):
            cls = info.load()
            assert not missing_methods(cls), (info.kind, info.name)


@dataclass
class Options:
    mode: Literal["a", "b"] = "a"
    anchor: Union[int, Literal["first"]] = "first"
    maybe: Optional[Literal["x"]] = None


class Choosy(Plugin):
    Config = Options
    section = "tiler"


def test_closed_sets_are_checked_for_plugins_built_without_a_spec():
    """A spec's Literal fields are checked where OmegaConf types them; the Plugin base applies the same rule (same
    Literal, same wording) to a plugin built directly from a config object."""
    from syncengine.errors import ConfigError
    from syncengine.merger import MergerConfig
    from syncengine_mergers.weighted import AverageMerger, GaussianConfig, GaussianMerger

    with pytest.raises(ConfigError) as info:
        GaussianMerger(GaussianConfig(target="eps"))
    assert info.value.key == "merger.target" and str(info.value).endswith("'eps' is not one of xt, x0")
    assert AverageMerger(MergerConfig(target="x0")).target == "x0"

    Choosy(Options(mode="b", anchor=3))
    for bad, key in ((Options(mode="c"), "tiler.mode"), (Options(anchor="last"), "tiler.anchor"),
                     (Options(maybe="y"), "tiler.maybe")):
        with pytest.raises(ConfigError) as info:
            Choosy(bad)
        assert info.value.key == key
