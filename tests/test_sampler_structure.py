"""The sampler's structure keeps its contracts: the sidecar's stats keys, one rule per check, the x0 <-> model output
conversions inverse to each other."""
from __future__ import annotations

import pytest
import torch

from syncengine.config import resolve
from syncengine.errors import ConfigError
from syncengine.merger import Merger, MergerConfig
from syncengine.parameterization import NoiseLevel, model_output_of, predicted_x0
from syncengine.pipeline import Pipeline
from syncengine.sampler import JointSampler, SamplerOptions
from syncengine.sync import SyncSchedule

STATS_KEYS = ["unet_views", "sync_views", "decodes", "sync_steps", "views", "owned_views", "seconds_sync",
              "seconds_denoise", "all_reduce_calls", "all_reduce_bytes", "broadcast_calls", "broadcast_bytes",
              "agreement_calls", "seconds_all_reduce", "seconds_broadcast"]


class _Ones(Merger):
    def window_weight(self, view):
        return torch.ones(1, 1, *view.latent_size)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample", "flow_prediction"])
def test_model_output_of_inverts_predicted_x0(prediction_type):
    g = torch.Generator().manual_seed(0)
    x_t, x0 = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64).unbind(0)
    a = torch.tensor(0.3, dtype=torch.float64)
    a = NoiseLevel.flow(a) if prediction_type == "flow_prediction" else NoiseLevel.diffusion(a)
    out = model_output_of(x0, x_t, a, prediction_type)
    torch.testing.assert_close(predicted_x0(out, x_t, a, prediction_type), x0)


def test_x0_target_needs_ddim_for_direct_users():
    with pytest.raises(ConfigError, match="sampler.scheduler"):
        JointSampler(None, [], _Ones(MergerConfig(target="x0")), None, SyncSchedule(0.0),
                     SamplerOptions(scheduler="euler"))
    JointSampler(None, [], _Ones(MergerConfig(target="x0")), None, SyncSchedule(0.0), SamplerOptions(scheduler="ddim"))


def test_every_merger_checks_its_target():
    with pytest.raises(ConfigError, match="merger.target"):
        _Ones(MergerConfig(target="eps"))


def test_stats_keys_and_types(tiny_spec):
    spec = tiny_spec(sync={"weight": 5.0}, sampler={"steps": 1, "view_batch_size": 4})
    stats = Pipeline(resolve(spec)).run(0).stats
    assert list(stats) == STATS_KEYS
    assert all(isinstance(stats[k], float) for k in STATS_KEYS if k.startswith("seconds_"))
    # 4 views, one sync step: the anchor's target, 3 synced renders, 4 guided predictions
    assert {k: stats[k] for k in ("unet_views", "sync_views", "decodes", "sync_steps", "views", "owned_views")} == {
        "unet_views": 8, "sync_views": 3, "decodes": 4, "sync_steps": 1, "views": 4, "owned_views": 4}
