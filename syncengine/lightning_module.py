"""Lightning: the module says what to compute per request, the Trainer where, the writer callback writes.

``runtime.shard``:
- ``windows``: every rank runs every request and owns a share of its views; the sampler all-reduces the merged
  sums once per step (``TorchDistributedCollective``). Rank 0 writes.
- ``requests``: rank r runs requests r, r+W, r+2W... (no padding, so nothing is duplicated or missing) and writes its own.
After ``Trainer.predict`` the ranks gather their summaries, so rank 0 reports every output and failure; the other
ranks report nothing and exit 0 (Lightning's launcher kills every process when a child exits non-zero).
The Trainer runs with ``inference_mode=False`` because the sync step needs gradients. Multi-process runs need a
launcher that keeps rank 0 in the calling process (``ddp``: Lightning re-runs the command for the other ranks, or
processes started by torchrun/SLURM); ``ddp_spawn``/``ddp_fork`` would lose the summary in the workers, so they are
refused. See docs/sharding.md.
"""
from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader

from .collective import Collective, TorchDistributedCollective
from .config import ResolvedSpec
from .errors import SyncEngineError
from .outputs import write_result
from .pipeline import Failed, Generated, Pipeline, requests_of

log = logging.getLogger(__name__)


def rank_indices(count: int, shard: str, rank: int, world_size: int) -> list[int]:
    """Which requests a rank runs: all of them when windows are sharded, every W-th otherwise."""
    if shard == "windows" or world_size == 1:
        return list(range(count))
    return list(range(rank, count, world_size))


class JointDiffusionModule(L.LightningModule):
    """One request per ``predict_step``; the pipeline (models) is built on the device Lightning chose."""

    def __init__(self, resolved: ResolvedSpec):
        super().__init__()
        self.resolved = resolved
        self.pipeline: Pipeline | None = None
        self.shard = str(resolved.config.runtime.shard)
        self.show_steps = bool(resolved.config.runtime.progress)

    def predict_dataloader(self) -> DataLoader:
        count = len(self.resolved.config.requests)
        indices = rank_indices(count, self.shard, self.global_rank, self.trainer.world_size)
        return DataLoader(indices, batch_size=None, shuffle=False)

    def on_predict_start(self) -> None:
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        collective = (
            TorchDistributedCollective() if distributed and self.shard == "windows" and self.trainer.world_size > 1
            else Collective()
        )
        self.pipeline = Pipeline(self.resolved, device=self.device, collective=collective)

    def predict_step(self, batch: Any, batch_idx: int = 0) -> Generated | Failed:
        index = int(batch)
        request = self.pipeline.requests()[index]
        bar = None
        if self.show_steps and self.global_rank == 0:
            from tqdm.auto import tqdm

            bar = tqdm(total=int(self.resolved.config.sampler.steps), desc=f"{request.name}", leave=False, unit="step")

        def progress(done: int, total: int) -> None:
            if bar is not None:
                bar.update(done - bar.n)

        collective = self.pipeline.collective
        collective.begin(index)  # the sidecar counts this request's collectives only
        try:
            with torch.enable_grad():  # Lightning may wrap predict in no_grad (gloo): the sync step needs grad
                return self.pipeline.run(index, progress)
        except SyncEngineError as exc:
            if not collective.agreed:  # failed before the request's first collective: the other ranks are waiting
                collective.agree(error=str(exc))
            log.error("request %s (%s) failed: %s", index, request.name, exc)
            return Failed(request, index, str(exc))
        finally:
            if bar is not None:
                bar.close()


@dataclass
class RunSummary:
    """What a run wrote and what failed (request name, error). ``primary`` is False on ranks other than 0 of a
    multi-process run: their outputs and failures are listed in rank 0's summary, so they report nothing."""

    written: list[Path] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    primary: bool = True
    _order: dict[str, int] = field(default_factory=dict, repr=False)  # key -> request index, to sort merged lists

    @property
    def ok(self) -> bool:
        return not self.failed

    def merge(self, others: list["RunSummary"]) -> None:
        """Take in the summaries of every rank (this one's included), in request order, each entry once."""
        written = {str(p): (o._order.get(str(p), 0), p) for o in others for p in o.written}
        failed = {f: (o._order.get(repr(f), 0), f) for o in others for f in o.failed}
        self.written = [p for _, p in sorted(written.values(), key=lambda x: x[0])]
        self.failed = [f for _, f in sorted(failed.values(), key=lambda x: x[0])]


