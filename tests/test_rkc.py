"""rkc, the Runge-Kutta-Chebyshev method: its stability polynomial is the damped Chebyshev one (against numpy's
Chebyshev series), its horizon follows the flow of Eq. 8-9 to second order, and its long steps take the stiff problems
the other explicit methods cannot. Its equilibrium against scikit-learn and its gradients are in tests/test_solvers.py
(the ODE solvers with step loops of their own, OWN_LOOPS)."""
import math

import numpy as np
import pytest
import torch
from numpy.polynomial import chebyshev as C

import vars_ode as vo
from conftest import conditioned_problem, eager_and_compiled_twice, horizon_errors, make_problem, sklearn_lasso
from vars_ode.solvers import rkc


def _closed_form(s, z, eps=2 / 13):
    """``a_s + b_s T_s(w0 + w1 z)`` from numpy's Chebyshev series: the polynomial an ``s``-stage step should have."""
    Ts = C.Chebyshev.basis(s)
    w0 = 1 + eps / s**2
    d1, d2 = Ts.deriv(1)(w0), Ts.deriv(2)(w0)
    w1 = d1 / d2
    b = d2 / d1**2
    return 1 - b * Ts(w0) + b * Ts(w0 + w1 * z), (w0 + 1) / w1


def _recurrence(s, z):
    """The module's recurrence on ``y' = z y / h`` from ``y = 1`` with ``h = 1``: ``y_new`` for each ``z``."""
    mt1, stages, _ = rkc.coefficients(s)
    prev2, prev = np.ones_like(z), 1 + mt1 * z
    for mu, nu, mt, gt in stages:
        prev2, prev = prev, (1 - mu - nu) + mu * prev + nu * prev2 + mt * z * prev + gt * z
    return prev


@pytest.mark.parametrize("s", [2, 3, 5, 12, 40, rkc.MAX_STAGES])
def test_stability_polynomial_is_the_damped_chebyshev_one(s):
    ref, beta = _closed_form(s, np.zeros(1))
    assert math.isclose(rkc.coefficients(s)[2], beta, rel_tol=1e-12)
    z = np.linspace(-beta, 0, 4001)
    P = _recurrence(s, z)
    assert np.abs(P - _closed_form(s, z)[0]).max() < 1e-9 * max(1, s)
    # stable on the whole interval, damped inside it, and not beyond it (the interval is as long as claimed)
    assert np.abs(P).max() <= 1 + 1e-12
    assert np.abs(P[z < -0.1 * beta]).max() < 0.97
    assert abs(_recurrence(s, np.array([-1.2 * beta]))[0]) > 1
    assert 0.6 * (s * s - 1) <= beta <= 0.67 * s * s
    # second order at zero: P(z) = 1 + z + z^2 / 2 + O(z^3)
    for zz in (1e-2, 2e-3):
        e = abs(_recurrence(s, np.array([-zz]))[0] - (1 - zz + zz * zz / 2))
        assert e < 0.2 * s**4 * zz**3, (zz, e)


def test_stages_for_is_the_fewest_that_cover_the_interval():
    for length in (0.0, 0.5, 2.0, 7.9, 100.0, 5000.0):
        s = rkc.stages_for(length)
        assert rkc.coefficients(s)[2] >= length
        assert s == 2 or rkc.coefficients(s - 1)[2] < length
    assert rkc.stages_for(1e9, max_stages=50) == 50


def test_spectral_radius_of_the_paper_field_and_of_its_jacobian():
    assert math.isclose(rkc.spectral_radius(1.0, 2.0, 2.0), (3 + math.sqrt(5)) / 2, rel_tol=1e-12)
    # against the Jacobian of the rescaled field, every atom active, at other parameters: the largest modulus
    g = torch.Generator().manual_seed(0)
    P = torch.randn(12, 8, generator=g, dtype=torch.float64)
    K = P.T @ P
    K = K / torch.linalg.eigvalsh(K).max()
    for al, be, ga in ((1.0, 2.0, 2.0), (0.5, 3.0, 1.0), (2.0, 1.0, 1.5)):
        m = K.shape[0]
        eye = torch.eye(m, dtype=torch.float64)
        J = torch.cat([torch.cat([-al * eye, K], 1), torch.cat([eye, -be * eye - ga * (K - eye)], 1)], 0)
        ev = torch.linalg.eigvals(J)
        assert ev.imag.abs().max() < 1e-10  # a real spectrum, what the method is for
        assert ev.real.abs().max().item() <= rkc.spectral_radius(al, be, ga) + 1e-9


