"""How a sampler shares work between processes. The single-process default does nothing.

Window sharding (``runtime.shard: windows``) swaps in :class:`TorchDistributedCollective`: every rank owns a balanced
share of the views, merges its contributions into canvas-sized sums, and the ranks all-reduce those sums once per
step. The anchor's target is computed by its owner and broadcast.

Collectives match by call order only, so every rank must make the same calls for every request. Before the first
collective of a request the ranks *agree* (one small ``all_gather_object``): on the request, on its views, and on
whether every rank got that far. A rank whose request failed before that point (a file missing on its node) takes part
in the agreement with its error instead, and every rank then skips the request together rather than waiting forever.
"""
from __future__ import annotations

import time
import zlib
from typing import Any, Sequence, TypeVar

import torch

from .errors import SyncEngineError

T = TypeVar("T")


class Collective:
    """Single process: owns every view; reductions and broadcasts are identities."""

    rank: int = 0
    world_size: int = 1

    def __init__(self) -> None:
        self.stats: dict[str, Any] = {}
        self.request: int | None = None
        self.agreed = False
        self.reset_stats()

    def begin(self, request: int) -> None:
        """A new request: the counters restart and the ranks have not agreed on it yet."""
        self.request, self.agreed = request, False
        self.reset_stats()

    def agree(self, items: Sequence[Any] = (), error: str | None = None) -> None:
        """Check that every rank runs this request with the same views (see the module docstring); a single process
        has nothing to check. ``error``: this rank failed before sampling and joins only to tell the others."""
        self.agreed = True

    def reset_stats(self) -> None:
        """Zero the counters (at each :meth:`begin`), so a sidecar's ``stats`` count that request's collectives only.
        ``seconds_*`` is wall time inside the collective: transfer plus waiting for the
        slowest rank (load imbalance shows up there)."""
        self.stats = {"all_reduce_calls": 0, "all_reduce_bytes": 0, "broadcast_calls": 0, "broadcast_bytes": 0,
                      "agreement_calls": 0, "seconds_all_reduce": 0.0, "seconds_broadcast": 0.0}

    def owned(self, items: Sequence[T]) -> list[T]:
        return list(items)

    def owner_of(self, position: int, count: int) -> int:
        return 0

    def all_reduce_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Sum tensors over ranks in place."""

    def broadcast_(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        """Overwrite ``tensor`` on every rank with rank ``src``'s (same shape everywhere)."""
        return tensor


def views_fingerprint(views: Sequence[Any]) -> tuple[int, int]:
    """(count, checksum) of the views' kinds, indices, sizes and positions: equal on ranks that built the same views."""
    text = repr([(type(v).__name__, getattr(v, "index", None), getattr(v, "latent_size", None), getattr(v, "box", None))
                 for v in views])
    return len(views), zlib.crc32(text.encode())


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
        if not self.agreed:
            self.agree(items)
        share = balanced_slices(len(items), self.world_size)[self.rank]
        return [items[i] for i in share]

    def agree(self, items: Sequence[Any] = (), error: str | None = None) -> None:
        self.agreed = True
        mine = (self.request, None if error is not None else views_fingerprint(items), error)
        everyone: list[Any] = [None] * self.world_size
        self._dist.all_gather_object(everyone, mine)
        self.stats["agreement_calls"] += 1
        if error is not None:
            return  # this rank reports its own failure
        failed = [(r, e) for r, (_, _, e) in enumerate(everyone) if e is not None]
        if failed:
            rank, message = failed[0]
            raise SyncEngineError(f"failed on rank {rank}: {message}")
        if len({req for req, _, _ in everyone}) > 1:
            raise SyncEngineError(f"ranks are on different requests {[req for req, _, _ in everyone]}")
        if len({fp for _, fp, _ in everyone}) > 1:
            prints = [fp for _, fp, _ in everyone]
            raise SyncEngineError(f"ranks built different views (count, checksum per rank: {prints})"
                                  "; every node must see the same spec and input files")

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
