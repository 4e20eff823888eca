"""Elementary operations against brute-force float64 references."""
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import vars_ode as vo
from sklearn.linear_model import Lasso
from conftest import make_problem


@given(st.integers(0, 10_000), st.floats(0, 2))
def test_soft_threshold_is_the_prox_of_the_l1_norm(seed, thr):
    # prox_{thr |.|}(v) = argmin_u 0.5 (u - v)^2 + thr |u|, checked on a dense grid
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(7, generator=g, dtype=torch.float64) * 3
    grid = torch.linspace(-12, 12, 240001, dtype=torch.float64)
    obj = 0.5 * (grid[None] - v[:, None]) ** 2 + thr * grid.abs()[None]
    brute = grid[obj.argmin(1)]
    assert torch.allclose(vo.soft_threshold(v, thr), brute, atol=2e-4)


def test_lasso_objective_matches_numpy_and_conventions(problem):
    P, x = problem
    u = torch.randn(P.shape[1], dtype=torch.float64)
    Pn, xn, un = P.numpy(), x.numpy(), u.numpy()
    ref = 0.5 * np.sum((Pn @ un - xn) ** 2) + 0.3 * np.sum(np.abs(un))
    assert abs(vo.lasso_objective(P, u, x, 0.3).item() - ref) < 1e-12
    ref22 = 0.5 * np.sum((Pn @ un - xn) ** 2) + 0.6 * np.sum(np.abs(un))
    assert abs(vo.lasso_objective(P, u, x, 0.3, convention="eq22").item() - ref22) < 1e-12


def test_lasso_objective_broadcasts_over_leading_dims():
    P, x = make_problem(1, 10, 6, batch=(4, 3))
    u = torch.randn(4, 3, 6, dtype=torch.float64)
    lam = torch.rand(4, 3, dtype=torch.float64)
    out = vo.lasso_objective(P, u, x, lam)
    assert out.shape == (4, 3)
    for i in range(4):
        for j in range(3):
            assert torch.allclose(out[i, j], vo.lasso_objective(P, u[i, j], x[i, j], float(lam[i, j])))


@pytest.mark.parametrize("method", ["eigvalsh", "power", "official"])
def test_lipschitz_constants(method):
    P, _ = make_problem(2, 30, 16, batch=())
    K = P.T @ P
    exact = np.linalg.svd(P.numpy(), compute_uv=False)[0] ** 2
    L = vo.lipschitz_constant(K, method, iters=500).item()
    if method == "official":
        assert L >= exact  # an upper bound (Gershgorin, plus one)
        assert abs(L - (np.abs(K.numpy()).sum(1).max() + 1)) < 1e-12
    else:
        assert abs(L - exact) < 1e-8 * exact


@pytest.mark.parametrize("iters", [1, 3, 10])
def test_power_iteration_batched_against_numpy(iters):
    # batches of matrices, with and without a (broadcast) start: the power iteration written out in numpy on K v
    rng = np.random.default_rng(iters)
    A = rng.standard_normal((2, 3, 7, 5))
    K = torch.from_numpy(A.transpose(0, 1, 3, 2) @ A)
    for v0 in (None, torch.from_numpy(rng.standard_normal(5)), torch.from_numpy(rng.standard_normal((3, 5)))):
        v = np.ones((2, 3, 5)) / 5 ** 0.5 if v0 is None else np.broadcast_to(v0.numpy(), (2, 3, 5)).copy()
        for _ in range(iters):
            v = np.einsum("bhij,bhj->bhi", K.numpy(), v)
            v /= np.linalg.norm(v, axis=-1, keepdims=True)
        ref = np.einsum("bhi,bhij,bhj->bh", v, K.numpy(), v)
        L = vo.lipschitz_constant(K, "power", iters=iters, v0=v0)
        assert L.shape == (2, 3)
        np.testing.assert_allclose(L.numpy(), ref, rtol=1e-12)
        assert (L <= torch.linalg.eigvalsh(K)[..., -1] * (1 + 1e-12)).all()


def test_kkt_residual_is_zero_at_the_scikit_learn_solution():
    P, x = make_problem(3, 25, 10)
    ref = Lasso(alpha=0.1 / 25, fit_intercept=False, tol=1e-14, max_iter=10**6).fit(P.numpy(), x.numpy()).coef_
    r = vo.kkt_residual(P, torch.from_numpy(ref), x, 0.1)
    assert r.item() < 1e-7
    # and clearly non-zero elsewhere
    assert vo.kkt_residual(P, torch.from_numpy(ref) + 0.05, x, 0.1).item() > 1e-3


