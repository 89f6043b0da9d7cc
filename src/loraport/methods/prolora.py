"""``prolora``: transfer the in-subspace part and the complement part separately."""

from __future__ import annotations

import torch

from .base import MethodContext, MethodResult, adapt_dimensions


def _two_part_map(X: torch.Tensor, U_s: torch.Tensor, U_t: torch.Tensor) -> torch.Tensor:
    """``(P_t P_s + P_t^perp P_s^perp) X`` with ``P = U U^T``, without forming m x m matrices."""
    inside = U_s.mT @ X  # (k, r): coordinates of X in the source subspace
    complement = X - U_s @ inside  # P_s^perp X
    return U_t @ ((U_t.mT @ U_s) @ inside) + complement - U_t @ (U_t.mT @ complement)


def prolora(ctx: MethodContext) -> MethodResult:
    """Subspace part to the target subspace, complement part to the target complement.

    With ``P_s = U_s U_s^T``, ``P_s^perp = I - P_s`` (same on the input side with ``V``),
    ``dW_s`` splits into four blocks ``P_s^a dW_s Q_s^b`` (``a, b`` in {subspace, complement});
    each block is carried to the matching target block:
    ``dW_t = sum_{a,b} P_t^a P_s^a dW_s Q_s^b Q_t^b``. The sum factorises:
    ``B_t = (P_t P_s + P_t^perp P_s^perp) B_s``, ``A_t = A_s (Q_s Q_t + Q_s^perp Q_t^perp)``,
    so the rank stays <= r and the cost is ``O((m + n) k r)``.

    This is loraport's reading of ProLoRA (ICML 2025): unlike ``project`` it does not
    truncate a standard LoRA to the top-k subspace, and with equal bases it returns the
    adapter exactly for any k. Different shapes: importance adaptation first.
    """
    assert ctx.source is not None and ctx.target is not None
    adapted = adapt_dimensions(ctx)
    assert adapted.U is not None and adapted.V is not None
    B = _two_part_map(adapted.B, adapted.U, ctx.target.U)
    A = _two_part_map(adapted.A.mT, adapted.V, ctx.target.V).mT
    return MethodResult(B, A, adapted.note)
