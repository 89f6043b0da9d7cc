"""``loraport transfer``: port a LoRA adapter to another base model."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from ..errors import LoraportError
from . import register_command

if TYPE_CHECKING:
    from ..transfer import TransferOptions


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


def _transfer_args(p: argparse.ArgumentParser) -> None:
    from ..calibrate import (
        CALIBRATED,
        DEFAULT_INIT,
        DEFAULT_MAX_TOKENS,
        DEFAULT_OUTPUT_WEIGHT,
        DEFAULT_RIDGE,
        DEFAULT_SAMPLES,
        INITS,
    )
    from ..calibrate.options import ANCHOR_LAYERS, DEPTHS, MAPS, MODES, WRITERS, CalibrationOptions
    from ..methods import METHODS
    from ..transfer import DEFAULT_METHOD, DEFAULT_SUBSPACE_RANK

    defaults = CalibrationOptions()
    p.add_argument(
        "--adapter",
        required=True,
        help="PEFT LoRA adapter directory trained on the source base, or an image-model LoRA "
        "(kohya / diffusers .safetensors file, a directory holding one, or per-component PEFT directories)",
    )
    p.add_argument(
        "--source-base",
        required=True,
        help="source base model: directory, hub id or .gguf file (Stable Diffusion: diffusers folder or "
        "single .safetensors file)",
    )
    p.add_argument("--target-base", required=True, help="target base model (as --source-base)")
    p.add_argument(
        "--out",
        required=True,
        help="output adapter directory (written atomically); image-model LoRAs: also a .safetensors file",
    )
    p.add_argument(
        "--out-format",
        choices=["kohya", "diffusers", "peft"],
        default=None,
        help="image-model LoRAs: output format (default: the input's; peft = one PEFT directory per component)",
    )
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
    calib.add_argument(
        "--calib-mode",
        choices=list(MODES),
        default=defaults.mode,
        help="shared: module by module in shared coordinates; mapped: through maps learned between the two models' "
        "hidden states (other tokenizer, widths, depth); auto (default): shared when tokenizer and shapes match",
    )
    calib.add_argument(
        "--calib-depth",
        choices=list(DEPTHS),
        default=defaults.depth,
        help="mapped: pair layers by activation similarity (cka, default) or relative depth",
    )
    calib.add_argument(
        "--calib-map", choices=list(MAPS), default=defaults.map, help="mapped: the map between hidden states"
    )
    calib.add_argument(
        "--calib-map-ridge",
        type=float,
        default=defaults.map_ridge,
        metavar="MU",
        help=f"mapped: relative ridge of the maps (default {defaults.map_ridge})",
    )
    calib.add_argument(
        "--calib-writers",
        choices=list(WRITERS),
        default=defaults.writers,
        help="mapped: target modules that carry the effect (default o,down)",
    )
    calib.add_argument(
        "--calib-anchor",
        type=float,
        default=defaults.anchor,
        metavar="W",
        help=f"mapped: weight of the output anchor (same tokens decoded; 0: off; default {defaults.anchor})",
    )
    calib.add_argument(
        "--calib-anchor-layers",
        choices=list(ANCHOR_LAYERS),
        default=defaults.anchor_layers,
        help="mapped: anchor the last layer's map (default) or every layer's",
    )
    calib.add_argument(
        "--keep-all",
        dest="no_harm",
        action="store_false",
        help="keep every ported module (default: leave out a module that fits held-out text worse than leaving it "
        "out, or than the copy where shapes match; the report lists them)",
    )


def options_from_args(args: argparse.Namespace) -> TransferOptions:
    """The :class:`~loraport.transfer.TransferOptions` of parsed ``transfer`` flags (``loraport batch`` uses it too)."""
    from ..architectures import parse_layer_map
    from ..calibrate import FLAG_FIELDS
    from ..transfer import TransferOptions

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
        out_format=args.out_format,
    )
    for flag in FLAG_FIELDS:  # the calibrated group, by flag name
        if hasattr(args, flag):
            options.set(flag, getattr(args, flag))
    return options


def _transfer(args: argparse.Namespace) -> int:
    from ..transfer import transfer

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