@pytest.mark.parametrize("bad, match", [
    (lambda P, x: vo.lasso_objective(P, torch.zeros(3, dtype=torch.float64), x, 0.1), "code"),
    (lambda P, x: vo.lasso_objective(P, torch.zeros(12, dtype=torch.float64), x[:5], 0.1), "x"),
    (lambda P, x: vo.lasso_objective(P, torch.zeros(12, dtype=torch.float64), x, -0.1), "lam"),
    (lambda P, x: vo.soft_threshold(torch.arange(3), 0.1), "x"),
    (lambda P, x: vo.lipschitz_constant(P.T @ P, "svd"), "method"),
    (lambda P, x: vo.penalty_weight(0.1, "eq11"), "convention"),
    # shapes that torch would have met with its own error, or (a negative threshold tensor) none
    (lambda P, x: vo.kkt_residual(P, x, torch.zeros(12, dtype=torch.float64), 0.1), r"code must have P.shape\[-1\] = 12"),
    (lambda P, x: vo.kkt_residual(P, torch.zeros(4, 12, dtype=torch.float64), x.expand(3, 20), 0.1),
     r"must broadcast: P \(\), code \(4,\), x \(3,\)"),
    (lambda P, x: vo.kkt_residual(P, torch.zeros(3, 12, dtype=torch.float64), x.expand(3, 20),
                                   torch.full((2,), 0.1)), r"lam \(2,\)"),
    (lambda P, x: vo.lasso_objective(P, torch.zeros(4, 12, dtype=torch.float64), x.expand(3, 20), 0.1), "broadcast"),
    (lambda P, x: vo.gram(P, x[:5]), r"x must have P.shape\[-2\] = 20"),
    (lambda P, x: vo.kkt_residual_gram(P.T @ P, torch.zeros(5, 2, dtype=torch.float64),
                                       torch.zeros(12, 2, dtype=torch.float64), 0.1), r"B must have K.shape\[-1\] = 12 rows"),
    (lambda P, x: vo.kkt_residual_gram((P.T @ P)[:5], torch.zeros(12, 2, dtype=torch.float64),
                                       torch.zeros(12, 2, dtype=torch.float64), 0.1), "K must be square"),
    (lambda P, x: vo.kkt_residual_gram(P.T @ P, torch.zeros(12, 2, dtype=torch.float64),
                                       torch.zeros(12, 3, dtype=torch.float64), 0.1), r"columns.*B \(2,\), code \(3,\)"),
    (lambda P, x: vo.soft_threshold(x, torch.ones(3, dtype=torch.float64)), r"x \(20,\), threshold \(3,\)"),
    (lambda P, x: vo.soft_threshold(x, torch.tensor(-0.5)), "threshold must be non-negative"),
    (lambda P, x: vo.lipschitz_constant(P.T @ P, "power", v0=torch.ones(5, dtype=torch.float64)),
     r"v0 must have K.shape\[-1\] = 12"),
    (lambda P, x: vo.lipschitz_constant(P.T @ P, "power", v0=torch.ones(3, 12, dtype=torch.float64)),
     r"v0 must broadcast to K's leading dimensions \(\)"),
])
def test_bad_input_names_the_argument(problem, bad, match):
    P, x = problem
    with pytest.raises(ValueError, match=match):
        bad(P, x)


def _violation_by_cases(g, u, w):
    # the optimality conditions written case by case, in float64
    on = (g + w * np.sign(u)) if np.isfinite(w) else np.where(u != 0, np.inf, 0.0)
    return np.where(u != 0, np.abs(on), np.maximum(np.abs(g) - w, 0.0))


@given(st.lists(st.tuples(st.floats(-10, 10, allow_subnormal=False), st.sampled_from([-2.0, -0.5, 0.0, 0.0, 0.7, 3.0])),
                min_size=1, max_size=40),
       st.sampled_from([0.0, 0.1, 1.0, 5.0, float("inf")]), st.booleans(), st.booleans())
