"""Each transfer method against a float64 dense implementation of its SPEC formula."""

from __future__ import annotations

import pytest
import torch
from scipy.linalg import orthogonal_procrustes

from loraport.lowrank import balanced_factors
from loraport.methods import METHODS, MethodContext, importance_map
from loraport.subspace import top_k_svd


@pytest.fixture(autouse=True)
def _float64_default():
    """The references run in float64; restore the default so other test modules are unaffected."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def decaying(m: int, n: int, seed: int, decay: float = 0.9) -> torch.Tensor:
    """A random matrix with geometrically decaying singular values (like pretrained weights)."""
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(m, min(m, n), generator=g)).Q
    V = torch.linalg.qr(torch.randn(n, min(m, n), generator=g)).Q
    S = decay ** torch.arange(min(m, n), dtype=torch.float64) * 10
    return U @ torch.diag(S) @ V.T


def factors(m: int, n: int, r: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, r, generator=g), torch.randn(r, n, generator=g)


def context(ms: tuple[int, int], mt: tuple[int, int], k: int, r: int = 4, seed: int = 0, drift: float = 0.3):
    W_s = decaying(*ms, seed)
    if ms == mt:
        W_t = W_s + drift * decaying(*mt, seed + 100, decay=0.95)
    else:
        W_t = decaying(*mt, seed + 1)
    B, A = factors(ms[0], ms[1], r, seed + 2)
    ctx = MethodContext(B, A, mt, top_k_svd(W_s, k, "exact"), top_k_svd(W_t, k, "exact"))
    return ctx, W_s, W_t


def proj(U: torch.Tensor) -> torch.Tensor:
    return U @ U.T


def permutation(source_norms: torch.Tensor, target_norms: torch.Tensor) -> torch.Tensor:
    """Dense (d_t x d_s) matrix moving source coordinates to target coordinates by importance rank."""
    d_s, d_t = len(source_norms), len(target_norms)
    P = torch.zeros(d_t, d_s)
    if d_s == d_t:
        return torch.eye(d_s)
    order_s = sorted(range(d_s), key=lambda i: -float(source_norms[i]))
    order_t = sorted(range(d_t), key=lambda i: -float(target_norms[i]))
    for i_s, i_t in zip(order_s, order_t, strict=False):
        P[i_t, i_s] = 1.0
    return P


def adapted_reference(ctx: MethodContext) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dense importance adaptation: dW' = P_out dW P_in^T, U_s' = qr(P_out U_s), V_s' = qr(P_in V_s)."""
    P_out = permutation(ctx.source.row_norms, ctx.target.row_norms)
    P_in = permutation(ctx.source.col_norms, ctx.target.col_norms)
    dW = P_out @ ctx.B @ ctx.A @ P_in.T
    U = torch.linalg.qr(P_out @ ctx.source.U).Q
    V = torch.linalg.qr(P_in @ ctx.source.V).Q
    return dW, U, V


