"""ISTA's and FISTA's rank-one step metric (vars_ode.lasso.RankOneMetric): it bounds K, its proximal step is the
exact one in that metric, and the solvers reach the same minimiser with it, in fewer iterations where one direction
dominates K (the random features' mean atom in a layer; a dictionary of positive atoms in vo.solve)."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import vars_ode as vo
from conftest import static_dense
from vars_ode import VARSLayer
from vars_ode.dictionaries import DynamicDictionary, StaticDictionary, UnionDictionary
from vars_ode.lasso import SPIKE_RATIO, GramOperator, RankOneMetric, kkt_residual_operator, rank_one_split
from vars_ode.solvers import iterative, solve_operator


D64 = torch.float64

pytestmark = pytest.mark.usefixtures("one_thread")


def union_atoms(seed, h=1, dh=8, m=16, r=2, H=3, W=3, p=1):
    torch.manual_seed(seed)
    un = UnionDictionary(DynamicDictionary(h, dh, m, dtype=D64),
                         StaticDictionary(h * dh, h, atoms_per_channel=r, kernel_size=3).double())
    q = torch.randn(1, h, p + H * W, dh, dtype=D64)
    return un.bind(q, (H, W), p), (h, dh, m, r, H, W, p)


def metric_matrix(metric, block_sizes, index, shape):
    """``H`` of the problem ``index`` (into the problems' ``shape``) as a dense matrix over the blocks' atoms."""
    parts = []
    for i, n in enumerate(block_sizes):
        Hi = torch.broadcast_to(metric.scales[i], shape)[index] * torch.eye(n, dtype=D64)
        if i == metric.block:
            v = metric.v[index[:-1]][:, 0]  # (B, h, m, 1): one vector per image and head
            Hi = Hi + torch.broadcast_to(metric.rho, shape)[index] * torch.outer(v, v)
        parts.append(Hi)
    return torch.block_diag(*parts)


def top_generalised_eigenvalue(K, H):
    C = torch.linalg.cholesky(H)
    M = torch.linalg.solve_triangular(C, torch.linalg.solve_triangular(C, K, upper=False).T, upper=False)
    return torch.linalg.eigvalsh((M + M.T) / 2)[-1]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_union_metric_bounds_K(seed):
    atoms, (h, dh, m, r, H, W, p) = union_atoms(seed)
    metric = atoms.metric()
    assert metric is not None, "positive random features have a dominant eigenvalue: a metric is offered"
    Ps = static_dense(atoms.static, h, dh, r, H, W, p + H * W)
    for j in range(dh):
        P = torch.cat([atoms.dynamic.phi[0, 0], Ps[0, j]], -1)
        Hm = metric_matrix(metric, (m, r * H * W), (0, 0, j), (1, h, dh))
        top = top_generalised_eigenvalue(P.T @ P, Hm)
        assert top <= 1 + 1e-10  # u^T K u <= u^T H u for every u
        # and far tighter than the scalar bound: H's smallest eigenvalue is below L
        assert torch.linalg.eigvalsh(Hm)[0] < 0.5 * atoms.lipschitz()[0, 0, j]


def dynamic_metric(atoms):
    """The random features' metric whatever its gain (the dictionary offers it from SPIKE_RATIO only)."""
    lam1, v, lam2 = atoms.split(min_ratio=0)
    return RankOneMetric((lam2,), v, lam1 - lam2)


@given(seed=st.integers(0, 2**16), m=st.integers(3, 40), N=st.integers(4, 40))
@settings(max_examples=20, deadline=None)
def test_dynamic_metric_bounds_K_and_matches_its_top_eigenvalues(seed, m, N):
    torch.manual_seed(seed)
    atoms = DynamicDictionary(2, 8, m, dtype=D64).bind(torch.randn(1, 2, N, 8, dtype=D64))
    K = atoms.gram()
    ev = torch.linalg.eigvalsh(K)
    # offered exactly where every head's top eigenvalue is SPIKE_RATIO times its second or more
    assert (atoms.split() is not None) == bool(((ev[..., -1] >= SPIKE_RATIO * ev[..., -2]) & (ev[..., -2] > 0)).all())
    metric = dynamic_metric(atoms)
    for hh in range(2):
        Hm = metric_matrix(metric, (m,), (0, hh, 0), (1, 2, 8))
        assert top_generalised_eigenvalue(K[0, hh], Hm) <= 1 + 1e-10
        # H agrees with K on its top eigenvalue and bounds the rest by the second, within the 1% margin
        hev = torch.linalg.eigvalsh(Hm)
        torch.testing.assert_close(hev[-1], 1.01 * ev[0, hh, -1], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(hev[0], 1.01 * ev[0, hh, -2], rtol=1e-9, atol=1e-12)


def test_metric_proximal_step_matches_scikit_learn():
    import sklearn.linear_model as sklearn
    torch.manual_seed(3)
    m, dh, w = 12, 8, 0.05
    atoms = DynamicDictionary(1, dh, m, dtype=D64).bind(torch.randn(1, 1, 16, dh, dtype=D64))
    metric = dynamic_metric(atoms)
    step = iterative._metric_steps(atoms, w, metric, newton=60)[0]
    y = torch.randn(1, 1, m, dh, dtype=D64)
    p = step(y, torch.zeros_like(y))  # g = 0: the proximal step of y itself in the metric
    for j in range(dh):
        Hm = metric_matrix(metric, (m,), (0, 0, j), (1, 1, dh))
        A = torch.linalg.cholesky(Hm).T  # A^T A = H
        # scikit-learn: (1 / 2m) ||A y - A p||^2 + alpha ||p||_1 = (1 / m) (0.5 (p - y)^T H (p - y) + w ||p||_1)
        model = sklearn.Lasso(alpha=w / m, fit_intercept=False, tol=1e-14, max_iter=1_000_000)
        model.fit(A.numpy(), (A @ y[0, 0, :, j]).numpy())
        torch.testing.assert_close(p[0, 0, :, j], torch.from_numpy(model.coef_), atol=1e-7, rtol=0)


@pytest.mark.parametrize("solver", ["fista", "ista"])
@given(seed=st.integers(0, 2**16), lam=st.floats(0.02, 0.2))
@settings(max_examples=8, deadline=None)
def test_solvers_with_the_metric_reach_the_minimiser(solver, seed, lam):
    torch.manual_seed(seed)
    atoms = DynamicDictionary(2, 8, 16, dtype=D64).bind(torch.randn(2, 2, 40, 8, dtype=D64))
    B = atoms.encode(torch.randn(2, 2, 40, 8, dtype=D64))
    tol = 1e-10 if solver == "fista" else 1e-8  # ISTA's scalar steps need thousands of iterations below
    codes = {}
    for name, metric in (("none", "none"), ("metric", dynamic_metric(atoms))):
        codes[name], _ = solve_operator(atoms, B, lam, solver, steps=None, tol=tol, max_iter=200_000,
                                        options={"metric": metric})
        assert kkt_residual_operator(atoms, codes[name], B, lam).max() <= tol
    close = 1e-6 if solver == "fista" else 1e-4
    torch.testing.assert_close(codes["metric"][0], codes["none"][0], atol=close, rtol=close)


@pytest.mark.parametrize("solver", ["fista", "ista"])
def test_the_metric_saves_iterations(solver):
    torch.manual_seed(11)
    atoms = DynamicDictionary(2, 16, 32, dtype=D64).bind(torch.randn(2, 2, 40, 16, dtype=D64))
    B = atoms.encode(torch.randn(2, 2, 40, 16, dtype=D64))
    work = {}
    for name, metric in (("none", "none"), ("metric", dynamic_metric(atoms))):
        _, work[name] = solve_operator(atoms, B, 0.1, solver, steps=None, tol=1e-6, max_iter=200_000,
                                       options={"metric": metric})
    assert int(work["metric"]) < 0.7 * int(work["none"]), work


def test_fixed_budget_keeps_the_scalar_steps():
    atoms, _ = union_atoms(4)
    B = atoms.encode(torch.randn(1, 1, 10, 8, dtype=D64))
    L = atoms.lipschitz()
    a, _ = iterative.fista(atoms, B, 0.05, L, None, tol=0, max_iter=7)  # metric "auto", the default
    b, _ = iterative.fista(atoms, B, 0.05, L, None, tol=0, max_iter=7, metric="none")
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_equilibrium_layer_with_and_without_the_metric():
    torch.manual_seed(5)
    x = torch.randn(2, 17, 16, dtype=D64, requires_grad=True)
    common = dict(dictionary="sd", solver="fista", steps=None, tol=1e-9, grad="implicit", kernel_size=3,
                  atoms_per_channel=2, image_size=4)
    layer = VARSLayer(16, 2, **common).double()
    plain = VARSLayer(16, 2, solver_options={"metric": "none"}, **common).double()
    plain.load_state_dict(layer.state_dict())
    outs, grads, work = [], [], []
    for lay in (layer, plain):
        y = lay(x)
        (g,) = torch.autograd.grad(y.square().sum(), x)
        outs.append(y.detach()), grads.append(g), work.append(int(lay.last_stats.iterations.max()))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-7, rtol=1e-7)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-6)
    assert work[0] < work[1], work


