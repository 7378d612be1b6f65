"""Lightning: the module says what to compute per request, the Trainer where, the writer callback writes.

``runtime.shard``:
- ``windows``: every rank runs every request and owns a share of its views; the sampler all-reduces the merged
  sums once per step (``TorchDistributedCollective``). Rank 0 writes.
- ``requests``: rank r runs requests r, r+W, r+2W... (no padding, so nothing is duplicated or missing) and writes its
  own.
After ``Trainer.predict`` the ranks gather their summaries, so rank 0 reports every output and failure; the other
ranks report nothing and exit 0 (Lightning's launcher kills every process when a child exits non-zero).
The Trainer runs with ``inference_mode=False`` because the sync step needs gradients. Multi-process runs need a
launcher that keeps rank 0 in the calling process (``ddp``: Lightning re-runs the command for the other ranks, or
processes started by torchrun/SLURM); ``ddp_spawn``/``ddp_fork`` would lose the summary in the workers, so they are
refused. See docs/sharding.md.

Stopping: while :func:`run` runs, SIGINT and SIGTERM set a stop flag (Lightning's own SIGTERM handling is off: it
would only note the signal, and broadcast from inside the handler in multi-process runs). The flag is checked after
every view batch and step, so the run stops within one denoising step; images already written are kept, the current
one is dropped, and :func:`run` raises :class:`RunInterrupted` (a ``KeyboardInterrupt``) carrying what was written.
A second signal stops at once. The previous handlers are restored when :func:`run` returns.

Failures: any exception of one request (not only a :class:`SyncEngineError`) fails that request only; the others
run. Its one-line reason goes to the summary; the traceback to the log at DEBUG, or to stderr with
``SYNCENGINE_DEBUG=1``.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
import traceback
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
from .errors import SyncEngineError, one_line
from .outputs import check_output_dir, write_result
from .pipeline import Failed, Generated, Pipeline, requests_of

log = logging.getLogger(__name__)


def rank_indices(count: int, shard: str, rank: int, world_size: int) -> list[int]:
    """Which requests a rank runs: all of them when windows are sharded, every W-th otherwise."""
    if shard == "windows" or world_size == 1:
        return list(range(count))
    return list(range(rank, count, world_size))


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequested(BaseException):
    """Raised inside the run when a stop signal arrived. A ``BaseException`` that is no ``KeyboardInterrupt``: the
    per-request isolation does not catch it, and Lightning re-raises it after its teardown (a ``KeyboardInterrupt``
    would end in Lightning's ``sys.exit(1)``)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = int(signum)


class RunInterrupted(KeyboardInterrupt):
    """A run stopped by SIGINT or SIGTERM; ``summary`` lists what was written before the stop (kept), ``exit_code``
    is the shell's convention, 128 + the signal number (130, 143)."""

    def __init__(self, signum: int, summary: "RunSummary"):
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)
        self.summary = summary

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopSignals:
    """While active (a context manager), SIGINT/SIGTERM set :attr:`signum` (the first signal) instead of killing the
    process; :meth:`check` raises :class:`StopRequested` at the next safe point. Only the main thread can install
    handlers; elsewhere this does nothing but :meth:`check`."""

    def __init__(self, forward: Any = None):
        self.signum: int | None = None
        self.forward = forward  # called with the signal number on the first signal (e.g. tell child ranks)
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.getsignal(signum)
                signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise StopRequested(self.signum)  # asked twice: stop now
        self.signum = signum
        if self.forward is not None:
            self.forward(signum)

    def check(self) -> None:
        if self.signum is not None:
            raise StopRequested(self.signum)


