"""Gradients through solve(): unrolled, implicit at the fixed point, and the ODE adjoint."""
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch.autograd import gradcheck

import vars_ode as vo
from conftest import make_problem, sklearn_lasso


def inputs(seed=0, d=10, m=6, batch=()):
    P, x = make_problem(seed, d, m, batch=batch)
    lam = torch.tensor(0.1, dtype=torch.float64)
    return P.requires_grad_(), x.requires_grad_(), lam.requires_grad_()


def test_gradcheck_unroll_fixed_steps():
    P, x, lam = inputs()
    # L is a constant of the iteration (the solver detaches it), so fix it for the finite differences
    f = lambda P, x, lam: vo.solve(P, x, lam, "ista", tol=0, max_iter=15, grad="unroll", L=3.0).output  # noqa: E731
    assert gradcheck(f, (P, x, lam), eps=1e-6, atol=1e-6)


def test_gradcheck_unroll_fista():
    P, x, lam = inputs(1, batch=(2,))
    f = lambda P, x, lam: vo.solve(P, x, lam, "fista", tol=0, max_iter=10, L=3.0).code  # noqa: E731
    assert gradcheck(f, (P, x, lam), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("implicit_solve", ["direct", "cg"])
def test_gradcheck_implicit(implicit_solve):
    P, x, lam = inputs(2, batch=(3,))
    f = lambda P, x, lam: vo.solve(P, x, lam, "fista", tol=1e-13, max_iter=100_000, grad="implicit",  # noqa: E731
                                   implicit_solve=implicit_solve).output
    assert gradcheck(f, (P, x, lam), eps=1e-6, atol=1e-5)


def test_gradcheck_implicit_gram_form():
    P, X = make_problem(3, 12, 6, batch=(4,))
    K = (P.T @ P).requires_grad_()
    B = (P.T @ X.T).requires_grad_()
    f = lambda K, B: vo.solve_gram(K, B, 0.1, "fista", tol=1e-13, max_iter=100_000, grad="implicit").code  # noqa: E731
    assert gradcheck(f, (K, B), eps=1e-6, atol=1e-5)


def test_gradcheck_adjoint_ode_smooth_field():
    # lam = 0: the field is smooth, so the adjoint gradient must match finite differences tightly
    P, x, lam = inputs(4, d=6, m=3)
    f = lambda P, x: vo.solve(P, x, 0.0, "dopri5", grad="adjoint", t_end=2.0, L=3.0,  # noqa: E731
                              rtol=1e-11, atol=1e-13).code
    assert gradcheck(f, (P, x), eps=1e-6, atol=1e-6)


def test_adjoint_and_unrolled_ode_gradients_with_thresholds():
    # lam > 0: each crossing of the threshold is a kink of the field; an adaptive solver resolves it
    # only to its tolerance, so adjoint, unrolled and finite-difference Jacobians agree to ~1e-4
    # at rtol 1e-11 (measured 1.6e-4) and to ~4e-2 at rtol 1e-8.
    P, x, lam = inputs(4, d=8, m=4)
    jac = {}
    for grad in ("unroll", "adjoint"):
        f = lambda x: vo.solve(P.detach(), x, 0.1, "dopri5", grad=grad, t_end=2.0,  # noqa: E731
                               rtol=1e-11, atol=1e-13).code
        jac[grad] = torch.autograd.functional.jacobian(f, x.detach())
    eps = 1e-6
    fd = torch.stack([(f(x.detach() + eps * e) - f(x.detach() - eps * e)) / (2 * eps)
                      for e in torch.eye(8, dtype=torch.float64)], 1)
    # unrolled through the native integrator, adjoint through torchdiffeq's (other steps): measured 1.1e-5
    assert (jac["adjoint"] - jac["unroll"]).abs().max() < 3e-5
    assert (jac["adjoint"] - fd).abs().max() < 1e-3
    assert fd.abs().max() > 0.05  # a real dependence, not a vacuous comparison


@pytest.mark.parametrize("method, integrator, short, long", [("dopri5", "torchdiffeq", 3.0, 8.0),
                                                              ("explicit_adams", "auto", 4.0, 12.0)])
def test_the_continuous_adjoint_is_refused_where_its_backward_pass_loses_the_trajectory(method, integrator, short,
                                                                                      long):
    # torchdiffeq's continuous adjoint integrates the state back through a flow that expands backwards. Over a long
    # horizon its gradient is noise (premise: far from the unrolled one, the gradient of the same forward trajectory),
    # and it is refused with the miss named; over a short one it is allowed, within a few percent of the unrolled
    # one, and its check does not count in the evaluations
    from vars_ode.solvers import ode
    g = torch.Generator().manual_seed(0)
    P = torch.randn(16, 10, generator=g, dtype=torch.float64) / 4
    X = torch.randn(3, 16, generator=g, dtype=torch.float64)

    def run(T, grad):
        Pg = P.clone().requires_grad_(True)
        sol = vo.solve(Pg, X, 0.1, method, grad=grad, tol=0.0, t_end=T, integrator=integrator)
        loss = (sol.code.sin() * torch.arange(10, dtype=P.dtype)).sum()
        return torch.autograd.grad(loss, Pg)[0], sol.stats.iterations

    with pytest.raises(ValueError, match=r"continuous adjoint .*misses the start by [0-9.e+]+ times.*discrete adjoint"):
        run(long, "adjoint")
    saved = ode.ADJOINT_MISS
    ode.ADJOINT_MISS = float("inf")
    try:
        noise, _ = run(long, "adjoint")
    finally:
        ode.ADJOINT_MISS = saved
    exact, _ = run(long, "unroll")
    assert (noise - exact).abs().max() > 1.0 * exact.abs().max()
    (adjoint, work), (unrolled, unrolled_work) = run(short, "adjoint"), run(short, "unroll")
    assert (adjoint - unrolled).abs().max() < 0.05 * unrolled.abs().max()
    assert torch.equal(work, unrolled_work)
    # without a gradient to take there is nothing to refuse
    with torch.no_grad():
        sol = vo.solve(P, X, 0.1, method, grad="adjoint", tol=0.0, t_end=long, integrator=integrator)
    assert torch.isfinite(sol.code).all() and sol.code.shape == (3, 10)


def test_scipy_solver_has_an_adjoint_over_a_horizon_and_no_unrolled_gradient():
    # scipy's solve_ivp integrates numpy arrays: no graph through its steps (grad='unroll' is refused, naming the
    # solver), but torchdiffeq's continuous adjoint needs none: over a horizon of 3 its gradient is that of the flow,
    # within 2% of rk4's with a fine step
    g = torch.Generator().manual_seed(0)
    P = (torch.randn(16, 10, generator=g, dtype=torch.float64) / 4).requires_grad_(True)
    X = torch.randn(3, 16, generator=g, dtype=torch.float64)
    with pytest.raises(ValueError, match="'scipy_solver' has no unrolled gradient"):
        vo.solve(P, X, 0.1, "scipy_solver", tol=0.0, t_end=3.0)
    sol = vo.solve(P, X, 0.1, "scipy_solver", grad="adjoint", tol=0.0, t_end=3.0)
    got = torch.autograd.grad(sol.code.sin().sum(), P)[0]
    fine = vo.solve(P, X, 0.1, "rk4", tol=0.0, t_end=3.0, options={"step_size": 0.01})
    want = torch.autograd.grad(fine.code.sin().sum(), P)[0]
    assert (got - want).abs().max() < 0.02 * want.abs().max()


def test_implicit_and_unrolled_gradients_agree_at_convergence():
    P, x, lam = inputs(6, d=16, m=8, batch=(3,))
    w = torch.randn(3, 16, dtype=torch.float64)
    out = {}
    for grad in ("unroll", "implicit"):
        P_, x_, l_ = (t.detach().clone().requires_grad_() for t in (P, x, lam))
        sol = vo.solve(P_, x_, l_, "ista", tol=1e-14, max_iter=50_000, grad=grad)
        (sol.output * w).sum().backward()
        out[grad] = (P_.grad, x_.grad, l_.grad)
    for a, b in zip(out["unroll"], out["implicit"]):
        assert torch.allclose(a, b, atol=1e-8, rtol=1e-6)


def test_implicit_memory_does_not_grow_with_iterations():
    # The implicit mode keeps no iterate in the graph: its backward sees only K, B, w and the code.
    P, x, lam = inputs(7)
    with pytest.warns(RuntimeWarning, match="fixed budget"):
        sol = vo.solve(P, x, lam, "ista", tol=0, max_iter=500, grad="implicit")
    fn = sol.code.grad_fn
    seen, stack = set(), [fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(n for n, _ in node.next_functions)
    assert len(seen) < 40


def test_implicit_gradient_of_a_fixed_budget_warns():
    # a fixed budget (tol=0, a horizon, a layer's steps) is not checked against a tolerance, so its implicit gradient
    # (the equilibrium's, taken wherever the budget stops: 3 ISTA steps are far from it) is said to be unchecked
    import warnings
    P, x, lam = inputs(3)
    for kw in (dict(solver="ista", max_iter=3), dict(solver="fista", max_iter=3), dict(solver="rk4", t_end=2.0)):
        with pytest.warns(RuntimeWarning, match="fixed budget"):
            vo.solve(P, x, lam, tol=0, grad="implicit", **kw)
    layer = vo.VARSLayer(8, 2, dictionary="d", steps=3, grad="implicit", dtype=torch.float64)
    tokens = torch.randn(2, 5, 8, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="fixed budget"):
        layer(tokens).sum().backward()
    with warnings.catch_warnings():  # not without gradients, nor with a tolerance that was reached
        warnings.simplefilter("error")
        with torch.no_grad():
            layer(tokens)
            vo.solve(P, x, lam, "ista", tol=0, max_iter=3, grad="implicit")
        vo.solve(P, x, lam, "fista", tol=1e-8, grad="implicit")
        layer.set_solver(steps=None)(tokens).sum().backward()


def test_operator_cg_stops_instead_of_diverging_on_a_rank_deficient_gram():
    """More atoms than tokens: K = Phi^T Phi has rank 12 < 24, and the support systems of some problems are
    nearly singular. In float32, CG used to run all its iterations there and return residuals far above the
    right-hand side's; it now stops each problem that has stalled and returns its best iterate, and the
    well-posed problems still match a float64 direct solve."""
    from vars_ode.gradients import _operator_cg
    from vars_ode.lasso import GramOperator

    g = torch.Generator().manual_seed(0)
    phi = torch.randn(12, 24, generator=g, dtype=torch.float64)
    K = phi.T @ phi
    D = (torch.rand(24, 200, generator=g) < 0.6).double()
    D[:, :100] = 0
    D[:8, :100] = 1.0  # the first 100 problems: 8 atoms on the support, a well-posed system
    R = torch.randn(24, 200, generator=g, dtype=torch.float64) * D
    op = GramOperator(K.float())
    calls = []
    apply = op.gram_apply
    op.gram_apply = lambda c: calls.append(1) or apply(c)
    (X,) = _operator_cg(op, (D.float(),), (R.float(),), 500, 1e-5)
    A = lambda V: D * (K @ (D * V)) + (1 - D) * V  # noqa: E731
    res = (A(X.double()) - R).norm(dim=0) / R.norm(dim=0).clamp_min(1e-30)
    assert torch.isfinite(X).all() and bool((res <= 1.0 + 1e-6).all()) and len(calls) < 500
    ref = torch.stack([torch.linalg.solve(torch.diag(D[:, j]) @ K @ torch.diag(D[:, j]) + torch.diag(1 - D[:, j]),
                                          R[:, j]) for j in range(100)], 1)
    torch.testing.assert_close(X[:, :100].double(), ref, rtol=1e-3, atol=1e-3)


def test_support_solve_cholesky_with_a_minimum_norm_fallback():
    # the direct implicit solve, column by column: (D K D + I - D) v = r by Cholesky; a support whose atoms are
    # linearly dependent (two equal atoms, both active) makes K_SS singular, and that column alone takes pinv's
    # answer (the factorisation of an exactly singular matrix can succeed with a pivot of rounding size)
    from vars_ode.gradients import _support_solve
    g = torch.Generator().manual_seed(4)
    P = torch.randn(6, 4, generator=g, dtype=torch.float64)
    P[:, 1] = P[:, 0]
    K = P.T @ P
    D = torch.tensor([[1., 1.], [1., 0.], [0., 1.], [1., 1.]], dtype=torch.float64)
    R = D * torch.randn(4, 2, generator=g, dtype=torch.float64)
    V = _support_solve(K, D, R)
    M = D.T[:, :, None] * K * D.T[:, None, :]
    M.diagonal(dim1=-2, dim2=-1).add_(1 - D.T)
    assert torch.allclose(V[:, 0], torch.linalg.pinv(M[0]) @ R[:, 0], atol=1e-10)
    assert torch.allclose(V[:, 1], torch.linalg.solve(M[1], R[:, 1]), atol=1e-12)


def test_operator_cg_with_an_operator_that_returns_its_input():
    # K = I given by an operator whose gram_apply returns the code itself: the conjugate gradients, which write
    # into the products, must not write into their own directions; the solution of (D I D + I - D) X = R is R
    from vars_ode.gradients import _operator_cg
    from vars_ode.lasso import GramOperator

    class Identity(GramOperator):
        def gram_apply(self, code):
            return tuple(code)

    R = torch.randn(3, 6, 4, dtype=torch.float64)
    D = (torch.rand(3, 6, 4) > 0.4).double()
    op = Identity(torch.eye(6, dtype=torch.float64).expand(3, 6, 6))
    (X,) = _operator_cg(op, (D,), (D * R,), 50, 1e-12)
    assert torch.allclose(X, D * R, atol=1e-12)


@pytest.mark.parametrize("solver", ["fista", "active_set", "admm", "cd", "implicit_euler", "rkc", "dopri5"])
@given(seed=st.integers(0, 10**6), d=st.integers(8, 20), m=st.integers(3, 10), lam=st.floats(0.02, 0.3))
@settings(max_examples=6, deadline=None)
def test_implicit_gradient_is_that_of_the_lasso_minimiser_on_its_support(solver, seed, d, m, lam):
    # The reference: scikit-learn's minimiser gives the support S and the signs s; on it u_S = (P_S^T P_S)^-1
    # (P_S^T x - lam s), a smooth function of (P, x, lam) while the support and the signs hold (strict
    # complementarity, checked by a margin). Its gradients, by autograd in float64, are independent of the library.
    P, x = make_problem(seed, d, m, batch=(3,))
    w = torch.randn(3, m, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    ref = sklearn_lasso(P, x, lam)
    on = ref.abs() > 1e-9
    corr = (x - ref @ P.T) @ P  # P^T (x - P u): lam s on the support, inside (-lam, lam) off it
    assume(bool((ref[on].abs() > 1e-3).all()) and bool((corr[~on].abs() < 0.95 * lam).all()))

    Pr, xr, lr = (t.clone().requires_grad_() for t in (P, x, torch.tensor(lam, dtype=torch.float64)))
    loss = 0.0
    for i in range(3):
        S = on[i].nonzero().squeeze(-1)
        if S.numel() == 0:
            continue
        PS = Pr[:, S]
        uS = torch.linalg.solve(PS.T @ PS, PS.T @ xr[i] - lr * torch.sign(ref[i, S]))
        loss = loss + (w[i, S] * uS).sum()
    assume(torch.is_tensor(loss))
    loss.backward()

    Pl, xl, ll = (t.clone().requires_grad_() for t in (P, x, torch.tensor(lam, dtype=torch.float64)))
    sol = vo.solve(Pl, xl, ll, solver, tol=1e-9, max_iter=400_000, grad="implicit")
    assert bool(sol.stats.converged.all()), sol.stats.summary()
    (w * sol.code).sum().backward()
    for mine, theirs in ((Pl.grad, Pr.grad), (xl.grad, xr.grad), (ll.grad, lr.grad)):
        assert (mine - theirs).abs().max().item() <= 1e-6 * max(1.0, theirs.abs().max().item())
