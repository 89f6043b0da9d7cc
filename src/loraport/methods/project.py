"""``project``: LoRA-X Eq. 3, projection onto the target's top-k subspaces (seed 002)."""

from __future__ import annotations

from .base import MethodContext, MethodResult, adapt_dimensions


def project(ctx: MethodContext) -> MethodResult:
    """``dW_t = U_t U_t^T dW_s V_t V_t^T``, factored.

    ``B_t = U_t (U_t^T B_s)`` (m_t, r) and ``A_t = (A_s V_t) V_t^T`` (r, n_t): rank <= r,
    exact, ``O((m + n) k r)``; no dense ``m x n`` matrix. Different shapes: the source update
    is first moved into target coordinates by :func:`~loraport.methods.base.adapt_dimensions`.
    """
    assert ctx.target is not None
    adapted = adapt_dimensions(ctx)
    U_t, V_t = ctx.target.U, ctx.target.V
    B = U_t @ (U_t.mT @ adapted.B)
    A = (adapted.A @ V_t) @ V_t.mT
    return MethodResult(B, A, adapted.note)
