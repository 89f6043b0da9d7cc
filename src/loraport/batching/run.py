"""``loraport.batch``: port many adapters from one manifest, locally or on a Ray cluster.

Phases: read and check every job (all problems at once, before any work); plan every
pending port's subspaces and compute each distinct one once, in parallel, into the shared
cache; run the ports (each reads its subspaces from the cache) and the fusions (``fuse:``
jobs, no subspaces); write the summary.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..errors import LoraportError
from ..io import atomic_write_text, default_cache_dir
from ..report import finite_json, peak_rss_mb
from .manifest import BatchJob, FuseJob, ManifestError, load_jobs
from .plan import FUSION_REPORT_NAME, REPORT_NAME, BatchPlan, job_state, plan_batch, subspace_tasks
from .pools import LocalPool, RayPool, TreeRss, size_local_pool
from .workers import JobOutcome, SubspaceOutcome, compute_subspaces, one_line, run_fuse_job, run_job


@dataclass
class RayOptions:
    """Run the batch's tasks on Ray.

    Attributes:
        address: the cluster (``ray://head:10001``, ``head:6379``, ``auto``); ``None``: ``RAY_ADDRESS``,
            else a running local cluster, else a new local instance. Ignored when ``ray.init`` was
            already called in this process (that connection is used and left open).
        gpus_per_job: GPUs each task asks Ray for; jobs without a ``device`` key then run on ``cuda``.
    """

    address: str | None = None
    gpus_per_job: float = 0.0


@dataclass
class BatchOptions:
    """Settings of a batch (the ``loraport batch`` flags), apart from the jobs themselves.

    Attributes:
        cache_dir: the subspace cache every job shares (default: ``$LORAPORT_CACHE`` or
            ``~/.cache/loraport/subspaces``). On a cluster: storage every worker sees at the same path.
        workers: local pool size (``None``: ``min(cores / threads_per_job, memory / per-job estimate, jobs)``;
            1 runs every job in this process).
        threads_per_job: torch threads of each job and subspace task (default 1). Results depend on
            it in the last bits; fixing it makes the outputs identical whatever the pool or executor.
        job_memory_mb: per-job peak memory for sizing the pool (``None``: estimated from the jobs).
        ray: run on Ray instead of the local pool.
        overwrite: replace output directories that exist but were not written by a batch.
    """

    cache_dir: str | os.PathLike[str] | None = None
    workers: int | None = None
    threads_per_job: int = 1
    job_memory_mb: float | None = None
    ray: RayOptions | None = None
    overwrite: bool = False

    def validate(self) -> None:
        if self.workers is not None and self.workers < 1:
            raise LoraportError(f"--workers must be >= 1, got {self.workers}")
        if self.threads_per_job < 1:
            raise LoraportError(f"--threads-per-job must be >= 1, got {self.threads_per_job}")
        if self.job_memory_mb is not None and self.job_memory_mb <= 0:
            raise LoraportError(f"--job-memory must be > 0 MB, got {self.job_memory_mb}")
        if self.ray is not None and self.ray.gpus_per_job < 0:
            raise LoraportError(f"--gpus-per-job must be >= 0, got {self.ray.gpus_per_job}")


@dataclass
class BatchResult:
    """What :func:`batch` returns: one outcome per job (manifest order) and the summary."""

    jobs: list[JobOutcome]
    summary: dict[str, Any]
    summary_path: Path | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Every job succeeded or was already up to date."""
        return all(job.status in ("ok", "up to date") for job in self.jobs)

    def table(self) -> str:
        """The summary table (Markdown): job, method, modules, mean kept energy, time, status."""
        lines = [
            "| job | method | modules | mean kept energy | time (s) | status |",
            "|---|---|---:|---:|---:|---|",
        ]
        for job in self.jobs:
            energy = "-" if job.mean_kept_energy is None else f"{job.mean_kept_energy:.3f}"
            seconds = "-" if job.seconds is None else f"{job.seconds:.1f}"
            modules = "-" if job.modules is None else str(job.modules)
            status = job.status + (f": {job.error}" if job.error else "")
            lines.append(f"| {job.name} | {job.method} | {modules} | {energy} | {seconds} | {status} |")
        return "\n".join(lines)

    def totals_line(self) -> str:
        s = self.summary
        sub = s["subspaces"]
        rss = s["peak_rss_mb"]["all_processes"]
        return (
            f"{s['jobs_total']} job(s): {s['succeeded']} ok, {s['up_to_date']} up to date, {s['failed']} failed"
            + (f", {s['interrupted']} interrupted" if s["interrupted"] else "")
            + "; "
            f"{sub['distinct']} distinct subspace(s): {sub['cached_before']} cached, {sub['computed']} computed "
            f"in {sub['seconds']:.1f} s; total {s['wall_seconds']:.1f} s"
            + (f", peak RSS {rss:.0f} MB (all processes)" if rss is not None else "")
        )


def _clean_stale_temporaries(jobs: list[BatchJob]) -> None:
    """Remove temporary output directories an earlier, killed batch left beside these outputs."""
    for job in jobs:
        out = Path(job.out)
        if out.parent.is_dir():
            for tmp in out.parent.glob(f".{out.name}.tmp-*"):
                shutil.rmtree(tmp, ignore_errors=True)


def _up_to_date(job: BatchJob) -> JobOutcome:
    """A skipped job's line, with the figures of the report its earlier run wrote."""
    outcome = JobOutcome(job.index, job.name, job.out, "up to date", job.method)
    try:
        if isinstance(job, FuseJob):
            report = json.loads((Path(job.out) / FUSION_REPORT_NAME).read_text())
            outcome.method, outcome.modules = report["method"], report["totals"]["tensors"]
            return outcome
        totals = json.loads((Path(job.out) / REPORT_NAME).read_text())["totals"]
        outcome.modules, outcome.units = totals["output_modules"], totals["units"]
        outcome.mean_kept_energy = totals["mean_kept_energy"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return outcome


def _failed(job: BatchJob, error: BaseException) -> JobOutcome:
    message = f"worker process died ({one_line(error)})"
    return JobOutcome(job.index, job.name, job.out, "failed", job.method, error=message)


def _stopped(job: BatchJob, record: dict[str, Any]) -> JobOutcome:
    """A job whose result never came back because the batch was interrupted: ``ok`` if its worker
    finished writing it before stopping, else ``interrupted`` (no output: it runs on the next try)."""
    status = "ok" if job_state(job, record) == "done" else "interrupted"
    return JobOutcome(job.index, job.name, job.out, status, job.method)


def batch(
    manifest: str | os.PathLike[str] | Mapping[str, Any],
    *,
    options: BatchOptions | None = None,
    summary_path: str | os.PathLike[str] | None = None,
    progress: bool = True,
    **overrides: Any,
) -> BatchResult:
    """Port (or fuse) every job of a manifest; resumable; a failed job does not stop the others.

    Args:
        manifest: a YAML or JSON file, or the parsed mapping: ``defaults`` (optional) and
            ``jobs``, each job with ``adapter``, ``out``, ``source_base``, ``target_base`` and any
            ``transfer`` option spelled like its flag with underscores (``subspace_rank: 32``);
            or a fusion job, ``{fuse: {models: [a, b], out: ..., method: ties}}``: any ``fuse``
            flag with underscores, ``defaults.fuse`` under it (see :mod:`loraport.batching.manifest`).
        options: a :class:`BatchOptions`; keyword ``overrides`` set its fields (``workers=2``).
        summary_path: the JSON summary (default: ``<manifest>.summary.json`` beside a manifest
            file; none for a mapping).
        progress: progress bars on stderr.

    Returns:
        A :class:`BatchResult`; ``result.ok`` says whether every job succeeded or was up to date.

    Raises:
        ManifestError: every problem of the manifest at once (missing field, unknown key or
            method, missing adapter or base, mismatched fusion inputs, ...), before any work starts.

    Example::

        >>> result = batch("ports.yaml", workers=2)          # doctest: +SKIP
        >>> print(result.table())                            # doctest: +SKIP

    Outputs are written atomically with a record of the job (``loraport_job.json``); a
    job whose output, report and record match is skipped on the next run. Fusion jobs skip the
    subspace phase; their line in the table gives the method run and the tensors (modules) fused. Local pools use
    ``spawn`` processes: call ``batch`` from a script under ``if __name__ == "__main__":``.
    """
    started = time.perf_counter()
    options = options or BatchOptions()
    for name, value in overrides.items():
        if not hasattr(options, name):
            raise TypeError(f"batch() got an unknown option {name!r}")
        setattr(options, name, value)
    options.validate()
    cache_dir = Path(options.cache_dir or default_cache_dir()).expanduser().resolve()
    gpus = options.ray.gpus_per_job if options.ray is not None else 0.0
    jobs, problems, source = load_jobs(manifest, cache_dir, device="cuda" if gpus > 0 else None)
    plan = plan_batch(jobs, cache_dir, options.overwrite)
    problems += plan.problems
    if problems:
        raise ManifestError(source, problems)
    if summary_path is None and not isinstance(manifest, Mapping):
        path = Path(manifest)
        summary_path = path.with_name(f"{path.stem}.summary.json")

    outcomes = {job.index: _up_to_date(job) for job in plan.done}
    job_memory = options.job_memory_mb or plan.max_job_memory_mb
    executor: dict[str, Any] = {"kind": "none (every job up to date)"}
    subspaces: dict[str, Any] = {
        "distinct": plan.distinct_subspaces,
        "cached_before": plan.cached_subspaces,
        "computed": 0,
        "seconds": 0.0,
    }
    warnings: list[str] = []

    def finish() -> BatchResult:
        result = _result(jobs, outcomes, subspaces, executor, rss.peak_mb, started, cache_dir, source, warnings)
        if summary_path is not None:
            result.summary_path = Path(summary_path)
            atomic_write_text(summary_path, json.dumps(result.summary, indent=2) + "\n")
        return result

    with TreeRss() as rss:
        if plan.pending:
            _clean_stale_temporaries(plan.pending)
            pool, parallel, executor = _make_pool(options, len(plan.pending), job_memory)
            if progress:
                print(f"loraport batch: {pool.description}", file=sys.stderr)
            try:
                subspaces.update(_compute_subspaces(pool, plan, cache_dir, parallel, progress, warnings))
                _run_ports(pool, plan, outcomes, progress, warnings)
            except BaseException:  # interrupted (or a bug): stop the workers, keep what finished
                pool.close(interrupted=True)
                for job in plan.pending:
                    outcomes.setdefault(job.index, _stopped(job, plan.records[job.index]))
                finish()
                raise
            pool.close()
    return finish()


def _make_pool(
    options: BatchOptions, jobs: int, job_memory_mb: float
) -> tuple[LocalPool | RayPool, int, dict[str, Any]]:
    """The pool, how many tasks it runs at once, and its description for the summary."""
    pool: LocalPool | RayPool
    if options.ray is not None:
        pool = RayPool(options.ray.address, options.threads_per_job, options.ray.gpus_per_job, job_memory_mb)
        parallel = max(1, int(pool.ray.cluster_resources().get("CPU", 1)) // options.threads_per_job)
        executor = {"kind": "ray", "address": options.ray.address, "gpus_per_job": options.ray.gpus_per_job}
    else:
        size = size_local_pool(jobs, options.threads_per_job, job_memory_mb, options.workers)
        pool, parallel = LocalPool(size), size.workers
        executor = {"kind": "local", "workers": size.workers, "peak_bound_mb": size.peak_bound_mb}
    executor.update(description=pool.description, threads_per_job=options.threads_per_job, job_memory_mb=job_memory_mb)
    return pool, parallel, executor


def _check_version(version: str | None, warnings: list[str]) -> None:
    from ..version import __version__

    if version is not None and version != __version__:
        message = f"a worker runs loraport {version}, this process {__version__}: install the same version everywhere"
        if message not in warnings:
            warnings.append(message)


def _compute_subspaces(
    pool: LocalPool | RayPool, plan: BatchPlan, cache_dir: Path, parallel: int, progress: bool, warnings: list[str]
) -> dict[str, Any]:
    """Phase 1: every distinct subspace not yet cached, computed once, spread over the workers."""
    started = time.perf_counter()
    tasks = subspace_tasks(plan, cache_dir, parallel)
    computed = 0
    bar = tqdm(
        total=sum(len(t.requests) for t in tasks),
        desc="loraport batch: subspaces",
        unit="matrix",
        file=sys.stderr,
        disable=not progress,
        dynamic_ncols=True,
    )
    with bar:
        for task, outcome in pool.run(compute_subspaces, tasks):
            bar.update(len(task.requests))
            if isinstance(outcome, SubspaceOutcome):
                computed += outcome.computed
                _check_version(outcome.version, warnings)
            else:  # the ports that need these subspaces compute them and report any error themselves
                warnings.append(f"subspace task on {task.base} failed: {one_line(outcome)}")
    return {"computed": computed, "tasks": len(tasks), "seconds": time.perf_counter() - started}


def _run_ports(
    pool: LocalPool | RayPool,
    plan: BatchPlan,
    outcomes: dict[int, JobOutcome],
    progress: bool,
    warnings: list[str],
) -> None:
    """Phase 2: the ports, each reading its subspaces from the cache."""
    items = [(job, plan.records[job.index]) for job in plan.pending]
    bar = tqdm(total=len(items), desc="loraport batch: ports", unit="job", file=sys.stderr, disable=not progress)
    with bar:
        for (job, _), outcome in pool.run(_run_item, items):
            if not isinstance(outcome, JobOutcome):
                outcome = _failed(job, outcome)
            _check_version(outcome.version, warnings)
            outcomes[job.index] = outcome
            bar.update(1)
            if outcome.status == "failed":
                bar.write(f"loraport batch: {job.label} failed: {outcome.error}", file=sys.stderr)


def _run_item(item: tuple[BatchJob, dict[str, Any]], threads: int) -> JobOutcome:
    job, record = item
    if isinstance(job, FuseJob):
        return run_fuse_job(job, record, threads)
    return run_job(job, record, threads)


def _result(
    jobs: list[BatchJob],
    outcomes: dict[int, JobOutcome],
    subspaces: dict[str, Any],
    executor: dict[str, Any],
    peak_all_mb: float | None,
    started: float,
    cache_dir: Path,
    source: str,
    warnings: list[str],
) -> BatchResult:
    ordered = [outcomes[job.index] for job in jobs if job.index in outcomes]
    job_peaks = [o.peak_rss_mb for o in ordered if o.peak_rss_mb is not None]
    summary = {
        "manifest": source,
        "ok": all(o.status in ("ok", "up to date") for o in ordered),
        "jobs_total": len(jobs),
        "succeeded": sum(o.status == "ok" for o in ordered),
        "up_to_date": sum(o.status == "up to date" for o in ordered),
        "failed": sum(o.status == "failed" for o in ordered),
        "interrupted": sum(o.status == "interrupted" for o in ordered),
        "wall_seconds": time.perf_counter() - started,
        "cache_dir": str(cache_dir),
        "subspaces": subspaces,
        "executor": executor,
        "peak_rss_mb": {
            "all_processes": peak_all_mb,
            "largest_job": max(job_peaks, default=None),
            "driver": peak_rss_mb(),
        },
        "warnings": warnings,
        "jobs": [asdict(o) for o in ordered],
    }
    return BatchResult(ordered, finite_json(summary), None, warnings)


__all__ = ["BatchOptions", "BatchResult", "RayOptions", "batch"]
