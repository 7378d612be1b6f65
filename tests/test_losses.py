"""Sync losses load their backbones through torchvision's real cache path and compute what they claim."""
from __future__ import annotations

import pytest
import torch

from syncengine.errors import ModelNotFoundError
from syncengine_losses.lpips_loss import LPIPSConfig, LPIPSLoss
from syncengine_losses.style_loss import StyleConfig, StyleLoss, gram


def _images(n=3, size=64, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lpips_matches_the_lpips_package(with_torch_home, net):
    import lpips

    ours = LPIPSLoss(LPIPSConfig(net=net))
    reference = lpips.LPIPS(net=net, verbose=False).eval()  # loads the same cached torchvision file
    x, anchor = _images(3), _images(1, seed=1)
    expected = reference(x, anchor.expand_as(x)).reshape(-1)
    got = ours(x, ours.prepare_target(anchor))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert torch.allclose(ours(anchor, ours.prepare_target(anchor)), torch.zeros(1), atol=1e-6)


def test_style_loss_is_zero_for_identical_and_positive_otherwise(with_torch_home):
    loss = StyleLoss(StyleConfig())
    x = _images(2)
    target = loss.prepare_target(x[:1])
    values = loss(x, target)
    assert values.shape == (2,) and values[0].abs() < 1e-10 and values[1] > 0


def test_gram_matrix():
    f = torch.arange(8.0).view(1, 2, 2, 2)
    g = gram(f)
    flat = f.view(2, 4)
    torch.testing.assert_close(g[0], flat @ flat.T / 8)


def test_missing_backbone_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # empty cache; downloads fail offline
    import urllib.request

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(ModelNotFoundError) as info:
        LPIPSLoss(LPIPSConfig(net="alex"))
    msg = str(info.value)
    assert "alexnet-owt-7be5be79.pth" in msg and str(tmp_path) in msg and "\n" not in msg
    with pytest.raises(ModelNotFoundError, match="vgg16-397923af.pth"):
        StyleLoss(StyleConfig())


def test_random_backbone_is_explicit_and_reproducible():
    a, b = LPIPSLoss(LPIPSConfig(net="alex", backbone="random")), LPIPSLoss(LPIPSConfig(net="alex", backbone="random"))
    x, anchor = _images(2), _images(1, seed=1)
    torch.testing.assert_close(a(x, a.prepare_target(anchor)), b(x, b.prepare_target(anchor)))


def test_bad_loss_options():
    from syncengine.errors import ConfigError

    with pytest.raises(ConfigError, match="sync.loss.net"):
        LPIPSLoss(LPIPSConfig(net="resnet"))
    with pytest.raises(ConfigError, match="sync.loss.layers"):
        StyleLoss(StyleConfig(layers=["relu9_9"], backbone="random"))