class _Progress:
    """The per-request progress callback (see ``Pipeline.run``): advances the step bar, shows view batches within
    long steps and phases (the final decode), and is where a stop request takes effect."""

    REFRESH_S = 1.0

    def __init__(self, name: str, steps: int, show: bool, stop: StopSignals):
        self.name, self.stop, self.bar = name, stop, None
        self._shown = 0.0
        if show:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=steps, desc=name, leave=False, unit="step", file=sys.stderr)

    def __call__(self, done: int, total: int) -> None:
        if self.bar is not None:
            if self.bar.total != total:  # the request overrides sampler.steps
                self.bar.total = total
            self.bar.set_postfix_str("", refresh=False)
            self.bar.update(done - self.bar.n)
        self.stop.check()

    def views(self, done: int, total: int) -> None:
        if self.bar is not None and time.monotonic() - self._shown > self.REFRESH_S:
            self._shown = time.monotonic()
            self.bar.set_postfix_str(f"views {done}/{total}")
        self.stop.check()

    def note(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_description(f"{self.name}: {text}")
            self.bar.refresh()
        self.stop.check()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def failure_reason(exc: BaseException) -> str:
    """One line for the summary: the engine's own message, or the type and first line of anything else."""
    if isinstance(exc, SyncEngineError):
        return str(exc)
    return f"{type(exc).__name__}: {one_line(exc)}"


def report_traceback(what: str) -> None:
    """The traceback of the exception being handled: DEBUG log, or stderr with ``SYNCENGINE_DEBUG=1``."""
    if os.environ.get("SYNCENGINE_DEBUG", "") not in ("", "0"):
        print(f"{what}:\n{traceback.format_exc()}", file=sys.stderr, end="")
    else:
        log.debug("%s", what, exc_info=True)


class JointDiffusionModule(L.LightningModule):
    """One request per ``predict_step``; the pipeline (models) is built on the device Lightning chose."""

    def __init__(self, resolved: ResolvedSpec, stop: StopSignals | None = None):
        super().__init__()
        self.resolved = resolved
        self.stop = stop or StopSignals()
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
        self.stop.check()
        index = int(batch)
        request = self.pipeline.requests()[index]
        progress = _Progress(request.name, int(self.resolved.config.sampler.steps),
                             self.show_steps and self.global_rank == 0, self.stop)
        collective = self.pipeline.collective
        collective.begin(index)  # the sidecar counts this request's collectives only
        try:
            with torch.enable_grad():  # Lightning may wrap predict in no_grad (gloo): the sync step needs grad
                return self.pipeline.run(index, progress)
        except KeyboardInterrupt:  # raised by someone else's handler: a stop, not Lightning's sys.exit(1)
            raise StopRequested(signal.SIGINT) from None
        except Exception as exc:  # one request's failure, whatever it is; StopRequested/SystemExit pass through
            reason = failure_reason(exc)
            if not collective.agreed:  # failed before the request's first collective: the other ranks are waiting
                collective.agree(error=reason)
            log.error("request %s (%s) failed: %s", index, request.name, reason)
            report_traceback(f"request {index} ({request.name}) failed")
            return Failed(request, index, reason)
        finally:
            progress.close()


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
        try:
            path = write_result(prediction, self.output_dir, self.overwrite)
        except KeyboardInterrupt:
            raise StopRequested(signal.SIGINT) from None
        except Exception as exc:  # disk full...: write_result removed its partial files; the run goes on
            entry = (prediction.request.name, failure_reason(exc))
            log.error("request %s (%s) failed: %s", prediction.index, prediction.request.name, entry[1])
            report_traceback(f"writing request {prediction.index} ({prediction.request.name}) failed")
            self.summary.failed.append(entry)
            self.summary._order[repr(entry)] = prediction.index
            return
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
    """Refuse a launcher that runs the ranks in child processes of this one (``mp`` spawn/fork): what they write and
    what fails stays in the children. Lightning exports no launcher type, so the strategy's public ``launcher`` is
    recognised by its class's name, not by importing Lightning's private module."""
    launcher = getattr(trainer.strategy, "launcher", None)
    if any(cls.__name__ == "_MultiProcessingLauncher" for cls in type(launcher).__mro__):
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


def _forward_to_children(trainer: L.Trainer):
    """SIGTERM reaches only the process it was sent to: pass it on to the ranks Lightning's ``ddp`` launcher started
    (as Lightning's own handler would). SIGINT from a terminal reaches the whole process group already."""

    def forward(signum: int) -> None:
        if signum == signal.SIGTERM:
            for proc in getattr(getattr(trainer.strategy, "launcher", None), "procs", None) or []:
                try:
                    proc.send_signal(signum)
                except (OSError, ValueError):
                    pass

    return forward


def _close_process_group() -> None:
    """After a stop: the other ranks may be inside a collective, so no barrier; just let go of the group."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # best effort on the way out
            pass


def run(resolved: ResolvedSpec) -> RunSummary:
    """Run every request of a resolved spec through ``Trainer.predict``; returns what was written and what failed.
    Raises :class:`RunInterrupted` on SIGINT/SIGTERM (module docstring), with what was written until then."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    with warnings.catch_warnings():  # Lightning's advice for training loops, for this run only
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*predict_dataloader.*")
        warnings.filterwarnings("ignore", message=".*infer the batch indices.*")
        return _run(resolved)


def _run(resolved: ResolvedSpec) -> RunSummary:
    runtime = resolved.config.runtime
    if not len(resolved.config.requests):
        from .errors import ConfigError

        raise ConfigError("requests", "no requests: add requests: [{prompt: ..., seed: 0}] or pass --prompts FILE")
    if str(runtime.shard) == "requests" or launched_rank() == 0:  # the ranks that write
        check_output_dir(runtime.output_dir)
    writer = OutputWriter(runtime.output_dir, bool(runtime.overwrite), str(runtime.shard))
    trainer = make_trainer(resolved, writer)
    _check_launcher(trainer)
    connector = getattr(trainer, "_signal_connector", None)
    if connector is not None:  # ours instead (module docstring); Lightning's teardown then restores nothing
        connector.register_signal_handlers = lambda: None
    with StopSignals(_forward_to_children(trainer)) as stop:
        try:
            trainer.predict(JointDiffusionModule(resolved, stop), return_predictions=False)
            stop.check()  # a signal during the last image's decode or write: still a stopped run
        except StopRequested as exc:
            _close_process_group()  # no gathering: each rank that writes reports its own outputs
            writer.summary.primary = trainer.global_rank == 0 or str(runtime.shard) == "requests"
            raise RunInterrupted(exc.signum, writer.summary) from None
    return _gather_summary(trainer, writer.summary)


__all__ = ["JointDiffusionModule", "OutputWriter", "RunInterrupted", "RunSummary", "StopSignals", "launched_rank",
           "make_trainer", "run", "requests_of"]
