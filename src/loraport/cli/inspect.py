"""``loraport inspect``: an adapter's low-rank structure."""

from __future__ import annotations

import argparse
import json

from . import register_command


def _inspect_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "adapter", help="PEFT LoRA adapter directory, GGUF LoRA file, or a kohya / diffusers LoRA (.safetensors)"
    )
    p.add_argument(
        "--base",
        default=None,
        help="base model (directory, hub id or .gguf file; SD: diffusers folder or single file): "
        "measure dW in its subspaces",
    )
    p.add_argument("--subspace-rank", type=int, default=64, metavar="K")
    p.add_argument("--svd", choices=["exact", "randomized"], default="randomized")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _inspect(args: argparse.Namespace) -> int:
    from ..structure import format_structure, inspect_adapter, structure_to_dicts

    rows = inspect_adapter(args.adapter, args.base, args.subspace_rank, args.svd)
    print(json.dumps(structure_to_dicts(rows), indent=2) if args.json else format_structure(rows))
    return 0


register_command("inspect", "show an adapter's low-rank structure", _inspect_args, _inspect)
