"""``loraport batch``: port (or fuse) every job of a manifest, on a local process pool or a Ray cluster."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
from collections.abc import Iterator
from typing import Any

from . import register_command


def _batch_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "manifest",
        metavar="MANIFEST",
        help="YAML or JSON: 'defaults' and 'jobs'; a job has adapter, out, source_base, target_base and any "
        "transfer flag with underscores (subspace_rank: 32), or is {fuse: {models: [A, B], out: DIR, ...}} with "
        "any fuse flag with underscores (defaults.fuse: their defaults)",
    )
    p.add_argument(
        "--cache-dir",
        default=None,
        help="subspace cache shared by every job (default ~/.cache/loraport/subspaces); with --ray, a path "
        "every worker sees",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="local processes (default: min(cores / threads, available memory / per-job estimate, jobs))",
    )
    p.add_argument(
        "--threads-per-job",
        type=int,
        default=1,
        metavar="T",
        help="torch threads (Ray: CPUs) per job (default 1; outputs are the same for any pool or executor)",
    )
    p.add_argument(
        "--job-memory",
        type=float,
        default=None,
        metavar="MB",
        help="per-job peak memory for sizing the pool (default: estimated from the jobs)",
    )
    p.add_argument(
        "--ray",
        nargs="?",
        const="",
        default=None,
        metavar="ADDRESS",
        help="run the jobs as Ray tasks (pip install 'loraport[ray]'); ADDRESS of a running cluster "
        "(default: RAY_ADDRESS, a running local cluster, or a new local instance)",
    )
    p.add_argument("--gpus-per-job", type=float, default=0.0, metavar="G", help="GPUs per Ray task (needs --ray)")
    p.add_argument(
        "--summary",
        default=None,
        metavar="FILE.json",
        help="JSON summary (default: MANIFEST's name + .summary.json, beside it)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace outputs that exist but no batch wrote")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (a scheduler stopping us) unwinds like Ctrl-C: workers stop, no partial outputs."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _batch(args: argparse.Namespace) -> int:
    from ..batching import BatchOptions, RayOptions, batch
    from ..errors import LoraportError

    if args.gpus_per_job and args.ray is None:
        raise LoraportError("--gpus-per-job needs --ray (the local pool runs on this machine's CPUs)")
    options = BatchOptions(
        cache_dir=args.cache_dir,
        workers=args.workers,
        threads_per_job=args.threads_per_job,
        job_memory_mb=args.job_memory,
        ray=RayOptions(args.ray or None, args.gpus_per_job) if args.ray is not None else None,
        overwrite=args.overwrite,
    )
    with _sigterm_as_interrupt():
        result = batch(args.manifest, options=options, summary_path=args.summary, progress=not args.quiet)
    print(result.table())
    print(result.totals_line())
    if "description" in result.summary["executor"]:
        print(result.summary["executor"]["description"])
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if result.summary_path is not None:
        print(f"summary written to {result.summary_path}")
    return 0 if result.ok else 1


register_command(
    "batch", "port (or fuse) many adapters from a manifest (local process pool or Ray)", _batch_args, _batch
)
