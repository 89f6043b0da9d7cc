"""Streamed moments, per fold: float32 products summed into float64 accumulators (Grams into float32).

The Gram matrices are the largest moments (``n^2`` per distinct input and fold; n = 8960 is
321 MB in float32, 642 MB in float64) and are kept per fold for the no-harm rule's held-out
fits, so they are stored in float32: sums of float32 products over a few thousand tokens lose
about 1e-6 relative, far below what the ridge term (0.1 of the mean input energy) changes;
solves convert to float64 (:func:`~loraport.methods.calibrated.calibrated_update`).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..methods.calibrated import Moments

GRAM_DTYPE = torch.float32


def add_product(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, block: int = 1024) -> None:
    """``out += a^T b`` (``a: (T, p)``, ``b: (T, q)``): float32 products, float64 sums, in column blocks.

    A whole ``q x q`` float32 product plus its float64 copy would be 1.5x the accumulator
    (n = 9216: 1 GB); blocks of 1024 columns bound the temporaries to ``p x 1024``.
    """
    for start in range(0, b.shape[1], block):
        stop = min(start + block, b.shape[1])
        out[:, start:stop] += a.mT @ b[:, start:stop]


class StageMoments:
    """Moments of one stage: Grams per distinct input, cross moments per unit, per fold."""

    def __init__(self, folds: int, device: torch.device, extra: bool) -> None:
        self.folds = folds
        self.device = device
        self.extra = extra
        self.grams: dict[str, list[torch.Tensor]] = {}
        self.group_of: dict[int, str] = {}  # plan index -> group key
        self.cross: dict[int, list[torch.Tensor]] = {}
        self.code_gram: dict[int, list[torch.Tensor]] = {}
        self.tokens: list[int] = [0] * folds
        self.target_cross: dict[int, list[torch.Tensor]] = {}
        self.target_code: dict[int, list[torch.Tensor]] = {}
        self.target_energy: dict[int, list[float]] = {}

    def add(
        self, index: int, group: str, fold: int, x: torch.Tensor, code: torch.Tensor, extra: torch.Tensor | None
    ) -> None:
        """``x: (T, n_t)`` student inputs, ``code: (T, r)`` teacher LoRA codes, ``extra: (T, m)``."""
        f64 = torch.float64
        if group not in self.grams:
            n = x.shape[1]
            self.grams[group] = [torch.zeros(n, n, dtype=GRAM_DTYPE, device=self.device) for _ in range(self.folds)]
        self.group_of[index] = group
        if index not in self.cross:
            r, n = code.shape[1], x.shape[1]
            self.cross[index] = [torch.zeros(r, n, dtype=f64, device=self.device) for _ in range(self.folds)]
            self.code_gram[index] = [torch.zeros(r, r, dtype=f64, device=self.device) for _ in range(self.folds)]
            if self.extra and extra is not None:
                m = extra.shape[1]
                self.target_cross[index] = [torch.zeros(m, n, dtype=f64, device=self.device) for _ in range(self.folds)]
                self.target_code[index] = [torch.zeros(r, m, dtype=f64, device=self.device) for _ in range(self.folds)]
                self.target_energy[index] = [0.0] * self.folds
        add_product(self.cross[index][fold], code, x)
        add_product(self.code_gram[index][fold], code, code)
        if self.extra and extra is not None:
            add_product(self.target_cross[index][fold], extra, x)
            add_product(self.target_code[index][fold], code, extra)
            self.target_energy[index][fold] += float(extra.square().sum(dtype=torch.float64))

    def add_gram(self, group: str, fold: int, x: torch.Tensor) -> None:
        add_product(self.grams[group][fold], x, x)

    def moments(self, index: int, folds: Iterable[int]) -> Moments:
        group = self.group_of[index]
        extra = self.extra and index in self.target_cross
        total = None
        for fold in folds:
            part = Moments(
                self.grams[group][fold],
                self.cross[index][fold],
                self.code_gram[index][fold],
                self.tokens[fold],
                self.target_cross[index][fold] if extra else None,
                self.target_energy[index][fold] if extra else 0.0,
                self.target_code[index][fold] if extra else None,
            )
            total = part if total is None else total + part
        assert total is not None
        return total
