"""The ``fuse`` command line's flags, shared by ``loraport fuse`` and ``loraport batch`` (``fuse:`` jobs).

:func:`add_fuse_arguments` fills a parser with every ``fuse`` flag; :func:`fuse_options_from_args`
turns the parsed weight-space flags into :class:`~loraport.fusion.FuseOptions`. The checks
that need the inputs' kinds and the call itself are :func:`loraport.api.check_fuse_args` and
:func:`loraport.api.fuse_from_args`.
"""

from __future__ import annotations

import argparse

from ..distill.options import DistillOptions
from ..errors import LoraportError
from ..option_fields import add_group_arguments
from .options import (
    AUTO,
    DARE_COMBINE,
    DEFAULT_EXCLUDE,
    DEFAULTS,
    FALLBACKS,
    DareOptions,
    FuseOptions,
    IsoCtsOptions,
    RegMeanOptions,
    RgspOptions,
    TiesOptions,
)
from .registry import FUSION_METHODS

# transfer's distillation flags fuse takes too; these are per adapter here (or named otherwise)
DISTILL_SKIP = ("prompts", "synthesize", "rank")


def parse_size(text: str) -> int:
    """``2GB``, ``500MB``, ``64KiB`` or a plain byte count."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    value = text.strip().upper()
    number = value.rstrip("KMGIB")
    try:
        return int(float(number) * units[value[len(number) :]])
    except (KeyError, ValueError):
        raise LoraportError(f"--shard-size: {text!r} is not a size (e.g. 2GB, 500MB, 1048576)") from None


def add_fuse_arguments(p: argparse.ArgumentParser) -> None:
    """Add every ``fuse`` flag to ``p`` (the command line's, and the batch manifest reader's)."""
    d = FuseOptions()
    p.add_argument(
        "--models",
        nargs="+",
        required=True,
        metavar="MODEL",
        help="two or more models, or two or more LoRA adapters (PEFT, or kohya / diffusers files of one SD base)",
    )
    p.add_argument(
        "--out",
        required=True,
        help="output directory (written atomically); adapters: also a .gguf file (GGUF LoRA); image-model LoRAs: "
        "a .safetensors file or a directory",
    )
    p.add_argument(
        "--out-format",
        default=None,
        choices=["peft", "gguf", "kohya", "diffusers"],
        help="adapters: peft or gguf (llama.cpp --lora; needs --base, the .gguf model; default: gguf for a .gguf "
        "--out, else the first input's format); image-model LoRAs: kohya, diffusers or peft (default: the first "
        "input's)",
    )
    labels = {"adapter": "LLM adapters", "image": "image-model LoRAs", "model": "models (needs --base)"}
    chosen = ", ".join(f"{m} x{s:g} for {labels.get(kind, kind)}" for kind, (m, s) in DEFAULTS.items())
    p.add_argument(
        "--method",
        default=d.method,
        choices=[AUTO, *FUSION_METHODS, "distill"],
        help=f"default {AUTO}: {chosen} (measured: benchmarks/results/fusion_real.md); with --prompts, auto scores "
        "weight-space merges by agreement with each adapter and distils when none keeps --min-kept; distill: "
        "LoRA adapters fused by distillation (each adapter a teacher on its own prompts, any bases)",
    )
    p.add_argument(
        "--base",
        default=None,
        help="common base model C (task-vector methods; adapters: the base they were trained on, for regmean, "
        "a GGUF output or GGUF inputs)",
    )
    p.add_argument(
        "--rank",
        type=int,
        default=None,
        help=f"models: RGSP top-r SVD rank (default {d.rgsp.rank}); adapters: rank of the fused adapter "
        "(default: the sum of the input ranks)",
    )
    p.add_argument(
        "--scaling",
        type=float,
        default=None,
        help="task-vector methods: W_C + scaling * merged (default 1, or the auto method's)",
    )
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

    g = p.add_argument_group("fusion by distillation (--method distill, or auto with --prompts)")
    g.add_argument("--prompts", nargs="+", default=None, metavar="FILE",
                   help="each adapter's task inputs, no labels (one file per adapter, in --models order)")  # fmt: skip
    g.add_argument("--bases", nargs="+", default=None, metavar="BASE",
                   help="the base each adapter was trained on (one, or one per adapter; default --base)")  # fmt: skip
    g.add_argument("--target-base", default=None, help="the fused adapter's base (default: the adapters' shared base)")
    g.add_argument("--synthesize", nargs="+", type=int, default=[0], metavar="N",
                   help="the teacher writes N more prompts (one count, or one per adapter)")  # fmt: skip
    g.add_argument("--min-kept", type=float, default=None, metavar="AGREEMENT",
                   help="auto: the worst task's held-out agreement a weight-space merge needs to be written without "
                   "distilling (default 0.9)")  # fmt: skip
    add_group_arguments(p, DistillOptions, "distillation settings (as for transfer --method distill)", DISTILL_SKIP,
                        "distill.")  # fmt: skip

    g = p.add_argument_group("rgsp")
    g.add_argument(
        "--epsilon", type=float, default=d.rgsp.epsilon, help=f"GW regularisation (default {d.rgsp.epsilon})"
    )
    g.add_argument("--beta", type=float, default=d.rgsp.beta, help=f"TOS temperature (default {d.rgsp.beta})")
    g.add_argument(
        "--gamma",
        type=float,
        default=d.rgsp.gamma,
        help=f"task-term scale (default {d.rgsp.gamma}, the seed's: lands past B; 0 = average)",
    )
    g.add_argument("--svd", choices=["exact", "randomized"], default=d.rgsp.svd, help=f"default {d.rgsp.svd}")

    g = p.add_argument_group("ties / dare")
    g.add_argument(
        "--density",
        type=float,
        default=None,
        help=f"kept fraction of each task vector (ties default {d.ties.density}, dare default {d.dare.density})",
    )
    g.add_argument(
        "--dare-combine",
        choices=DARE_COMBINE,
        default=d.dare.combine,
        help=f"dare: combine the dropped task vectors by sum or TIES sign election (default {d.dare.combine})",
    )
    g.add_argument("--seed", type=int, default=d.dare.seed, help=f"dare's mask seed (default {d.dare.seed})")

    g = p.add_argument_group("iso_cts")
    g.add_argument(
        "--common-fraction",
        type=float,
        default=d.iso_cts.common_fraction,
        help=f"share of min(m, n) kept as the common subspace (default {d.iso_cts.common_fraction})",
    )

    g = p.add_argument_group("regmean")
    g.add_argument(
        "--calibration",
        nargs="+",
        default=None,
        metavar="FILE",
        help="unlabeled text, one sample per line: one file for every model, or one per model (in --models order)",
    )
    g.add_argument(
        "--calib-samples", type=int, default=d.regmean.samples, help=f"samples used (default {d.regmean.samples})"
    )
    g.add_argument(
        "--calib-max-tokens",
        type=int,
        default=d.regmean.max_tokens,
        help=f"tokens per sample (default {d.regmean.max_tokens})",
    )
    g.add_argument(
        "--shrinkage",
        type=float,
        default=d.regmean.shrinkage,
        help=f"factor on off-diagonal Gram entries (default {d.regmean.shrinkage})",
    )
    g.add_argument(
        "--fallback",
        choices=FALLBACKS,
        default=d.regmean.fallback,
        help=f"for tensors that are not a decoder layer's linear weight (default {d.regmean.fallback})",
    )
    g.add_argument("--device", default=d.regmean.device, help=f"where the models run (default {d.regmean.device})")


def fuse_options_from_args(args: argparse.Namespace) -> FuseOptions:
    """The :class:`~loraport.fusion.FuseOptions` of parsed ``fuse`` flags (weight-space methods; unvalidated)."""
    defaults = FuseOptions()
    rgsp = RgspOptions(epsilon=args.epsilon, beta=args.beta, gamma=args.gamma, svd=args.svd)
    if args.rank is not None:
        rgsp.rank = args.rank  # models; for adapters --rank is the output rank (rgsp's rank is clamped anyway)
    density = args.density
    return FuseOptions(
        method=args.method,
        scaling=args.scaling,
        include=args.include,
        exclude=args.exclude or None,
        allow_mismatch=args.allow_mismatch,
        shard_size=parse_size(args.shard_size),
        rgsp=rgsp,
        ties=TiesOptions(density=density if density is not None else defaults.ties.density),
        dare=DareOptions(
            density=density if density is not None else defaults.dare.density, combine=args.dare_combine, seed=args.seed
        ),
        iso_cts=IsoCtsOptions(common_fraction=args.common_fraction),
        regmean=RegMeanOptions(
            calibration=args.calibration[0] if args.calibration and len(args.calibration) == 1 else None,
            model_calibration=args.calibration if args.calibration and len(args.calibration) > 1 else None,
            samples=args.calib_samples,
            max_tokens=args.calib_max_tokens,
            shrinkage=args.shrinkage,
            fallback=args.fallback,
            device=args.device,
        ),
    )


def distilled(args: argparse.Namespace) -> bool:
    """Does this ``fuse`` command line fuse by distillation (``--method distill``, or ``auto`` with ``--prompts``)?"""
    return bool(args.method == "distill" or (args.method == "auto" and args.prompts is not None))


__all__ = ["DISTILL_SKIP", "add_fuse_arguments", "distilled", "fuse_options_from_args", "parse_size"]
