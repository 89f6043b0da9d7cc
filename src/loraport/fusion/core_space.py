"""Core Space of LoRA updates of one module: merge adapters without forming ``m x n`` matrices (SPEC sec. 12).

For ``T`` updates ``D_i = B_i A_i`` (scale folded into ``B_i``; ``B_i: (m, r_i)``,
``A_i: (r_i, n)``) stack ``B = [B_1 .. B_T]`` and ``A = [A_1; ..; A_T]``. With orthonormal
bases ``Q_B: (m, p)`` of span(B) and ``Q_A: (n, q)`` of span(A^T),
``D_i = Q_B C_i Q_A^T`` *exactly*, with the core ``C_i = (Q_B^T B_i)(A_i Q_A): (p, q)``,
``p, q <= sum_i r_i`` (Panariello et al., NeurIPS 2025, "Core Space"). Because ``Q_B`` and
``Q_A`` have orthonormal columns, every method built from SVDs, projections, sums and
Frobenius inner products (average, task arithmetic, TSV, Iso-C, Iso-CTS) gives on the cores
exactly the core of what it gives on the dense ``D_i``: the result is lifted back by
:meth:`CoreSpace.lift` and re-factorised to the requested rank, never densified.

Entrywise methods (TIES, DARE) depend on the basis: on cores they are a different method
than on dense updates (the one the Core Space paper evaluates). The bases are therefore the
*singular* vectors of the stacked factors (a QR, then the SVD of its small ``R``), which do
not depend on the order of the inputs; column signs do not matter to TIES or DARE.

Example::

    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> f64 = torch.float64
    >>> ups = [(torch.randn(40, 4, generator=g, dtype=f64), torch.randn(4, 30, generator=g, dtype=f64)) for _ in "abc"]
    >>> space = core_space(ups)
    >>> space.cores[0].shape
    torch.Size([12, 12])
    >>> f = space.lift(space.cores[0] + space.cores[1])
    >>> bool(torch.allclose(f.B @ f.A, ups[0][0] @ ups[0][1] + ups[1][0] @ ups[1][1]))
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..lowrank import DEFAULT_RTOL, Factors, factors_from_svd, thin_qr


@dataclass
class CoreSpace:
    """Shared bases and per-update cores.

    Attributes:
        Q_B: ``(m, p)`` orthonormal basis of the span of the stacked ``B_i``.
        Q_A: ``(n, q)`` orthonormal basis of the span of the stacked ``A_i^T``.
        cores: ``C_i = Q_B^T B_i A_i Q_A: (p, q)``, one per update.
    """

    Q_B: torch.Tensor
    Q_A: torch.Tensor
    cores: list[torch.Tensor]

    @property
    def dim(self) -> int:
        """``min(p, q)``: the ``d`` of the subspace methods' budgets on the cores."""
        return min(self.Q_B.shape[1], self.Q_A.shape[1])

    def dense(self, core: torch.Tensor) -> torch.Tensor:
        """``Q_B core Q_A^T: (m, n)`` (for tests on small matrices)."""
        return self.Q_B @ core @ self.Q_A.mT

    def lift(self, core: torch.Tensor, max_rank: int | None = None, rtol: float = DEFAULT_RTOL) -> Factors:
        """Balanced factors of ``Q_B core Q_A^T`` of rank ``<= max_rank`` (SVD of the core only)."""
        if core.numel() == 0:
            return Factors(self.Q_B[:, :0], self.Q_A[:, :0].mT, core.new_zeros(0))
        u, S, vh = torch.linalg.svd(core, full_matrices=False)
        return factors_from_svd(self.Q_B @ u, S, vh @ self.Q_A.mT, max_rank=max_rank, rtol=rtol)


def span_basis(X: torch.Tensor, rtol: float = DEFAULT_RTOL) -> torch.Tensor:
    """Orthonormal basis ``(rows, k)`` of the column span of ``X``: its left singular vectors with ``S > rtol S_0``.

    A thin QR, then the SVD of the small ``R``; rank-deficient stacks (two equal adapters)
    give a basis of their true rank.
    """
    if X.shape[1] == 0:
        return X
    Q, R = thin_qr(X)
    u, S, _ = torch.linalg.svd(R, full_matrices=False)
    keep = int((rtol * S[0] < S).sum()) if S.numel() and S[0] > 0 else 0
    return Q @ u[:, :keep]


def core_space(updates: Sequence[tuple[torch.Tensor, torch.Tensor]], rtol: float = DEFAULT_RTOL) -> CoreSpace:
    """The Core Space of updates ``B_i A_i`` (scale folded into ``B_i``), computed in their dtype.

    Args:
        updates: ``(B_i: (m, r_i), A_i: (r_i, n))`` pairs of one module, ``T >= 1``.
        rtol: directions of the stacked factors below ``rtol S_0`` are dropped (numerically zero).

    Returns:
        A :class:`CoreSpace` whose ``dense(cores[i])`` equals ``B_i A_i`` to round-off.
    """
    if not updates:
        raise ValueError("need at least one update")
    Q_B = span_basis(torch.cat([B for B, _ in updates], dim=1), rtol)
    Q_A = span_basis(torch.cat([A for _, A in updates], dim=0).mT, rtol)
    cores = [(Q_B.mT @ B) @ (A @ Q_A) for B, A in updates]
    return CoreSpace(Q_B, Q_A, cores)


__all__ = ["CoreSpace", "core_space", "span_basis"]
