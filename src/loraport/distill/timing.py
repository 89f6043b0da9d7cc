"""Where a distilled port's time goes: named phases, timed (the report's breakdown, ``--verbose`` lines)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)


class Phases:
    """Wall time per named phase, in the order first seen; a phase entered twice adds up.

    Example::

        >>> phases = Phases()
        >>> with phases("teacher: generate"):
        ...     pass
        >>> list(phases.seconds)
        ['teacher: generate']
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            spent = time.perf_counter() - started
            self.seconds[name] = self.seconds.get(name, 0.0) + spent
            log.info("distill: %s %.1f s", name, spent)

    def rounded(self) -> dict[str, float]:
        return {name: round(value, 2) for name, value in self.seconds.items()}


__all__ = ["Phases"]
