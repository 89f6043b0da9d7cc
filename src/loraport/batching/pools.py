"""Where batch work runs: a local process pool (default) or tasks on a Ray cluster.

Both give the same interface: :meth:`run` yields ``(item, result)`` as tasks finish (a
result is the exception when a worker died), :meth:`close` stops them (on interrupt, the
running ports unwind and remove their temporary directories). The local pool is sized to
the cores and to the memory available; :class:`TreeRss` samples the peak RSS of the whole
batch (the driver and every process under it).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import LoraportError
from .workers import init_pool_worker

MEMORY_HEADROOM = 0.85  # use at most this share of the available memory


def available_memory_mb() -> float | None:
    """Memory available to new processes: ``MemAvailable``, capped by a cgroup v2 limit; ``None`` if unknown."""
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) / 1024
    except OSError:
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            free = (int(limit) - used) / 2**20
            available = free if available is None else min(available, free)
    except (OSError, ValueError):
        pass
    return available


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


@dataclass
class PoolSize:
    """The local pool's size and why: ``min(cores / threads, memory / per-job estimate, jobs)``."""

    workers: int
    threads: int
    cores: int
    available_mb: float | None
    job_memory_mb: float
    chosen_by: str

    def describe(self) -> str:
        memory = "unknown memory" if self.available_mb is None else f"{self.available_mb / 1024:.1f} GB available"
        workers = "1 worker (this process)" if self.workers == 1 else f"{self.workers} worker processes"
        return (
            f"local pool: {workers} x {self.threads} thread(s) ({self.chosen_by}; {self.cores} core(s), "
            f"{memory}, about {self.job_memory_mb:.0f} MB per job: peak about {self.peak_bound_mb:.0f} MB)"
        )

    @property
    def peak_bound_mb(self) -> float:
        return self.workers * self.job_memory_mb


