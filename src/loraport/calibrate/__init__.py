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

from ..adapters import LoraAdapter
from ..pairing import Pairing
from ..report import TransferReport
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
from .text import read_calibration_lines, shared_tokenizer, tokenize_calibration


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
    "calibrate",
    "read_calibration_lines",
    "shared_tokenizer",
    "tokenize_calibration",
]