def test_bad_metric():
    atoms, _ = union_atoms(0)
    B = atoms.encode(torch.randn(1, 1, 10, 8, dtype=D64))
    with pytest.raises(ValueError, match="metric"):
        iterative.fista(atoms, B, 0.05, atoms.lipschitz(), None, tol=1e-6, max_iter=10, metric="diagonal")


def positive_dictionary(seed, d, m, lead=(), offset=None):
    """Columns of unit norm, entries uniform in [0, 1) (or normal plus ``offset``): a dominant mean direction."""
    g = torch.Generator().manual_seed(seed)
    if offset is None:
        P = torch.rand(*lead, d, m, generator=g, dtype=D64)
    else:
        P = torch.randn(*lead, d, m, generator=g, dtype=D64) + offset
    return P / P.norm(dim=-2, keepdim=True)


@given(seed=st.integers(0, 2**16), offset=st.floats(0.0, 2.0), m=st.integers(2, 24), batch=st.sampled_from([0, 3]))
@settings(max_examples=40, deadline=None)
def test_gram_metric_offered_where_one_direction_dominates_and_bounds_K(seed, offset, m, batch):
    P = positive_dictionary(seed, 20, m, (batch,) if batch else (), offset=offset)
    K = P.transpose(-1, -2) @ P
    ev = torch.linalg.eigvalsh(K)
    ratio_ok = bool(((ev[..., -1] >= SPIKE_RATIO * ev[..., -2]) & (ev[..., -2] > 0)).all())
    metric = GramOperator(K).metric()
    if not batch:
        assert (metric is not None) == ratio_ok  # one matrix: decided by its eigenvalues
    else:
        # a batch is screened by lambda_2 <= sqrt(||K||_F^2 - lambda_1^2): never offered below the ratio, always
        # where the screen (with the exact lambda_1, and a margin for the power iterations') passes
        screen = ev[..., -1] / ((K * K).sum((-2, -1)) - ev[..., -1] ** 2).clamp_min(0).sqrt()
        assert metric is None or ratio_ok
        if bool((screen >= 1.25 * SPIKE_RATIO).all()):
            assert metric is not None
    if metric is None:
        return
    for j in range(batch or 1):
        index = (j,) if batch else ()
        Hm = metric.scales[0][index] * torch.eye(m, dtype=D64) + metric.rho[index] * torch.outer(
            metric.v[index][:, 0], metric.v[index][:, 0])
        assert top_generalised_eigenvalue(K[index], Hm) <= 1 + 1e-10
        assert float(metric.bound()[index]) >= float(ev[index][-1])  # a Lipschitz bound too


