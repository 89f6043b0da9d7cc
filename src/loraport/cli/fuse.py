"""``loraport fuse``: weight-space fusion of ``N >= 2`` models or adapters (flags: :mod:`loraport.fusion.arguments`)."""

from __future__ import annotations

import argparse

from . import quiet_loading, register_command


def _fuse_args(p: argparse.ArgumentParser) -> None:
    from ..fusion.arguments import add_fuse_arguments

    add_fuse_arguments(p)


def _fuse(args: argparse.Namespace) -> int:
    from ..api import fuse_from_args, input_kind
    from ..fusion.arguments import distilled

    if args.quiet:
        quiet_loading()
    result = fuse_from_args(args, progress=not args.quiet)
    print(result.report.summary())
    if distilled(args):
        print("\n".join(result.report.notes))
        what = "adapter"
    else:
        what = "image-model LoRA" if input_kind(args.models[0]) == "image" else result.report.kind
    print(f"{what} written to {args.out}" + (f"; report {args.report}" if args.report else ""))
    return 0


register_command("fuse", "fuse two or more fine-tuned models (or LoRA adapters) in weight space", _fuse_args, _fuse)
