"""ADMM (vars_ode/solvers/admm.py): the LASSO minimiser against scikit-learn, per problem, with its own stopping and
rho; fewer iterations than FISTA on a layer's ill-conditioned Gram matrices; the layer's equilibrium and gradients."""
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import vars_ode as vo
from conftest import make_problem, sklearn_lasso
from vars_ode.dictionaries import draw_features, positive_random_features
from vars_ode.sync import count_host_syncs


def feature_problem(seed, tokens=100, atoms=48, signals=8, head_dim=32):
    """A layer's kind of problem: the layer's positive random features of Gaussian queries (all atoms in one
    orthant, so K = Phi^T Phi has one large and many small eigenvalues), columns of unit norm over the tokens."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 1, tokens, head_dim, generator=g, dtype=torch.float64)
    feats = draw_features(1, head_dim, atoms, generator=g, dtype=torch.float64)
    Phi = positive_random_features(q, feats)[0, 0]
    return Phi, torch.randn(signals, tokens, generator=g, dtype=torch.float64)


@given(st.integers(0, 10**6), st.integers(10, 30), st.integers(4, 16), st.floats(0.02, 0.5),
       st.sampled_from(["direct", "correction"]))
def test_admm_matches_scikit_learn(seed, d, m, lam, form):
    P, x = make_problem(seed, d, m, batch=(3,))
    sol = vo.solve(P, x, lam, "admm", tol=1e-11, max_iter=50_000, form=form)
    assert bool(sol.stats.converged.all()), sol.stats.summary()
    for i in range(3):
        assert (sol.code[i] - sklearn_lasso(P, x[i], lam)).abs().max() < 1e-7
    # exact zeros off the support, and the KKT conditions checked independently of the solver
    g = (sol.code @ P.T - x) @ P
    on = sol.code != 0
    assert torch.allclose(g[on], -lam * torch.sign(sol.code[on]), atol=1e-9)
    assert bool((g[~on].abs() <= lam + 1e-9).all())


def test_admm_per_problem_weights_and_batched_dictionaries():
    g = torch.Generator().manual_seed(3)
    P = torch.randn(4, 20, 10, generator=g, dtype=torch.float64) / 20**0.5
    x = torch.randn(4, 20, generator=g, dtype=torch.float64)
    lam = torch.tensor([0.05, 0.1, 0.2, 0.4], dtype=torch.float64)
    sol = vo.solve(P, x, lam, "admm", tol=1e-11)
    assert bool(sol.stats.converged.all())
    for i in range(4):
        assert (sol.code[i] - sklearn_lasso(P[i], x[i], float(lam[i]))).abs().max() < 1e-7
    # one dictionary shared by many signals with their own weights: one rho and one inverse for all of them
    P1, X = make_problem(4, 24, 12, batch=(6,))
    lam = torch.linspace(0.05, 0.3, 6, dtype=torch.float64)
    sol = vo.solve(P1, X, lam, "admm", tol=1e-11)
    for i in range(6):
        assert (sol.code[i] - sklearn_lasso(P1, X[i], float(lam[i]))).abs().max() < 1e-7


def test_admm_needs_far_fewer_iterations_than_fista_on_feature_dictionaries():
    for seed in range(3):
        Phi, x = feature_problem(seed)
        K = Phi.T @ Phi
        ev = torch.linalg.eigvalsh(K)
        assert ev[-1] / ev[0] > 500  # the conditioning that slows FISTA
        a = vo.solve(Phi, x, 0.05, "admm", tol=1e-8)
        # FISTA's scalar steps (metric "none"): the features' mean atom also offers FISTA a step metric, which cuts
        # its iterations about threefold (tests/test_metric.py)
        f = vo.solve(Phi, x, 0.05, "fista", tol=1e-8, max_iter=100_000, metric="none")
        assert bool(a.stats.converged.all()) and bool(f.stats.converged.all())
        assert (a.code - f.code).abs().max() < 1e-5
        assert int(a.stats.iterations.max()) * 4 < int(f.stats.iterations.max()), (a.stats.iterations, f.stats.iterations)
        # and fewer than FISTA in the metric too
        fm = vo.solve(Phi, x, 0.05, "fista", tol=1e-8, max_iter=100_000)
        assert int(a.stats.iterations.max()) < int(fm.stats.iterations.max()), (a.stats.iterations, fm.stats.iterations)


def test_residual_balancing_recovers_from_a_poor_rho():
    Phi, x = feature_problem(5)
    ref = vo.solve(Phi, x, 0.05, "active_set", tol=1e-12).code
    fixed = vo.solve(Phi, x, 0.05, "admm", tol=1e-8, rho=10.0, adapt=0, max_iter=3000)
    adapted = vo.solve(Phi, x, 0.05, "admm", tol=1e-8, rho=10.0, max_iter=3000)
    assert bool(adapted.stats.converged.all())
    assert (adapted.code - ref).abs().max() < 1e-6
    n_fixed = torch.where(fixed.stats.converged, fixed.stats.iterations, torch.full_like(fixed.stats.iterations, 3000))
    assert int(adapted.stats.iterations.max()) * 3 < int(n_fixed.max())


def test_fixed_budget_runs_exactly_and_never_reads_the_device():
    Phi, x = feature_problem(6)
    with count_host_syncs() as reads:
        sol = vo.solve(Phi, x, 0.05, "admm", tol=0, max_iter=7)
    with count_host_syncs() as reads_fista:
        vo.solve(Phi, x, 0.05, "fista", tol=0, max_iter=7)
    assert bool((sol.stats.iterations == 7).all())
    assert reads.count == reads_fista.count  # those of the statistics at the end, none in the loop
    # the iterate after 7 iterations, written out by hand from the splitting (scaled form, relaxation 1.8)
    K, B = Phi.T @ Phi, Phi.T @ x.T
    rho = 0.01 * torch.linalg.eigvalsh(K)[-1]
    inv = torch.linalg.inv(K + rho * torch.eye(K.shape[0], dtype=K.dtype))
    z, y = torch.zeros_like(B), torch.zeros_like(B)
    for _ in range(7):
        u = inv @ (B + rho * (z - y))
        a = 1.8 * u + (1 - 1.8) * z + y
        z = torch.sign(a) * torch.relu(a.abs() - 0.05 / rho)
        y = a - z
    assert torch.allclose(sol.code, z.T, atol=1e-10)


def test_admm_in_a_layer_reaches_the_equilibrium_with_the_implicit_gradient():
    torch.manual_seed(0)
    kw = dict(dictionary="d", steps=None, tol=1e-9, grad="implicit", max_iter=20_000, dtype=torch.float64)
    a = vo.VARSLayer(16, 2, solver="admm", **kw)
    # FISTA with its scalar steps: in the random features' rank-one metric (the default to a tolerance) it takes
    # fewer iterations than ADMM on this small layer (160 against 213)
    f = vo.VARSLayer(16, 2, solver="fista", solver_options={"metric": "none"}, **kw)
    f.load_state_dict(a.state_dict())
    x = torch.randn(2, 17, 16, dtype=torch.float64, requires_grad=True)
    ya, yf = a(x), f(x)
    assert float(a.last_stats.residual.max()) <= 1e-9
    assert int(a.last_stats.iterations) < int(f.last_stats.iterations)
    assert torch.allclose(ya, yf, atol=1e-7)
    w = torch.randn_like(ya)
    ga = torch.autograd.grad((ya * w).sum(), [x, a.qkv.weight])
    gf = torch.autograd.grad((yf * w).sum(), [x, f.qkv.weight])
    for p, q in zip(ga, gf):
        assert torch.allclose(p, q, atol=1e-6 * float(q.abs().max()))


@pytest.mark.parametrize("form", ["direct", "correction"])
def test_admm_unrolled_gradients_of_a_fixed_budget(form):
    # L (and with it rho) is a constant of the iteration (the solver detaches it): fixed for the finite differences
    P, x = make_problem(2, 10, 6, batch=(2,))
    lam = torch.tensor(0.1, dtype=torch.float64)
    args = (P.requires_grad_(), x.requires_grad_(), lam.requires_grad_())
    f = lambda P, x, lam: vo.solve(P, x, lam, "admm", tol=0, max_iter=8, L=3.0, form=form).code  # noqa: E731
    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-6)
    # the two forms are one iteration in exact arithmetic: the same iterates to rounding, with and without a graph
    other = "correction" if form == "direct" else "direct"
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            a, b = (vo.solve(P, x, lam, "admm", tol=0, max_iter=8, L=3.0, form=f).code for f in (form, other))
        assert (a - b).abs().max() < 1e-12
    # and in a layer, where the layer's own steps are ADMM iterations
    layer = vo.VARSLayer(8, 2, dictionary="d", solver="admm", steps=4, dtype=torch.float64)
    layer(torch.randn(1, 5, 8, dtype=torch.float64)).sum().backward()
    assert int(layer.last_stats.iterations) == 4 and layer.qkv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("options, match", [
    (dict(rho=0.0), "rho"), (dict(rho=100.0), "rho"), (dict(relax=2.0), "relax"), (dict(relax=0), "relax"),
    (dict(adapt=-1), "adapt"), (dict(adapt=1.5), "adapt"), (dict(restart=True), "restart"), (dict(form="lu"), "form"),
])
def test_bad_options(options, match):
    P, x = make_problem(0, 12, 6)
    with pytest.raises(ValueError, match=match):
        vo.solve(P, x, 0.1, "admm", **options)


def test_admm_refuses_operators_without_a_gram_matrix():
    with pytest.raises(ValueError, match="admm"):
        vo.VARSLayer(16, 2, dictionary="s", solver="admm", steps=2)


def test_float32_layer_problem_to_the_layer_tolerance():
    # float32: the tolerance of a layer (1e-4) is reached, as FISTA's, on the features of a layer
    Phi, x = feature_problem(8, tokens=100, atoms=48, signals=32)
    a = vo.solve(Phi.float(), x.float(), 0.1, "admm", tol=1e-4)
    ref = vo.solve(Phi, x, 0.1, "active_set", tol=1e-12).code
    assert bool(a.stats.converged.all())
    assert np.isfinite(a.code.numpy()).all() and (a.code.double() - ref).abs().max() < 1e-2



def test_direct_form_goes_on_in_the_correction_form_near_tol(monkeypatch):
    # The direct form's fixed point carries the error of the inverse (in float32 its rounding times L / rho, which
    # stalled a DeiT-Ti-width dense VARS-SD layer above 1e-5); the correction form's is the LASSO's whatever the
    # inverse. With an inverse 1e-5 off (float64, so that the perturbation is the only error): the direct form alone
    # stalls far above tol; it goes on in the correction form once its residual stops halving, and reaches tol
    from vars_ode.solvers import admm as admm_module
    exact = admm_module._inverse

    def perturbed(K, r, eye):
        M = exact(K, r, eye)
        g = torch.Generator().manual_seed(0)
        E = torch.randn(M.shape, generator=g, dtype=M.dtype)
        return M + 1e-5 * M.abs().amax() * (E + E.mT) / 2

    monkeypatch.setattr(admm_module, "_inverse", perturbed)
    Phi, x = feature_problem(4, signals=16)
    ref = vo.solve(Phi, x, 0.05, "active_set", tol=1e-12).code
    runs = {}
    for name, form in (("correction", "correction"), ("direct", "direct")):
        sol = vo.solve(Phi, x, 0.05, "admm", tol=1e-8, max_iter=400, form=form)
        runs[name] = (int(sol.stats.iterations.max()), bool(sol.stats.converged.all()), float((sol.code - ref).abs().max()))
    # the direct form alone: every iteration direct (no check switches it, and none stops it)
    monkeypatch.setattr(admm_module, "SWITCH", 0.0)
    monkeypatch.setattr(admm_module, "FIRST_CHECK", 10**9)
    sol = vo.solve(Phi, x, 0.05, "admm", tol=1e-8, max_iter=400, form="direct")
    runs["alone"] = (int(sol.stats.iterations.max()), bool(sol.stats.converged.all()), float((sol.code - ref).abs().max()))
    assert not runs["alone"][1] and runs["alone"][2] > 1e-4, runs
    for name in ("correction", "direct"):
        assert runs[name][1] and runs[name][2] < 1e-6, runs
    assert runs["direct"][0] <= 2 * runs["correction"][0], runs


def test_auto_check_schedule_reads_less_and_stops_soon_after_tol():
    # "auto": a first check at iteration 8, then where the residual's rate predicts tol (2 to 16 iterations on);
    # against a check at every iteration: the same tolerance reached, a few reads instead of one per iteration
    Phi, x = feature_problem(9, signals=16)
    with count_host_syncs() as every_reads:
        every = vo.solve(Phi, x, 0.05, "admm", tol=1e-9, check_every=1)
    with count_host_syncs() as auto_reads:
        auto = vo.solve(Phi, x, 0.05, "admm", tol=1e-9)
    assert bool(auto.stats.converged.all()) and bool(every.stats.converged.all())
    n_every, n_auto = int(every.stats.iterations.max()), int(auto.stats.iterations.max())
    assert n_every <= n_auto <= n_every + 16
    assert auto_reads.count * 3 < every_reads.count, (auto_reads.count, every_reads.count)  # rho updates read too
    assert (auto.code - every.code).abs().max() < 1e-7


def test_float32_implicit_gradient_is_as_accurate_as_the_forward_solve():
    # the conjugate gradients of the backward stop at the forward's tolerance (not below the float32 floor): the
    # float32 gradient is as far from the exact one (float64, tol 1e-12) as the float64 gradient at the same tol
    import copy
    torch.manual_seed(0)
    base = vo.VARSLayer(32, 2, dictionary="d", qkv_bias=True, dtype=torch.float64)
    x, wout = torch.randn(2, 2, 50, 32, dtype=torch.float64).unbind(0)

    def grad(dtype, tol):
        layer = copy.deepcopy(base).to(dtype).set_solver("admm", steps=None, tol=tol, grad="implicit")
        xx = x.to(dtype).requires_grad_()
        g = torch.autograd.grad((layer(xx).double() * wout).sum(), [xx, layer.qkv.weight])
        return torch.cat([t.double().flatten() for t in g])

    exact = grad(torch.float64, 1e-12)
    for tol in (1e-3, 1e-4):
        err32, err64 = ((grad(dt, tol) - exact).norm() / exact.norm() for dt in (torch.float32, torch.float64))
        assert err32 <= 2 * err64 + 1e-5, (tol, float(err32), float(err64))
        assert err64 < 10 * tol


def test_unrolled_gradient_through_rho_updates_of_some_matrices_equals_the_implicit_one():
    # one dictionary per problem: residual balancing moves the rho of some matrices and not others, whose
    # inverses are formed again alone; unrolled through those iterations to convergence, the gradient is the
    # implicit one at the solution
    import vars_ode.solvers.admm as admm_module
    g = torch.Generator().manual_seed(3)
    P = torch.randn(4, 20, 10, generator=g, dtype=torch.float64) / 20**0.5
    x = torch.randn(4, 20, generator=g, dtype=torch.float64)
    lam = torch.tensor([0.05, 0.1, 0.2, 0.4], dtype=torch.float64)
    calls = []
    original = admm_module._reinvert
    admm_module._reinvert = lambda *a: calls.append(int(a[3].sum())) or original(*a)
    try:
        grads = []
        for grad in ("unroll", "implicit"):
            Pq = P.clone().requires_grad_()
            vo.solve(Pq, x, lam, "admm", tol=1e-11, grad=grad).code.sum().backward()
            grads.append(Pq.grad)
    finally:
        admm_module._reinvert = original
    assert calls and all(0 < c < 4 for c in calls)  # some matrices re-inverted, never all of them
    assert (grads[0] - grads[1]).norm() <= 1e-7 * grads[1].norm()


@pytest.mark.parametrize("form", ["direct", "correction"])
def test_admm_float32_with_one_signal_per_dictionary(form):
    """float32, a dictionary per problem and one signal each (the products taken by rows, vars_ode.ops.by_rows): the
    minimiser of scikit-learn's Lasso to the accuracy a KKT residual of 1e-5 allows, unrolled gradients as float64's."""
    g = torch.Generator().manual_seed(7)
    P = torch.randn(6, 30, 12, generator=g, dtype=torch.float64) / 30**0.5
    x = torch.randn(6, 30, generator=g, dtype=torch.float64)
    lam = 0.1
    sol = vo.solve(P.float(), x.float(), lam, "admm", tol=1e-5, form=form)
    assert bool(sol.stats.converged.all())
    for i in range(6):
        assert (sol.code[i].double() - sklearn_lasso(P[i], x[i], lam)).abs().max() < 1e-3
    # a fixed budget, unrolled: the gradient to the signals in float32 equals float64's
    grads = []
    for dt in (torch.float32, torch.float64):
        xs = x.to(dt).requires_grad_()
        code = vo.solve(P.to(dt), xs, lam, "admm", tol=0, max_iter=30, form=form).code
        grads.append(torch.autograd.grad((code * torch.linspace(-1, 1, 12, dtype=dt)).sum(), xs)[0])
    torch.testing.assert_close(grads[0].double(), grads[1], atol=2e-4, rtol=1e-3)