@pytest.mark.parametrize("lead", [(), (3,)])
@pytest.mark.parametrize("solver", ["fista", "active_set", "ista"])
@given(seed=st.integers(0, 2**16), lam=st.floats(0.02, 0.3))
@settings(max_examples=4, deadline=None)
def test_solve_steps_in_the_metric_of_a_positive_dictionary(solver, lead, seed, lam):
    """vo.solve: the same minimiser as scikit-learn's Lasso, in fewer iterations than with the scalar steps."""
    import sklearn.linear_model as sklearn
    d, m = 32, 24
    P = positive_dictionary(seed, d, m, lead)
    x = torch.randn(*lead, 5, d, generator=torch.Generator().manual_seed(seed + 1), dtype=D64)
    Pb = P.unsqueeze(-3) if lead else P  # one dictionary per row of problems
    assert GramOperator(P.transpose(-1, -2) @ P).metric() is not None
    tol = 1e-8 if solver == "ista" else 1e-10
    sol = vo.solve(Pb, x, lam, solver, tol=tol, max_iter=1_000_000)
    assert bool(sol.stats.converged.all())
    for idx in ([(i, j) for i in range(lead[0]) for j in range(5)] if lead else [(j,) for j in range(5)]):
        Pi = P[idx[0]] if lead else P
        model = sklearn.Lasso(alpha=lam / d, fit_intercept=False, tol=1e-14, max_iter=1_000_000)
        model.fit(Pi.numpy(), x[idx].numpy())
        torch.testing.assert_close(sol.code[idx], torch.from_numpy(model.coef_), atol=1e-5, rtol=0)
    # the scalar steps, to a looser tolerance for ISTA (tens of thousands of iterations below)
    loose = 1e-5 if solver == "ista" else tol
    work = [int(vo.solve(Pb, x, lam, solver, tol=loose, max_iter=1_000_000, metric=metric).stats.iterations.max())
            for metric in ("auto", "none")]
    assert work[0] < 0.7 * work[1], work


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("noise", [0.0, 1e-7, 1e-4, 1e-3])
def test_dictionaries_near_rank_one_converge_in_the_metric(noise, dtype):
    """Atoms sharing one direction up to ``noise`` (lambda_1 / lambda_2 from 3e6 to 1e14): the metric's proximal step
    finds its multiplier by two Newton steps, which on slopes spanning that ratio left it inexact, and ISTA, FISTA
    and active_set diverged (residuals up to 1e86). With the ratio capped at METRIC_CAP in the step they converge to
    the minimiser that the scalar steps find, in the library's metric and in one built by hand without the cap."""
    g = torch.Generator().manual_seed(1)
    d, m, lam = 30, 20, 0.05
    P = torch.randn(d, 1, generator=g, dtype=D64) @ torch.rand(1, m, generator=g, dtype=D64) + \
        noise * torch.randn(d, m, generator=g, dtype=D64)
    x = torch.randn(5, d, generator=g, dtype=D64)
    K = P.T @ P
    ev = torch.linalg.eigvalsh(K)
    assert ev[-1] > 1e6 * ev[-2].clamp_min(0)
    P, x = P.to(dtype), x.to(dtype)
    tol = 1e-7 if dtype == D64 else 1e-4
    assert GramOperator(P.T @ P).metric() is not None
    B = P.double().T @ x.double().T  # (m, problems), float64
    lam1, v, lam2 = rank_one_split(P.T @ P)
    by_hand = RankOneMetric((lam2.unsqueeze(-1),), v.unsqueeze(-1), (lam1 - lam2).unsqueeze(-1))  # as GramOperator.metric
    for solver, metric in (("fista", "auto"), ("active_set", "auto"), ("fista", by_hand)):
        sol = vo.solve(P, x, lam, solver, tol=tol, metric=metric)
        assert bool(sol.stats.converged.all()), (solver, sol.stats.residual)
        residual = kkt_residual_operator(GramOperator(K), (sol.code.double().T,), (B,), lam)  # in float64
        assert float(residual.max()) <= 2 * tol * max(1.0, float(B.abs().max())), (solver, residual)
        ref = vo.solve(P, x, lam, solver, tol=tol, metric="none").code
        torch.testing.assert_close(sol.code, ref, atol=1e-4 if dtype == D64 else 2e-2, rtol=0)