def test_kkt_violation_matches_the_two_cases_to_the_last_bit(pairs, w, tensor_weight, track):
    # the branch-free form |g + w s| - (1 - |s|) min(|g|, w) against the cases, with and without a graph (the
    # untracked form works in place); an infinite weight: zero codes satisfy it, non-zero ones violate it
    from vars_ode.ops import kkt_violation
    g = torch.tensor([p[0] for p in pairs], dtype=torch.float64, requires_grad=track)
    u = torch.tensor([p[1] for p in pairs], dtype=torch.float64)
    weight = torch.full((1,), w, dtype=torch.float64) if tensor_weight else w
    got = kkt_violation(g, u, weight).detach().numpy()
    want = _violation_by_cases(g.detach().numpy(), u.numpy(), w)
    if not track:  # into the caller's three buffers: the same bits, the inputs untouched
        g0, u0, bufs = g.clone(), u.clone(), tuple(torch.full_like(u, float("nan")) for _ in range(3))
        into = kkt_violation(g, u, weight, buffers=bufs)
        assert into.data_ptr() == bufs[0].data_ptr() and np.array_equal(into.numpy(), got, equal_nan=True)
        assert torch.equal(g, g0) and torch.equal(u, u0)
    finite = np.isfinite(want)
    assert np.array_equal(got[finite], want[finite])
    assert (got[~finite] >= torch.finfo(torch.float64).max / 2).all()  # +inf, or the largest float


@given(st.integers(0, 10_000), st.sampled_from(["shared", "per_problem", "both"]), st.floats(0.0, 1.0),
       st.booleans(), st.booleans(), st.booleans())
def test_support_solve_matches_a_dense_solve_column_by_column(seed, layout, density, compact, dependent, shifted):
    # (D_j K D_j + I - D_j) v_j = r_j for every column j, against numpy's solve of the full m x m system of each
    # column; supports of any size (none, all), K shared by the columns or one per problem (broadcast both ways);
    # with two equal atoms both active the system is singular and `ok` must say so, unless a positive shift
    # (K_SS + shift_j I, one per column, as implicit_euler's steps use) makes it definite
    from vars_ode.ops import support_solve
    g = torch.Generator().manual_seed(seed)
    m, k, d = 6, 4, 9
    kb, db = {"shared": ((), (3,)), "per_problem": ((3,), (3,)), "both": ((2, 1), (1, 3))}[layout]
    P = torch.randn(*kb, d, m, generator=g, dtype=torch.float64)
    if dependent:
        P[..., 1] = P[..., 0]
    K = P.mT @ P
    D = (torch.rand(*db, m, k, generator=g, dtype=torch.float64) < density).double()
    R = torch.randn(*db, m, k, generator=g, dtype=torch.float64)
    batch = torch.broadcast_shapes(kb, db)
    shift = 0.1 + torch.rand(*batch, k, generator=g, dtype=torch.float64) if shifted else None
    V, ok = support_solve(K, D, R, compact=compact, shift=shift)
    assert V.shape == batch + (m, k) and ok.shape == batch + (k,)
    Kb, Db, Rb = K.expand(*batch, m, m), D.expand(*batch, m, k), R.expand(*batch, m, k)
    for i in np.ndindex(*batch):
        for j in range(k):
            dj = Db[i][:, j]
            singular = dependent and bool(dj[0] and dj[1]) and not shifted
            assert bool(ok[i][j]) == (not singular)
            if singular:
                continue
            M = np.diag(dj.numpy()) @ Kb[i].numpy() @ np.diag(dj.numpy()) + np.diag(1 - dj.numpy())
            if shifted:
                M += np.diag(dj.numpy() * float(shift[i][j]))
            np.testing.assert_allclose(V[i][:, j].numpy(), np.linalg.solve(M, Rb[i][:, j].numpy()), rtol=1e-9, atol=1e-9)


@given(st.integers(0, 10_000), st.sampled_from(["shared", "per_problem"]), st.floats(0.2, 1.0), st.booleans(),
       st.sampled_from([None, "equal", "empty"]), st.booleans())
