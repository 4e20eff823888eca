"""solver="cd" (vars_ode.solvers.coordinate): coordinate descent per problem, against scikit-learn's Lasso, a numpy
restatement of its sweeps, the active-set solver, and in a layer."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.linear_model import Lasso

import vars_ode as vo
from vars_ode.lasso import GramOperator
from vars_ode.solvers.coordinate import coordinate_descent


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10**6), st.integers(1, 4), st.integers(3, 20), st.integers(1, 12), st.floats(0.01, 1.0))
def test_cd_matches_scikit_learn_per_problem(seed, batch, d, m, lam):
    # one dictionary per problem (the layer's case), float64, to 1e-11: scikit-learn's answer at tol 1e-12 within 1e-6
    g = torch.Generator().manual_seed(seed)
    P = torch.randn(batch, d, m, generator=g, dtype=torch.float64) / d ** 0.5
    X = torch.randn(batch, d, generator=g, dtype=torch.float64)
    sol = vo.solve(P, X, lam, "cd", tol=1e-11, max_iter=100_000)
    assert bool(sol.stats.converged.all()), sol.stats.summary()
    model = Lasso(alpha=lam / d, fit_intercept=False, tol=1e-12, max_iter=1_000_000)
    ref = np.stack([model.fit(p, x).coef_.copy() for p, x in zip(P.numpy(), X.numpy())])
    np.testing.assert_allclose(sol.code.numpy(), ref, rtol=0, atol=1e-6)


def _sweeps_numpy(K, b, w, u, sweeps):
    # the same coordinate updates, one problem, in numpy
    g = K @ u - b
    for _ in range(sweeps):
        for j in range(len(u)):
            z = u[j] - g[j] / K[j, j]
            new = np.sign(z) * max(abs(z) - w / K[j, j], 0.0)
            g += (new - u[j]) * K[:, j]
            u[j] = new
    return u


def test_cd_fixed_budget_runs_exactly_its_sweeps_with_per_problem_weights_and_init():
    # tol = 0: every problem runs max_iter sweeps (shared K over two batches of columns, a weight and a start per
    # problem), equal to a numpy restatement of the sweeps
    g = torch.Generator().manual_seed(4)
    P = torch.randn(2, 9, 6, generator=g, dtype=torch.float64)
    K = P.transpose(-1, -2) @ P
    B = torch.randn(2, 6, 5, generator=g, dtype=torch.float64)
    w = torch.rand(2, 5, generator=g, dtype=torch.float64)
    init = torch.randn(2, 6, 5, generator=g, dtype=torch.float64)
    (code,), iters = coordinate_descent(GramOperator(K), (B,), w, 1.0, (init,), tol=0.0, max_iter=3)
    assert iters.shape == (2, 5) and bool((iters == 3).all())
    for i in range(2):
        for c in range(5):
            ref = _sweeps_numpy(K[i].numpy(), B[i, :, c].numpy(), float(w[i, c]), init[i, :, c].numpy().copy(), 3)
            np.testing.assert_allclose(code[i, :, c].numpy(), ref, rtol=1e-12, atol=1e-13)


def test_cd_shared_dictionary_float32_and_a_nonfinite_problem():
    # one dictionary, many signals (columns of one Gram system); float32; a signal with a NaN is reported
    # non-finite and leaves the others as they were
    P, X = torch.randn(20, 8, dtype=torch.float64), torch.randn(6, 20, dtype=torch.float64)
    ref = vo.solve(P, X, 0.3, "active_set", tol=1e-12).code
    got = vo.solve(P, X, 0.3, "cd", tol=1e-10).code
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-8)
    got32 = vo.solve(P.float(), X.float(), 0.3, "cd", tol=1e-5)
    assert got32.code.dtype == torch.float32 and bool(got32.stats.converged.all())
    torch.testing.assert_close(got32.code.double(), ref, rtol=0, atol=1e-3)
    Xn = X.clone()
    Xn[2, 3] = float("nan")
    sol = vo.solve(P, Xn, 0.3, "cd", tol=1e-10)
    assert sol.stats.status[2] == vo.Status.NONFINITE and bool(sol.code[2].isnan().all())
    keep = [0, 1, 3, 4, 5]
    torch.testing.assert_close(sol.code[keep], got[keep], rtol=0, atol=0)


def test_cd_refuses_other_devices_and_unrolled_gradients():
    K = torch.eye(3)
    with pytest.raises(ValueError, match="CPU tensors"):
        coordinate_descent(GramOperator(K.to("meta")), (torch.zeros(3, 2, device="meta"),), 0.1, 1.0, None,
                           tol=1e-6, max_iter=10)
    P = torch.randn(10, 4, requires_grad=True)
    with pytest.raises(ValueError, match="grad='implicit'"):
        vo.solve(P, torch.randn(3, 10), 0.1, "cd", tol=1e-6)
    # with the implicit gradient: the equilibrium's, as the active set's
    grads = []
    for solver in ("cd", "active_set"):
        Pg = P.detach().double().requires_grad_(True)
        sol = vo.solve(Pg, torch.ones(3, 10, dtype=torch.float64), 0.1, solver, tol=1e-11, grad="implicit")
        grads.append(torch.autograd.grad(sol.code.sin().sum(), Pg)[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-6, atol=1e-8)


def test_cd_in_an_equilibrium_layer():
    # VARSLayer(solver="cd", steps=None, grad="implicit"): the output and gradients of the active set's equilibrium
    torch.manual_seed(0)
    x = torch.randn(2, 10, 8, dtype=torch.float64, requires_grad=True)
    got = {}
    for solver in ("cd", "active_set"):
        torch.manual_seed(1)
        layer = vo.VARSLayer(8, 2, dictionary="d", solver=solver, steps=None, tol=1e-10, grad="implicit").double()
        y = layer(x)
        got[solver] = (y.detach(), torch.autograd.grad(y.sin().sum(), [x, *layer.parameters()], allow_unused=True))
        assert float(layer.last_stats.residual.max()) <= 1e-9
    torch.testing.assert_close(got["cd"][0], got["active_set"][0], rtol=0, atol=1e-8)
    for a, b in zip(got["cd"][1], got["active_set"][1]):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


def test_cd_leaves_the_thread_counts_as_it_found_them():
    # numba's OpenMP layer and torch share one OpenMP runtime: a solve used to leave torch with numba's thread count
    # (2 here). In a fresh interpreter, where numba starts its threads inside the solve, as in a user's program.
    code = ("import torch, numba, vars_ode as vo\n"
            "torch.set_num_threads(1)\n"
            "g = torch.Generator().manual_seed(0)\n"
            "P = torch.randn(20, 12, generator=g, dtype=torch.float64)\n"
            "x = torch.randn(6, 20, generator=g, dtype=torch.float64)\n"
            "for solver in ('fista', 'active_set', 'cd'):\n"
            "    vo.solve(P, x, 0.1, solver, tol=1e-9)\n"
            "print(torch.get_num_threads(), numba.get_num_threads(), numba.config.NUMBA_NUM_THREADS)\n")
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    torch_after, numba_after, numba_max = map(int, out.stdout.split())
    assert numba_max >= 2, "this check needs numba to default to two threads or more (two cores)"
    assert torch_after == 1 and numba_after == numba_max
