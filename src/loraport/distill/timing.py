"""Where a distilled port's time and memory go: named phases, timed, with the process's peak RSS
at the end of each (the report's breakdown, ``--verbose`` lines)."""

from __future__ import annotations

import ctypes
import gc
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

from ..report import peak_rss_mb

log = logging.getLogger(__name__)


class Phases:
    """Wall time per named phase, in the order first seen; a phase entered twice adds up.

    ``peak_mb`` holds the process's peak RSS when each phase last ended: the phase where it
    jumps is the one that holds the memory.

    Example::

        >>> phases = Phases()
        >>> with phases("teacher: generate"):
        ...     pass
        >>> list(phases.seconds)
        ['teacher: generate']
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.peak_mb: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            spent = time.perf_counter() - started
            self.seconds[name] = self.seconds.get(name, 0.0) + spent
            self.peak_mb[name] = round(peak_rss_mb())
            log.info("distill: %s %.1f s (peak RSS %d MB)", name, spent, self.peak_mb[name])

    def rounded(self) -> dict[str, float]:
        return {name: round(value, 2) for name, value in self.seconds.items()}


def release_memory() -> None:
    """Collect garbage and hand the C heap's free pages back to the system (glibc ``malloc_trim``; elsewhere
    only the collection).

    The allocator keeps what a model freed for later use, so the teacher's memory counted in the
    process's RSS under the student. Measured on a Gemma-3-270M port: 0.84 GB of freed memory still
    resident after training, gone after ``malloc_trim`` (benchmarks/results/real.md).
    """
    gc.collect()
    try:
        trim = ctypes.CDLL(None).malloc_trim  # the C library already loaded (no search for its file)
    except (OSError, AttributeError):  # not glibc
        return
    trim(0)


__all__ = ["Phases", "release_memory"]
