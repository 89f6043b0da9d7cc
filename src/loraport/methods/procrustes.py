"""``procrustes``: two-sided orthogonal Procrustes alignment of the subspaces (seed 000)."""

from __future__ import annotations

import torch

from .base import MethodContext, MethodResult, adapt_dimensions


def procrustes_rotation(U_s: torch.Tensor, U_t: torch.Tensor) -> torch.Tensor:
    """``R = argmin_{R in O(k)} ||U_s R - U_t||_F = X Y^T`` where ``U_s^T U_t = X Sigma Y^T``."""
    X, _, Yh = torch.linalg.svd(U_s.mT @ U_t)
    return X @ Yh


def procrustes(ctx: MethodContext) -> MethodResult:
    """``dW_t = U_t R_u^T C_s R_v V_t^T`` with ``C_s = U_s^T dW_s V_s``.

    ``R_u`` aligns ``U_s`` to ``U_t`` and ``R_v`` aligns ``V_s`` to ``V_t``
    (:func:`procrustes_rotation`). Seed 000 writes ``Q^T dW_s Q`` with one ``Q in O(n)``,
    impossible for a non-square ``dW``; this two-sided k-dim form equals it on the
    subspaces and costs ``O(k^3)`` instead of ``O(n^3)``. Factored:
    ``B_t = U_t R_u^T (U_s^T B_s)``, ``A_t = (A_s V_s) R_v V_t^T``.

    Different shapes: seed 000's structure-aware adaptation first (importance mapping of
    coordinates, :func:`~loraport.methods.base.adapt_dimensions`), then the same-shape formula
    on the adapted, re-orthonormalised source bases.
    """
    assert ctx.source is not None and ctx.target is not None
    adapted = adapt_dimensions(ctx)
    assert adapted.U is not None and adapted.V is not None
    U_s, V_s = adapted.U, adapted.V
    U_t, V_t = ctx.target.U, ctx.target.V
    R_u = procrustes_rotation(U_s, U_t)
    R_v = procrustes_rotation(V_s, V_t)
    B = U_t @ (R_u.mT @ (U_s.mT @ adapted.B))
    A = ((adapted.A @ V_s) @ R_v) @ V_t.mT
    return MethodResult(B, A, adapted.note)
