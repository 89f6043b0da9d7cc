"""The settings of calibrated transfer, grouped apart from the data-free methods' options."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from ..errors import TransferError
from ..option_fields import check_choices, keyword_fields, option

CALIBRATED = "calibrated"
INITS = ("auto", "identity", "project", "lorax", "procrustes", "prolora", "zero")
MODES = ("auto", "shared", "mapped")
DEPTHS = ("cka", "relative")
MAPS = ("ridge", "orthogonal", "cca")
WRITERS = ("o,down", "down")
ANCHOR_LAYERS = ("last", "all")
DEFAULT_RIDGE: float | str = 0.1
DEFAULT_OUTPUT_WEIGHT = 1.0
DEFAULT_INIT = "auto"
DEFAULT_SAMPLES = 256
DEFAULT_MAX_TOKENS = 128
DEFAULT_MAP_RIDGE = 0.01
DEFAULT_MIN_ALIGNED = 0.2


@dataclass
class CalibrationOptions:
    """Settings of ``method="calibrated"`` (see :mod:`loraport.calibrate`).

    Attributes:
        text: unlabeled text: a file (one sample per line) or a list of strings (``--calibration``).
        samples / max_tokens: the first ``samples`` non-empty lines, ``max_tokens`` tokens each.
        ridge: relative ridge weight toward the start point (``lam' = lam * mean input energy``),
            or ``"auto"`` (per module, by held-out fit).
        init: the start point's method (``auto``: the copy where shapes match; where they differ
            ``prolora`` for ``calibrated``, the target itself for ``distill``; ``zero``).
            Shared-coordinates mode only (``calibrated``).
        truncation: ``rrr`` (reduced-rank ridge, default) or ``svd``.
        output_weight: ``beta``: 1 matches each module's whole output, 0 only the adapter's
            contribution. Shared-coordinates mode only.
        init_scale: ``fit`` shrinks the init by its fitted scale (an explored variant).
        batch_size: sequences per forward chunk.
        rank: rank of the ported modules (default: the source's).
        folds: calibration samples are split into this many folds (sample ``i`` in fold
            ``i % folds``); held-out folds choose ``ridge="auto"`` and decide the no-harm rule.
        mode: ``shared`` ports module by module in shared coordinates (same tokenizer and shapes,
            or rows paired by importance across widths), ``mapped`` carries the adapter's effect
            on the residual stream through maps learned between the two models' hidden states
            (other tokenizers, widths, depths, independent training), ``auto`` picks ``shared``
            when both models have the same tokenizer and every paired module the same shape,
            ``mapped`` otherwise.
        depth: ``mapped`` only: pair layers by activation similarity (``cka``, order-preserving)
            or by ``relative`` depth.
        map: ``mapped`` only: ``ridge`` least squares, ``orthogonal`` (scaled Procrustes) or
            ``cca`` (ridge through the top canonical directions).
        map_ridge: relative ridge weight of the maps.
        writers: ``mapped`` only: the target modules that carry the effect (``o,down`` or ``down``).
        anchor: ``mapped`` only: weight of the output anchor in the maps (0: activations only): the
            mapped states should decode to the same tokens through each model's final norm and
            output head, over the tokens both vocabularies spell the same way.
        anchor_layers: ``last`` (the map at the last target layer) or ``all`` layers (logit lens).
        no_harm: keep a ported module only when it brings the target closer to the teacher on
            held-out calibration text than the alternatives (leaving it out, or the copy where
            shapes match); what was left out is listed in the report.
        min_aligned: the smallest share of token positions that must align across tokenizers.
    """

    TITLE: ClassVar[str] = "calibrated transfer (--method calibrated)"

    text: str | os.PathLike[str] | Sequence[str] | None = option(
        None,
        name="calibration",
        flag="calibration",
        metavar="FILE",
        help="unlabeled text, one sample per line (distill: optional generic text whose predictions the target keeps)",
    )
    samples: int = option(
        DEFAULT_SAMPLES,
        name="calib_samples",
        flag="calib_samples",
        word=int,
        metavar="N",
        help=f"samples used (default {DEFAULT_SAMPLES})",
    )
    max_tokens: int = option(
        DEFAULT_MAX_TOKENS,
        name="calib_max_tokens",
        flag="calib_max_tokens",
        word=int,
        metavar="T",
        help=f"tokens per sample (default {DEFAULT_MAX_TOKENS})",
    )
    ridge: float | str = option(
        DEFAULT_RIDGE,
        name="ridge",
        flag="ridge",
        metavar="LAM",
        help=f"ridge weight toward the init, in units of the mean input energy, or 'auto' (default {DEFAULT_RIDGE})",
    )
    init: str = option(
        DEFAULT_INIT,
        name="init",
        flag="init",
        choices=INITS,
        help=f"start point's method, for calibrated and distill (default {DEFAULT_INIT}: the copy where shapes match; "
        "elsewhere prolora for calibrated, the target itself for distill)",
    )
    truncation: str = option("rrr", name="calib_truncation", choices=("rrr", "svd"))
    output_weight: float = option(
        DEFAULT_OUTPUT_WEIGHT,
        name="calib_output_weight",
        flag="calib_output_weight",
        word=float,
        metavar="BETA",
        help="1: match each module's whole output (default); 0: only the adapter's contribution",
    )
    init_scale: str = option("none", name="calib_init_scale", choices=("none", "fit"))
    batch_size: int = option(16, name="calib_batch_size")
    rank: int | None = option(
        None,
        name="calib_rank",
        flag="calib_rank",
        word=int,
        metavar="R",
        help="rank of the ported modules (default: the source's; more rank = a bigger, often better adapter)",
    )
    folds: int = option(2, name="calib_folds")
    mode: str = option(
        "auto",
        name="calib_mode",
        flag="calib_mode",
        choices=MODES,
        help="shared: module by module in shared coordinates; mapped: through maps learned between the two models' "
        "hidden states (other tokenizer, widths, depth); auto (default): shared when tokenizer and shapes match",
    )
    depth: str = option(
        "cka",
        name="calib_depth",
        flag="calib_depth",
        choices=DEPTHS,
        help="mapped: pair layers by activation similarity (cka, default) or relative depth",
    )
    map: str = option(
        "ridge", name="calib_map", flag="calib_map", choices=MAPS, help="mapped: the map between hidden states"
    )
    map_ridge: float = option(
        DEFAULT_MAP_RIDGE,
        name="calib_map_ridge",
        flag="calib_map_ridge",
        word=float,
        metavar="MU",
        help=f"mapped: relative ridge of the maps (default {DEFAULT_MAP_RIDGE})",
    )
    writers: str = option(
        "o,down",
        name="calib_writers",
        flag="calib_writers",
        choices=WRITERS,
        help="mapped: target modules that carry the effect (default o,down)",
    )
    anchor: float = option(
        1.0,
        name="calib_anchor",
        flag="calib_anchor",
        word=float,
        metavar="W",
        help="mapped: weight of the output anchor (same tokens decoded; 0: off; default 1.0)",
    )
    anchor_layers: str = option(
        "last",
        name="calib_anchor_layers",
        flag="calib_anchor_layers",
        choices=ANCHOR_LAYERS,
        help="mapped: anchor the last layer's map (default) or every layer's",
    )
    no_harm: bool = option(
        True,
        name="no_harm",
        flag="keep_all",
        switch=True,
        help="keep every ported module (default: leave out a module that fits held-out text worse than leaving it "
        "out, or than the copy where shapes match; the report lists them)",
    )
    min_aligned: float = option(DEFAULT_MIN_ALIGNED, name="calib_min_aligned")

    def validate(self) -> None:
        """Check every field (raises ``TransferError``); reads the text file once to fail early."""
        from .text import read_calibration_lines

        if self.text is None:
            raise TransferError("--method calibrated needs --calibration FILE (unlabeled text, one sample per line)")
        check_choices(self)
        if isinstance(self.ridge, str) and self.ridge != "auto":
            try:
                self.ridge = float(self.ridge)
            except ValueError:
                raise TransferError(f"--ridge must be a number >= 0 or 'auto', got {self.ridge!r}") from None
        if not isinstance(self.ridge, str) and not self.ridge >= 0:
            raise TransferError(f"--ridge must be >= 0 or 'auto', got {self.ridge!r}")
        if self.rank is not None and self.rank < 1:
            raise TransferError(f"--calib-rank must be >= 1, got {self.rank}")
        if self.samples < 1 or self.max_tokens < 1 or self.batch_size < 1:
            raise TransferError("--calib-samples, --calib-max-tokens and the batch size must be >= 1")
        if self.folds < 2:
            raise TransferError(f"calibration folds must be >= 2 (held-out decisions need one), got {self.folds}")
        if not self.map_ridge >= 0:
            raise TransferError(f"--calib-map-ridge must be >= 0, got {self.map_ridge}")
        if not self.anchor >= 0:
            raise TransferError(f"--calib-anchor must be >= 0, got {self.anchor}")
        if not 0 <= self.min_aligned <= 1:
            raise TransferError(f"min_aligned must be in [0, 1], got {self.min_aligned}")
        read_calibration_lines(self.text)

    def validate_for_distill(self) -> None:
        """What ``distill`` reads from this group: ``init`` and, if given, the generic text (``--calibration``)."""
        from .text import read_calibration_lines

        check_choices(self, only=("init",))
        if self.text is not None:
            read_calibration_lines(self.text)


# ``transfer()`` keyword names (underscored, as ``transfer(**overrides)`` spells them) -> CalibrationOptions fields.
FLAG_FIELDS: dict[str, str] = keyword_fields(CalibrationOptions)


def options_summary(options: CalibrationOptions) -> dict[str, Any]:
    """The options as report fields (the text by name only)."""
    values = {f.name: getattr(options, f.name) for f in fields(options)}
    text = values.pop("text")
    values["text"] = str(text) if isinstance(text, str | os.PathLike) else f"<list of {len(list(text or []))} strings>"
    return values
