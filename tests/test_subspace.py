"""Truncated SVD (exact and randomized), similarity and its chance level, the on-disk cache."""

from __future__ import annotations

import pytest
import torch

from loraport.lowrank import frobenius_norm, product_svd, singular_values
from loraport.subspace import (
    SubspaceCache,
    above_chance,
    chance_similarity,
    similarity,
    top_k_svd,
)


def decaying(m: int, n: int, seed: int, decay: float = 0.97) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(m, min(m, n), generator=g)).Q
    V = torch.linalg.qr(torch.randn(n, min(m, n), generator=g)).Q
    return U @ torch.diag(decay ** torch.arange(min(m, n), dtype=torch.float32)) @ V.T


def random_basis(m: int, k: int, g: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(m, k, generator=g)).Q


def test_exact_matches_torch_svd_and_is_orthonormal() -> None:
    W = torch.randn(50, 30, generator=torch.Generator().manual_seed(0))
    sub = top_k_svd(W, 10, "exact")
    torch.testing.assert_close(sub.S, torch.linalg.svdvals(W)[:10])
    torch.testing.assert_close(sub.U.T @ sub.U, torch.eye(10), atol=1e-5, rtol=0)
    torch.testing.assert_close(sub.V.T @ sub.V, torch.eye(10), atol=1e-5, rtol=0)
    torch.testing.assert_close(sub.U.T @ W @ sub.V, torch.diag(sub.S), atol=1e-4, rtol=0)
    torch.testing.assert_close(sub.row_norms, W.norm(dim=1))
    torch.testing.assert_close(sub.col_norms, W.norm(dim=0))


def test_randomized_matches_exact_on_decaying_spectrum() -> None:
    # A clear spectral gap: the top-32 subspace is well defined and 2 power iterations find it.
    W = decaying(600, 400, 1, decay=0.9)
    exact = top_k_svd(W, 32, "exact")
    fast = top_k_svd(W, 32, "randomized", niter=2)
    assert abs(similarity(exact.U, fast.U) - 1) < 0.01
    assert abs(similarity(exact.V, fast.V) - 1) < 0.01
    torch.testing.assert_close(fast.S, exact.S, rtol=1e-3, atol=1e-4)


def test_randomized_is_deterministic_and_seeded() -> None:
    W = torch.randn(300, 200, generator=torch.Generator().manual_seed(2))
    a = top_k_svd(W, 16, "randomized", seed=5)
    b = top_k_svd(W, 16, "randomized", seed=5)
    c = top_k_svd(W, 16, "randomized", seed=6)
    assert torch.equal(a.U, b.U) and torch.equal(a.S, b.S)
    assert not torch.equal(a.U, c.U)


