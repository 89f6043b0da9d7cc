"""``loraport fuse``: weight-space fusion of models or adapters."""

from __future__ import annotations

import argparse

from ..errors import LoraportError
from . import register_command


def _parse_size(text: str) -> int:
    """``2GB``, ``500MB``, ``64KiB`` or a plain byte count."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    value = text.strip().upper()
    number = value.rstrip("KMGIB")
    try:
        return int(float(number) * units[value[len(number) :]])
    except (KeyError, ValueError):
        raise LoraportError(f"--shard-size: {text!r} is not a size (e.g. 2GB, 500MB, 1048576)") from None


def _fuse_args(p: argparse.ArgumentParser) -> None:
    from ..fusion.methods import DEFAULT_EXCLUDE, FUSION_METHODS, FuseOptions

    d = FuseOptions()
    p.add_argument("--models", nargs=2, required=True, metavar=("A", "B"), help="two models, or two LoRA adapters")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--method", default=d.method, choices=list(FUSION_METHODS), help=f"default {d.method}")
    p.add_argument("--base", default=None, help="common base model C (task_arithmetic, ties)")
    p.add_argument(
        "--rank",
        type=int,
        default=None,
        help=f"models: RGSP top-r SVD rank (default {d.rank}); adapters: rank of the fused adapter (default r_A + r_B)",
    )
    p.add_argument("--epsilon", type=float, default=d.epsilon, help=f"GW entropic regularisation (default {d.epsilon})")
    p.add_argument("--beta", type=float, default=d.beta, help=f"RGSP TOS temperature (default {d.beta})")
    p.add_argument("--gamma", type=float, default=d.gamma, help=f"RGSP task-term scale (default {d.gamma})")
    p.add_argument("--density", type=float, default=d.density, help=f"TIES kept fraction (default {d.density})")
    p.add_argument("--scaling", type=float, default=d.scaling, help=f"task-vector scale (default {d.scaling})")
    p.add_argument("--svd", choices=["exact", "randomized"], default=d.svd, help=f"SVD algorithm (default {d.svd})")
    p.add_argument("--include", default=None, metavar="REGEX", help="tensors sent through the method (default: 2-D)")
    p.add_argument(
        "--exclude",
        default=DEFAULT_EXCLUDE,
        metavar="REGEX",
        help=f"tensors averaged instead (default {DEFAULT_EXCLUDE!r})",
    )
    p.add_argument("--shard-size", default="2GiB", help="max output shard size (default 2GiB)")
    p.add_argument(
        "--allow-mismatch", action="store_true", help="fuse models of different types, tensor sets or shapes"
    )
    p.add_argument("--report", default=None, metavar="FILE.json", help="write the report (JSON + Markdown)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _fuse(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..adapters import CONFIG_NAME
    from ..fusion import FuseOptions, fuse, fuse_adapters

    options = FuseOptions(
        method=args.method,
        epsilon=args.epsilon,
        beta=args.beta,
        gamma=args.gamma,
        density=args.density,
        scaling=args.scaling,
        svd=args.svd,
        include=args.include,
        exclude=args.exclude or None,
        allow_mismatch=args.allow_mismatch,
        shard_size=_parse_size(args.shard_size),
    )
    a, b = args.models
    is_adapter = [(Path(m) / CONFIG_NAME).exists() for m in args.models]
    common = dict(options=options, report_path=args.report, overwrite=args.overwrite, progress=not args.quiet)
    if any(is_adapter):
        if not all(is_adapter):
            which = a if is_adapter[0] else b
            raise LoraportError(
                f"{which} is a LoRA adapter but the other input is not: pass two models or two adapters"
            )
        if args.base:
            raise LoraportError("--base is for model fusion; adapters are fused on their shared base (C = 0)")
        result = fuse_adapters(a, b, args.out, rank=args.rank, **common)
    else:
        if args.rank is not None:
            options.rank = args.rank
        result = fuse(a, b, args.out, base=args.base, **common)
    print(result.report.summary())
    print(f"{result.report.kind} written to {args.out}" + (f"; report {args.report}" if args.report else ""))
    return 0


register_command("fuse", "fuse two fine-tuned models (or two LoRA adapters) in weight space", _fuse_args, _fuse)
