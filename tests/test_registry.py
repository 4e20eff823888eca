"""A solver written here, outside the package, registered by one line, runs through vo.solve, vo.solve_gram,
solve_operator and every VARSLayer path; the table of torchdiffeq's methods matches torchdiffeq's own."""
import pytest
import torch

import vars_ode as vo
from vars_ode.lasso import tmap


def damped_ista(op, B, w, L, init, *, tol, max_iter, damping=0.5, **unused):
    """ISTA with a shorter step: u <- S_{damping w / L}(u - damping (K u - b) / L); same fixed points."""
    u = tuple(torch.zeros_like(b) for b in B) if init is None else init
    n = op.num_blocks
    step = tuple(damping / op.expand(i, L) for i in range(n))
    thr = tuple(op.expand(i, w) * s for i, s in enumerate(step))
    it = 0
    for it in range(1, max_iter + 1):
        grad = tmap(torch.sub, op.gram_apply(u), B)
        u = tuple(vo.soft_threshold(x - s * g, t) for x, g, s, t in zip(u, grad, step, thr))
        if tol > 0 and bool((vo.kkt_residual_operator(op, u, B, w) <= tol).all()):
            break
    return u, op.problems_like(B, it, torch.long)


@pytest.fixture
def registered():
    vo.register_solver("damped_ista", damped_ista)
    yield "damped_ista"
    vo.unregister_solver("damped_ista")


def test_a_registered_solver_solves_the_lasso(registered):
    torch.manual_seed(0)
    P = torch.randn(12, 8, dtype=torch.float64) / 3
    x = torch.randn(4, 12, dtype=torch.float64)
    ref = vo.solve(P, x, 0.1, "active_set", tol=1e-12)
    sol = vo.solve(P, x, 0.1, registered, tol=1e-9)
    assert sol.stats.unit == "iterations" and bool(sol.stats.converged.all())
    torch.testing.assert_close(sol.code, ref.code, atol=1e-7, rtol=0)
    # the implicit gradient at its solution is the active-set solution's
    P.requires_grad_(True)
    g1, = torch.autograd.grad(vo.solve(P, x, 0.1, registered, tol=1e-11, grad="implicit").output.sum(), P)
    g2, = torch.autograd.grad(vo.solve(P, x, 0.1, "active_set", tol=1e-12, grad="implicit").output.sum(), P)
    torch.testing.assert_close(g1, g2, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dictionary", ["d", "sd", "s"])
def test_a_registered_solver_runs_in_every_layer(registered, dictionary):
    torch.manual_seed(1)
    layer = vo.VARSLayer(8, 2, dictionary=dictionary, solver=registered, steps=4, kernel_size=3,
                         atoms_per_channel=2).double()
    x = torch.randn(2, 10, 8, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    assert layer.last_stats.solver == registered and int(layer.last_stats.iterations) == 4
    assert torch.isfinite(x.grad).all()
    # with damping 1 it is ISTA: the same output as the built-in solver, every dictionary
    vo.register_solver(registered, lambda *a, **k: damped_ista(*a, damping=1.0, **k), replace=True)
    ista = vo.VARSLayer(8, 2, dictionary=dictionary, solver="ista", steps=4, kernel_size=3, atoms_per_channel=2,
                        fused=False).double()
    ista.load_state_dict(layer.state_dict())
    torch.testing.assert_close(layer(x), ista(x))
    # to the equilibrium, with the implicit gradient
    layer.set_solver(steps=None, tol=1e-8, grad="implicit")
    layer(x).sum().backward()
    assert layer.last_stats.residual.max() <= 1e-8


def test_registry_refuses_bad_entries(registered):
    with pytest.raises(ValueError, match="already registered"):
        vo.register_solver(registered, damped_ista)
    with pytest.raises(ValueError, match="fn must be callable"):
        vo.register_solver("x", 3)
    with pytest.raises(ValueError, match="needs an ODE solver"):
        vo.solve(torch.eye(3), torch.ones(3), 0.1, registered, grad="adjoint")
    with pytest.raises(ValueError, match="no solver"):
        vo.unregister_solver("not_there")
    with pytest.raises(ValueError, match="needs the Gram matrix"):
        vo.VARSLayer(8, 2, dictionary="sd", solver="active_set")


def test_a_solver_that_autograd_cannot_follow_is_named_not_given_zero_gradients():
    # a solver that works outside autograd (here: on detached tensors) returns a code without a graph; registered as
    # if it unrolled, a call whose inputs require gradients is refused with its name (not a backward pass that fails
    # deep inside torch, or gradients that are silently missing); registered with unrolls=False, the refusal says
    # to use grad='implicit', which then gives the equilibrium's gradient
    def outside(op, B, w, L, init, **kw):
        with torch.no_grad():
            return damped_ista(op, tuple(b.detach() for b in B), w, L, init, **kw)

    P = torch.randn(12, 8, dtype=torch.float64, requires_grad=True)
    x = torch.randn(4, 12, dtype=torch.float64)
    vo.register_solver("outside", outside)
    try:
        with pytest.raises(ValueError, match="'outside' returned a code without a graph.*unrolls=False"):
            vo.solve(P, x, 0.1, "outside", tol=1e-9)
        vo.register_solver("outside", outside, unrolls=False, replace=True)
        with pytest.raises(ValueError, match="'outside' has no unrolled gradient.*grad='implicit'"):
            vo.solve(P, x, 0.1, "outside", tol=1e-9)
        g1, = torch.autograd.grad(vo.solve(P, x, 0.1, "outside", tol=1e-11, grad="implicit").output.sum(), P)
        g2, = torch.autograd.grad(vo.solve(P, x, 0.1, "active_set", tol=1e-12, grad="implicit").output.sum(), P)
        torch.testing.assert_close(g1, g2, atol=1e-6, rtol=1e-6)
    finally:
        vo.unregister_solver("outside")


def test_torchdiffeq_methods_match_torchdiffeq():
    from torchdiffeq._impl.odeint import SOLVERS as TORCHDIFFEQ_TABLE  # the private table, read in this test only

    from vars_ode.solvers.ode import TORCHDIFFEQ_METHODS

    assert set(TORCHDIFFEQ_METHODS) == set(TORCHDIFFEQ_TABLE)
    assert set(TORCHDIFFEQ_METHODS) <= set(vo.SOLVERS)
