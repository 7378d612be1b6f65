"""Tolerances for two runs that do the same arithmetic in another order, measured on the machine that runs the test.

Summing the same float32 contributions in another order (other ranks, other batches, another CPU's kernels) moves
each sum by a few units in the last place; SyncDiffusion's gradient step then amplifies such differences over the
steps, by an amount that depends on the model, the steps and the CPU. A fixed tolerance taken from one machine
therefore fails on another (1e-4 failed on an AVX-512 CPU). Instead, a test measures this machine's amplification:
the same run once plainly and once with every merged sum moved by one ulp at random (:class:`LastBitJitter`, in the
one place the sampler sums views: its collective's all-reduce). The two runs under comparison must agree within a
number of such ulps:

- ``REORDER_ULPS``: the same kernels, sums reordered (window sharding: two partial canvases, then the all-reduce);
- ``KERNEL_ULPS``: other kernels (another batch size, one view at a time, diffusers' own loop): each convolution or
  matmul output is a sum of K products (K = channels x kernel area, about 300 in the tiny models) that another kernel
  may round differently, up to K ulps and typically sqrt(K).

Measured (tiny model, 2-3 steps with sync, ATen default/AVX2/AVX-512 kernels and oneDNN SSE4.1/AVX2/AVX-512): sharded
vs one process 0-3.3 one-ulp distances; another batch size 4.8-8.1; the per-window reference 44-62.
"""
from __future__ import annotations

from typing import Callable

import torch

from syncengine.collective import Collective

REORDER_ULPS = 8
KERNEL_ULPS = 256
FLOOR = 1e-6  # below this a difference is the rounding of the final values themselves


class LastBitJitter(Collective):
    """A single-process collective whose all-reduce moves every summed value by one ulp, up or down at random (a
    fixed seed): what summing the same contributions in another order does, at most a few times over."""

    def __init__(self, seed: int = 1234) -> None:
        super().__init__()
        self.generator = torch.Generator().manual_seed(seed)

    def all_reduce_(self, tensors) -> None:
        for t in tensors:
            up = torch.randint(0, 2, t.shape, generator=self.generator).bool().to(t.device)
            t.copy_(torch.nextafter(t, torch.where(up, torch.inf, -torch.inf).to(t.dtype)))


def distance(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def reorder_tolerance(run: Callable[[Collective], torch.Tensor], ulps: int = REORDER_ULPS) -> float:
    """``ulps`` times how far one ulp on every merged sum moves ``run``'s result on this machine."""
    return max(FLOOR, ulps * distance(run(LastBitJitter()), run(Collective())))


def assert_reordered_close(got: torch.Tensor, expected: torch.Tensor, tolerance: float, what: str = "") -> None:
    d = distance(got, expected)
    assert d <= tolerance, f"{what}: differs by {d:.3g} > {tolerance:.3g} (measured: a one-ulp change times ulps)"