def reference(name: str, ctx: MethodContext) -> torch.Tensor:
    U_s, V_s, U_t, V_t = ctx.source.U, ctx.source.V, ctx.target.U, ctx.target.V
    dW = ctx.B @ ctx.A
    if name == "identity" or (name == "auto" and ctx.same_shape):
        return dW
    if name == "auto":
        return reference("prolora", ctx)
    if name == "project":
        dWa = dW if ctx.same_shape else adapted_reference(ctx)[0]
        return proj(U_t) @ dWa @ proj(V_t)
    if name == "lorax":
        core = U_s.T @ dW @ V_s
        if ctx.same_shape:
            return U_t @ (U_t.T @ U_s @ core @ V_s.T @ V_t) @ V_t.T
        # P = argmin ||P U_s - U_t|| = U_t pinv(U_s); Ubar_s = P U_s.
        Ubar = U_t @ torch.linalg.pinv(U_s) @ U_s
        Vbar = V_t @ torch.linalg.pinv(V_s) @ V_s
        return U_t @ (U_t.T @ Ubar @ core @ Vbar.T @ V_t) @ V_t.T
    if name == "procrustes":
        dWa, Ua, Va = (dW, U_s, V_s) if ctx.same_shape else adapted_reference(ctx)
        R_u, _ = orthogonal_procrustes(Ua.numpy(), U_t.numpy())
        R_v, _ = orthogonal_procrustes(Va.numpy(), V_t.numpy())
        core = Ua.T @ dWa @ Va
        return U_t @ torch.from_numpy(R_u).T @ core @ torch.from_numpy(R_v) @ V_t.T
    if name == "prolora":
        dWa, Ua, Va = (dW, U_s, V_s) if ctx.same_shape else adapted_reference(ctx)
        m, n = ctx.target_shape
        Ps, Pt, Qs, Qt = proj(Ua), proj(U_t), proj(Va), proj(V_t)
        Im, In = torch.eye(m), torch.eye(n)
        lefts = [Pt @ Ps, (Im - Pt) @ (Im - Ps)]
        rights = [Qs @ Qt, (In - Qs) @ (In - Qt)]
        return sum(left @ dWa @ right for left in lefts for right in rights)
    raise AssertionError(name)


SAME = [((40, 30), 8), ((24, 24), 6), ((30, 50), 30)]
DIFFERENT = [((40, 30), (48, 36), 8), ((40, 30), (32, 30), 6), ((30, 30), (30, 20), 5)]


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize(("shape", "k"), SAME)
def test_same_shape_matches_dense_reference(name: str, shape: tuple[int, int], k: int) -> None:
    ctx, _, _ = context(shape, shape, k)
    result = METHODS[name].fn(ctx)
    torch.testing.assert_close(result.B @ result.A, reference(name, ctx), rtol=1e-9, atol=1e-9)
    assert result.B.shape[1] <= ctx.B.shape[1]  # rank <= r


@pytest.mark.parametrize("name", ["project", "lorax", "procrustes", "prolora", "auto"])
@pytest.mark.parametrize(("ms", "mt", "k"), DIFFERENT)
def test_different_shapes_match_dense_reference(name: str, ms, mt, k: int) -> None:
    ctx, _, _ = context(ms, mt, k)
    result = METHODS[name].fn(ctx)
    assert result.B.shape[0] == mt[0] and result.A.shape[1] == mt[1]
    torch.testing.assert_close(result.B @ result.A, reference(name, ctx), rtol=1e-9, atol=1e-9)


def test_identity_refuses_other_shapes() -> None:
    ctx, _, _ = context((40, 30), (48, 36), 8)
    with pytest.raises(ValueError, match="equal shapes"):
        METHODS["identity"].fn(ctx)


