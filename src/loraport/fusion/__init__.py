"""Weight-space fusion of fine-tuned models and of LoRA adapters (SPEC sec. 7 and 12).

Methods (:data:`FUSION_METHODS`): ``rgsp`` (RGSP-TEFM, seed 004, two models), ``average``,
``task_arithmetic``, ``ties``, ``dare``, the subspace methods ``tsv``, ``iso_c``, ``iso_cts``
(all of these need the common base C) and ``regmean`` (needs calibration text). The per-matrix
math is in :mod:`~loraport.fusion.baselines`, :mod:`~loraport.fusion.subspace_merge`,
:mod:`~loraport.fusion.regmean` and :mod:`~loraport.fusion.rgsp` (pure functions; the
functions of :mod:`~loraport.fusion.regmean` and :mod:`~loraport.fusion.core_space` are not
re-exported here, so those module names stay importable). :func:`fuse` and
:func:`fuse_adapters` do the I/O for ``N >= 2`` inputs. Adapters are fused in their Core Space
(:mod:`~loraport.fusion.core_space`), never densified. ``docs/fusion.md`` has the math, every
interpretation, and the measured comparison.

Example::

    >>> from loraport.fusion import fuse, fuse_adapters
    >>> result = fuse("model-a", "model-b", "fused", method="rgsp", rank=64)       # doctest: +SKIP
    >>> result = fuse("model-a", "model-b", "tsv-out", method="tsv", base="C")    # doctest: +SKIP
    >>> result = fuse("a", "b", "abc", more=["c"], method="regmean", calibration="text.txt")  # doctest: +SKIP
    >>> result = fuse_adapters("lora-a", "lora-b", "lora-ab", method="iso_cts", rank=16)  # doctest: +SKIP
    >>> print(result.report.summary())                                            # doctest: +SKIP
"""

from __future__ import annotations

from .baselines import average, dare, task_arithmetic, ties
from .core_space import CoreSpace
from .distilled import fuse_distilled
from .lora import fuse_adapters
from .methods import merge_task_matrices
from .models import FusionResult, fuse
from .options import (
    DEFAULT_EXCLUDE,
    DareOptions,
    FuseOptions,
    FusionError,
    IsoCtsOptions,
    RegMeanOptions,
    RgspOptions,
    TiesOptions,
)
from .registry import FUSION_METHODS, FusionMethod
from .report import FusionReport, TensorRecord
from .rgsp import RgspAlignment, RgspRecord, rgsp_align, rgsp_fuse
from .subspace_merge import iso_c, iso_cts, tsv

__all__ = [
    "DEFAULT_EXCLUDE",
    "FUSION_METHODS",
    "CoreSpace",
    "DareOptions",
    "FuseOptions",
    "FusionError",
    "FusionMethod",
    "FusionReport",
    "FusionResult",
    "IsoCtsOptions",
    "RegMeanOptions",
    "RgspAlignment",
    "RgspOptions",
    "RgspRecord",
    "TensorRecord",
    "TiesOptions",
    "average",
    "dare",
    "fuse",
    "fuse_adapters",
    "fuse_distilled",
    "iso_c",
    "iso_cts",
    "merge_task_matrices",
    "rgsp_align",
    "rgsp_fuse",
    "task_arithmetic",
    "ties",
    "tsv",
]
