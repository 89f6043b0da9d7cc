"""Weight-space fusion of fine-tuned models and of LoRA adapters (SPEC sec. 7).

Methods (:data:`FUSION_METHODS`): ``rgsp`` (RGSP-TEFM, seed 004), ``average``,
``task_arithmetic`` and ``ties`` (the last two need the common base C). The per-matrix math
is in :mod:`~loraport.fusion.rgsp` and :mod:`~loraport.fusion.baselines` (pure functions);
:func:`fuse` and :func:`fuse_adapters` do the I/O. ``docs/fusion.md`` lists every
interpretation of the seed.

Example::

    >>> from loraport.fusion import fuse, fuse_adapters
    >>> result = fuse("model-a", "model-b", "fused", method="rgsp", rank=64)       # doctest: +SKIP
    >>> result = fuse("model-a", "model-b", "ties-out", method="ties", base="C")  # doctest: +SKIP
    >>> result = fuse_adapters("lora-a", "lora-b", "lora-ab", method="average")   # doctest: +SKIP
    >>> print(result.report.summary())                                            # doctest: +SKIP
"""

from __future__ import annotations

from .baselines import average, task_arithmetic, ties
from .lora import fuse_adapters
from .methods import DEFAULT_EXCLUDE, FUSION_METHODS, FuseOptions, FusionError, FusionMethod
from .models import FusionResult, fuse
from .report import FusionReport, TensorRecord
from .rgsp import RgspAlignment, RgspRecord, rgsp_align, rgsp_fuse

__all__ = [
    "DEFAULT_EXCLUDE",
    "FUSION_METHODS",
    "FuseOptions",
    "FusionError",
    "FusionMethod",
    "FusionReport",
    "FusionResult",
    "RgspAlignment",
    "RgspRecord",
    "TensorRecord",
    "average",
    "fuse",
    "fuse_adapters",
    "rgsp_align",
    "rgsp_fuse",
    "task_arithmetic",
    "ties",
]