def test_one_dimensional_signals_with_ista_in_the_metric():
    """d = 1: K of rank one, whose second eigenvalue is rounding; ISTA in the metric diverged to 1e10."""
    g = torch.Generator().manual_seed(1)
    P = torch.randn(1, 20, generator=g, dtype=D64) / 30 ** 0.5
    x = torch.randn(5, 1, generator=g, dtype=D64)
    lam = 0.01
    # the minimiser in closed form: all the weight on the atom of the largest |p_j| (it buys the most fit per unit of
    # L1 norm), u_j = S_lam(p_j x) / p_j^2
    j = int(P[0].abs().argmax())
    ref = torch.zeros(5, 20, dtype=D64)
    ref[:, j] = torch.nn.functional.softshrink(P[0, j] * x[:, 0], lam) / P[0, j] ** 2
    for solver in ("ista", "fista", "active_set"):
        sol = vo.solve(P, x, lam, solver, tol=1e-7)
        assert bool(sol.stats.converged.all()), (solver, sol.stats.residual)
        torch.testing.assert_close(sol.code, ref, atol=1e-5, rtol=0)


def test_an_equilibrium_layer_of_one_token_converges_in_the_metric():
    """One token per image: the random features' K is of rank one. FISTA in the uncapped metric spent its 10,000
    iterations there (residual 0.015-0.37); capped it converges in a few."""
    torch.manual_seed(0)
    for kw in (dict(dictionary="d"), dict(dictionary="sd", static="dense"), dict(dictionary="sd")):
        layer = VARSLayer(32, 2, steps=None, solver="fista", tol=1e-4, num_prefix_tokens=0, grid_size=(1, 1),
                          image_size=2, **kw)
        with torch.no_grad():
            y = layer(torch.randn(2, 1, 32))
        assert torch.isfinite(y).all() and float(layer.last_stats.residual.max()) <= 1e-4, kw
        assert int(layer.last_stats.iterations) < 100, kw


