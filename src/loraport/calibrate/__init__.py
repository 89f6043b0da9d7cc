"""Calibrated transfer: fit the port on unlabeled text streamed through teacher and student.

The teacher is the source base with the adapter merged; the student is the target base with
what has been ported so far. Both run one decoder layer at a time (:mod:`loraport.streaming`),
so only one layer of each model and the hidden states of the calibration batch are in memory.

Two modes (:class:`CalibrationOptions` ``mode``):

- ``shared`` (:mod:`.shared`): module by module in shared coordinates: each target module is
  fitted so its output matches the teacher's on the student's inputs. For a target that
  shares the source's tokenizer and shapes (fine-tunes, continued pretraining).
- ``mapped`` (:mod:`.mapped`): for models that share no coordinates (another tokenizer, widths,
  depth, independent training): token positions aligned by character offsets, layers paired by
  activation similarity, linear maps between the two residual streams learned from the same
  text, and the adapter's mapped effect on the residual stream fitted into the target's
  residual-writing modules.

Both keep a module only when it brings the student closer to the teacher on held-out text
than the alternatives (``no_harm``), and report what they left out.
"""

from __future__ import annotations

import torch

from ..adapters import LoraAdapter
from ..pairing import Pairing
from ..report import TransferReport
from .mapped import MappedCalibrator
from .options import (
    CALIBRATED,
    DEFAULT_INIT,
    DEFAULT_MAX_TOKENS,
    DEFAULT_OUTPUT_WEIGHT,
    DEFAULT_RIDGE,
    DEFAULT_SAMPLES,
    FLAG_FIELDS,
    INITS,
    CalibrationOptions,
)
from .shared import Calibrator, Part
from .text import base_tokenizers, read_calibration_lines, same_vocabulary, shared_tokenizer, tokenize_calibration

# Above this relative weight difference between paired source and target modules, two models of
# one shape are treated as independently trained (no shared coordinates). Fine-tunes and
# continued pretraining drift 3-30%; two independent trainings differ by about sqrt(2).
MAX_SHARED_DRIFT = 0.7
DRIFT_PROBES = 8


def choose_mode(options: CalibrationOptions, pairing: Pairing) -> tuple[str, str]:
    """``shared`` or ``mapped`` for ``options.mode == "auto"``, and why (a note for the report).

    ``shared`` needs the same tokenizer, equal shapes for every paired module and weights
    close enough to share coordinates (median relative difference of up to
    ``DRIFT_PROBES`` paired matrices below ``MAX_SHARED_DRIFT``); otherwise ``mapped``.
    """
    if options.mode != "auto":
        return options.mode, f"calibration mode {options.mode} (asked for)"
    units = pairing.units
    if any(u.source.shape != u.target.shape for u in units) or pairing.layers_s != pairing.layers_t:
        return "mapped", "calibration mode mapped: the models differ in shape or depth"
    tokenizer_s, tokenizer_t = base_tokenizers(pairing.src, pairing.tgt)
    if not same_vocabulary(tokenizer_s, tokenizer_t):
        return "mapped", "calibration mode mapped: the models have different tokenizers"
    step = max(1, len(units) // DRIFT_PROBES)
    drifts = []
    for unit in units[::step][:DRIFT_PROBES]:
        W_s = pairing.src.get(unit.source.key, unit.source.rows).double()
        W_t = pairing.tgt.get(unit.target.key, unit.target.rows).double()
        drifts.append(float(torch.linalg.matrix_norm(W_t - W_s) / torch.linalg.matrix_norm(W_s).clamp(min=1e-30)))
    drift = sorted(drifts)[len(drifts) // 2] if drifts else 0.0
    if drift > MAX_SHARED_DRIFT:
        return "mapped", (
            f"calibration mode mapped: same shapes and tokenizer, but the weights differ by {drift:.0%} "
            f"(median of {len(drifts)} matrices): independently trained, no shared coordinates"
        )
    return "shared", f"calibration mode shared: same tokenizer and shapes, weights {drift:.1%} apart"


def calibrate(
    parts: list[Part],
    pairing: Pairing,
    adapter: LoraAdapter,
    options: CalibrationOptions,
    report: TransferReport,
    progress: bool = True,
    device: str = "cpu",
) -> list[Part]:
    """Refine the init method's per-unit results by calibration in shared coordinates.

    Args:
        parts: ``(unit, record, B, A)`` from the init method, in target coordinates, source scale.
        pairing / adapter: the port's module pairing and source adapter.
        options: the calibration settings.
        report: gets per-module calibration fields and a ``calibration`` summary.

    Returns:
        The refined ``(unit, record, B, A)``, one per paired unit that is kept.
    """
    return Calibrator(pairing, adapter, options, report, progress, device).run(parts)


__all__ = [
    "CALIBRATED",
    "DEFAULT_INIT",
    "DEFAULT_MAX_TOKENS",
    "DEFAULT_OUTPUT_WEIGHT",
    "DEFAULT_RIDGE",
    "DEFAULT_SAMPLES",
    "FLAG_FIELDS",
    "INITS",
    "CalibrationOptions",
    "Calibrator",
    "MappedCalibrator",
    "calibrate",
    "choose_mode",
    "read_calibration_lines",
    "shared_tokenizer",
    "tokenize_calibration",
]