class OutputWriter(BasePredictionWriter):
    """Writes each finished request immediately (PNG + JSON); rank 0 only when windows are sharded."""

    def __init__(self, output_dir: str | Path, overwrite: bool, shard: str):
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self.overwrite = overwrite
        self.shard = shard
        self.summary = RunSummary()

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        if self.shard == "windows" and trainer.global_rank != 0:
            return
        if isinstance(prediction, Failed):
            entry = (prediction.request.name, prediction.error)
            self.summary.failed.append(entry)
            self.summary._order[repr(entry)] = prediction.index
            return
        path = write_result(prediction, self.output_dir, self.overwrite)
        self.summary.written.append(path)
        self.summary._order[str(path)] = prediction.index


def launched_rank() -> int:
    """This process's global rank as set by a launcher before Lightning starts (0 when not launched as a rank):
    lets the CLI print its notices once per run, not once per process."""
    for key in ("RANK", "SLURM_PROCID"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return int(os.environ.get("LOCAL_RANK", "0") or 0) + int(os.environ.get("NODE_RANK", "0") or 0)


def _check_launcher(trainer: L.Trainer) -> None:
    from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher

    if isinstance(getattr(trainer.strategy, "launcher", None), _MultiProcessingLauncher):
        from .errors import ConfigError

        raise ConfigError("runtime.strategy", "spawn/fork launchers (ddp_spawn, ddp_fork, or 'auto' in a notebook) "
                          "cannot report outputs back to the caller; use strategy=ddp from a script or the CLI")


def _gather_summary(trainer: L.Trainer, summary: RunSummary) -> RunSummary:
    """Collect every rank's summary on every rank; rank 0 keeps the full list, the others are marked non-primary.
    Runs after ``Trainer.predict`` (not in a hook): a rank with no requests skips the predict hooks entirely.
    Then the process group is closed: left open, gloo's threads can abort the interpreter at exit."""
    dist = torch.distributed
    if trainer.world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
        return summary
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, summary)
    summary.merge(gathered)
    summary.primary = dist.get_rank() == 0
    dist.barrier()
    dist.destroy_process_group()
    return summary


def make_trainer(resolved: ResolvedSpec, writer: OutputWriter) -> L.Trainer:
    r = resolved.config.runtime
    kwargs: dict[str, Any] = dict(
        accelerator=r.accelerator,
        devices=r.devices,
        num_nodes=r.num_nodes,
        strategy=r.strategy,
        inference_mode=False,
        use_distributed_sampler=False,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=bool(r.progress),
        callbacks=[writer],
    )
    if r.precision is not None:
        kwargs["precision"] = r.precision
    return L.Trainer(**kwargs)


def run(resolved: ResolvedSpec) -> RunSummary:
    """Run every request of a resolved spec through ``Trainer.predict``; returns what was written and what failed."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*predict_dataloader.*")
    warnings.filterwarnings("ignore", message=".*infer the batch indices.*")
    writer = OutputWriter(resolved.config.runtime.output_dir, bool(resolved.config.runtime.overwrite),
                          str(resolved.config.runtime.shard))
    trainer = make_trainer(resolved, writer)
    if not len(resolved.config.requests):
        from .errors import ConfigError

        raise ConfigError("requests", "no requests: add requests: [{prompt: ..., seed: 0}] or pass --prompts FILE")
    _check_launcher(trainer)
    trainer.predict(JointDiffusionModule(resolved), return_predictions=False)
    return _gather_summary(trainer, writer.summary)


__all__ = ["JointDiffusionModule", "OutputWriter", "RunSummary", "launched_rank", "make_trainer", "run", "requests_of"]
