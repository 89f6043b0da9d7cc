"""``loraport transfer``: port a LoRA adapter to another base model (flags from the declared options)."""

from __future__ import annotations

import argparse

from . import quiet_loading, register_command


def _transfer_args(p: argparse.ArgumentParser) -> None:
    from ..port.options import add_transfer_arguments

    add_transfer_arguments(p)


def _transfer(args: argparse.Namespace) -> int:
    from ..api import transfer
    from ..port.options import options_from_args

    if args.quiet:
        quiet_loading()

    result = transfer(
        args.adapter,
        args.source_base,
        args.target_base,
        args.out,
        options=options_from_args(args),
        report_path=args.report,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    print(result.report.summary())
    print(f"adapter written to {result.output}" + (f"; report {args.report}" if args.report else ""))
    return 0


register_command("transfer", "port a LoRA adapter to another base model", _transfer_args, _transfer)
