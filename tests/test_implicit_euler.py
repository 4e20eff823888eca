"""implicit_euler, the stiff method: its fixed horizon follows the flow of Eq. 8-9 (first order), it takes stiff
problems in few steps, and it refuses what it cannot do. Its equilibrium against scikit-learn and its gradients are in
tests/test_solvers.py (the ODE solvers with step loops of their own, OWN_LOOPS)."""
import math

import numpy as np
import pytest
import torch

import vars_ode as vo
from conftest import conditioned_problem, horizon_errors, make_problem, sklearn_lasso


def test_ill_conditioned_problem_in_few_steps():
    # K with condition number 1e6: the explicit methods' step is bounded by the fast end of the spectrum and
    # their time by the slow end; the implicit steps are not. Work is counted in steps (one factorisation each).
    P, X = conditioned_problem(3, 40, 24, 3.0, 20)
    sol = vo.solve(P, X, 0.05, "implicit_euler", tol=1e-8, max_iter=400)
    assert bool(sol.stats.converged.all()), sol.stats.summary()
    assert (sol.code - sklearn_lasso(P, X, 0.05)).abs().max().item() < 1e-5
    rk4 = vo.solve(P, X, 0.05, "rk4", tol=1e-8, max_iter=4000)
    assert not bool(rk4.stats.converged.all())  # 4,000 evaluations are far from enough for the explicit method


@pytest.mark.parametrize("seed, d, m, problems, dtype, tol, stuck", [(1, 10, 12, 6, torch.float64, 1e-10, [4]),
                                                                   (0, 10, 12, 4, torch.float32, 1e-4, [0, 3]),
                                                                   (4, 32, 96, 4, torch.float32, 1e-4, [1, 2])])
def test_a_drift_along_a_singular_support_is_not_taken_for_growth(seed, d, m, problems, dtype, tol, stuck,
                                                                  monkeypatch):
    # where K_AA is singular (more atoms on the way than the signal's dimension) the flow drifts along the null space
    # at a constant speed, and the field's norm changes by 1e-11 (float64) or its rounding (float32) per step. Taken
    # for growth (the premise, GROWTH_SLACK 0), every step was undone and the floor halved: these problems ran out of
    # their 1,000 steps. Within the slack they converge, to the minimum (the objective; with 96 atoms for 32
    # dimensions codes at a residual of 1e-4 can lie 0.3 apart)
    from vars_ode.solvers import implicit_euler as ie
    P, X = make_problem(seed, d, m, batch=(problems,))
    P, X = P.to(dtype), X.to(dtype)
    lam = 0.03125
    sol = vo.solve(P, X, lam, "implicit_euler", tol=tol, max_iter=1000)
    assert bool(sol.stats.converged.all()) and int(sol.stats.iterations.max()) < 500, sol.stats.summary()
    Pd, Xd = P.double(), X.double()
    best = vo.lasso_objective(Pd, vo.solve(Pd, Xd, lam, "active_set", tol=1e-12).code, Xd, lam)
    got = vo.lasso_objective(Pd, sol.code.double(), Xd, lam)
    # (float32 at tol 1e-4: FISTA's objective is 9e-5 above the minimum on the 32 x 96 problems, dopri5's 2.1e-4)
    assert ((got - best) / best).max().item() < (1e-12 if dtype == torch.float64 else 5e-4)
    monkeypatch.setattr(ie, "GROWTH_SLACK", 0.0)
    before = vo.solve(P, X, lam, "implicit_euler", tol=tol, max_iter=1000)
    assert torch.nonzero(~before.stats.converged).flatten().tolist() == stuck


