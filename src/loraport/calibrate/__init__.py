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
from ..errors import LoraportError
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
# one shape are called independently trained. Fine-tunes and continued pretraining drift 3-30%;
# two independent trainings differ by about sqrt(2).
MAX_SHARED_DRIFT = 0.7
DRIFT_PROBES = 8


def weight_drift(pairing: Pairing) -> float | None:
    """Median relative difference ``||W_t - W_s|| / ||W_s||`` of up to ``DRIFT_PROBES`` paired matrices.

    ``None`` when no paired module has the same shape on both sides.
    """
    same = [u for u in pairing.units if u.source.shape == u.target.shape]
    if not same:
        return None
    step = max(1, len(same) // DRIFT_PROBES)
    drifts = []
    for unit in same[::step][:DRIFT_PROBES]:
        W_s = pairing.src.get(unit.source.key, unit.source.rows).double()
        W_t = pairing.tgt.get(unit.target.key, unit.target.rows).double()
        drifts.append(float(torch.linalg.matrix_norm(W_t - W_s) / torch.linalg.matrix_norm(W_s).clamp(min=1e-30)))
    return sorted(drifts)[len(drifts) // 2]


def unrelated_reason(pairing: Pairing) -> str | None:
    """Why the target looks unrelated to the source (another family), or ``None`` when it looks related.

    Unrelated: another tokenizer, no paired module of the same shape (other widths), or weights
    that differ by more than ``MAX_SHARED_DRIFT`` (independently trained). Bases without a
    tokenizer are judged by their weights alone.
    """
    try:
        tokenizer_s, tokenizer_t = base_tokenizers(pairing.src, pairing.tgt)
    except LoraportError:
        tokenizer_s = tokenizer_t = None
    if tokenizer_s is not None and not same_vocabulary(tokenizer_s, tokenizer_t):
        return "the target has another tokenizer"
    drift = weight_drift(pairing)
    if drift is None:
        return "no module of the target has its source module's shape"
    if drift > MAX_SHARED_DRIFT:
        return f"the bases' weights differ by {drift:.0%}: independently trained"
    return None


def choose_mode(options: CalibrationOptions, pairing: Pairing) -> tuple[str, list[str]]:
    """``shared`` or ``mapped`` for ``options.mode == "auto"``, and notes for the report.

    ``auto`` is ``shared`` whenever both bases have the same tokenizer: on the quality zoo it
    beat ``mapped`` on the independently trained same-shape model and on the model of other
    widths and depth (benchmarks/results/calibrated.md). ``mapped`` is the only mode for
    different tokenizers. A loud warning is added when the weights show the models to be
    independently trained (median relative difference above ``MAX_SHARED_DRIFT``).
    """
    notes: list[str] = []
    drift = weight_drift(pairing)
    if drift is not None and drift > MAX_SHARED_DRIFT:
        notes.append(
            f"WARNING: the bases' weights differ by {drift:.0%} (median of up to {DRIFT_PROBES} matrices of equal "
            "shape): they look independently trained, so little of the adapter may carry over"
        )
    if options.mode != "auto":
        return options.mode, [f"calibration mode {options.mode} (asked for)", *notes]
    tokenizer_s, tokenizer_t = base_tokenizers(pairing.src, pairing.tgt)
    if not same_vocabulary(tokenizer_s, tokenizer_t):
        return "mapped", ["calibration mode mapped: the models have different tokenizers", *notes]
    shapes = "equal" if all(u.source.shape == u.target.shape for u in pairing.units) else "different"
    return "shared", [f"calibration mode shared: same tokenizer, {shapes} shapes", *notes]


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
    "unrelated_reason",
]
