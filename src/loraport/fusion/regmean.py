"""RegMean: the closed-form merge of linear layers from their input Gram matrices (SPEC sec. 12).

RegMean (Jin et al., ICLR 2023) merges a linear layer ``y = W x`` of ``T`` models so that
the merged layer reproduces each model's outputs on that model's own inputs as well as one
matrix can: ``W* = argmin sum_i ||W X_i - W_i X_i||_F^2``. In torch's ``(out, in)`` layout,
with ``G_i = X_i X_i^T: (n, n)`` (``X_i: (n, tokens)``),

    ``W* = (sum_i W_i G_i) (sum_i G_i)^-1``

(the paper's ``(sum_i G_i)^-1 sum_i G_i W_i`` with ``W`` stored ``(in, out)``). As in the paper
the off-diagonal entries of every ``G_i`` are scaled by ``a`` (:func:`shrink_gram`,
``a = 0.9`` by default): ``a = 0`` is a per-input-weighted average, ``a = 1`` the plain
least-squares solution.

A tiny ridge toward the average, ``G_i <- G_i + (eps / T) I`` with
``eps = ridge * mean(diag(sum_i G_i))``, keeps the system solvable when an input never fires
(a dead unit: a zero row and column in every ``G_i``); such an input's column of ``W*`` is
the average of the models' columns, every other column moves by ``O(ridge)``.
``ridge = 0`` is the exact formula.

For adapters on one base (``W_i = W_0 + D_i``) the base cancels:
``W* = W_0 + (sum_i D_i G_i)(sum_i G_i)^-1``; with ``D_i = B_i A_i`` that is
``sum_i B_i [A_i G_i (sum_j G_j)^-1]``, a factored update of rank ``<= sum_i r_i``
(:func:`regmean_factors`), never an ``m x n`` matrix.

Example::

    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> X = torch.randn(5, 50, generator=g, dtype=torch.float64)
    >>> W = torch.randn(3, 5, generator=g, dtype=torch.float64)
    >>> bool(torch.allclose(regmean([W, W], [X @ X.T, 2 * X @ X.T]), W))  # one model twice: itself
    True
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

DEFAULT_SHRINKAGE = 0.9
DEFAULT_RIDGE = 1e-6


def shrink_gram(G: torch.Tensor, shrinkage: float = DEFAULT_SHRINKAGE) -> torch.Tensor:
    """``a G + (1 - a) diag(G)``: off-diagonal entries scaled by ``a`` (``G: (n, n)``)."""
    if not 0 <= shrinkage <= 1:
        raise ValueError(f"shrinkage must be in [0, 1], got {shrinkage}")
    return shrinkage * G + (1 - shrinkage) * torch.diag(torch.diagonal(G))


def _prepared(grams: Sequence[torch.Tensor], shrinkage: float, ridge: float) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Shrunk (and ridged) Grams in float64 and the Cholesky factor of their sum."""
    if not grams:
        raise ValueError("need at least one Gram matrix")
    shrunk = [shrink_gram(G.double(), shrinkage) for G in grams]
    total = torch.stack(shrunk).sum(0)
    n = total.shape[0]
    if ridge > 0:
        eps = ridge * float(torch.diagonal(total).mean()) if n else 0.0
        if eps <= 0:  # every input silent: the ridge alone (the plain average)
            eps = ridge
        eye = torch.eye(n, dtype=total.dtype, device=total.device) * (eps / len(shrunk))
        shrunk = [G + eye for G in shrunk]
        total = total + eye * len(shrunk)
    L, info = torch.linalg.cholesky_ex(total)
    if int(info) != 0:
        raise ValueError("the summed Gram matrix is singular (an input never fires in any model); use ridge > 0")
    return shrunk, L


def _solve_right(M: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """``M (L L^T)^-1`` for ``M: (m, n)``."""
    return torch.cholesky_solve(M.mT, L).mT


def regmean(
    weights: Sequence[torch.Tensor],
    grams: Sequence[torch.Tensor],
    shrinkage: float = DEFAULT_SHRINKAGE,
    ridge: float = DEFAULT_RIDGE,
) -> torch.Tensor:
    """``W* = (sum_i W_i G_i)(sum_i G_i)^-1`` with shrunk Grams, in float64.

    Args:
        weights: ``T`` weights ``W_i: (m, n)`` (torch ``Linear`` layout, out x in).
        grams: their input Grams ``G_i = X_i X_i^T: (n, n)`` from each model's own inputs.
        shrinkage: ``a``, the factor on off-diagonal Gram entries.
        ridge: relative ridge toward the average (see the module docstring); 0 = exact formula.

    Returns:
        ``W*: (m, n)`` in float64 (the caller casts).
    """
    if len(weights) != len(grams):
        raise ValueError(f"{len(weights)} weights but {len(grams)} Gram matrices")
    shrunk, L = _prepared(grams, shrinkage, ridge)
    numerator = sum(W.double() @ G for W, G in zip(weights, shrunk, strict=True))
    return _solve_right(numerator, L)


def regmean_factors(
    updates: Sequence[tuple[torch.Tensor, torch.Tensor]],
    grams: Sequence[torch.Tensor],
    shrinkage: float = DEFAULT_SHRINKAGE,
    ridge: float = DEFAULT_RIDGE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RegMean of adapters on one base, factored: ``(B, A)`` with ``B A = (sum_i B_i A_i G_i)(sum_i G_i)^-1``.

    Args:
        updates: ``(B_i: (m, r_i), A_i: (r_i, n))`` with the scale folded into ``B_i``.
        grams: ``G_i: (n, n)`` from the base with adapter ``i`` applied.

    Returns:
        ``B = [B_1 .. B_T]: (m, sum r_i)`` and ``A = [A_i G_i (sum G)^-1]: (sum r_i, n)``, float64.
    """
    if len(updates) != len(grams):
        raise ValueError(f"{len(updates)} updates but {len(grams)} Gram matrices")
    shrunk, L = _prepared(grams, shrinkage, ridge)
    B = torch.cat([Bi.double() for Bi, _ in updates], dim=1)
    A = torch.cat([_solve_right(Ai.double() @ G, L) for (_, Ai), G in zip(updates, shrunk, strict=True)], dim=0)
    return B, A


__all__ = ["DEFAULT_RIDGE", "DEFAULT_SHRINKAGE", "regmean", "regmean_factors", "shrink_gram"]