@pytest.mark.parametrize("solver", ["implicit_euler", "active_set"])
def test_a_dictionary_scaled_by_1e3_in_float32_takes_the_same_steps(solver):
    # P and x scaled by 1e3, lam by 1e6: the same minimiser and, the tolerance being relative, the same steps. The
    # support systems' pivot check counted the identity slots (pivots of 1) beside K_SS (entries of 1e6): every
    # support looked singular, implicit_euler stalled (3 of 5 problems at max_iter) and active_set's Newton steps
    # were dropped (33 -> 55 iterations)
    P, X = make_problem(2, 30, 20, batch=(5,))
    base = vo.solve(P.float(), X.float(), 0.1, solver, tol=1e-4)
    sol = vo.solve((1e3 * P).float(), (1e3 * X).float(), 1e5, solver, tol=1e-4)
    assert bool(sol.stats.converged.all()), sol.stats.summary()
    assert sol.stats.iterations.tolist() == base.stats.iterations.tolist()
    assert (sol.code - base.code).abs().max().item() < 1e-4  # rounding apart, the same iterates
    assert (sol.code.double() - sklearn_lasso(P, X, 0.1)).abs().max().item() < 1e-2  # float32 at tol 1e-4


@pytest.mark.parametrize("h", [0.3, 2.0, 50.0])
def test_steps_solve_the_dense_linearised_system(h):
    # the solver reduces (I - h J) delta = h f(y) on the 2m-dimensional state (w, u) to one system on each
    # problem's support; here the dense system is written out in numpy from Eq. 8-9 rescaled by L and solved
    # whole, step by step, for small steps and for long (Newton-like) ones
    alpha, beta, gamma, lam, L = 1.0, 2.0, 2.0, 0.1, 2.5
    g = torch.Generator().manual_seed(7)
    P = torch.randn(14, 9, generator=g, dtype=torch.float64) / 3
    X = torch.randn(3, 14, generator=g, dtype=torch.float64)
    K, B = (P.T @ P).numpy(), (P.T @ X.T).numpy()
    m = K.shape[0]
    thr = lam / (L * alpha * beta)
    soft = lambda u: np.sign(u) * np.maximum(np.abs(u) - thr, 0)  # noqa: E731
    for n in (1, 2, 4):
        got = vo.solve_gram(torch.from_numpy(K), torch.from_numpy(B), lam, "implicit_euler", tol=0.0, t_end=n * h,
                            step_size=h, L=L).code.numpy()
        for j in range(B.shape[1]):
            w, u = B[:, j] / (L * alpha), np.zeros(m)
            for _ in range(n):
                a = soft(u)
                f = np.concatenate([-alpha * w + (K @ a + B[:, j]) / L, -beta * u - gamma * (K @ a / L - a) + w])
                D = np.diag((np.abs(u) > thr).astype(float))
                J = np.block([[-alpha * np.eye(m), K @ D / L],
                              [np.eye(m), -beta * np.eye(m) - gamma * (K / L - np.eye(m)) @ D]])
                delta = np.linalg.solve(np.eye(2 * m) - h * J, h * f)
                w, u = w + delta[:m], u + delta[m:]
            np.testing.assert_allclose(got[:, j], soft(u), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("first_step", [0.25, 1.0, 4.0, 64.0])
def test_any_first_step_converges(first_step):
    # long first steps are Newton steps that can cycle between supports: the floor halves until they stop cycling
    P, X = make_problem(11, 32, 24, batch=(30,))
    sol = vo.solve(P, X, 0.1, "implicit_euler", tol=1e-9, first_step=first_step)
    assert bool(sol.stats.converged.all()), sol.stats.summary()
    assert (sol.code - sklearn_lasso(P, X, 0.1)).abs().max().item() < 1e-6


def test_fixed_horizon_is_first_order_in_the_step():
    # against the flow integrated by rk4 with a fine step: halving the step halves the error
    errors, rates = horizon_errors("implicit_euler", 0.1, (0.1, 0.05, 0.025, 0.0125), 1 / 256)
    assert errors[-1] < 5e-3 and all(0.8 < r < 1.3 for r in rates), (errors, rates)


def test_fixed_horizon_records_every_unit_of_time_like_rk4():
    P, X = make_problem(6, 16, 10, batch=(3,))
    rec_ie, rec_rk = [], []
    vo.solve(P, X, 0.1, "implicit_euler", tol=0.0, t_end=3.0, step_size=0.01, record=rec_ie)
    vo.solve(P, X, 0.1, "rk4", tol=0.0, t_end=3.0, options={"step_size": 0.01}, record=rec_rk)
    assert len(rec_ie) == len(rec_rk) == 3
    for a, b in zip(rec_ie, rec_rk):
        assert (a[0] - b[0]).abs().max().item() < 2e-2


def test_layer_runs_it_for_gram_dictionaries_and_refuses_convolutional_templates():
    torch.manual_seed(0)
    x = torch.randn(2, 10, 16, dtype=torch.float64)
    for kw in (dict(dictionary="d"), dict(dictionary="sd", static="dense", num_static_atoms=4)):
        layer = vo.VARSLayer(16, 2, solver="implicit_euler", steps=3.0, dtype=torch.float64, **kw)
        y = layer(x)
        layer.set_solver("rk4", steps=3.0, solver_options={"options": {"step_size": 1 / 64}})
        # the same flow to the same horizon: first order with 6 steps of 0.5 against rk4's fine steps
        assert (y - layer(x)).abs().max().item() < 0.2 * y.abs().max().item()
        layer.set_solver("implicit_euler", steps=None, tol=1e-8, grad="implicit")
        y_eq = layer(x)
        layer.set_solver("active_set", steps=None, tol=1e-10, grad="implicit")
        assert (y_eq - layer(x)).abs().max().item() < 1e-6
    with pytest.raises(ValueError, match="needs the Gram matrix"):
        vo.VARSLayer(16, 2, dictionary="s", solver="implicit_euler", steps=3.0, image_size=3)


@pytest.mark.parametrize("kwargs, match", [
    (dict(grad="adjoint", t_end=1.0), "no adjoint"),
    (dict(first_step=0.0), "first_step must be a finite float, positive"),
    (dict(growth=0.5), "growth must be a finite float, at least 1"),
    (dict(reject=math.nan), "reject must be"),
    (dict(step_size=-1.0), "step_size must be"),
    (dict(rtol=1e-3), r"unknown option\(s\) \['rtol'\] for solver 'implicit_euler'"),
])
def test_bad_options_are_named(kwargs, match):
    P, X = make_problem(1, 8, 4, batch=(2,))
    with pytest.raises(ValueError, match=match):
        vo.solve(P, X, 0.1, "implicit_euler", tol=1e-6, **kwargs)


def test_torch_compile_keeps_the_unrolled_gradient():
    # implicit_euler traced by torch.compile (aot_eager: AOTAutograd's graphs, run eagerly), K and b both requiring a
    # gradient, over a horizon: output and gradients equal to the eager ones. The support solves' update of the
    # system's diagonal in place, after their host read (a graph break), gave K's diagonal a gradient 0.28 off
    P, x = make_problem(3, 20, 12, batch=(5,))
    K0, b0 = P.T @ P, (x @ P).T.contiguous()
    L = float(torch.linalg.eigvalsh(K0)[-1])

    def run(fn):
        K, b = K0.clone().requires_grad_(), b0.clone().requires_grad_()
        code = fn(K, b)
        return [code.detach(), *torch.autograd.grad(code.square().sum(), (K, b))]

    def solve(K, b):
        return vo.solve_gram(K, b, lam=0.1, solver="implicit_euler", t_end=2.0, L=L).code

    torch._dynamo.reset()
    eager, compiled = run(solve), run(torch.compile(solve, backend="aot_eager"))
    for e, c in zip(eager, compiled):
        assert torch.allclose(e, c, rtol=1e-12, atol=1e-12), (e - c).abs().max()
