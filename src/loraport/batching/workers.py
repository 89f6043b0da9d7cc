"""What runs in a batch worker (a pool process, a Ray task, or the driver itself): subspace tasks, ports, fusions.

Both functions take and return plain picklable records and never raise for a bad job: a
failed port comes back as a :class:`JobOutcome` with its one-line error, so the others go on.
Each sets its torch thread count: results depend on it in the last bits, so a fixed
``threads`` per job makes a batch's outputs the same whatever the pool size or executor.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ..checkpoints import Checkpoint
from ..errors import LoraportError
from ..fusion.models import REPORT_NAME as FUSION_REPORT_NAME
from ..io import atomic_directory
from ..report import peak_rss_mb
from ..store import SubspaceStore
from ..subspace import SubspaceCache
from .manifest import FuseJob, Job
from .plan import JOB_RECORD, SubspaceTask


@dataclass
class SubspaceOutcome:
    """What a subspace task did: how many subspaces it computed (others were already cached)."""

    computed: int
    seconds: float
    peak_rss_mb: float | None
    version: str


@dataclass
class JobOutcome:
    """One line of the batch summary.

    ``status`` is ``ok``, ``up to date`` (skipped: output, report and record matched), ``failed``
    (``error`` holds the one-line message) or ``interrupted`` (the batch was stopped before it
    finished; nothing was written); ``modules`` counts the target modules written (a fusion job:
    the tensors or modules of its report, ``method`` the method it ran; no kept energy or cache counts).
    """

    index: int
    name: str
    out: str
    status: str
    method: str
    modules: int | None = None
    units: int | None = None
    mean_kept_energy: float | None = None
    seconds: float | None = None
    peak_rss_mb: float | None = None
    cache_hits: int | None = None
    cache_misses: int | None = None
    error: str | None = None
    version: str | None = None


def _version() -> str:
    from ..version import __version__

    return __version__


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run with exactly ``threads`` torch threads, then restore the previous setting."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


_busy = False  # a pool process is running a task (SIGTERM must unwind it, not kill it)


@contextlib.contextmanager
def _working() -> Iterator[None]:
    global _busy
    _busy = True
    try:
        yield
    finally:
        _busy = False


def _terminate(signum: int, frame: Any) -> None:
    if _busy:
        raise KeyboardInterrupt(f"signal {signum}")
    os._exit(128 + signum)


def init_pool_worker(threads: int) -> None:
    """Pool process start-up: a fixed thread count; Ctrl-C is left to the driver, which forwards
    it as SIGTERM; SIGTERM unwinds a running task like Ctrl-C, so the port in progress removes
    its temporary output directory (no partial outputs), and ends an idle worker at once."""
    torch.set_num_threads(threads)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _terminate)


def compute_subspaces(task: SubspaceTask, threads: int) -> SubspaceOutcome:
    """Compute a task's subspaces into the shared cache (entries land by atomic rename)."""
    started = time.perf_counter()
    with _working(), torch_threads(threads), Checkpoint.open(task.base) as ckpt:
        store = SubspaceStore(
            SubspaceCache(task.cache_dir), task.svd, task.oversample, task.niter, task.seed, task.device
        )
        requests = [(ckpt, task.transposed, key, rows, k) for key, rows, k in task.requests]
        try:
            store.plan(requests)
            for request in requests:
                store.get(*request)
        finally:
            store.close()
    return SubspaceOutcome(store.computed, time.perf_counter() - started, peak_rss_mb(), _version())


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if isinstance(exc, LoraportError) else f"{type(exc).__name__}: {text}"


def run_job(job: Job, record: dict[str, Any], threads: int) -> JobOutcome:
    """Port one job into its ``out`` (atomically, with its record); errors become a failed outcome."""
    from ..api import transfer

    started = time.perf_counter()
    outcome = JobOutcome(job.index, job.name, job.out, "failed", job.options.method, version=_version())
    try:
        with _working(), torch_threads(threads):
            result = transfer(
                job.adapter,
                job.source_base,
                job.target_base,
                job.out,
                options=job.options,
                report_path=job.report,
                overwrite=True,  # the plan allowed it: a new output, an older batch's, or --overwrite
                progress=False,
                extra_files={JOB_RECORD: json.dumps(record, indent=2, sort_keys=True)},
            )
    except Exception as exc:  # a failed job is reported and the others go on
        outcome.error = one_line(exc)
        outcome.seconds = time.perf_counter() - started
        outcome.peak_rss_mb = peak_rss_mb()
        return outcome
    totals = result.report.totals()
    outcome.status = "ok"
    outcome.modules = totals["output_modules"]
    outcome.units = totals["units"]
    outcome.mean_kept_energy = totals["mean_kept_energy"]
    outcome.seconds = time.perf_counter() - started
    outcome.peak_rss_mb = peak_rss_mb()
    outcome.cache_hits, outcome.cache_misses = totals["cache_hits"], totals["cache_misses"]
    return outcome


def run_fuse_job(job: FuseJob, record: dict[str, Any], threads: int) -> JobOutcome:
    """Fuse one job into its ``out`` (atomically, with its record); errors become a failed outcome.

    The fusion is written into a directory inside the job's temporary output (so its own
    temporaries go with it), moved up beside the record, and the whole replaces ``out`` in one rename.
    """
    from ..api import fuse_from_args

    started = time.perf_counter()
    outcome = JobOutcome(job.index, job.name, job.out, "failed", job.method, version=_version())
    try:
        with _working(), torch_threads(threads), atomic_directory(job.out, overwrite=True) as tmp:
            staged = tmp / "fused"
            args = argparse.Namespace(**{**vars(job.args), "out": str(staged), "overwrite": False})
            result = fuse_from_args(args, progress=False)
            for entry in staged.iterdir():
                os.replace(entry, tmp / entry.name)
            staged.rmdir()
            result.report.output = job.out  # not the temporary directory it was written in
            result.report.save(tmp / FUSION_REPORT_NAME)
            if job.report is not None:
                result.report.save(job.report)
            (tmp / JOB_RECORD).write_text(json.dumps(record, indent=2, sort_keys=True))
    except Exception as exc:  # a failed job is reported and the others go on
        outcome.error = one_line(exc)
        outcome.seconds = time.perf_counter() - started
        outcome.peak_rss_mb = peak_rss_mb()
        return outcome
    outcome.status = "ok"
    outcome.method = result.report.method
    outcome.modules = result.report.totals()["tensors"]
    outcome.seconds = time.perf_counter() - started
    outcome.peak_rss_mb = peak_rss_mb()
    return outcome


__all__ = [
    "JobOutcome",
    "SubspaceOutcome",
    "compute_subspaces",
    "init_pool_worker",
    "run_fuse_job",
    "run_job",
    "torch_threads",
]