def size_local_pool(jobs: int, threads: int, job_memory_mb: float, workers: int | None = None) -> PoolSize:
    """Pool size for ``jobs`` ports of about ``job_memory_mb`` each with ``threads`` torch threads."""
    cores = usable_cores()
    available = available_memory_mb()
    if workers is not None:
        return PoolSize(workers, threads, cores, available, job_memory_mb, "--workers")
    limits = {"cores": max(1, cores // threads), "jobs": max(1, jobs)}
    if available is not None:
        limits["memory"] = max(1, int(available * MEMORY_HEADROOM // job_memory_mb))
    chosen_by = min(limits, key=lambda name: limits[name])
    return PoolSize(limits[chosen_by], threads, cores, available, job_memory_mb, f"bounded by {chosen_by}")


class LocalPool:
    """Runs tasks in ``workers`` spawned processes (``workers == 1``: in this process)."""

    def __init__(self, size: PoolSize) -> None:
        self.size = size
        self.threads = size.threads
        self._executor: ProcessPoolExecutor | None = None
        self._others = set(multiprocessing.active_children())  # not ours: never terminated
        if size.workers > 1:
            self._executor = ProcessPoolExecutor(
                size.workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=init_pool_worker,
                initargs=(size.threads,),
            )

    @property
    def description(self) -> str:
        return self.size.describe()

    def run(self, fn: Callable[..., Any], items: list[Any]) -> Iterator[tuple[Any, Any]]:
        if self._executor is None:
            for item in items:
                yield item, fn(item, self.threads)
            return
        futures: dict[Future[Any], Any] = {self._executor.submit(fn, item, self.threads): item for item in items}
        pending = set(futures)
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                exc = future.exception()
                yield futures[future], exc if exc is not None else future.result()

    def close(self, interrupted: bool = False) -> None:
        if self._executor is None:
            return
        if interrupted:
            # Ask running ports to unwind (their SIGTERM handler raises KeyboardInterrupt, so the
            # temporary output directory is removed; idle workers just exit) before the pool goes.
            workers = set(multiprocessing.active_children()) - self._others
            self._executor.shutdown(wait=False, cancel_futures=True)
            for child in workers:
                child.terminate()
            for child in workers:
                child.join()
        self._executor.shutdown(wait=True, cancel_futures=True)


class RayPool:
    """Runs tasks as Ray tasks on a running cluster (or a local instance), each with
    ``threads`` CPUs, ``gpus`` GPUs and the job's memory estimate as Ray resources."""

    def __init__(self, address: str | None, threads: int, gpus: float, job_memory_mb: float) -> None:
        try:
            import ray
        except ImportError:
            raise LoraportError("--ray needs Ray: pip install 'loraport[ray]'") from None
        self.ray = ray
        self.threads, self.gpus, self.job_memory_mb = threads, gpus, job_memory_mb
        self.started_here = not ray.is_initialized()
        if self.started_here:
            previous = signal.getsignal(signal.SIGTERM)
            try:
                ray.init(address=address, log_to_driver=False, include_dashboard=False)
            except Exception as exc:
                raise LoraportError(f"cannot connect to the Ray cluster at {address or 'default'}: {exc}") from None
            with contextlib.suppress(ValueError):  # ray.init replaces it; ours stops the batch cleanly
                signal.signal(signal.SIGTERM, previous)
        # A memory request no node can meet would leave the tasks pending forever.
        largest = max((node["Resources"].get("memory", 0) for node in ray.nodes() if node["Alive"]), default=0)
        self.memory_bytes = int(min(job_memory_mb * 2**20, largest or job_memory_mb * 2**20))
        self._pending: list[Any] = []

    @property
    def description(self) -> str:
        resources = self.ray.cluster_resources()
        return (
            f"Ray: {resources.get('CPU', 0):g} CPU(s), {resources.get('GPU', 0):g} GPU(s) in the cluster; "
            f"each job {self.threads} CPU(s), {self.gpus:g} GPU(s), about {self.job_memory_mb:.0f} MB"
        )

    def run(self, fn: Callable[..., Any], items: list[Any]) -> Iterator[tuple[Any, Any]]:
        ray = self.ray
        remote = ray.remote(num_cpus=self.threads, num_gpus=self.gpus, memory=self.memory_bytes, max_retries=0)(fn)
        refs = {remote.remote(item, self.threads): item for item in items}
        self._pending = list(refs)
        while self._pending:
            finished, self._pending = ray.wait(self._pending, num_returns=1)
            ref = finished[0]
            try:
                result = ray.get(ref)
            except Exception as exc:  # the worker died or the task was cancelled
                result = exc
            yield refs[ref], result

    def close(self, interrupted: bool = False) -> None:
        if interrupted:
            for ref in self._pending:
                self.ray.cancel(ref)  # raises KeyboardInterrupt in a running task: it unwinds
        self._pending = []
        if self.started_here:
            self.ray.shutdown()


class TreeRss:
    """Peak total RSS of a process (default: this one) and all its descendants, sampled every
    ``interval`` s (Linux; ``peak_mb`` stays ``None`` elsewhere).

    A sum of RSS counts pages shared between processes (the torch libraries) once per process,
    so it bounds the physical memory used from above.
    """

    def __init__(self, interval: float = 0.2, root: int | None = None) -> None:
        self.interval = interval
        self.root = os.getpid() if root is None else root
        self.peak_mb: float | None = None
        self._stop = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        self._thread = threading.Thread(target=self._loop, name="loraport-rss", daemon=True)

    @staticmethod
    def _descendants(pid: int) -> list[int]:
        found, stack = [], [pid]
        while stack:
            current = stack.pop()
            found.append(current)
            try:
                for task in Path(f"/proc/{current}/task").iterdir():
                    stack += [int(child) for child in (task / "children").read_text().split()]
            except OSError:
                continue
        return found

    def sample(self) -> float | None:
        total = 0
        for pid in self._descendants(self.root):
            try:
                total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * self._page
            except (OSError, IndexError, ValueError):
                continue
        return total / 2**20 if total else None

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            value = self.sample()
            if value is not None:
                self.peak_mb = max(self.peak_mb or 0.0, value)

    def __enter__(self) -> TreeRss:
        if Path("/proc/self/statm").exists():
            self.peak_mb = self.sample()
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
            value = self.sample()
            if value is not None:
                self.peak_mb = max(self.peak_mb or 0.0, value)


__all__ = ["LocalPool", "PoolSize", "RayPool", "TreeRss", "available_memory_mb", "size_local_pool", "usable_cores"]