@pytest.mark.parametrize("s", [2, 5, 20])
def test_error_estimate_is_of_the_local_error_order_and_does_not_underestimate_it(s):
    # one step of the linear field (threshold 0) from a random state, against torchdiffeq's dopri8 at 1e-13: the local
    # error is third order in h, and the estimate is 1.2-2 times its size (measured; its constant depends on s)
    from torchdiffeq import odeint
    from vars_ode.dynamics import VARSField
    from vars_ode.lasso import GramOperator
    g = torch.Generator().manual_seed(0)
    P = torch.randn(16, 10, generator=g, dtype=torch.float64) / 4
    K = P.T @ P
    f = VARSField(GramOperator(K / torch.linalg.eigvalsh(K).max()), (torch.randn(10, 3, generator=g,
                  dtype=torch.float64),), (torch.zeros((), dtype=torch.float64),))
    y = tuple(torch.randn(10, 3, generator=g, dtype=torch.float64) for _ in range(2))
    sizes = []
    for h in (0.1, 0.05):
        hh = torch.tensor(h, dtype=torch.float64)
        y1, _, est = rkc.rkc_step(f, y, f(0.0, y), (hh, hh), s)
        exact = odeint(f, y, torch.tensor([0.0, h], dtype=torch.float64), method="dopri8", rtol=1e-13, atol=1e-13)
        true = torch.cat([(a - e[-1]).flatten() for a, e in zip(y1, exact)]).norm().item()
        ratio = torch.cat([e.flatten() for e in est]).norm().item() / true
        assert 1.0 < ratio < 2.5, (h, ratio)
        sizes.append(true)
    assert 7 < sizes[0] / sizes[1] < 9  # third order locally: second order globally


def test_long_steps_reach_an_ill_conditioned_equilibrium_that_dopri5_does_not():
    # K with condition number 100: dopri5's step is held at its stability limit (about 1.2 units of time) and its
    # time is set by the slow end of the spectrum (9,994 evaluations here); rkc's steps grow with their stages (3,360)
    P, X = conditioned_problem(3, 40, 24, 1.0, 20)
    sol = vo.solve(P, X, 0.02, "rkc", tol=1e-8, max_iter=5000)
    assert bool(sol.stats.converged.all()), sol.stats.summary()
    assert (sol.code - sklearn_lasso(P, X, 0.02)).abs().max().item() < 1e-5  # residual 1e-8, condition 100
    dopri5 = vo.solve(P, X, 0.02, "dopri5", tol=1e-8, max_iter=5000)
    assert not bool(dopri5.stats.converged.all())


def test_fixed_horizon_is_second_order_in_the_step():
    # equal steps against the flow integrated by rk4 with a fine step: halving the step quarters the error. With
    # lam = 0 the field is linear (no kinks of the threshold, where any method's order drops)
    errors, rates = horizon_errors("rkc", 0.0, (0.2, 0.1, 0.05, 0.025), 1 / 512)
    assert errors[-1] < 3e-5 and all(1.8 < r < 2.5 for r in rates), (errors, rates)


def test_adaptive_horizon_follows_the_flow_and_records_each_unit_of_time():
    P, X = make_problem(6, 16, 10, batch=(3,))
    rec_rkc, rec_rk = [], []
    got = vo.solve(P, X, 0.1, "rkc", tol=0.0, t_end=3.0, rtol=1e-7, record=rec_rkc)
    ref = vo.solve(P, X, 0.1, "rk4", tol=0.0, t_end=3.0, options={"step_size": 1 / 256}, record=rec_rk)
    assert len(rec_rkc) == len(rec_rk) == 3
    for a, b in zip(rec_rkc, rec_rk):
        assert (a[0] - b[0]).abs().max().item() < 1e-5
    assert (got.code - ref.code).abs().max().item() < 1e-5
    loose = vo.solve(P, X, 0.1, "rkc", tol=0.0, t_end=3.0)  # the default tolerance of a horizon, 3e-3
    assert (loose.code - ref.code).abs().max().item() < 1e-2
    assert int(loose.stats.iterations.max()) < int(got.stats.iterations.max())


def test_layer_runs_it_for_every_dictionary():
    torch.manual_seed(0)
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    for kw in (dict(dictionary="d"), dict(dictionary="sd", static="dense", num_static_atoms=4),
               dict(dictionary="sd", image_size=3, num_static_atoms=4)):
        layer = vo.VARSLayer(16, 2, solver="rkc", steps=3.0, dtype=torch.float64, **kw)
        y = layer(x)
        y.square().sum().backward()
        grads = [p.grad for p in layer.parameters() if p.requires_grad]
        assert any(g is not None for g in grads) and all(bool(torch.isfinite(g).all()) for g in grads if g is not None)
        with torch.no_grad():
            # the same flow to the same horizon (the default rtol of a horizon, rkc.HORIZON_RTOL)
            layer.set_solver("rk4", steps=3.0, solver_options={"options": {"step_size": 1 / 64}})
            assert (y - layer(x)).abs().max().item() < 1e-2 * y.abs().max().item()
            if "image_size" in kw:
                continue  # the convolutional templates' equilibrium: thousands of evaluations in operator form
            layer.set_solver("rkc", steps=None, tol=1e-8, grad="implicit")
            y_eq = layer(x)
            layer.set_solver("fista", steps=None, tol=1e-10, grad="implicit")
            assert (y_eq - layer(x)).abs().max().item() < 1e-6