def test_support_solve_gradients_against_a_dense_solve(seed, layout, density, compact, dependent, shifted):
    # the gradients of the solved columns (those marked ok, as every caller keeps them) for P (K = P^T P), R and the
    # shift, against autograd through dense solves of each column's full m x m system by LU (torch.linalg.solve),
    # float64. With two equal atoms, or an empty one, on a support that column is singular: its factorisation fails
    # (an empty atom's pivot is exactly zero) and the gradients of every input stay finite; they were NaN, from the
    # failed factor's pivots in the backward pass, though the column itself is not used
    from vars_ode.ops import support_solve
    g = torch.Generator().manual_seed(seed)
    m, k, d = 6, 4, 9
    kb = (3,) if layout == "per_problem" else ()
    P = torch.randn(*kb, d, m, generator=g, dtype=torch.float64)
    if dependent:
        P[..., 1] = P[..., 0] if dependent == "equal" else 0
    D = (torch.rand(3, m, k, generator=g, dtype=torch.float64) < density).double()
    if dependent:
        D[0, :2, 0] = 1  # one column whose support holds atoms 0 and 1 (equal, or 1 empty)
    R = torch.randn(3, m, k, generator=g, dtype=torch.float64)
    W = torch.randn(3, m, k, generator=g, dtype=torch.float64)  # the loss's weights
    shift = 0.1 + torch.rand(3, k, generator=g, dtype=torch.float64) if shifted else None

    def inputs():
        return [t.clone().requires_grad_() for t in (P, R)] + ([shift.clone().requires_grad_()] if shifted else [])

    got_in = inputs()
    K = got_in[0].mT @ got_in[0]
    V, ok = support_solve(K, D, got_in[1], compact=compact, shift=got_in[2] if shifted else None)
    loss = (torch.where(ok.unsqueeze(-2), V, 0) * W).sum()
    got = torch.autograd.grad(loss, got_in)
    assert all(torch.isfinite(t).all() for t in got)
    if dependent and not shifted:
        assert not ok[0, 0]

    ref_in = inputs()
    Kr = (ref_in[0].mT @ ref_in[0]).expand(3, m, m)
    ref_loss = 0
    for i in range(3):
        for j in range(k):
            if not ok[i, j]:
                continue
            dj = D[i, :, j]
            M = torch.diag(dj) @ Kr[i] @ torch.diag(dj) + torch.diag(1 - dj)
            if shifted:
                M = M + torch.diag(dj * ref_in[2][i, j])
            ref_loss = ref_loss + torch.linalg.solve(M, ref_in[1][i, :, j]) @ W[i, :, j]
    ref = torch.autograd.grad(ref_loss, ref_in, allow_unused=True) if torch.is_tensor(ref_loss) else [None] * len(ref_in)
    for a, b in zip(got, ref):
        b = torch.zeros_like(a) if b is None else b
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-9 * max(1.0, float(b.abs().max())))


@pytest.mark.parametrize("scale", [1e-8, 1.0, 1e8])
def test_support_solve_does_not_depend_on_the_scale_of_K(scale):
    # float32, K scaled by 1e-8 and 1e8 (a dictionary scaled by 1e-4 and 1e4): every well-conditioned support is
    # solved and marked ok; the identity slots off the supports (pivots of 1) made each look singular before
    from vars_ode.ops import support_solve
    g = torch.Generator().manual_seed(0)
    P = torch.randn(12, 6, generator=g, dtype=torch.float64)
    K = P.T @ P
    D = (torch.rand(6, 5, generator=g) < 0.6).double()
    D[:, 0] = 1  # one full support
    R = torch.randn(6, 5, generator=g, dtype=torch.float64)
    V, ok = support_solve((scale * K).float(), D.float(), (scale * R).float())
    assert ok.all(), ok
    for j in range(5):
        M = torch.diag(D[:, j]) @ (scale * K) @ torch.diag(D[:, j]) + torch.diag(1 - D[:, j])
        want = torch.linalg.solve(M, scale * R[:, j])
        assert torch.allclose(V[:, j].double(), want, rtol=1e-4, atol=1e-4 * want.abs().max()), j


def test_support_solve_with_a_non_finite_mask_entry_fails_that_column_only():
    # a NaN in one column's mask (a code that went non-finite) marks that column as failed; the others are solved
    from vars_ode.ops import support_solve
    g = torch.Generator().manual_seed(0)
    P = torch.randn(8, 5, generator=g, dtype=torch.float64)
    K = P.T @ P
    D = (torch.rand(5, 3, generator=g) < 0.6).double()
    D[0, 1] = float("nan")
    R = torch.randn(5, 3, generator=g, dtype=torch.float64)
    V, ok = support_solve(K, D, R)
    assert ok.tolist() == [True, False, True]
    for j in (0, 2):
        M = torch.diag(D[:, j]) @ K @ torch.diag(D[:, j]) + torch.diag(1 - D[:, j])
        assert torch.allclose(V[:, j], torch.linalg.solve(M, R[:, j]), atol=1e-10)
