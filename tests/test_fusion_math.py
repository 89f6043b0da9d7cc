"""The per-matrix fusion math against independent float64 references (SPEC sec. 7).

The reference below is written from the SPEC formulas with explicit loops, sharing no code
with the library except POT's GW solver (the plan itself is checked by its marginals).
"""

from __future__ import annotations

import math

import numpy as np
import ot
import pytest
import torch

from loraport.fusion import average, rgsp_align, rgsp_fuse, task_arithmetic, ties
from loraport.fusion.baselines import trim
from loraport.fusion.rgsp import DEFAULT_EPSILON, direction_cost
from loraport.subspace import top_k_svd


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny SVDs on a shared 2-core machine are ~300x slower with 2 busy-waiting threads.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _pair(m: int, n: int, drift: float, seed: int, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    W_A = torch.randn(m, n, generator=g, dtype=torch.float64) / math.sqrt(n)
    G = torch.randn(m, 3, generator=g, dtype=torch.float64) @ torch.randn(3, n, generator=g, dtype=torch.float64)
    W_B = W_A + drift * W_A.norm() * G / G.norm()
    return W_A.to(dtype), W_B.to(dtype)


def _ref_svd(W: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float64 top-r SVD; each U column's largest-magnitude entry made positive."""
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    U, S, V = U[:, :r].clone(), S[:r].clone(), Vh[:r].T.clone()
    for j in range(r):
        i = int(U[:, j].abs().argmax())
        if U[i, j] < 0:
            U[:, j], V[:, j] = -U[:, j], -V[:, j]
    return U, S, V


def _reference(W_A, W_B, r, epsilon=DEFAULT_EPSILON, beta=1.0, gamma=1.0, tfi_eps=1e-8):
    """SPEC sec. 7 step by step, float64, explicit loops."""
    W_A, W_B = W_A.double(), W_B.double()
    UA, SA, VA = _ref_svd(W_A, r)
    UB, SB, VB = _ref_svd(W_B, r)
    M = torch.zeros(r, r, dtype=torch.float64)
    for i in range(r):
        logits = [float(UA[:, i] @ UB[:, j]) / math.sqrt(r) for j in range(r)]
        top = max(logits)
        weights = [math.exp(v - top) for v in logits]
        for j in range(r):
            M[i, j] = weights[j] / sum(weights)
    UBp = torch.zeros_like(UA)
    VBp = torch.zeros_like(VA)
    for i in range(r):
        for j in range(r):
            UBp[:, i] += M[i, j] * UB[:, j]
            VBp[:, i] += M[i, j] * VB[:, j]

    def cost(U, S):
        C = torch.zeros(r, r, dtype=torch.float64)
        for i in range(r):
            for j in range(r):
                C[i, j] = float(((S[i] * U[:, i] - S[j] * U[:, j]) ** 2).sum())
        return C / C.max() if C.max() > 0 else C

    CA, CB = cost(UA, SA), cost(UBp, SB)
    marg = np.full(r, 1.0 / r)
    plan_gw, log = ot.gromov.entropic_gromov_wasserstein(
        CA.numpy(), CB.numpy(), marg, marg, loss_fun="square_loss", epsilon=epsilon, log=True
    )
    plan_gw = torch.from_numpy(plan_gw)
    d = min(max(float(log["gw_dist"]), 0.0), 1.0)
    delta = SB - SA
    z = sum(math.exp(abs(float(x))) for x in delta)
    p = torch.tensor([math.exp(abs(float(x))) / z for x in delta], dtype=torch.float64)
    s_rel = float(sum(p[i] * delta[i] for i in range(r)))
    h_rel = float(-sum(p[i] * math.log(p[i]) for i in range(r)))
    tfi = torch.tensor([float(p[i]) * s_rel * (1 - d) / (h_rel + tfi_eps) for i in range(r)], dtype=torch.float64)
    tos = torch.zeros(r, r, dtype=torch.float64)
    for k in range(r):
        for q in range(r):
            cos = float(UA[:, k] @ UBp[:, q]) / float(UA[:, k].norm() * UBp[:, q].norm())
            tos[k, q] = abs(cos) * math.exp(-beta * d)
    plan = plan_gw * tos
    plan = plan / plan.sum()
    dS = torch.zeros(r, dtype=torch.float64)
    for i in range(r):
        for j in range(r):
            dS[i] += M[i, j] * sum(r * plan[j, k] * delta[k] for k in range(r))
    U_rel, V_rel = (UA + UBp) / 2, (VA + VBp) / 2
    tau_proj = torch.zeros_like(W_A)
    for i in range(r):
        tau_proj += dS[i] * torch.outer(U_rel[:, i], V_rel[:, i])
    tau_ortho = (W_B - W_A) - tau_proj
    lam = min(max(1 / (1 + math.exp(d)) * float(tfi.mean()), 0.0), 1.0)
    fused = (W_A + W_B) / 2 + gamma * (lam * tau_proj + (1 - lam) * tau_ortho)
    return dict(M=M, CA=CA, CB=CB, plan_gw=plan_gw, d=d, p=p, s_rel=s_rel, h_rel=h_rel, tfi=tfi, tos=tos) | dict(
        plan=plan, dS=dS, lam=lam, tau_proj=tau_proj, tau_ortho=tau_ortho, fused=fused
    )


def _library_alignment(W_A, W_B, r, **kwargs):
    a = top_k_svd(W_A, r, algorithm="exact")
    b = top_k_svd(W_B, r, algorithm="exact")
    return rgsp_align(a.U, a.S, a.V, b.U, b.S, b.V, **kwargs)


# -- RGSP against the reference ------------------------------------------------------------


def test_small_case_intermediates_match_reference():
    """M, both cost matrices, the GW plan, encoding, TFI/TOS, dS and lambda on a 7 x 5, r = 3 case."""
    W_A, W_B = _pair(7, 5, drift=0.4, seed=3)
    ref = _reference(W_A, W_B, r=3)
    lib = _library_alignment(W_A, W_B, 3)
    for name, value in [("M", lib.M), ("CA", lib.cost_A), ("CB", lib.cost_B), ("p", lib.p), ("tfi", lib.tfi)]:
        torch.testing.assert_close(value, ref[name], rtol=1e-9, atol=1e-12, msg=name)
    torch.testing.assert_close(lib.plan_gw, ref["plan_gw"], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(lib.tos, ref["tos"], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(lib.plan, ref["plan"], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(lib.dS, ref["dS"], rtol=1e-6, atol=1e-10)
    for name in ("d", "s_rel", "h_rel", "lam"):
        assert getattr(lib, name) == pytest.approx(ref[name], rel=1e-6, abs=1e-12), name
    assert torch.allclose(lib.M.sum(dim=1), torch.ones(3, dtype=torch.float64))
    # The spectrum changed: the small case must exercise non-trivial values.
    assert abs(ref["s_rel"]) > 1e-3 and ref["dS"].abs().max() > 1e-3


@pytest.mark.parametrize("gamma", [1.0, 0.5])
def test_fused_matrix_matches_reference_float64(gamma):
    W_A, W_B = _pair(24, 16, drift=0.3, seed=5)
    ref = _reference(W_A, W_B, r=6, gamma=gamma)
    fused, record = rgsp_fuse(W_A, W_B, rank=6, gamma=gamma)
    assert fused.dtype == torch.float64
    torch.testing.assert_close(fused, ref["fused"], rtol=1e-7, atol=1e-9)
    assert record.lam == pytest.approx(ref["lam"], rel=1e-6, abs=1e-12)
    assert record.tau_proj_norm == pytest.approx(float(ref["tau_proj"].norm()), rel=1e-6)
    assert record.tau_ortho_norm == pytest.approx(float(ref["tau_ortho"].norm()), rel=1e-6)
    assert record.rank == 6 and record.gw_epsilon == DEFAULT_EPSILON  # same solve as the reference


def test_fused_matrix_float32_close_to_float64_reference():
    W_A, W_B = _pair(40, 30, drift=0.2, seed=7)
    ref = _reference(W_A, W_B, r=8)
    fused, _ = rgsp_fuse(W_A.float(), W_B.float(), rank=8)
    assert fused.dtype == torch.float32
    assert float((fused.double() - ref["fused"]).norm() / ref["fused"].norm()) < 1e-4


def test_gw_plan_marginals_before_tos():
    W_A, W_B = _pair(48, 32, drift=0.3, seed=11)
    r = 16
    lib = _library_alignment(W_A.float(), W_B.float(), r)
    assert lib.plan_gw.shape == (r, r)
    uniform = torch.full((r,), 1 / r, dtype=torch.float64)
    torch.testing.assert_close(lib.plan_gw.sum(dim=1), uniform, atol=1e-7 / r, rtol=0)
    torch.testing.assert_close(lib.plan_gw.sum(dim=0), uniform, atol=1e-7 / r, rtol=0)
    assert float(lib.plan.sum()) == pytest.approx(1.0, abs=1e-12)
    assert (lib.plan >= 0).all() and 0.0 <= lib.d <= 1.0 and lib.gw_converged
    assert lib.gw_epsilon == DEFAULT_EPSILON  # no retry was needed


def test_cost_matrix_properties_and_zero_guard():
    X = torch.randn(10, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    C = direction_cost(X)
    assert torch.equal(C, C.T) and float(C.max()) == 1.0 and torch.all(torch.diagonal(C) == 0)
    assert torch.equal(direction_cost(torch.zeros(10, 5)), torch.zeros(5, 5, dtype=torch.float64))


# -- RGSP invariants -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_rgsp_of_identical_inputs_is_bit_exact(dtype):
    """W_A == W_B gives dS = 0, tau_proj = tau_ortho = 0, W* = W_A exactly (no shortcut)."""
    W, _ = _pair(32, 20, drift=0.0, seed=1, dtype=dtype)
    fused, record = rgsp_fuse(W, W.clone(), rank=8)
    assert torch.equal(fused.to(dtype), W)
    assert record.lam == 0.0 and record.tau_proj_norm == 0.0 and record.tau_ortho_norm == 0.0
    assert math.isfinite(record.d) and record.position is None


@pytest.mark.parametrize("shape,rank", [((6, 4), 64), ((5, 3), 1), ((1, 8), 4)])
def test_rgsp_rank_clamped_and_degenerate_ranks(shape, rank):
    W_A, W_B = _pair(*shape, drift=0.5, seed=2, dtype=torch.float32)
    fused, record = rgsp_fuse(W_A, W_B, rank=rank)
    assert record.rank == min(rank, *shape)
    assert fused.shape == W_A.shape and torch.isfinite(fused).all()
    same, _ = rgsp_fuse(W_A, W_A.clone(), rank=rank)
    assert torch.equal(same, W_A)


def test_rgsp_zero_matrices_and_gamma_zero():
    Z = torch.zeros(8, 6)
    fused, record = rgsp_fuse(Z, Z.clone(), rank=4)
    assert torch.equal(fused, Z) and record.lam == 0.0
    W_A, W_B = _pair(8, 6, drift=0.5, seed=4, dtype=torch.float32)
    fused, _ = rgsp_fuse(Z, W_B, rank=6)
    assert torch.isfinite(fused).all()
    fused, _ = rgsp_fuse(W_A, W_B, rank=6, gamma=0.0)
    assert torch.equal(fused, (W_A + W_B) / 2)


def test_rgsp_deterministic_and_position_diagnostic():
    W_A, W_B = _pair(30, 20, drift=0.2, seed=9, dtype=torch.float32)
    first, rec1 = rgsp_fuse(W_A, W_B, rank=20)
    second, rec2 = rgsp_fuse(W_A, W_B, rank=20)
    assert torch.equal(first, second) and rec1 == rec2
    expected = float(((first - W_A).double() * (W_B - W_A).double()).sum() / ((W_B - W_A).double() ** 2).sum())
    assert rec1.position == pytest.approx(expected, rel=1e-4)


# -- baselines ---------------------------------------------------------------------------


def test_average_and_task_arithmetic_closed_forms():
    g = torch.Generator().manual_seed(0)
    C, t1, t2 = (torch.randn(6, 5, generator=g, dtype=torch.float64) for _ in range(3))
    A, B = C + t1, C + t2
    torch.testing.assert_close(average([A, B]), (A + B) / 2)
    torch.testing.assert_close(task_arithmetic([A, B], C, scaling=1.0), C + t1 + t2)
    torch.testing.assert_close(task_arithmetic([A, B], C, scaling=0.5), (A + B) / 2)


def test_ties_density_one_with_agreeing_signs_is_task_arithmetic_of_the_mean():
    g = torch.Generator().manual_seed(1)
    C = torch.randn(7, 9, generator=g, dtype=torch.float64)
    sign = torch.sign(torch.randn(7, 9, generator=g, dtype=torch.float64))
    t1 = sign * (torch.rand(7, 9, generator=g, dtype=torch.float64) + 0.1)
    t2 = sign * (torch.rand(7, 9, generator=g, dtype=torch.float64) + 0.1)
    merged = ties([C + t1, C + t2], C, density=1.0, scaling=0.8)
    torch.testing.assert_close(merged, C + 0.8 * (t1 + t2) / 2)
    torch.testing.assert_close(merged, task_arithmetic([C + t1, C + t2], C, scaling=0.4))


def test_ties_trim_elect_disjoint_mean_by_hand():
    C = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0])
    t1 = torch.tensor([3.0, -1.0, 0.5, 2.0, -4.0])
    t2 = torch.tensor([-1.0, -2.0, 0.4, 2.0, 1.0])
    # density 0.6 keeps ceil(3) entries: t1 -> [3, 0, 0, 2, -4]; t2 -> [-1, -2, 0, 2, 1] (|.| >= 1 ties kept)
    assert torch.equal(trim(t1, 0.6), torch.tensor([3.0, 0, 0, 2, -4]))
    assert torch.equal(trim(t2, 0.6), torch.tensor([-1.0, -2, 0, 2, 1]))
    # elected signs: [+, -, 0, +, -]; disjoint means: [3, -2, 0, 2, -4]
    merged = ties([C + t1, C + t2], C, density=0.6, scaling=0.5)
    torch.testing.assert_close(merged, C + 0.5 * torch.tensor([3.0, -2.0, 0.0, 2.0, -4.0]))


def test_ties_of_identical_models_with_full_density_is_identity():
    g = torch.Generator().manual_seed(2)
    C, A = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    torch.testing.assert_close(ties([A, A], C, density=1.0, scaling=1.0), A)
