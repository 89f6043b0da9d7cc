"""The settings of a port, declared once, and everything derived from them.

:class:`TransferOptions` holds the options every method shares (grouped by concern:
``port``, ``subspace``, ``threshold``, ``output``) and one group per method that has its own
settings (``calibrated``: :class:`~loraport.calibrate.CalibrationOptions`). Each field is
declared with :func:`~loraport.option_fields.option`; from those declarations come

- the ``loraport transfer`` flags (:func:`add_transfer_arguments`), also used to read the jobs
  of a ``loraport batch`` manifest, whose keys are those flags with underscores;
- :func:`options_from_args`: parsed flags -> :class:`TransferOptions`;
- the keyword names :func:`loraport.transfer` accepts (:meth:`TransferOptions.set`).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from ..architectures import parse_layer_map
from ..calibrate import CALIBRATED, FLAG_FIELDS, CalibrationOptions
from ..distill.options import DISTILL, DISTILL_FIELDS, DistillOptions
from ..errors import LoraportError, TransferError
from ..methods import METHODS, get_method
from ..option_fields import OptionSpec, add_option_argument, check_choices, declared, option

DEFAULT_METHOD = "auto"
DEFAULT_SUBSPACE_RANK = 64
SIMILARITY_MODES = ("min", "mean", "U", "V")
THRESHOLD_ON = ("raw", "above_chance")
OUT_FORMATS = ("kohya", "diffusers", "peft", "gguf")

# Help-section titles of the shared options' concerns (a method group has its own title).
GROUP_TITLES = {"subspace": "subspaces", "threshold": "thresholds", "output": "output"}


def method_names() -> tuple[str, ...]:
    """Every ``--method`` choice: the per-module methods and the methods with their own group."""
    return tuple(sorted([*METHODS, CALIBRATED, DISTILL]))


def parse_thresholds(text: str | None) -> dict[str, float]:
    """``--threshold-by-type`` text (``q_proj=0.2,mlp.down=0.1``) as a mapping."""
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


@dataclass
class TransferOptions:
    """Settings of a port (the command line's flags).

    Attributes:
        method: a name from :data:`loraport.methods.METHODS`, or ``calibrated``.
        subspace_rank: k, clamped per module to ``min(m, n)`` of both weights (reported).
        svd: ``"randomized"`` (default) or ``"exact"``.
        threshold: skip modules whose similarity is below this (``None``: keep all).
        threshold_by_type: per module type, keyed by role (``attn.q``) or leaf name (``q_proj``).
        threshold_on: compare thresholds with the ``"raw"`` or ``"above_chance"`` similarity.
        similarity: how ``sim_U`` and ``sim_V`` combine: ``min`` (default), ``mean``, ``U``, ``V``.
        fallback: what to do below threshold: ``"skip"`` or another method's name.
        layer_map: explicit target layer -> source layer map (default: relative depth).
        device: where the math runs (``cpu``, ``cuda``).
        cache_dir: subspace cache directory (default :func:`~loraport.io.default_cache_dir`);
            ``use_cache=False`` disables it.
        oversample / niter / seed: randomized SVD parameters.
        drop_unsupported: port the LoRA part of adapters with ``modules_to_save`` or
            embedding LoRAs, listing what was dropped.
        report_similarity: compute source/target subspace similarity for every module.
            ``None`` (default): yes for methods that use subspaces, no for ``identity``
            (it would cost two SVDs per module for a number the method ignores);
            always on when a threshold is set.
        calibrated: the settings of ``method="calibrated"``
            (:class:`~loraport.calibrate.CalibrationOptions`: text, samples, ridge, init, mode, ...).
            :func:`loraport.transfer` also takes them flat, spelled like the command-line flags
            (``calibration=``, ``calib_rank=``, ``ridge=``, ...; :data:`~loraport.calibrate.FLAG_FIELDS`).
            ``distill`` uses its text (generic text) and ``init`` too.
        distill: the settings of ``method="distill"`` (:class:`~loraport.distill.DistillOptions`:
            prompts, synthesize, rank, steps, time, ...), also taken flat (``prompts=``,
            ``distill_rank=``, ...; :data:`~loraport.distill.DISTILL_FIELDS`).
        out_format: language-model LoRAs: ``peft`` or ``gguf`` (a GGUF LoRA for llama.cpp; needs a
            GGUF target base); image-model LoRAs: ``kohya``, ``diffusers`` or ``peft`` (one PEFT
            directory per component); ``None`` (default) writes the input's format (language
            models: ``gguf`` for an ``out`` ending in ``.gguf``).
    """

    method: str = option(
        DEFAULT_METHOD,
        flag="method",
        group="port",
        choices=method_names,
        help=f"transfer method (default {DEFAULT_METHOD})",
    )
    subspace_rank: int = option(
        DEFAULT_SUBSPACE_RANK,
        flag="subspace_rank",
        group="subspace",
        word=int,
        metavar="K",
        help=f"top-k singular subspace rank (default {DEFAULT_SUBSPACE_RANK}; clamped to min(m, n))",
    )
    svd: str = option("randomized", flag="svd", group="subspace", choices=("exact", "randomized"), help="SVD algorithm")
    threshold: float | None = option(
        None,
        flag="threshold",
        group="threshold",
        word=float,
        metavar="X",
        help="skip modules whose subspace similarity is below X (default: keep all)",
    )
    threshold_by_type: dict[str, float] = option(
        default_factory=dict,
        flag="threshold_by_type",
        group="threshold",
        metavar="TYPE=X,...",
        convert=parse_thresholds,
        help="per module type thresholds, by leaf name or role: q_proj=0.3,mlp.down=0.1",
    )
    threshold_on: str = option(
        "raw",
        flag="threshold_on",
        group="threshold",
        choices=THRESHOLD_ON,
        help="compare thresholds with the raw or the above-chance similarity",
    )
    similarity: str = option(
        "min",
        flag="similarity",
        group="threshold",
        choices=SIMILARITY_MODES,
        help="combine sim_U and sim_V (default min)",
    )
    fallback: str = option(
        "skip", flag="fallback", group="threshold", help="below threshold: skip (default) or use this method"
    )
    layer_map: dict[int, int] | None = option(
        None,
        flag="layer_map",
        group="port",
        metavar="T:S,...",
        convert=parse_layer_map,
        help="explicit target:source layer pairs (default: relative depth)",
    )
    device: str = option("cpu", flag="device", group="port", help="cpu or cuda")
    cache_dir: str | None = option(
        None, flag="cache_dir", group="subspace", help="subspace cache directory (default ~/.cache/loraport)"
    )
    use_cache: bool = option(
        True, flag="no_cache", group="subspace", switch=True, help="do not read or write the subspace cache"
    )
    oversample: int = option(8, group="subspace")
    niter: int = option(2, group="subspace")
    seed: int = option(0, group="subspace")
    drop_unsupported: bool = option(
        False,
        flag="drop_unsupported",
        group="port",
        switch=True,
        help="port the LoRA part of adapters with modules_to_save or embedding LoRAs",
    )
    report_similarity: bool | None = option(None, group="subspace")
    calibrated: CalibrationOptions = field(default_factory=CalibrationOptions)
    distill: DistillOptions = field(default_factory=DistillOptions)
    out_format: str | None = option(
        None,
        flag="out_format",
        group="output",
        choices=OUT_FORMATS,
        help="output format (default: the input's; gguf when --out ends in .gguf). Language models: peft or "
        "gguf (llama.cpp --lora, Ollama ADAPTER; needs a .gguf target base); image models: kohya, diffusers or "
        "peft (one PEFT directory per component)",
    )

    def validate(self) -> None:
        if self.method == CALIBRATED:
            self.calibrated.validate()
        if self.method == DISTILL:
            self.distill.validate()
            self.calibrated.validate_for_distill()
            if self.distill.learn != "lora":
                raise TransferError(
                    f"--distill-learn {self.distill.learn} is for fuse --method distill (weights over several "
                    "adapters); a transfer learns a LoRA"
                )
            if self.distill.task_shares != "even":
                raise TransferError(
                    f"--distill-task-shares {self.distill.task_shares} is for fuse --method distill (a batch split "
                    "over several teachers); a transfer has one"
                )
        try:
            get_method(self.init_method if self.method in (CALIBRATED, DISTILL) else self.method)
            if self.fallback != "skip":
                fallback = get_method(self.fallback)
                if fallback.name == self.method:
                    raise ValueError("fallback must differ from the method")
        except ValueError as exc:
            raise TransferError(str(exc)) from None
        if self.subspace_rank < 1:
            raise TransferError(f"subspace rank must be >= 1, got {self.subspace_rank}")
        check_choices(self)  # every declared choice (an unknown method was named by get_method above)
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise TransferError("--device cuda requested but CUDA is not available")

    @property
    def init_method(self) -> str:
        """The per-module method a calibrated or distilled port starts from (``zero`` starts from the copy's units)."""
        return "identity" if self.calibrated.init == "zero" else self.calibrated.init

    def set(self, name: str, value: Any) -> None:
        """Set an option by its field name or its keyword name (``calib_rank`` sets ``calibrated.rank``)."""
        if name in FLAG_FIELDS:
            setattr(self.calibrated, FLAG_FIELDS[name], value)
        elif name in DISTILL_FIELDS:
            setattr(self.distill, DISTILL_FIELDS[name], value)
        elif name in {f.name for f in fields(self)}:
            setattr(self, name, value)
        else:
            raise TypeError(f"transfer() got an unknown option {name!r}")

    @property
    def thresholded(self) -> bool:
        return self.threshold is not None or bool(self.threshold_by_type)

    def wants_similarity(self, method_uses_subspaces: bool) -> bool:
        if self.thresholded:
            return True
        return method_uses_subspaces if self.report_similarity is None else self.report_similarity

    def threshold_for(self, role: str, leaves: Iterable[str]) -> float | None:
        for key in (role, *leaves):
            if key in self.threshold_by_type:
                return self.threshold_by_type[key]
        return self.threshold


# The method groups of TransferOptions: field name -> its options class (which has a TITLE).
METHOD_GROUPS: dict[str, type] = {"calibrated": CalibrationOptions, "distill": DistillOptions}


@dataclass(frozen=True)
class PortArgument:
    """A ``transfer`` argument that is not an option of the method: what to port, where to, how to run."""

    flag: str
    help: str
    required: bool = False
    metavar: str | None = None
    switch: bool = False


PORT_ARGUMENTS = (
    PortArgument(
        "adapter",
        "PEFT LoRA adapter directory or GGUF LoRA file trained on the source base, or an image-model LoRA "
        "(kohya / diffusers .safetensors file, a directory holding one, or per-component PEFT directories)",
        required=True,
    ),
    PortArgument(
        "source_base",
        "source base model: directory, hub id or .gguf file (Stable Diffusion: diffusers folder or "
        "single .safetensors file)",
        required=True,
    ),
    PortArgument("target_base", "target base model (as --source-base)", required=True),
    PortArgument(
        "out",
        "output adapter directory (written atomically); also a single file: .gguf (GGUF LoRA), "
        ".safetensors (image-model LoRAs)",
        required=True,
    ),
    PortArgument("report", "write the report (JSON + Markdown)", metavar="FILE.json"),
    PortArgument("overwrite", "replace an existing --out directory", switch=True),
    PortArgument("quiet", "no progress bar", switch=True),
)


def declared_options() -> Iterator[tuple[str | None, Any, OptionSpec]]:
    """``(group field or None, field, declaration)`` of every option of a port, shared ones first."""
    for f, spec in declared(TransferOptions):
        yield None, f, spec
    for group, cls in METHOD_GROUPS.items():
        for f, spec in declared(cls):
            yield group, f, spec


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _dest(group: str | None, name: str) -> str:
    return name if group is None else f"{group}.{name}"


def add_transfer_arguments(parser: argparse.ArgumentParser) -> None:
    """Add every ``transfer`` flag to ``parser`` (the command line's, and the batch manifest reader's)."""
    for argument in PORT_ARGUMENTS:
        if argument.switch:
            parser.add_argument(_flag(argument.flag), action="store_true", help=argument.help)
        else:
            parser.add_argument(
                _flag(argument.flag), required=argument.required, default=None, metavar=argument.metavar,
                help=argument.help,
            )  # fmt: skip
    sections: dict[str, Any] = {}
    for group, f, spec in declared_options():
        if spec.flag is None:
            continue
        if group is not None:
            title = METHOD_GROUPS[group].TITLE  # type: ignore[attr-defined]
        else:
            title = GROUP_TITLES.get(spec.group or "")
        target = parser if title is None else sections.setdefault(title, parser.add_argument_group(title))
        add_option_argument(target, f, spec, _dest(group, f.name))


def options_from_args(args: argparse.Namespace) -> TransferOptions:
    """The :class:`TransferOptions` of parsed ``transfer`` flags (``loraport batch`` reads its jobs with it too).

    Options without a flag keep their defaults; ``convert`` errors are ``LoraportError`` s.
    """
    options = TransferOptions()
    for group, f, spec in declared_options():
        dest = _dest(group, f.name)
        if spec.flag is None or not hasattr(args, dest):
            continue
        value = getattr(args, dest)
        if spec.convert is not None:
            if value is None:
                continue
            value = spec.convert(value)
        setattr(options if group is None else getattr(options, group), f.name, value)
    return options


__all__ = [
    "DEFAULT_METHOD",
    "DEFAULT_SUBSPACE_RANK",
    "METHOD_GROUPS",
    "OUT_FORMATS",
    "PORT_ARGUMENTS",
    "SIMILARITY_MODES",
    "THRESHOLD_ON",
    "PortArgument",
    "TransferOptions",
    "add_transfer_arguments",
    "declared_options",
    "method_names",
    "options_from_args",
    "parse_thresholds",
]
