"""The settings of calibrated transfer, grouped apart from the data-free methods' options."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

from ..errors import TransferError

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
        init: the start point's method (``auto``: the copy where shapes match, ``prolora`` where
            they differ; ``zero``). Shared-coordinates mode only.
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

    text: str | os.PathLike[str] | Sequence[str] | None = None
    samples: int = DEFAULT_SAMPLES
    max_tokens: int = DEFAULT_MAX_TOKENS
    ridge: float | str = DEFAULT_RIDGE
    init: str = DEFAULT_INIT
    truncation: str = "rrr"
    output_weight: float = DEFAULT_OUTPUT_WEIGHT
    init_scale: str = "none"
    batch_size: int = 16
    rank: int | None = None
    folds: int = 2
    mode: str = "auto"
    depth: str = "cka"
    map: str = "ridge"
    map_ridge: float = DEFAULT_MAP_RIDGE
    writers: str = "o,down"
    anchor: float = 1.0
    anchor_layers: str = "last"
    no_harm: bool = True
    min_aligned: float = DEFAULT_MIN_ALIGNED

    def validate(self) -> None:
        """Check every field (raises ``TransferError``); reads the text file once to fail early."""
        from .text import read_calibration_lines

        if self.text is None:
            raise TransferError("--method calibrated needs --calibration FILE (unlabeled text, one sample per line)")
        choices = {
            "init": INITS,
            "mode": MODES,
            "depth": DEPTHS,
            "map": MAPS,
            "writers": WRITERS,
            "anchor_layers": ANCHOR_LAYERS,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise TransferError(
                    f"calibrated: {name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}"
                )
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
        if self.truncation not in ("rrr", "svd"):
            raise TransferError(f"calib_truncation must be rrr or svd, got {self.truncation!r}")
        if self.init_scale not in ("none", "fit"):
            raise TransferError(f"calib_init_scale must be none or fit, got {self.init_scale!r}")
        if not self.map_ridge >= 0:
            raise TransferError(f"--calib-map-ridge must be >= 0, got {self.map_ridge}")
        if not self.anchor >= 0:
            raise TransferError(f"--calib-anchor must be >= 0, got {self.anchor}")
        if not 0 <= self.min_aligned <= 1:
            raise TransferError(f"min_aligned must be in [0, 1], got {self.min_aligned}")
        read_calibration_lines(self.text)


# ``transfer`` flag names (underscored, as ``transfer(**overrides)`` and batch manifests spell them)
# -> CalibrationOptions fields.
FLAG_FIELDS: dict[str, str] = {
    "calibration": "text",
    "calib_samples": "samples",
    "calib_max_tokens": "max_tokens",
    "ridge": "ridge",
    "init": "init",
    "calib_truncation": "truncation",
    "calib_output_weight": "output_weight",
    "calib_init_scale": "init_scale",
    "calib_batch_size": "batch_size",
    "calib_rank": "rank",
    "calib_folds": "folds",
    "calib_mode": "mode",
    "calib_depth": "depth",
    "calib_map": "map",
    "calib_map_ridge": "map_ridge",
    "calib_writers": "writers",
    "calib_anchor": "anchor",
    "calib_anchor_layers": "anchor_layers",
    "no_harm": "no_harm",
    "calib_min_aligned": "min_aligned",
}
assert set(FLAG_FIELDS.values()) == {f.name for f in fields(CalibrationOptions)}


def options_summary(options: CalibrationOptions) -> dict[str, Any]:
    """The options as report fields (the text by name only)."""
    values = {f.name: getattr(options, f.name) for f in fields(options)}
    text = values.pop("text")
    values["text"] = str(text) if isinstance(text, str | os.PathLike) else f"<list of {len(list(text or []))} strings>"
    return values