def test_randomized_falls_back_to_exact_for_small_matrices() -> None:
    W = torch.randn(40, 30, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(top_k_svd(W, 16, "randomized").U, top_k_svd(W, 16, "exact").U)


def test_k_is_clamped_to_min_dimension() -> None:
    sub = top_k_svd(torch.randn(12, 7), 64, "exact")
    assert sub.k == 7 and sub.U.shape == (12, 7)


def test_bf16_input_is_decomposed_in_float32() -> None:
    W = torch.randn(20, 10).to(torch.bfloat16)
    assert top_k_svd(W, 4, "exact").U.dtype == torch.float32


def test_similarity_range_identity_and_orthogonality() -> None:
    g = torch.Generator().manual_seed(4)
    U = random_basis(30, 5, g)
    assert similarity(U, U) == pytest.approx(1.0)
    Q = torch.linalg.qr(torch.randn(30, 30, generator=g)).Q
    assert similarity(Q[:, :5], Q[:, 5:10]) == pytest.approx(0.0, abs=1e-6)
    for _ in range(20):
        value = similarity(random_basis(30, 5, g), random_basis(30, 5, g))
        assert 0.0 <= value <= 1.0


def test_seed_formula_would_be_bounded_by_one_over_k() -> None:
    # The seed divides ||U_s^T U_t||_F^2 by k^2: for identical subspaces that gives 1/k.
    U = random_basis(40, 8, torch.Generator().manual_seed(5))
    seed_value = float(torch.linalg.matrix_norm(U.T @ U) ** 2) / (8 * 8)
    assert seed_value == pytest.approx(1 / 8)
    assert similarity(U, U) == pytest.approx(1.0)


@pytest.mark.parametrize(("m", "k"), [(64, 4), (64, 16), (128, 32)])
def test_random_subspaces_have_similarity_k_over_m(m: int, k: int) -> None:
    g = torch.Generator().manual_seed(m + k)
    values = [similarity(random_basis(m, k, g), random_basis(m, k, g)) for _ in range(200)]
    mean = sum(values) / len(values)
    assert mean == pytest.approx(k / m, rel=0.1)
    assert chance_similarity(k, m) == pytest.approx(k / m)
    assert abs(above_chance(mean, k, m)) < 0.05


def test_above_chance_endpoints() -> None:
    assert above_chance(1.0, 8, 64) == pytest.approx(1.0)
    assert above_chance(8 / 64, 8, 64) == pytest.approx(0.0)
    assert above_chance(1.0, 64, 64) == 1.0  # the whole space


def test_cache_round_trip_and_corrupt_entry(tmp_path) -> None:
    cache = SubspaceCache(tmp_path)
    sub = top_k_svd(torch.randn(20, 10), 4, "exact")
    key = SubspaceCache.key("file|1|2|w", None, 4, "exact", 8, 2, 0)
    assert cache.get(key) is None
    cache.put(key, sub)
    again = cache.get(key)
    assert again is not None and torch.equal(again.U, sub.U) and torch.equal(again.col_norms, sub.col_norms)
    assert SubspaceCache.key("file|1|2|w", None, 8, "exact", 8, 2, 0) != key
    assert SubspaceCache.key("file|1|3|w", None, 4, "exact", 8, 2, 0) != key
    assert SubspaceCache.key("file|1|2|w", (0, 5), 4, "exact", 8, 2, 0) != key
    cache._path(key).write_bytes(b"garbage")
    assert cache.get(key) is None


def test_factored_norms_and_singular_values_match_dense() -> None:
    g = torch.Generator().manual_seed(6)
    B, A = torch.randn(40, 5, generator=g, dtype=torch.float64), torch.randn(5, 30, generator=g, dtype=torch.float64)
    dense = B @ A
    assert frobenius_norm(B, A) == pytest.approx(float(torch.linalg.matrix_norm(dense)), rel=1e-10)
    torch.testing.assert_close(singular_values(B, A), torch.linalg.svdvals(dense)[:5])
    P, S, Qh = product_svd(B, A)
    torch.testing.assert_close(P @ torch.diag(S) @ Qh, dense)


@pytest.mark.parametrize("condition", [1.0, 1e3, 1e6])
def test_thin_qr_is_orthonormal_and_exact(condition: float) -> None:
    from loraport.lowrank import thin_qr

    g = torch.Generator().manual_seed(7)
    U = torch.linalg.qr(torch.randn(500, 40, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(40, 40, generator=g, dtype=torch.float64)).Q
    X = (U * torch.logspace(0, -torch.log10(torch.tensor(condition)).item(), 40, dtype=torch.float64)) @ V.T
    X = X.float()
    Q, R = thin_qr(X)
    torch.testing.assert_close(Q.T @ Q, torch.eye(40), atol=1e-5, rtol=0)
    torch.testing.assert_close(Q @ R, X, atol=1e-5 * float(X.abs().max()), rtol=0)
    assert torch.allclose(R, torch.triu(R))


def test_thin_qr_falls_back_on_rank_deficient_and_wide_input() -> None:
    from loraport.lowrank import thin_qr

    X = torch.randn(30, 6, dtype=torch.float64)
    X[:, 5] = X[:, 0]  # rank 5
    Q, R = thin_qr(X)
    torch.testing.assert_close(Q @ R, X)
    torch.testing.assert_close(Q.T @ Q, torch.eye(6, dtype=torch.float64), atol=1e-10, rtol=0)
    wide = torch.randn(4, 9, dtype=torch.float64)
    Q, R = thin_qr(wide)
    torch.testing.assert_close(Q @ R, wide)
    Q, R = thin_qr(torch.zeros(10, 3))
    assert torch.equal(Q @ R, torch.zeros(10, 3))


@pytest.mark.parametrize("condition", [1.0, 1e2, 1e5])
def test_stabilize_keeps_the_span_and_is_nearly_orthonormal(condition: float) -> None:
    from loraport.lowrank import stabilize

    g = torch.Generator().manual_seed(8)
    U = torch.linalg.qr(torch.randn(400, 30, generator=g, dtype=torch.float64)).Q
    X = (U * torch.logspace(0, -torch.log10(torch.tensor(condition)).item(), 30, dtype=torch.float64)).float()
    Q = stabilize(X)
    # same column space: projecting X onto span(Q) loses nothing
    Qo = torch.linalg.qr(Q.double()).Q
    residual = X.double() - Qo @ (Qo.T @ X.double())
    assert float(residual.norm() / X.double().norm()) < 1e-5
    # one CholeskyQR round in float32 (or the fallback for ill-conditioned input)
    torch.testing.assert_close(Q.T @ Q, torch.eye(30), atol=1e-3, rtol=0)


def test_matrix_norms_blocked_matches_direct() -> None:
    from loraport.subspace import matrix_norms

    W = torch.randn(301, 17, generator=torch.Generator().manual_seed(9))
    rows, cols = matrix_norms(W)
    torch.testing.assert_close(rows, torch.linalg.vector_norm(W, dim=1))
    torch.testing.assert_close(cols, torch.linalg.vector_norm(W, dim=0))
