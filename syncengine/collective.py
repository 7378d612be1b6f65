"""How a sampler shares work between processes. The single-process default does nothing.

Window sharding (``runtime.shard: windows``) swaps in :class:`TorchDistributedCollective`: every rank owns a balanced
share of the views, merges its contributions into canvas-sized sums, and the ranks all-reduce those sums once per
step. The anchor's target is computed by its owner and broadcast.
"""
from __future__ import annotations

import time
from typing import Any, Sequence, TypeVar

import torch

T = TypeVar("T")


class Collective:
    """Single process: owns every view; reductions and broadcasts are identities."""

    rank: int = 0
    world_size: int = 1

    def __init__(self) -> None:
        self.stats: dict[str, Any] = {}
        self.reset_stats()

    def reset_stats(self) -> None:
        """Zero the counters; the Lightning module calls it before each request, so a sidecar's ``stats`` count that
        request's collectives only. ``seconds_*`` is wall time inside the collective: transfer plus waiting for the
        slowest rank (load imbalance shows up there)."""
        self.stats = {"all_reduce_calls": 0, "all_reduce_bytes": 0, "broadcast_calls": 0, "broadcast_bytes": 0,
                      "seconds_all_reduce": 0.0, "seconds_broadcast": 0.0}

    def owned(self, items: Sequence[T]) -> list[T]:
        return list(items)

    def owner_of(self, position: int, count: int) -> int:
        return 0

    def all_reduce_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Sum tensors over ranks in place."""

    def broadcast_(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        """Overwrite ``tensor`` on every rank with rank ``src``'s (same shape everywhere)."""
        return tensor


def balanced_slices(count: int, world_size: int) -> list[range]:
    """Contiguous, balanced shares of ``count`` items (sizes differ by at most one)."""
    base, extra = divmod(count, world_size)
    out, start = [], 0
    for r in range(world_size):
        size = base + (1 if r < extra else 0)
        out.append(range(start, start + size))
        start += size
    return out


class TorchDistributedCollective(Collective):
    """``torch.distributed`` collectives over the default process group (gloo on CPU, NCCL on GPUs)."""

    def __init__(self) -> None:
        super().__init__()
        import torch.distributed as dist

        self._dist = dist
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()

    def owned(self, items: Sequence[T]) -> list[T]:
        share = balanced_slices(len(items), self.world_size)[self.rank]
        return [items[i] for i in share]

    def owner_of(self, position: int, count: int) -> int:
        for r, share in enumerate(balanced_slices(count, self.world_size)):
            if position in share:
                return r
        raise IndexError(position)

    def all_reduce_(self, tensors: Sequence[torch.Tensor]) -> None:
        # One flat buffer: one collective per step, whatever the number of merged quantities.
        t0 = time.perf_counter()
        flat = torch.cat([t.reshape(-1) for t in tensors])
        self._dist.all_reduce(flat)
        self.stats["all_reduce_calls"] += 1
        self.stats["all_reduce_bytes"] += flat.numel() * flat.element_size()
        self.stats["seconds_all_reduce"] += time.perf_counter() - t0
        offset = 0
        for t in tensors:
            n = t.numel()
            t.copy_(flat[offset : offset + n].view_as(t))
            offset += n

    def broadcast_(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        t0 = time.perf_counter()
        tensor = tensor.contiguous()
        self._dist.broadcast(tensor, src=src)
        self.stats["broadcast_calls"] += 1
        self.stats["broadcast_bytes"] += tensor.numel() * tensor.element_size()
        self.stats["seconds_broadcast"] += time.perf_counter() - t0
        return tensor