@pytest.mark.parametrize("kwargs, match", [
    (dict(grad="adjoint", t_end=1.0), "no adjoint"),
    (dict(first_step=0.0), "first_step must be a positive finite number"),
    (dict(rtol=-1e-3), "rtol must be a positive finite number"),
    (dict(step_size=math.inf, t_end=1.0), "step_size must be a positive finite number"),
    (dict(max_stages=1), "max_stages must be at least 2"),
    (dict(max_stages=2.5), "max_stages must be a positive integer"),
    (dict(step_size=0.5), "step_size gives equal steps over a horizon"),
    (dict(options={"step_size": 0.5}), r"unknown option\(s\) \['options'\] for solver 'rkc'"),
])
def test_bad_options_are_named(kwargs, match):
    P, X = make_problem(1, 8, 4, batch=(2,))
    with pytest.raises(ValueError, match=match):
        vo.solve(P, X, 0.1, "rkc", tol=1e-6, **kwargs)


def test_a_compiled_layer_runs_rkc_eagerly_as_one_graph_break():
    # rkc reads its stage counts and step decisions from the data; traced, every read is a guard, and a VARS-D
    # layer's horizon recompiled at each until the recompile limit. Under torch.compile it runs eagerly: the graphs
    # around it are captured once, and the output and gradients are the eager layer's
    torch.manual_seed(0)
    layer = vo.VARSLayer(16, 2, dictionary="d", solver="rkc").double()
    x = torch.randn(2, 17, 16, dtype=torch.float64)

    eager, compiled, again, graphs, stats = eager_and_compiled_twice(layer, x)
    assert stats["unique_graphs"] == graphs <= 6, stats  # a second call reuses the graphs (traced: 25, then 26)
    assert len(eager) == len(compiled) > 3
    for a, b, c in zip(eager, compiled, again):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-10 * float(a.abs().max()))
        torch.testing.assert_close(c, a, rtol=0, atol=1e-10 * float(a.abs().max()))


def test_a_layers_horizon_follows_the_flow_as_closely_as_dopri5_at_the_layers_defaults():
    # rkc.HORIZON_RTOL is the loosest tolerance at which a layer's horizon stays as close to the flow (rk4 in steps of
    # 0.01) as dopri5 at the layer's rtol; 1e-2 would be about twice as far, 1e-3 takes more evaluations
    for kw in (dict(dictionary="d"), dict(dictionary="sd", static="dense", num_static_atoms=4)):
        torch.manual_seed(0)
        x = torch.randn(2, 33, 32, dtype=torch.float64)
        layer = vo.VARSLayer(32, 2, solver="rk4", steps=3.0, dtype=torch.float64,
                             solver_options={"options": {"step_size": 0.01}}, **kw)
        with torch.no_grad():
            ref = layer(x)
            err, evals = {}, {}
            for name, solver, opts in (("dopri5", "dopri5", {}), ("rkc", "rkc", {}), ("tight", "rkc", {"rtol": 1e-3}),
                                       ("loose", "rkc", {"rtol": 1e-2})):
                layer.set_solver(solver, steps=3.0, solver_options=opts)
                err[name] = (layer(x) - ref).abs().max().item() / ref.abs().max().item()
                evals[name] = int(layer.last_stats.iterations.max())
        assert err["rkc"] <= 1.5 * err["dopri5"] < err["loose"], (kw, err)
        assert evals["rkc"] < evals["tight"], (kw, evals)


def test_one_host_read_a_step(monkeypatch):
    # each step decides its stage count on the host (the stability interval it needs); nothing else is read: to a
    # steady state the live problems' step lengths and whether any is live, over a horizon the longest step still to
    # take and whether the budget is spent, are one number (a read waits for the device on a GPU)
    from vars_ode.sync import count_host_syncs

    steps = []
    original = rkc.rkc_step

    def counted(*args, **kwargs):
        steps.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(rkc, "rkc_step", counted)
    P, X = make_problem(0, 24, 16, batch=(12,))
    for kw in (dict(tol=1e-6), dict(tol=0.0, t_end=2.5)):
        steps.clear()
        with count_host_syncs() as reads:
            vo.solve(P, X, 0.1, "rkc", **kw)
        marks = math.ceil(kw.get("t_end", 0.0))  # a horizon's loop ends once at each unit of time
        # (a few more around the loop: the checks of the input, the status)
        assert len(steps) > 10 and reads.count <= len(steps) + marks + 6, (kw, reads.count, len(steps))
