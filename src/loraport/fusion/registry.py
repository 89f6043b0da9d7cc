"""The fusion methods' registry: which inputs each method needs (the options validate against it).

>>> sorted(FUSION_METHODS)
['average', 'dare', 'iso_c', 'iso_cts', 'regmean', 'rgsp', 'task_arithmetic', 'ties', 'tsv']
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FusionMethod:
    """A registered method.

    Attributes:
        needs_base: works on task vectors ``W_i - W_C`` (the common base C is required).
        matrices_only: only 2-D tensors go through it (others are averaged).
        summary: one line for help texts and docs.
        uses_scaling: returns ``W_C + scaling * merged``.
        max_models: the most inputs it is defined for (``None``: any ``N >= 2``).
        calibrated: needs activations (calibration text run through every model).
    """

    name: str
    needs_base: bool
    matrices_only: bool
    summary: str
    uses_scaling: bool = False
    max_models: int | None = None
    calibrated: bool = False


FUSION_METHODS: dict[str, FusionMethod] = {
    m.name: m
    for m in (
        FusionMethod(
            "rgsp", False, True, "RGSP-TEFM: relative Gromov subspace projection (SPEC sec. 7; two models)", False, 2
        ),
        FusionMethod("average", False, False, "mean_i W_i"),
        FusionMethod("task_arithmetic", True, False, "W_C + scaling * sum_i (W_i - W_C)", True),
        FusionMethod(
            "ties", True, False, "TIES: trim to density, elect sign, disjoint mean; W_C + scaling * merged", True
        ),
        FusionMethod(
            "dare", True, False, "DARE: drop at random, rescale, then sum or TIES; W_C + scaling * merged", True
        ),
        FusionMethod("tsv", True, True, "TSV-M: per-task top singular vectors, orthogonalised (Procrustes)", True),
        FusionMethod("iso_c", True, True, "Iso-C: flat spectrum of the summed task matrix", True),
        FusionMethod("iso_cts", True, True, "Iso-CTS: common + task-specific subspaces, flat spectrum", True),
        FusionMethod(
            "regmean",
            False,
            True,
            "RegMean: (sum_i W_i G_i)(sum_i G_i)^-1 per linear layer, G_i = input Gram on calibration text",
            calibrated=True,
        ),
    )
}


__all__ = ["FUSION_METHODS", "FusionMethod"]