@pytest.mark.parametrize("name", ["project", "lorax", "procrustes", "prolora"])
def test_equal_bases_full_rank_give_back_the_adapter(name: str) -> None:
    # Square W: k = min(m, n) spans both spaces, so every projector is the identity.
    W = decaying(18, 18, 3)
    B, A = factors(18, 18, 4, 4)
    sub = top_k_svd(W, 18, "exact")
    result = METHODS[name].fn(MethodContext(B, A, (18, 18), sub, sub))
    torch.testing.assert_close(result.B @ result.A, B @ A, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", ["project", "lorax", "procrustes"])
def test_equal_rectangular_bases_full_rank_keep_the_column_space_part(name: str) -> None:
    # Tall W (20 x 16): k = 16 spans R^16 on the input side but only col(W) on the output side.
    W = decaying(20, 16, 3)
    B, A = factors(20, 16, 4, 4)
    sub = top_k_svd(W, 16, "exact")
    result = METHODS[name].fn(MethodContext(B, A, (20, 16), sub, sub))
    torch.testing.assert_close(result.B @ result.A, proj(sub.U) @ B @ A, rtol=1e-9, atol=1e-9)


def test_prolora_gives_back_the_adapter_for_any_k_when_bases_are_equal() -> None:
    W = decaying(30, 24, 5)
    B, A = factors(30, 24, 4, 6)
    for k in (1, 4, 10):
        sub = top_k_svd(W, k, "exact")
        result = METHODS["prolora"].fn(MethodContext(B, A, (30, 24), sub, sub))
        torch.testing.assert_close(result.B @ result.A, B @ A, rtol=1e-9, atol=1e-9)


def test_project_with_partial_k_loses_energy_outside_the_subspace() -> None:
    W = decaying(30, 24, 7)
    B, A = factors(30, 24, 4, 8)
    sub = top_k_svd(W, 4, "exact")
    result = METHODS["project"].fn(MethodContext(B, A, (30, 24), sub, sub))
    kept = torch.linalg.matrix_norm(result.B @ result.A) / torch.linalg.matrix_norm(B @ A)
    assert 0.0 < float(kept) < 0.9


def test_methods_are_invariant_to_singular_vector_signs() -> None:
    ctx, _, _ = context((30, 20), (30, 20), 6)
    flipped_src = ctx.source.to("cpu")
    signs = torch.tensor([1.0, -1, 1, -1, -1, 1])
    flipped_src.U, flipped_src.V = flipped_src.U * signs, flipped_src.V * signs
    for name in ("project", "lorax", "procrustes", "prolora"):
        a = METHODS[name].fn(ctx)
        b = METHODS[name].fn(MethodContext(ctx.B, ctx.A, ctx.target_shape, flipped_src, ctx.target))
        torch.testing.assert_close(a.B @ a.A, b.B @ b.A, rtol=1e-9, atol=1e-9)


def test_procrustes_recovers_a_rotation_inside_the_subspace() -> None:
    # Target basis = source basis rotated within the subspace: procrustes keeps dW's in-subspace part.
    W = decaying(24, 20, 9)
    sub_s = top_k_svd(W, 6, "exact")
    g = torch.Generator().manual_seed(1)
    R = torch.linalg.qr(torch.randn(6, 6, generator=g)).Q
    sub_t = sub_s.to("cpu")
    sub_t.U, sub_t.V = sub_s.U @ R, sub_s.V @ R
    B, A = factors(24, 20, 3, 2)
    result = METHODS["procrustes"].fn(MethodContext(B, A, (24, 20), sub_s, sub_t))
    expected = proj(sub_s.U) @ B @ A @ proj(sub_s.V)
    torch.testing.assert_close(result.B @ result.A, expected, rtol=1e-9, atol=1e-9)


def test_importance_map_pairs_by_rank() -> None:
    source = torch.tensor([1.0, 5.0, 3.0])
    target = torch.tensor([2.0, 9.0, 0.5, 4.0])
    s, t = importance_map(source, target)
    assert s.tolist() == [1, 2, 0] and t.tolist() == [1, 3, 0]
    s, t = importance_map(target, source)
    assert s.tolist() == [1, 3, 0] and t.tolist() == [1, 2, 0]
    same = torch.tensor([3.0, 1.0])
    assert importance_map(same, same)[0].tolist() == [0, 1]


def test_balanced_refactorisation_keeps_the_product_and_bounds_the_rank() -> None:
    B, A = factors(30, 20, 6, 11)
    B[:, 5] = B[:, 0]  # rank-deficient: 5 independent directions
    A[5] = 0
    f = balanced_factors(B, A)
    assert f.rank == 5
    torch.testing.assert_close(f.B @ f.A, B @ A, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(f.B.T @ f.B, f.A @ f.A.T, rtol=1e-9, atol=1e-9)
    truncated = balanced_factors(B, A, max_rank=2)
    assert truncated.rank == 2
    S = torch.linalg.svdvals(B @ A)
    assert truncated.dropped_energy == pytest.approx(float((S[2:] ** 2).sum() / (S**2).sum()), rel=1e-9)
