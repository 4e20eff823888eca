"""Executable checks for theory/energy_and_stability.md (Lyapunov energies, Jacobian, stiffness).

Run ``python theory/check_energy.py [--size small|full]``; every function asserts its claim in
float64 and prints the numbers it measured. ``main()`` returns them as a dict.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
from torch.autograd.functional import jacobian
from torchdiffeq import odeint

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vars_ode  # noqa: E402
from _common import DTYPE, Counted, cli, random_problem, report  # noqa: E402
from vars_ode import ReducedVARSDynamics, VARSDynamics  # noqa: E402

SIZES = {"small": dict(d=20, m=30, samples=401), "full": dict(d=40, m=60, samples=2001)}


def _t(*values):
    return torch.tensor(values, dtype=DTYPE)


def _random_state(d, m, seed, scale=1.5):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(d, generator=g, dtype=DTYPE), scale * torch.randn(m, generator=g, dtype=DTYPE))


def check_energy_derivative(d, m, seed=0):
    """dE_H/dt = -||dz/dt||^2 - sum_i g'(u_i) (du_i/dt)^2 at generic states, for the paper's
    parameters and for other positive (alpha, beta, gamma, theta): E_H needs no tuning to decrease."""
    P, x, lam = random_problem(d, m, seed)
    out = {}
    for alpha, beta, gamma, thr in ((1.0, 2.0, 2.0, None), (0.5, 3.0, 1.0, 0.2), (1.0, 1.0, 1.0, None)):
        f = VARSDynamics(P, x, lam, alpha, beta, gamma, threshold=thr)
        z, u = _random_state(d, m, seed + 1)
        z.requires_grad_(True)
        u.requires_grad_(True)
        gz, gu = torch.autograd.grad(f.energy((z, u)), (z, u))
        with torch.no_grad():
            dz, du = f(0.0, (z, u))
            chain = float((gz * dz).sum() + (gu * du).sum())
            formula = -float(dz.pow(2).sum() + du[u.abs() > f.threshold].pow(2).sum())
        err = abs(chain - formula) / abs(formula)
        assert err < 1e-12 and formula < 0, (alpha, beta, gamma, chain, formula)
        out[f"rel_err(a,b,g)=({alpha},{beta},{gamma})"] = err
    return report("dE_H/dt = -|dz/dt|^2 - sum g'(u)(du/dt)^2", **out)


def check_energy_monotone(d, m, samples, seed=0):
    """E_H never increases along torchdiffeq trajectories of Eq. 8-9 (from (x, 0) and from a random state)."""
    P, x, lam = random_problem(d, m, seed)
    f = VARSDynamics(P, x, lam)
    ts = torch.linspace(0, 20, samples, dtype=DTYPE)
    out = {}
    for name, s0 in (("from (x,0)", f.initial_state()), ("from random", _random_state(d, m, seed + 3))):
        z, u = odeint(f, s0, ts, rtol=1e-10, atol=1e-12)
        E = f.energy((z, u))
        rise = float(E.diff().max())
        assert rise < 1e-9 * float(E.abs().max()), (name, rise)
        out[f"max_step_{name}"] = rise
        out[f"drop_{name}"] = float(E[0] - E[-1])
    return report("E_H non-increasing along Eq. 8-9", **out)


def check_min_over_z(d, m, seed=0):
    """min_z E_H(z, a) is attained at z = (P a + x)/alpha and equals 0.5||P a - x||^2 + lam||a||_1 - ||x||^2
    for alpha = 1, beta = gamma = 2, theta = lam/2 (minus ||x||^2, not ||x||^2 / 2)."""
    P, x, lam = random_problem(d, m, seed)
    f = VARSDynamics(P, x, lam)
    _, u = _random_state(d, m, seed + 4)
    a = f.code(u)
    z_min = P @ a + x
    E_min = float(f.energy((z_min, u)))
    lasso = float(vars_ode.lasso_objective(P, a, x, lam))
    xx = float(x @ x)
    err = abs(E_min - (lasso - xx))
    g = torch.Generator().manual_seed(seed + 5)
    worse = min(float(f.energy((z_min + 0.1 * torch.randn(d, generator=g, dtype=DTYPE), u))) for _ in range(20))
    assert err < 1e-12 * max(1.0, xx) and worse > E_min
    return report("min_z E_H = LASSO - ||x||^2", err=err, err_if_half=abs(E_min - (lasso - xx / 2)),
                  nnz=int((a != 0).sum()))


def check_eq22_reduced(d, m, samples, seed=0):
    """Eq. 22 (the LASSO objective at g(u)) never increases along the reduced flow Eq. 20."""
    P, x, lam = random_problem(d, m, seed)
    f = ReducedVARSDynamics(P, x, lam)
    out = {}
    for name, u0 in (("from 0", f.initial_state()), ("from random", _random_state(d, m, seed + 6)[1])):
        u = odeint(f, u0, torch.linspace(0, 20, samples, dtype=DTYPE), rtol=1e-10, atol=1e-12)
        E = f.energy(u)
        rise = float(E.diff().max())
        assert rise < 1e-9 * float(E.abs().max()), (name, rise)
        out[f"max_step_{name}"] = rise
    return report("Eq. 22 non-increasing along Eq. 20", **out)


def check_eq22_not_lyapunov_for_coupled(d, m, seed=0):
    """Eq. 22 can rise along Eq. 8-9 when z is away from P g(u) + x, while E_H keeps falling:
    (i) a scalar example P = 1, x = 0, lam = 0.2, (z0, u0) = (5, 0); (ii) a random d x m instance."""
    P = torch.ones(1, 1, dtype=DTYPE)
    x = torch.zeros(1, dtype=DTYPE)
    f = VARSDynamics(P, x, 0.2)
    ts = torch.linspace(0, 3, 61, dtype=DTYPE)
    z, u = odeint(f, (_t(5.0), _t(0.0)), ts, rtol=1e-10, atol=1e-12)
    E22, EH = f.lasso_energy((z, u)), f.energy((z, u))
    rise_1d = float(E22.max() - E22[0])
    assert rise_1d > 0.1 and float(EH.diff().max()) < 1e-12, rise_1d
    P, x, lam = random_problem(d, m, seed)
    f = VARSDynamics(P, x, lam)
    z0 = x + 2.0 * torch.randn(d, generator=torch.Generator().manual_seed(seed + 7), dtype=DTYPE)
    z, u = odeint(f, (z0, torch.zeros(m, dtype=DTYPE)), torch.linspace(0, 10, 1001, dtype=DTYPE),
                  rtol=1e-10, atol=1e-12)
    E22, EH = f.lasso_energy((z, u)), f.energy((z, u))
    k = int(E22.diff().argmax())
    rise = float(E22.diff()[k])
    assert rise > 1e-3 and float(EH.diff().max()) < 1e-9 * float(EH.abs().max()), rise
    return report("Eq. 22 rises along Eq. 8-9", rise_scalar_example=rise_1d, rise_random=rise,
                  at_t=float(k * 0.01), EH_max_step=float(EH.diff().max()))


def check_jacobian(d, m, seed=0):
    """On the active set S the Jacobian of Eq. 8-9 is [[-I, P_S], [P_S^T, -2 P_S^T P_S]]: symmetric,
    negative semi-definite (Schur complement -P_S^T P_S), eigenvalues -(1 + 2 s^2 +- sqrt(1 + 4 s^4))/2
    for the singular values s of P_S, -1 (z off range(P_S)) and 0 (u in null(P_S)); inactive u_i add
    eigenvalue -2 (the full Jacobian is block triangular)."""
    P, x, lam = random_problem(d, m, seed)
    f = VARSDynamics(P, x, lam)
    z, u = _random_state(d, m, seed + 8)
    S = u.abs() > f.threshold
    J = jacobian(lambda zz, uu: torch.cat(f(0.0, (zz, uu))), (z, u))
    J = torch.cat(J, dim=1)                          # (d + m) x (d + m)
    idx = torch.cat([torch.arange(d), d + torch.nonzero(S).squeeze(1)])
    J_S = J[idx][:, idx]
    PS = P[:, S]
    expected = torch.block_diag(-torch.eye(d, dtype=DTYPE), -2 * PS.T @ PS)
    expected[:d, d:] = PS
    expected[d:, :d] = PS.T
    block_err = float((J_S - expected).abs().max())
    sym_err = float((J_S - J_S.T).abs().max())
    ev = torch.linalg.eigvalsh(J_S)
    s2 = torch.linalg.svdvals(PS) ** 2
    disc = torch.sqrt(1 + 4 * s2**2)
    r = len(s2)                                   # rank of P_S (generic: min(d, |S|))
    pred = torch.sort(torch.cat([-(1 + 2 * s2 + disc) / 2, -(1 + 2 * s2 - disc) / 2,
                                 -torch.ones(d - r, dtype=DTYPE),            # z orthogonal to range(P_S)
                                 torch.zeros(int(S.sum()) - r, dtype=DTYPE)])).values  # u in null(P_S)
    eig_err = float((ev - pred).abs().max())
    schur = -2 * PS.T @ PS - PS.T @ torch.linalg.solve(-torch.eye(d, dtype=DTYPE), PS)
    schur_err = float((schur + PS.T @ PS).abs().max())
    # inactive u_i: their columns vanish except the diagonal -2, so J is block triangular and its
    # spectrum is that of J_S plus -2 once per inactive atom
    off = d + torch.nonzero(~S).squeeze(1)
    cols = J[:, off]
    tri_err = float((cols + 2 * torch.eye(d + m, dtype=DTYPE)[:, off]).abs().max())
    assert block_err < 1e-12 and sym_err < 1e-12 and float(ev.max()) <= 1e-12
    assert eig_err < 1e-10 and schur_err < 1e-12 and tri_err < 1e-12
    L = float(torch.linalg.eigvalsh(P.T @ P)[-1])
    return report("active-set Jacobian", block_err=block_err, sym_err=sym_err, eig_formula_err=eig_err,
                  triangular_err=tri_err, max_eig=float(ev.max()), fastest_rate=float(-ev.min()), two_L=2 * L, active=int(S.sum()))


def check_stiffness_and_rescaling(d, m, seed=0):
    """Fastest rate ~ 2L: explicit Euler with dt = 0.5 diverges on the raw problem (L >> 1) and
    converges after P -> P/sqrt(L), x -> x/sqrt(L), lam -> lam/L, which keeps the minimiser; dopri5's
    evaluations over a fixed horizon grow with L on the raw problem and not on the rescaled one."""
    P0, x, lam0 = random_problem(d, m, seed)
    out = {}
    for c in (2.0, 4.0):
        P = c * P0
        lam = lam0 * c
        L = float(torch.linalg.eigvalsh(P.T @ P)[-1])
        ref = vars_ode.solve(P, x, lam, "fista", tol=1e-10, max_iter=100_000).code
        resc = vars_ode.solve(P / L**0.5, x / L**0.5, lam / L, "fista", tol=1e-12, max_iter=100_000).code
        same = float((ref - resc).abs().max())
        fastest = (1 + 2 + math.sqrt(5)) / 2          # s^2 = 1 after rescaling
        f_raw = VARSDynamics(P, x, lam)
        f_res = VARSDynamics(P / L**0.5, x / L**0.5, lam / L)
        ts = torch.arange(0, 41, dtype=DTYPE) * 0.5
        z_raw, _ = odeint(f_raw, f_raw.initial_state(), ts, method="euler", options={"step_size": 0.5})
        z_res, u_res = odeint(f_res, f_res.initial_state(), ts, method="euler", options={"step_size": 0.5})
        raw_blowup = float(z_raw[-1].abs().max())
        res_kkt = float(vars_ode.kkt_residual(P, f_res.code((z_res[-1], u_res[-1])), x, lam))
        res_kkt0 = float(vars_ode.kkt_residual(P, torch.zeros(m, dtype=DTYPE), x, lam))
        assert same < 1e-8 and 0.5 * fastest < 2           # Euler stable iff dt * rate < 2
        # measured: every rate of the rescaled system (all atoms active) is at most (3 + sqrt 5)/2
        u_all = torch.full((m,), 10.0, dtype=DTYPE)
        Jr = torch.cat(jacobian(lambda zz, uu: torch.cat(VARSDynamics(P / L**0.5, x / L**0.5, lam / L)(0.0, (zz, uu))),
                                (x / L**0.5, u_all)), dim=1)
        rates = -torch.linalg.eigvalsh(Jr)
        assert float(rates.max()) <= fastest + 1e-12 and float(rates.min()) >= -1e-12
        out[f"max_rate_rescaled(c={c})"] = float(rates.max())
        assert not (raw_blowup < 1e6) and res_kkt < res_kkt0, (raw_blowup, res_kkt, res_kkt0)
        nfe = {}
        for name, f in (("raw", f_raw), ("rescaled", f_res)):
            cf = Counted(f)
            odeint(cf, f.initial_state(), _t(0.0, 3.0), rtol=1e-6, atol=1e-8, method="dopri5")
            nfe[name] = cf.nfe
        out[f"L(c={c})"] = L
        out[f"euler_raw_max|z|(c={c})"] = raw_blowup
        out[f"dopri5_nfe_raw(c={c})"] = nfe["raw"]
        out[f"dopri5_nfe_rescaled(c={c})"] = nfe["rescaled"]
    assert out["dopri5_nfe_raw(c=4.0)"] > 1.4 * out["dopri5_nfe_raw(c=2.0)"]
    assert out["dopri5_nfe_rescaled(c=4.0)"] <= 1.2 * out["dopri5_nfe_rescaled(c=2.0)"]
    assert out["dopri5_nfe_raw(c=4.0)"] > 3 * out["dopri5_nfe_rescaled(c=4.0)"]
    return report("stiffness and rescaling by L", **out)


def check_implicit_step(d, m, seed=0):
    """One linearly implicit Euler step of the projected field rescaled by L, ``(I - h J) delta = h f``, reduced to
    ``(K_AA + (p L / q) I) du_A = (L / q) R_A`` on the active set and two products for the other rows (section 5),
    equals the dense ``2m x 2m`` solve for short and long steps; ``p, q > 0`` for the paper's parameters; and while
    the support does not change the step is exactly implicit Euler: ``y_new = y + h f(y_new)``."""
    al, be, ga = 1.0, 2.0, 2.0
    P, x, lam = random_problem(d, m, seed)
    K, b = P.T @ P, P.T @ x
    L = float(torch.linalg.eigvalsh(K)[-1])
    thr = lam / (L * al * be)
    I = torch.eye(m, dtype=DTYPE)

    def field(w, u):
        a = vars_ode.soft_threshold(u, thr)
        return -al * w + (K @ a + b) / L, -be * u - ga * (K @ a / L - a) + w

    g = torch.Generator().manual_seed(seed + 5)
    w0, u0 = torch.randn(m, generator=g, dtype=DTYPE), torch.randn(m, generator=g, dtype=DTYPE)
    # about half the atoms active, every |u_i| at least thr / 2 away from the kink
    A = torch.rand(m, generator=g, dtype=DTYPE) < 0.5
    u0 = torch.where(A, torch.sign(u0) * (1.5 * thr + 0.3 * u0.abs()), 0.5 * thr * torch.tanh(u0))
    out = {"active": int(A.sum())}
    for h in (0.01, 0.3, 3.0, 300.0):
        fW, fU = field(w0, u0)
        J = torch.cat([torch.cat(r, dim=1) for r in jacobian(lambda w, u: field(w, u), (w0, u0))], dim=0)
        dense = torch.linalg.solve(torch.eye(2 * m, dtype=DTYPE) - h * J, h * torch.cat([fW, fU]))
        c = h * h / (1 + h * al)
        p, q = 1 + h * (be - ga), h * ga - c
        R = h * fU + c * fW
        du = torch.zeros(m, dtype=DTYPE)
        du[A] = torch.linalg.solve(K[A][:, A] + (p * L / q) * torch.eye(int(A.sum()), dtype=DTYPE), (L / q) * R[A])
        KdA = K @ du / L
        du[~A] = (R[~A] - q * KdA[~A]) / (1 + h * be)
        dw = h * (fW + KdA) / (1 + h * al)
        err = float((torch.cat([dw, du]) - dense).abs().max() / dense.abs().max())
        assert p > 0 and q > 0 and err < 1e-11, (h, p, q, err)
        out[f"reduced_vs_dense(h={h:g})"] = err
        w1, u1 = w0 + dw, u0 + du
        if bool(((u1.abs() > thr) == A).all()):  # the support did not change: exact implicit Euler
            fW1, fU1 = field(w1, u1)
            exact = float(torch.cat([w1 - w0 - h * fW1, u1 - u0 - h * fU1]).abs().max())
            assert exact < 1e-12, (h, exact)
            out[f"implicit_euler_residual(h={h:g})"] = exact
    assert "implicit_euler_residual(h=0.01)" in out  # a short step keeps the support
    return report("linearly implicit Euler step on the support", **out)


def main(size: str = "small") -> dict:
    cfg = SIZES[size]
    d, m = cfg["d"], cfg["m"]
    print(f"theory/energy_and_stability.md checks (size={size}, d={d}, m={m}, float64)")
    out = {}
    out.update(check_energy_derivative(d, m))
    out.update(check_energy_monotone(d, m, cfg["samples"]))
    out.update(check_min_over_z(d, m))
    out.update(check_eq22_reduced(d, m, cfg["samples"]))
    out.update(check_eq22_not_lyapunov_for_coupled(d, m))
    out.update(check_jacobian(d, m))
    out.update(check_stiffness_and_rescaling(d, m))
    out.update(check_implicit_step(d, m))
    print("all energy and stability checks passed")
    return out


if __name__ == "__main__":
    cli(main, SIZES, __doc__)
