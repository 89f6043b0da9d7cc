"""Many ports (and fusions) from one manifest: ``loraport batch``, on a local process pool or a Ray cluster.

- :mod:`.manifest`: the manifest (``defaults`` + ``jobs``), each job turned into transfer options
  by the ``transfer`` command's own parser, or a ``fuse:`` job into ``fuse`` flags by the ``fuse``
  command's parser and checks; every problem reported at once.
- :mod:`.plan`: job records (resumability) and the plan of distinct subspaces over all jobs.
- :mod:`.workers`: what a worker runs (a subspace task, a port, a fusion).
- :mod:`.pools`: the local process pool (sized to cores and memory) and Ray.
- :mod:`.run`: :func:`batch`, the orchestration and the summary.
"""

from __future__ import annotations

from .manifest import FuseJob, Job, ManifestError
from .run import BatchOptions, BatchResult, RayOptions, batch
from .workers import JobOutcome

__all__ = ["BatchOptions", "BatchResult", "FuseJob", "Job", "JobOutcome", "ManifestError", "RayOptions", "batch"]
