"""The z/u dynamics: equilibria, energies, the ISTA-Euler correspondence, the attention special case."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchdiffeq import odeint

import vars_ode as vo
from conftest import make_problem, sklearn_lasso as sk


def rescaled(P, x, lam, c=1.0):
    """The problem scaled by c / L: same minimiser, spectrum of K bounded by c."""
    L = torch.linalg.eigvalsh(P.T @ P)[-1]
    s = (c / L) ** 0.5
    return P * s, x * s, lam * c / L


@given(st.integers(0, 10**6), st.floats(0.05, 0.4))
@settings(max_examples=3)
def test_equilibrium_of_eq8_9_is_the_lasso_and_eq11(seed, lam):
    P, x = make_problem(seed, 14, 7)
    Ps, xs, lams = rescaled(P, x, lam)
    f = vo.VARSDynamics(Ps, xs, lams)
    # t = 1000 in the rescaled units: the code 1e-11 from scikit-learn's on the draws tried (3000 gave the same)
    t = torch.tensor([0.0, 1000.0], dtype=torch.float64)
    z, u = odeint(f, f.initial_state(), t, method="dopri5", rtol=1e-10, atol=1e-12)
    state = (z[-1], u[-1])
    code = f.code(state)
    assert (code - sk(P, x, lam)).abs().max().item() < 1e-5
    # Eq. 11: the network's own z settles at P u* + x (in the network's, i.e. rescaled, units)
    assert torch.allclose(f.output(state), Ps @ code + xs, atol=1e-8)
    dz, du = f(0, state)
    assert dz.abs().max() < 1e-8 and du.abs().max() < 1e-8


def test_unit_parameters_do_not_give_the_lasso():
    # alpha = beta = gamma = 1: the equilibrium is soft(P^T x) instead (FACTS section 1)
    P, x = make_problem(3, 14, 7)
    Ps, xs, lams = rescaled(P, x, 0.2)
    f = vo.VARSDynamics(Ps, xs, lams, alpha=1.0, beta=1.0, gamma=1.0)
    assert not f.is_lasso_equivalent and vo.VARSDynamics(Ps, xs, lams).is_lasso_equivalent
    t = torch.tensor([0.0, 300.0], dtype=torch.float64)
    z, u = odeint(f, f.initial_state(), t, method="dopri5", rtol=1e-10, atol=1e-12)
    code = f.code((z[-1], u[-1]))
    assert (code - sk(P, x, 0.2)).abs().max().item() > 1e-2


def test_gram_field_is_the_projection_of_the_full_field():
    P, x = make_problem(4, 12, 8, batch=(3,))
    f = vo.VARSDynamics(P, x, 0.1)
    z = torch.randn(3, 12, dtype=torch.float64)
    u = torch.randn(3, 8, dtype=torch.float64)
    dz, du = f(0, (z, u))
    K, B = P.T @ P, P.T @ x.T
    g = vo.GramVARSDynamics(K, B, f.threshold.reshape(()))
    dW, dU = g(0, ((P.T @ z.T), u.T))
    assert torch.allclose(dW, P.T @ dz.T) and torch.allclose(dU, du.T)


def trajectory(f, y0, T, n, rtol=1e-10):
    t = torch.linspace(0, T, n, dtype=torch.float64)
    return odeint(f, y0, t, method="dopri5", rtol=rtol, atol=rtol * 1e-2)


@given(st.integers(0, 10**6))
@settings(max_examples=4)
def test_coupled_lyapunov_energy_is_non_increasing_along_eq8_9(seed):
    P, x = make_problem(seed, 20, 30)  # overcomplete, as in a VARS layer
    Ps, xs, lams = rescaled(P, x, 0.1)
    f = vo.VARSDynamics(Ps, xs, lams)
    z, u = trajectory(f, f.initial_state(), 30.0, 300, rtol=1e-9)
    E = f.energy((z, u))
    assert (E[1:] - E[:-1]).max().item() <= 1e-9
    assert E[-1] < E[0] - 1e-3  # and it really moves
    # minimised over z it is the LASSO energy minus ||x||^2 / 2
    a = f.code((z[-1], u[-1]))
    zstar = Ps @ a + xs
    assert torch.allclose(f.energy((zstar, u[-1])), f.lasso_energy(u[-1]) - xs.pow(2).sum(), atol=1e-10)


@given(st.integers(0, 10**6))
@settings(max_examples=4)
def test_eq22_is_non_increasing_along_eq20(seed):
    P, x = make_problem(seed, 20, 30)
    Ps, xs, lams = rescaled(P, x, 0.1)
    f = vo.ReducedVARSDynamics(Ps, xs, lams, convention="eq22")  # Eq. 22 literally: 2 lam ||u||_1
    u = trajectory(f, f.initial_state(), 30.0, 300, rtol=1e-9)
    E = f.energy(u)
    assert torch.allclose(E, vo.lasso_objective(Ps, f.code(u), xs, lams, convention="eq22"))
    assert (E[1:] - E[:-1]).max().item() <= 1e-9
    assert E[-1] < E[0] - 1e-3


def test_eq22_is_not_monotone_along_the_coupled_flow():
    # The LASSO energy alone is no Lyapunov function of Eq. 8-9: it rises on a trajectory that
    # starts with z away from P g(u) + x, while the coupled energy keeps falling.
    rises = []
    for seed in range(3):
        P, x = make_problem(seed, 40, 60)
        Ps, xs, lams = rescaled(P, x, 0.1)
        f = vo.VARSDynamics(Ps, xs, lams)
        z0, u0 = f.initial_state()
        z0 = z0 + 2.0 * torch.randn(z0.shape, generator=torch.Generator().manual_seed(seed), dtype=z0.dtype)
        z, u = trajectory(f, (z0, u0), 10.0, 400, rtol=1e-8)
        EH = f.energy((z, u))
        assert (EH[1:] - EH[:-1]).max().item() <= 1e-9
        E = f.lasso_energy(u)
        rises.append((E[1:] - E[:-1]).max().item())
    assert max(rises) > 1e-4, rises


@given(st.integers(0, 10**6))
@settings(max_examples=5)
def test_eq22_is_non_increasing_along_ista(seed):
    P, x = make_problem(seed, 20, 30)
    L = torch.linalg.eigvalsh(P.T @ P)[-1]
    u = torch.zeros(30, dtype=torch.float64)
    E = [vo.lasso_objective(P, u, x, 0.1).item()]
    for _ in range(100):
        u = vo.soft_threshold(u - P.T @ (P @ u - x) / L, 0.1 / L)
        E.append(vo.lasso_objective(P, u, x, 0.1).item())
    E = torch.tensor(E)
    assert (E[1:] - E[:-1]).max().item() <= 1e-12


@given(st.integers(0, 10**6), st.floats(0.01, 0.5))
@settings(max_examples=8)
def test_ista_is_explicit_euler_of_the_lca_and_of_eq20(seed, lam):
    P, x = make_problem(seed, 16, 24)
    K, b = P.T @ P, P.T @ x
    L = torch.linalg.eigvalsh(K)[-1]
    ista = vo.solve(P, x, lam, "ista", tol=0, max_iter=1).code
    iterates = [torch.zeros(24, dtype=torch.float64)]
    for k in range(1, 8):
        iterates.append(vo.solve(P, x, lam, "ista", tol=0, max_iter=k).code)
    assert torch.allclose(iterates[1], ista)
    # LCA (Rozell et al.), Euler step 1, problem scaled by 1/L, threshold lam / L
    t = torch.arange(8, dtype=torch.float64)
    u = odeint(lambda t, u: vo.lca_field(K / L, b / L, u, lam / L), torch.zeros(24, dtype=torch.float64), t,
               method="euler", options={"step_size": 1.0})
    assert torch.allclose(vo.soft_threshold(u, lam / L), torch.stack(iterates), atol=1e-12)
    # Eq. 20 (beta = gamma = 2), Euler step 1/2, problem scaled by 2/L
    s = (2 / L) ** 0.5
    f = vo.ReducedVARSDynamics(P * s, x * s, 2 * lam / L)
    u = odeint(f, f.initial_state(), t / 2, method="euler", options={"step_size": 0.5})
    assert torch.allclose(f.code(u), torch.stack(iterates), atol=1e-12)


def test_self_attention_is_one_euler_step_of_eq15():
    g = torch.Generator().manual_seed(0)
    N, C, m = 10, 4, 6
    Phi = torch.rand(N, m, generator=g, dtype=torch.float64)
    X = torch.randn(C, N, generator=g, dtype=torch.float64)  # one signal per channel
    # Eq. 6-7 (no inhibition, no threshold) from (Z, U) = (X, Phi^T X): Eq. 15 in encoder-decoder form
    f = vo.VARSDynamics(Phi, X, 0.0, alpha=1.0, beta=1.0, gamma=0.0)
    z, u = odeint(f, f.initial_state(encode=True), torch.tensor([0.0, 1.0], dtype=torch.float64),
                  method="euler", options={"step_size": 1.0})
    assert torch.allclose(z[-1], X @ Phi @ Phi.T + X)  # Eq. 14: Phi Phi^T X^mu + X^mu per channel


def test_dynamics_reject_bad_arguments():
    P, x = make_problem(0, 10, 5)
    with pytest.raises(ValueError, match="alpha"):
        vo.VARSDynamics(P, x, 0.1, alpha=0.0)
    with pytest.raises(ValueError, match="gamma"):
        vo.VARSDynamics(P, x, 0.1, gamma=-1.0)
    with pytest.raises(ValueError, match="x"):
        vo.VARSDynamics(P, x[:4], 0.1)
    with pytest.raises(ValueError, match="lam"):
        vo.ReducedVARSDynamics(P, x, -0.1)