def test_active_set_trace_counts_the_work_done():
    """A trace's last point is the work the solve reports (not the budget of the chunk that converged)."""
    P = positive_dictionary(2, 20, 40)
    x = torch.randn(20, generator=torch.Generator().manual_seed(3), dtype=D64)
    trace = []
    sol = vo.solve(P, x, 0.1, "active_set", tol=1e-4, trace=trace)
    assert bool(sol.stats.converged) and trace[-1][0] == int(sol.stats.iterations) < 64


@pytest.mark.parametrize("uses_metric", [True, False])
def test_gram_entry_takes_L_from_the_metric(uses_metric):
    """A solver registered with uses_metric=True is handed the metric's bound as L where vo.solve steps in the metric
    (no second eigendecomposition), and the exact top eigenvalue of K everywhere else."""
    from vars_ode.solvers.registry import register_solver, unregister_solver
    seen = []

    def recording_fista(op, B, w, L, init, **kw):
        seen.append(torch.as_tensor(L).flatten())
        return iterative.fista(op, B, w, L, init, **kw)

    register_solver("recording_fista", recording_fista, uses_metric=uses_metric)
    try:
        P = positive_dictionary(4, 20, 12, (3,))
        x = torch.randn(3, 20, generator=torch.Generator().manual_seed(5), dtype=D64)
        K = P.transpose(-1, -2) @ P
        top = torch.linalg.eigvalsh(K)[..., -1]
        metric = GramOperator(K).metric()
        assert metric is not None
        runs = [dict(tol=1e-8), dict(tol=1e-8, metric="none"), dict(tol=0.0, max_iter=50)]
        sols = [vo.solve(P, x, 0.1, "recording_fista", **kw) for kw in runs]
    finally:
        unregister_solver("recording_fista")
    if uses_metric:
        torch.testing.assert_close(seen[0], metric.bound().flatten(), rtol=1e-12, atol=0)
        assert bool((seen[0] >= top).all())
    else:
        torch.testing.assert_close(seen[0], top, rtol=1e-12, atol=0)
    for L in seen[1:]:
        torch.testing.assert_close(L, top, rtol=1e-12, atol=0)
    # the first solve stepped in the metric either way and reached the minimiser
    assert bool(sols[0].stats.converged.all()) and bool(sols[1].stats.converged.all())
    torch.testing.assert_close(sols[0].code, sols[1].code, atol=1e-6, rtol=0)


@given(seed=st.integers(0, 2**16), m=st.integers(2, 40), log_ratio=st.floats(0.5, 7.0))
@settings(max_examples=40, deadline=None)
def test_float32_split_bounds_K_at_any_ratio(seed, m, log_ratio):
    """The split computed in float32 (rank_one_split works in K's precision) gives H >= K, the float32 matrix taken
    exactly, up to lambda_1 / lambda_2 of 1e7: the eigensolver's backward error (lambda_2's error in float32 reaches
    lambda_2 itself near a ratio of 1e7) is covered without the relative margin, up to the rounding of the float32
    eigenvector's norm; with the margin, entirely."""
    from vars_ode.lasso import rank_one_split
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(m, generator=g, dtype=D64)
    v = v / v.norm()
    A = torch.randn(m, m, generator=g, dtype=D64)
    R = A @ A.T / m
    K32 = (10.0 ** log_ratio * torch.linalg.eigvalsh(R)[-1] * torch.outer(v, v) + R).float()
    K32 = (K32 + K32.T) / 2
    for margin, slack in ((0.0, 1e-5), (0.01, 0.0)):
        lam1, u, lam2 = rank_one_split(K32, margin=margin)
        assert lam1.dtype == u.dtype == lam2.dtype == torch.float32
        lam1, u, lam2 = lam1.double(), u.double(), lam2.double()
        H = lam2 * torch.eye(m, dtype=D64) + (lam1 - lam2) * torch.outer(u, u)
        assert top_generalised_eigenvalue(K32.double(), H) <= 1 + slack
