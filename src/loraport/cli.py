"""The ``loraport`` command line: thin wrappers over the library API, no math here.

Bad input exits with status 2 and a one-line ``loraport: error: ...`` naming the file or
module; progress bars go to stderr; results and summaries to stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence

from .errors import LoraportError

Handler = Callable[[argparse.Namespace], int]
_COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Handler, str]] = {}


def register_command(
    name: str, help_text: str, add_arguments: Callable[[argparse.ArgumentParser], None], handler: Handler
) -> None:
    """Add a sub-command: ``add_arguments`` fills its parser, ``handler`` runs it (returns the exit code)."""
    _COMMANDS[name] = (add_arguments, handler, help_text)


def _parse_thresholds(text: str | None) -> dict[str, float]:
    if not text:
        return {}
    result: dict[str, float] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = item.partition("=")
        try:
            if not sep or not name:
                raise ValueError
            result[name.strip()] = float(value)
        except ValueError:
            raise LoraportError(f"--threshold-by-type: {item!r} is not TYPE=NUMBER (e.g. q_proj=0.2)") from None
    return result


# -- transfer ---------------------------------------------------------------------------


def _transfer_args(p: argparse.ArgumentParser) -> None:
    from .calibrate import (
        CALIBRATED,
        DEFAULT_INIT,
        DEFAULT_MAX_TOKENS,
        DEFAULT_OUTPUT_WEIGHT,
        DEFAULT_RIDGE,
        DEFAULT_SAMPLES,
        INITS,
    )
    from .methods import METHODS
    from .transfer import DEFAULT_METHOD, DEFAULT_SUBSPACE_RANK

    p.add_argument("--adapter", required=True, help="PEFT LoRA adapter directory trained on the source base")
    p.add_argument("--source-base", required=True, help="source base model: directory or hub id")
    p.add_argument("--target-base", required=True, help="target base model: directory or hub id")
    p.add_argument("--out", required=True, help="output adapter directory (written atomically)")
    p.add_argument(
        "--method",
        default=DEFAULT_METHOD,
        choices=sorted([*METHODS, CALIBRATED]),
        help=f"transfer method (default {DEFAULT_METHOD})",
    )
    p.add_argument(
        "--subspace-rank",
        type=int,
        default=DEFAULT_SUBSPACE_RANK,
        metavar="K",
        help=f"top-k singular subspace rank (default {DEFAULT_SUBSPACE_RANK}; clamped to min(m, n))",
    )
    p.add_argument("--svd", choices=["exact", "randomized"], default="randomized", help="SVD algorithm")
    p.add_argument(
        "--threshold",
        type=float,
        default=None,
        metavar="X",
        help="skip modules whose subspace similarity is below X (default: keep all)",
    )
    p.add_argument(
        "--threshold-by-type",
        default=None,
        metavar="TYPE=X,...",
        help="per module type thresholds, by leaf name or role: q_proj=0.3,mlp.down=0.1",
    )
    p.add_argument(
        "--threshold-on",
        choices=["raw", "above_chance"],
        default="raw",
        help="compare thresholds with the raw or the above-chance similarity",
    )
    p.add_argument(
        "--similarity", choices=["min", "mean", "U", "V"], default="min", help="combine sim_U and sim_V (default min)"
    )
    p.add_argument("--fallback", default="skip", help="below threshold: skip (default) or use this method")
    p.add_argument(
        "--layer-map",
        default=None,
        metavar="T:S,...",
        help="explicit target:source layer pairs (default: relative depth)",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--report", default=None, metavar="FILE.json", help="write the report (JSON + Markdown)")
    p.add_argument("--cache-dir", default=None, help="subspace cache directory (default ~/.cache/loraport)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the subspace cache")
    p.add_argument(
        "--drop-unsupported",
        action="store_true",
        help="port the LoRA part of adapters with modules_to_save or embedding LoRAs",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    calib = p.add_argument_group("calibrated transfer (--method calibrated)")
    calib.add_argument("--calibration", default=None, metavar="FILE", help="unlabeled text, one sample per line")
    calib.add_argument(
        "--calib-samples",
        type=int,
        default=DEFAULT_SAMPLES,
        metavar="N",
        help=f"samples used (default {DEFAULT_SAMPLES})",
    )
    calib.add_argument(
        "--calib-max-tokens",
        type=int,
        default=DEFAULT_MAX_TOKENS,
        metavar="T",
        help=f"tokens per sample (default {DEFAULT_MAX_TOKENS})",
    )
    calib.add_argument(
        "--ridge",
        default=str(DEFAULT_RIDGE),
        metavar="LAM",
        help=f"ridge weight toward the init, in units of the mean input energy, or 'auto' (default {DEFAULT_RIDGE})",
    )
    calib.add_argument(
        "--init", default=DEFAULT_INIT, choices=list(INITS), help=f"start point's method (default {DEFAULT_INIT})"
    )
    calib.add_argument(
        "--calib-output-weight",
        type=float,
        default=DEFAULT_OUTPUT_WEIGHT,
        metavar="BETA",
        help="1: match each module's whole output (default); 0: only the adapter's contribution",
    )
    calib.add_argument(
        "--calib-rank",
        type=int,
        default=None,
        metavar="R",
        help="rank of the ported modules (default: the source's; more rank = a bigger, often better adapter)",
    )


def _transfer(args: argparse.Namespace) -> int:
    from .architectures import parse_layer_map
    from .transfer import TransferOptions, transfer

    options = TransferOptions(
        method=args.method,
        subspace_rank=args.subspace_rank,
        svd=args.svd,
        threshold=args.threshold,
        threshold_by_type=_parse_thresholds(args.threshold_by_type),
        threshold_on=args.threshold_on,
        similarity=args.similarity,
        fallback=args.fallback,
        layer_map=parse_layer_map(args.layer_map) if args.layer_map else None,
        device=args.device,
        cache_dir=args.cache_dir,
        use_cache=not args.no_cache,
        drop_unsupported=args.drop_unsupported,
        calibration=args.calibration,
        calib_samples=args.calib_samples,
        calib_max_tokens=args.calib_max_tokens,
        ridge=args.ridge,
        init=args.init,
        calib_output_weight=args.calib_output_weight,
        calib_rank=args.calib_rank,
    )
    result = transfer(
        args.adapter,
        args.source_base,
        args.target_base,
        args.out,
        options=options,
        report_path=args.report,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    print(result.report.summary())
    print(f"adapter written to {result.output}" + (f"; report {args.report}" if args.report else ""))
    return 0


register_command("transfer", "port a LoRA adapter to another base model", _transfer_args, _transfer)


# -- inspect ----------------------------------------------------------------------------


def _inspect_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapter", help="PEFT LoRA adapter directory")
    p.add_argument("--base", default=None, help="base model (directory or hub id): measure dW in its subspaces")
    p.add_argument("--subspace-rank", type=int, default=64, metavar="K")
    p.add_argument("--svd", choices=["exact", "randomized"], default="randomized")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _inspect(args: argparse.Namespace) -> int:
    from .structure import format_structure, inspect_adapter, structure_to_dicts

    rows = inspect_adapter(args.adapter, args.base, args.subspace_rank, args.svd)
    print(json.dumps(structure_to_dicts(rows), indent=2) if args.json else format_structure(rows))
    return 0


register_command("inspect", "show an adapter's low-rank structure", _inspect_args, _inspect)


# -- eval -------------------------------------------------------------------------------


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="base model directory (with its tokenizer)")
    p.add_argument("--adapter", default=None, help="PEFT LoRA adapter directory to apply")
    p.add_argument("--data", required=True, metavar="FILE.jsonl", help="ARC-format JSONL questions")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="score only the first N questions")
    p.add_argument("--batch-size", type=int, default=32, metavar="B", help="requests per forward pass (default 32)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="model dtype (default float32)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a summary line")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _eval(args: argparse.Namespace) -> int:
    import torch

    from .evaluate import evaluate_path

    result = evaluate_path(
        args.model,
        args.data,
        adapter=args.adapter,
        limit=args.limit,
        batch_size=args.batch_size,
        device=args.device,
        progress=not args.quiet,
        dtype=getattr(torch, args.dtype),
    )
    print(json.dumps(result.to_dict()) if args.json else result.summary())
    return 0


register_command("eval", "score a model (+ adapter) on ARC-format multiple choice, as lm-eval", _eval_args, _eval)


# -- fuse -------------------------------------------------------------------------------


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
    from .fusion.methods import DEFAULT_EXCLUDE, FUSION_METHODS, FuseOptions

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

    from .adapters import CONFIG_NAME
    from .fusion import FuseOptions, fuse, fuse_adapters

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


# -- demo -------------------------------------------------------------------------------


def _demo_args(p: argparse.ArgumentParser) -> None:
    from .demo import DEFAULT_DEMO_RANK, DEFAULT_METHODS

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

    from .demo import format_table, run_demo

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loraport",
        description="Port LoRA adapters between base models without training data; fuse fine-tuned models.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log details to stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (add_arguments, _, help_text) in _COMMANDS.items():
        add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="loraport: %(levelname)s: %(message)s"
    )
    try:
        return _COMMANDS[args.command][1](args)
    except LoraportError as exc:
        print(f"loraport: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("loraport: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
