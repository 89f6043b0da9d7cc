"""``loraport demo``: port the shipped tiny LoRA with each method and score it."""

from __future__ import annotations

import argparse
import sys

from . import register_command


def _demo_args(p: argparse.ArgumentParser) -> None:
    from ..demo import DEFAULT_DEMO_RANK, DEFAULT_METHODS

    p.add_argument("--out", default=None, metavar="DIR", help="adapters, reports, results (default: a new temp dir)")
    p.add_argument(
        "--methods",
        nargs="+",
        default=list(DEFAULT_METHODS),
        choices=list(DEFAULT_METHODS),
        metavar="METHOD",
        help=f"transfer methods (default: {' '.join(DEFAULT_METHODS)}; identity only where shapes match)",
    )
    p.add_argument("--subspace-rank", type=int, default=DEFAULT_DEMO_RANK, metavar="K", help="k (default 64)")
    p.add_argument("--targets", nargs="+", default=None, metavar="NAME", help="shipped targets (default: all)")
    p.add_argument("--quiet", action="store_true", help="print only the results table and where they went")


def _demo(args: argparse.Namespace) -> int:
    import tempfile
    import time

    from ..demo import format_table, run_demo

    started = time.perf_counter()
    out = args.out or tempfile.mkdtemp(prefix="loraport-demo-")
    say = None if args.quiet else (lambda text: print(text, file=sys.stderr, flush=True))
    rows = run_demo(out, args.methods, args.subspace_rank, args.targets, say=say)
    print(format_table(rows))
    print(f"\nadapters, reports and results.md in {out} ({time.perf_counter() - started:.0f} s)")
    return 0


register_command(
    "demo", "port the shipped tiny LoRA to the shipped targets with each method and score it", _demo_args, _demo
)
