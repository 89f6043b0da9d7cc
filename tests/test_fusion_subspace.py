"""Subspace merging (TSV-M, Iso-C, Iso-CTS), DARE, RegMean and the Core Space: pure math against float64 references.

The references are written independently of the implementation: numpy SVDs, the polar factor as
``U (U^T U)^-1/2``, RegMean as the least-squares solution on the stacked activations, the Core
Space results against the same method on dense matrices.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from loraport.fusion import FuseOptions, iso_c, iso_cts, merge_task_matrices, tsv
from loraport.fusion import baselines as B_
from loraport.fusion.core_space import core_space
from loraport.fusion.regmean import regmean, regmean_factors, shrink_gram
from loraport.fusion.subspace_merge import orthogonalize

F64 = torch.float64


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _low_rank(m: int, n: int, r: int, seed: int) -> torch.Tensor:
    return _randn(m, r, seed=seed) @ _randn(r, n, seed=seed + 100)


# -- numpy references -------------------------------------------------------------------------


def _polar(X: np.ndarray) -> np.ndarray:
    """``X (X^T X)^-1/2``: the orthonormal polar factor, by an eigendecomposition (not an SVD of X)."""
    w, Q = np.linalg.eigh(X.T @ X)
    return X @ (Q / np.sqrt(w)) @ Q.T


def _svd(D: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    U, S, Vt = np.linalg.svd(D, full_matrices=False)
    return U[:, :k], S[:k], Vt[:k].T


def ref_tsv(deltas: list[np.ndarray], dim: int | None = None) -> np.ndarray:
    k = (dim or min(deltas[0].shape)) // len(deltas)
    parts = [_svd(D, k) for D in deltas]
    U = np.concatenate([p[0] for p in parts], axis=1)
    S = np.concatenate([p[1] for p in parts])
    V = np.concatenate([p[2] for p in parts], axis=1)
    return _polar(U) @ np.diag(S) @ _polar(V).T


def ref_iso_c(deltas: list[np.ndarray], rank: int | None = None) -> np.ndarray:
    total = sum(deltas)
    U, S, V = _svd(total, rank or min(total.shape))
    return S.mean() * U @ V.T


def ref_iso_cts(deltas: list[np.ndarray], fraction: float, dim: int | None = None) -> np.ndarray:
    d = dim or min(deltas[0].shape)
    k = int(fraction * d)
    U_c, S_c, V_c = _svd(sum(deltas), k)
    s = (d - k) // len(deltas)
    Us, Ss, Vs = [U_c], [S_c], [V_c]
    for D in deltas:
        U, S, V = _svd(D - U_c @ U_c.T @ D, s)
        Us.append(U)
        Ss.append(S)
        Vs.append(V)
    S_all = np.concatenate(Ss)
    return S_all.mean() * _polar(np.concatenate(Us, axis=1)) @ _polar(np.concatenate(Vs, axis=1)).T


# -- orthogonal Procrustes ----------------------------------------------------------------------


def test_orthogonalize_is_the_nearest_orthonormal_matrix():
    X = _randn(12, 5, seed=0)
    P = orthogonalize(X)
    torch.testing.assert_close(P.T @ P, torch.eye(5, dtype=F64))
    torch.testing.assert_close(P, torch.from_numpy(_polar(X.numpy())))
    for seed in range(5):  # no other orthonormal matrix is closer
        Y = torch.linalg.qr(_randn(12, 5, seed=10 + seed))[0]
        assert torch.linalg.norm(X - P) <= torch.linalg.norm(X - Y)
    Q = torch.linalg.qr(X)[0]
    torch.testing.assert_close(orthogonalize(Q), Q)  # orthonormal columns stay


# -- TSV, Iso-C, Iso-CTS ------------------------------------------------------------------------


@pytest.mark.parametrize("tasks", [2, 3])
def test_tsv_matches_reference(tasks):
    deltas = [_randn(10, 8, seed=s) for s in range(tasks)]
    expected = ref_tsv([D.numpy() for D in deltas])
    torch.testing.assert_close(tsv(deltas), torch.from_numpy(expected), rtol=1e-10, atol=1e-10)


def test_tsv_of_tasks_in_orthogonal_subspaces_is_their_sum():
    """No interference to remove: U = [U_1 U_2] is already orthonormal, so TSV returns D_1 + D_2."""
    Q_u = torch.linalg.qr(_randn(10, 8, seed=1))[0]
    Q_v = torch.linalg.qr(_randn(8, 8, seed=2))[0]
    D1 = Q_u[:, :4] @ torch.diag(torch.tensor([5.0, 3, 2, 1], dtype=F64)) @ Q_v[:, :4].T
    D2 = Q_u[:, 4:] @ torch.diag(torch.tensor([4.0, 2, 1, 0.5], dtype=F64)) @ Q_v[:, 4:].T
    torch.testing.assert_close(tsv([D1, D2]), D1 + D2)
    torch.testing.assert_close(tsv([D1]), D1)  # one task: its full spectrum, unchanged


def test_tsv_keeps_floor_d_over_t_directions_per_task():
    deltas = [_randn(9, 7, seed=s) for s in range(3)]  # d = 7, T = 3: 2 directions each
    merged = tsv(deltas)
    assert int((torch.linalg.svdvals(merged) > 1e-9).sum()) == 6
    torch.testing.assert_close(merged, torch.from_numpy(ref_tsv([D.numpy() for D in deltas])))


def test_iso_c_flattens_the_spectrum_of_the_sum():
    deltas = [_randn(10, 6, seed=s) for s in range(2)]
    merged = iso_c(deltas)
    total = deltas[0] + deltas[1]
    S_total = torch.linalg.svdvals(total)
    torch.testing.assert_close(torch.linalg.svdvals(merged), S_total.mean().expand(6))
    torch.testing.assert_close(merged, torch.from_numpy(ref_iso_c([D.numpy() for D in deltas])))
    # same singular subspaces as the sum: projecting the sum onto the result's row space changes nothing
    U = torch.linalg.svd(merged)[0][:, :6]
    torch.testing.assert_close(U @ U.T @ total, total)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_iso_c_never_lifts_zero_directions(dtype):
    """A rank-3 sum in a 12 x 10 matrix: 3 flat singular values, the other 7 stay zero (float32 too)."""
    deltas = [_low_rank(12, 10, 2, seed=3).to(dtype), _low_rank(12, 10, 1, seed=4).to(dtype)]
    S = torch.linalg.svdvals(iso_c(deltas))
    assert torch.allclose(S[:3], S[0].expand(3), rtol=1e-4)
    assert float(S[3:].max()) < 1e-4 * float(S[0])
    expected = ref_iso_c([D.double().numpy() for D in deltas], rank=3)
    torch.testing.assert_close(iso_c(deltas).double(), torch.from_numpy(expected), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fraction", [0.0, 0.5, 0.8])
def test_iso_cts_matches_reference(fraction):
    deltas = [_randn(12, 10, seed=s) for s in range(3)]
    expected = ref_iso_cts([D.numpy() for D in deltas], fraction)
    torch.testing.assert_close(iso_cts(deltas, fraction), torch.from_numpy(expected), rtol=1e-10, atol=1e-10)


def test_iso_cts_special_cases():
    deltas = [_randn(12, 10, seed=s) for s in range(2)]
    # all of the sum's spectrum as the common subspace: Iso-C
    torch.testing.assert_close(iso_cts(deltas, common_fraction=1.0), iso_c(deltas))
    merged = iso_cts(deltas, 0.6)
    S = torch.linalg.svdvals(merged)
    torch.testing.assert_close(S, S[0].expand(10))  # flat: 6 common + 2 x 2 task-specific = 10 directions
    # the task-specific directions are orthogonal to the common ones before the joint orthogonalisation
    U_c = torch.linalg.svd(deltas[0] + deltas[1])[0][:, :6]
    residual = deltas[0] - U_c @ U_c.T @ deltas[0]
    assert float(torch.linalg.norm(U_c.T @ residual)) < 1e-10


def test_subspace_methods_use_the_given_dim():
    """On adapters the budget is the core size, not min(m, n): d = 4, T = 2 keeps 2 directions each."""
    deltas = [_low_rank(20, 16, 2, seed=s) for s in (5, 6)]
    torch.testing.assert_close(tsv(deltas, dim=4), torch.from_numpy(ref_tsv([D.numpy() for D in deltas], dim=4)))
    expected = ref_iso_cts([D.numpy() for D in deltas], 0.5, dim=4)
    torch.testing.assert_close(iso_cts(deltas, 0.5, dim=4), torch.from_numpy(expected), rtol=1e-9, atol=1e-9)


# -- DARE ----------------------------------------------------------------------------------------


def test_dare_drops_and_rescales():
    tau = _randn(200, 100, seed=7)
    dropped = B_.drop_and_rescale(tau, 0.3, torch.Generator().manual_seed(0))
    kept = dropped != 0
    assert abs(float(kept.double().mean()) - 0.3) < 0.01
    torch.testing.assert_close(dropped[kept], tau[kept] / 0.3)
    again = B_.drop_and_rescale(tau, 0.3, torch.Generator().manual_seed(0))
    assert torch.equal(dropped, again)  # seeded
    # unbiased: the mean over many masks approaches tau
    small = tau[:4, :5]
    g = torch.Generator().manual_seed(1)
    mean = torch.stack([B_.drop_and_rescale(small, 0.5, g) for _ in range(4000)]).mean(0)
    torch.testing.assert_close(mean, small, rtol=0, atol=0.1)


def test_dare_at_density_one_is_task_arithmetic_or_ties():
    base = _randn(6, 5, seed=8)
    weights = [base + _randn(6, 5, seed=s) for s in (9, 10, 11)]
    g = torch.Generator().manual_seed(0)
    torch.testing.assert_close(B_.dare(weights, base, 1.0, 0.7, generator=g), B_.task_arithmetic(weights, base, 0.7))
    torch.testing.assert_close(
        B_.dare(weights, base, 1.0, 1.0, generator=g, combine="ties"), B_.ties(weights, base, 1.0, 1.0)
    )


# -- RegMean -------------------------------------------------------------------------------------


def test_regmean_is_the_least_squares_merge():
    """a = 1, no ridge: argmin_W sum_i ||W X_i - W_i X_i||^2, solved by lstsq on the stacked activations."""
    Xs = [_randn(6, 40, seed=s) for s in (1, 2, 3)]
    Ws = [_randn(4, 6, seed=s) for s in (4, 5, 6)]
    X = np.concatenate([x.numpy() for x in Xs], axis=1)
    Y = np.concatenate([(w @ x).numpy() for w, x in zip(Ws, Xs, strict=True)], axis=1)
    expected = np.linalg.lstsq(X.T, Y.T, rcond=None)[0].T
    merged = regmean(Ws, [x @ x.T for x in Xs], shrinkage=1.0, ridge=0.0)
    torch.testing.assert_close(merged, torch.from_numpy(expected), rtol=1e-10, atol=1e-10)


def test_regmean_shrinkage_formula_and_limits():
    Xs = [_randn(5, 30, seed=s) for s in (1, 2)]
    Ws = [_randn(3, 5, seed=s) for s in (3, 4)]
    grams = [x @ x.T for x in Xs]
    shrunk = [0.9 * G.numpy() + 0.1 * np.diag(np.diag(G.numpy())) for G in grams]
    expected = sum(w.numpy() @ G for w, G in zip(Ws, shrunk, strict=True)) @ np.linalg.inv(sum(shrunk))
    torch.testing.assert_close(regmean(Ws, grams, 0.9, 0.0), torch.from_numpy(expected))
    torch.testing.assert_close(shrink_gram(grams[0], 0.9), torch.from_numpy(shrunk[0]))
    # a = 0: every input column is the Gram-diagonal-weighted average of the models' columns
    d = [torch.diagonal(G) for G in grams]
    weighted = (Ws[0] * d[0] + Ws[1] * d[1]) / (d[0] + d[1])
    torch.testing.assert_close(regmean(Ws, grams, 0.0, 0.0), weighted)
    # one model twice (any Gram scale): itself
    torch.testing.assert_close(regmean([Ws[0], Ws[0]], [grams[0], 3 * grams[1]]), Ws[0], rtol=1e-5, atol=1e-8)


def test_regmean_dead_input_gets_the_average():
    X = _randn(5, 30, seed=1)
    X[2] = 0  # input 2 never fires in either model
    Ws = [_randn(3, 5, seed=s) for s in (3, 4)]
    grams = [X @ X.T, 2 * X @ X.T]
    with pytest.raises(ValueError, match="singular"):
        regmean(Ws, grams, 0.9, ridge=0.0)
    merged = regmean(Ws, grams)
    torch.testing.assert_close(merged[:, 2], (Ws[0][:, 2] + Ws[1][:, 2]) / 2)
    live = [0, 1, 3, 4]
    exact = regmean([w[:, live] for w in Ws], [G[live][:, live] for G in grams], ridge=0.0)
    torch.testing.assert_close(merged[:, live], exact, rtol=1e-4, atol=1e-6)


def test_regmean_factors_equal_dense_regmean_of_the_merged_models():
    W0 = _randn(8, 6, seed=0)
    updates = [(_randn(8, 2, seed=s), _randn(2, 6, seed=s + 10)) for s in (1, 2, 3)]
    grams = [(x := _randn(6, 25, seed=s + 20)) @ x.T for s in (1, 2, 3)]
    B, A = regmean_factors(updates, grams)
    dense = regmean([W0 + b @ a for b, a in updates], grams)
    torch.testing.assert_close(W0 + B @ A, dense)
    assert B.shape == (8, 6) and A.shape == (6, 6)


# -- Core Space ----------------------------------------------------------------------------------


def _updates(ranks: tuple[int, ...], m: int = 24, n: int = 18) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(_randn(m, r, seed=10 * i + 1), _randn(r, n, seed=10 * i + 2)) for i, r in enumerate(ranks)]


def test_core_space_reconstructs_every_update():
    updates = _updates((3, 4, 2))
    space = core_space(updates)
    assert space.cores[0].shape == (9, 9) and space.dim == 9
    for (B, A), core in zip(updates, space.cores, strict=True):
        torch.testing.assert_close(space.dense(core), B @ A)
    torch.testing.assert_close(space.Q_B.T @ space.Q_B, torch.eye(9, dtype=F64))
    # two equal adapters: the stacked factors have rank 3, so does the space
    same = core_space([updates[0], updates[0]])
    assert same.Q_B.shape[1] == 3 and same.Q_A.shape[1] == 3


@pytest.mark.parametrize("method", ["task_arithmetic", "tsv", "iso_c", "iso_cts"])
@pytest.mark.parametrize("ranks", [(4, 4), (3, 4, 2)])
def test_core_space_is_exact_for_subspace_and_linear_methods(method, ranks):
    """The method on the (sum r) x (sum r) cores, lifted, equals the method on the dense updates (float64)."""
    options = FuseOptions(method=method)
    options.iso_cts.common_fraction = 0.5
    updates = _updates(ranks)
    space = core_space(updates)
    lifted = space.lift(merge_task_matrices(options, space.cores, dim=space.dim))
    dense = merge_task_matrices(options, [B @ A for B, A in updates], dim=space.dim)
    torch.testing.assert_close(lifted.B @ lifted.A, dense, rtol=1e-9, atol=1e-9)
    assert lifted.rank <= sum(ranks)


def test_ties_in_core_space_does_not_depend_on_input_order():
    """The bases are singular vectors of the stacked factors: swapping the inputs gives the same merge."""
    options = FuseOptions(method="ties")
    updates = _updates((3, 3))
    results = []
    for order in (updates, updates[::-1]):
        space = core_space(order)
        f = space.lift(merge_task_matrices(options, space.cores, dim=space.dim))
        results.append(f.B @ f.A)
    torch.testing.assert_close(results[0], results[1], rtol=1e-9, atol=1e-9)
