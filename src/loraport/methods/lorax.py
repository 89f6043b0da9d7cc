"""``lorax``: the faithful LoRA-X transfer (seed 001, with its core fixed)."""

from __future__ import annotations

from .base import MethodContext, MethodResult


def lorax(ctx: MethodContext) -> MethodResult:
    """``dW_t = U_t dSigma V_t^T`` with ``dSigma = U_t^T Ubar_s C_s Vbar_s^T V_t``.

    ``C_s = U_s^T dW_s V_s`` is the k x k core of the *adapter* update in the source basis
    (seed 001's draft used the base singular values ``diag(S_s)``: a bug). Same shapes:
    ``Ubar_s = U_s``, ``Vbar_s = V_s``, so ``dW_t = U_t U_t^T U_s U_s^T dW_s V_s V_s^T V_t V_t^T``.
    Factored: ``B_t = U_t (U_t^T U_s) (U_s^T B_s)``, ``A_t = (A_s V_s) (V_s^T V_t) V_t^T``.

    Different shapes: ``Ubar_s = P U_s`` with ``P = argmin ||P U_s - U_t||_F = U_t U_s^+``,
    which for orthonormal ``U_s`` gives ``P U_s = U_t`` exactly, so ``dSigma = C_s`` and
    ``dW_t = U_t C_s V_t^T``: the i-th source singular direction is sent to the i-th target
    one (singular-index correspondence, under loraport's sign convention for singular
    vectors). This is what the LoRA-X formula reduces to; it carries no geometric
    alignment, and the report says so.
    """
    assert ctx.source is not None and ctx.target is not None
    U_s, V_s = ctx.source.U, ctx.source.V
    U_t, V_t = ctx.target.U, ctx.target.V
    core_B = U_s.mT @ ctx.B  # (k, r)
    core_A = ctx.A @ V_s  # (r, k)
    if ctx.same_shape:
        B = U_t @ ((U_t.mT @ U_s) @ core_B)
        A = (core_A @ (V_s.mT @ V_t)) @ V_t.mT
        return MethodResult(B, A)
    k = min(U_s.shape[1], U_t.shape[1], V_s.shape[1], V_t.shape[1])
    B = U_t[:, :k] @ core_B[:k]
    A = core_A[:, :k] @ V_t[:, :k].mT
    return MethodResult(B, A, "different dims: singular-index correspondence (P U_s = U_t)")
