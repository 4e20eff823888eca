"""Executable checks for theory/derivation.md (Eq. 4 -> Eq. 10-11, ISTA as Euler, the errata).

Run ``python theory/check_derivation.py [--size small|full]``; every function asserts its claim
in float64 and prints the numbers it measured. ``main()`` returns them as a dict.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torchdiffeq import odeint

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vars_ode  # noqa: E402
from _common import DTYPE, Counted, cli, random_problem, report, sklearn_lasso  # noqa: E402
from vars_ode import ReducedVARSDynamics, VARSDynamics, lca_field, soft_threshold  # noqa: E402

SIZES = {"small": dict(d=20, m=30, horizon=100.0), "full": dict(d=40, m=60, horizon=200.0)}


def _t(*values):
    return torch.tensor(values, dtype=DTYPE)


# --- Section 1: Eq. 4 -> Eq. 5 -> Eq. 6-7 --------------------------------------------------------

def check_psd_factorisation(d, seed=0):
    """Every symmetric PSD A (d x d) is P P^T with P of width d' >= d (and vice versa)."""
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(d, d + 3, generator=g, dtype=DTYPE)
    A = M @ M.T                                        # symmetric PSD
    evals, V = torch.linalg.eigh(A)
    P = V * evals.clamp_min(0).sqrt()                  # d x d factor
    P_wide = torch.cat([P, torch.zeros(d, 5, dtype=DTYPE)], dim=1)   # any d' >= d works
    err = max(float((P @ P.T - A).abs().max()), float((P_wide @ P_wide.T - A).abs().max())) / float(A.abs().max())
    assert err < 1e-12, err
    assert float(torch.linalg.eigvalsh(P_wide @ P_wide.T)[0]) > -1e-9 * float(A.abs().max())
    return report("A = P P^T factorisation", rel_err=err)


def check_encoder_decoder(d, m, seed=0):
    """Eq. 6-7 has the equilibrium of Eq. 5: z* = (I - P P^T)^{-1} x, u* = P^T z*; both are stable
    exactly when sigma_max(P) < 1, the Jacobian [[-I, P], [P^T, -I]] having eigenvalues -1 +- sigma_i."""
    g = torch.Generator().manual_seed(seed)
    P = torch.randn(d, m, generator=g, dtype=DTYPE)
    P = 0.9 * P / torch.linalg.matrix_norm(P, ord=2)  # sigma_max = 0.9 < 1
    x = torch.randn(d, generator=g, dtype=DTYPE)
    z_star = torch.linalg.solve(torch.eye(d, dtype=DTYPE) - P @ P.T, x)

    def eq5(t, z):
        return -z + P @ (P.T @ z) + x

    def eq67(t, s):
        z, u = s
        return -z + P @ u + x, -u + P.T @ z

    ts = _t(0.0, 400.0)
    z5 = odeint(eq5, torch.zeros(d, dtype=DTYPE), ts, rtol=1e-11, atol=1e-13)[-1]
    z67, u67 = (s[-1] for s in odeint(eq67, (torch.zeros(d, dtype=DTYPE), torch.zeros(m, dtype=DTYPE)), ts,
                                      rtol=1e-11, atol=1e-13))
    e5 = float((z5 - z_star).abs().max())
    e67 = max(float((z67 - z_star).abs().max()), float((u67 - P.T @ z_star).abs().max()))
    assert e5 < 1e-7 and e67 < 1e-7, (e5, e67)
    J = torch.zeros(d + m, d + m, dtype=DTYPE)
    J[:d, :d], J[:d, d:], J[d:, :d], J[d:, d:] = -torch.eye(d), P, P.T, -torch.eye(m)
    ev = torch.linalg.eigvalsh(J)
    sig = torch.linalg.svdvals(P)
    predicted = torch.sort(torch.cat([-1 + sig, -1 - sig, -torch.ones(d + m - 2 * len(sig), dtype=DTYPE)])).values
    e_eig = float((ev - predicted).abs().max())
    assert e_eig < 1e-12 and float(ev.max()) < 0
    return report("Eq. 6-7 equilibrium = Eq. 5 equilibrium", err_eq5=e5, err_eq67=e67, eig_err=e_eig,
                  slowest_rate=float(-ev.max()))


# --- Section 2: Eq. 8-9 -> Eq. 10-11 ------------------------------------------------------------

def lasso_equilibrium(P, x, a, alpha=1.0, beta=2.0):
    """The (z*, u*) that the derivation predicts for a LASSO minimiser ``a``."""
    b, K = P.T @ x, P.T @ P
    return (P @ a + x) / alpha, a + (b - K @ a) / (alpha * beta)


def check_equilibrium_is_lasso(d, m, horizon, seed=0):
    """alpha = 1, beta = gamma = 2, g = S_{lam/2}: the field vanishes at (P a* + x, a* + P^T(x - P a*)/2)
    with a* the LASSO minimiser (scikit-learn), g(u*) = a*, and the flow from (x, 0) goes there (Eq. 10-11)."""
    P, x, lam = random_problem(d, m, seed)
    ref = sklearn_lasso(P, x, lam)
    f = VARSDynamics(P, x, lam)
    assert f.is_lasso_equivalent
    z_star, u_star = lasso_equilibrium(P, x, ref)
    dz, du = f(0.0, (z_star, u_star))
    field = max(float(dz.abs().max()), float(du.abs().max()))
    code_err = float((f.code((z_star, u_star)) - ref).abs().max())
    assert field < 1e-9 and code_err < 1e-12, (field, code_err)
    cf = Counted(f)
    z, u = (s[-1] for s in odeint(cf, f.initial_state(), _t(0.0, horizon), rtol=1e-10, atol=1e-12))
    flow_err = float((f.code((z, u)) - ref).abs().max())
    eq11_err = float((z - (P @ ref + x)).abs().max())
    assert flow_err < 1e-6 and eq11_err < 1e-6, (flow_err, eq11_err)
    return report("equilibrium of Eq. 8-9 = LASSO of Eq. 10, z* = P u* + x (Eq. 11)", field_at_pred=field,
                  code_vs_sklearn=flow_err, eq11_err=eq11_err, nfe=cf.nfe, nnz=int((ref != 0).sum()), m=m)


def check_general_condition(d, m, seed=0):
    """beta = gamma = 2/alpha with threshold w/(alpha beta) keeps the LASSO equilibrium for any alpha;
    breaking beta = gamma or gamma = 2/alpha leaves a fixed point that is not the LASSO minimiser."""
    P, x, lam = random_problem(d, m, seed)
    ref = sklearn_lasso(P, x, lam)
    out = {}
    for alpha in (0.5, 1.0, 2.0):
        beta = gamma = 2.0 / alpha
        f = VARSDynamics(P, x, lam, alpha, beta, gamma, threshold=lam / (alpha * beta))
        assert f.is_lasso_equivalent
        z_star, u_star = lasso_equilibrium(P, x, ref, alpha, beta)
        dz, du = f(0.0, (z_star, u_star))
        field = max(float(dz.abs().max()), float(du.abs().max()))
        assert field < 1e-9, (alpha, field)
        out[f"field_alpha={alpha}"] = field
    # Off the condition: the flow settles, but not at the LASSO minimiser.
    for alpha, beta, gamma in ((1.0, 2.0, 1.5), (1.0, 3.0, 3.0)):
        f = VARSDynamics(P, x, lam, alpha, beta, gamma)
        assert not f.is_lasso_equivalent
        z, u = (s[-1] for s in odeint(f, f.initial_state(), _t(0.0, 200.0), rtol=1e-9, atol=1e-11))
        dz, du = f(0.0, (z, u))
        settled = max(float(dz.abs().max()), float(du.abs().max()))
        kkt = float(vars_ode.kkt_residual(P, f.code((z, u)), x, lam))
        assert settled < 1e-6 and kkt > 1e-2, (alpha, beta, gamma, settled, kkt)
        out[f"kkt_at_fixed_point(a,b,g)=({alpha},{beta},{gamma})"] = kkt
    return report("beta = gamma = 2/alpha, theta = w/(alpha beta) is the LASSO condition", **out)


def check_unit_parameters_diverge(d, m, seed=0):
    """alpha = beta = gamma = 1: a fixed point needs u - g(u) = P^T x, whose left side is bounded by the
    threshold, so when ||P^T x||_inf > threshold there is no equilibrium and u grows linearly."""
    P, x, lam = random_problem(d, m, seed)
    f = VARSDynamics(P, x, lam, 1.0, 1.0, 1.0)
    b = P.T @ x
    assert float(b.abs().max()) > float(f.threshold)
    ts = _t(0.0, 20.0, 40.0, 60.0)
    _, u = odeint(f, f.initial_state(), ts, rtol=1e-9, atol=1e-11)
    norms = u.abs().amax(-1)
    inc = norms.diff()[1:]
    rel = float((inc[1] - inc[0]).abs() / inc[0])
    assert float(norms[-1]) > 10 * float(b.abs().max()) and rel < 1e-2, (norms, rel)
    return report("alpha = beta = gamma = 1 has no equilibrium (u diverges linearly)",
                  max_abs_u_t20=float(norms[1]), max_abs_u_t60=float(norms[3]), growth_rate=float(inc[0]) / 20,
                  increment_rel_diff=rel, b_inf=float(b.abs().max()), threshold=float(f.threshold))


# --- Section 3: ISTA is explicit Euler -----------------------------------------------------------

def check_ista_is_euler(d, m, seed=0, steps=6):
    """ISTA (Eq. 12) = Euler (step 1) of the LCA on the problem scaled by 1/L, and = Euler (step 1/2)
    of Eq. 20 on the problem scaled by 2/L; k Euler steps of torchdiffeq = k ISTA iterations."""
    P, x, lam = random_problem(d, m, seed)
    K, b = P.T @ P, P.T @ x
    L = float(torch.linalg.eigvalsh(K)[-1])
    g = torch.Generator().manual_seed(seed + 1)
    a = soft_threshold(torch.randn(m, generator=g, dtype=DTYPE), 0.5)
    ista = soft_threshold(a - (K @ a - b) / L, lam / L)
    # LCA: any u with g(u) = a; threshold lam / L on the problem scaled by 1/L
    u = a + torch.sign(a) * (lam / L)
    lca = soft_threshold(u + lca_field(K / L, b / L, u, lam / L), lam / L)
    e_lca = float((lca - ista).abs().max())
    # Eq. 20 with P -> sqrt(2/L) P, x -> sqrt(2/L) x, lam -> 2 lam / L (threshold lam / L)
    s = (2.0 / L) ** 0.5
    red = ReducedVARSDynamics(s * P, s * x, 2 * lam / L)
    u = a + torch.sign(a) * (lam / L)
    e20 = float((red.code(u + 0.5 * red(0.0, u)) - ista).abs().max())
    # k steps of torchdiffeq's Euler with step 1 on the LCA = k ISTA iterations from zero
    lca_f = lambda t, v: lca_field(K / L, b / L, v, lam / L)  # noqa: E731
    us = odeint(lca_f, torch.zeros(m, dtype=DTYPE), torch.arange(steps + 1, dtype=DTYPE), method="euler",
                options={"step_size": 1.0})
    ista_k = vars_ode.solve(P, x, lam, "ista", tol=0.0, max_iter=steps).code
    e_k = float((soft_threshold(us[-1], lam / L) - ista_k).abs().max())
    # the LCA's own equilibrium is the LASSO with weight theta
    ref = sklearn_lasso(P, x, lam)
    lca_eq = float(lca_field(K, b, ref + (b - K @ ref), lam).abs().max())
    assert max(e_lca, e20, e_k) < 1e-12 and lca_eq < 1e-9, (e_lca, e20, e_k, lca_eq)
    return report("ISTA = explicit Euler", lca_field_at_lasso=lca_eq, lca_step1_err=e_lca, eq20_step_half_err=e20,
                  euler_k_steps_vs_ista_err=e_k, L=L)


# --- Section 4: the errata and the library's convention ------------------------------------------

def check_conventions(d, m, seed=0):
    """eq10: weight lam, threshold lam/2 (main text). eq22: weight 2 lam, threshold lam (appendix);
    solve(lam, convention='eq22') = solve(2 lam) and matches scikit-learn with alpha = 2 lam / d."""
    P, x, lam = random_problem(d, m, seed, lam_ratio=0.15)
    assert vars_ode.penalty_weight(lam) == lam and vars_ode.penalty_weight(lam, "eq22") == 2 * lam
    f10, f22 = VARSDynamics(P, x, lam), VARSDynamics(P, x, lam, convention="eq22")
    assert abs(float(f10.threshold) - lam / 2) < 1e-15 and abs(float(f22.threshold) - lam) < 1e-15
    s22 = vars_ode.solve(P, x, lam, "fista", tol=1e-11, convention="eq22", max_iter=100_000)
    s10 = vars_ode.solve(P, x, 2 * lam, "fista", tol=1e-11, max_iter=100_000)
    ref = sklearn_lasso(P, x, 2 * lam)
    e_same = float((s22.code - s10.code).abs().max())
    e_ref = float((s22.code - ref).abs().max())
    z_star, u_star = lasso_equilibrium(P, x, ref)
    dz, du = f22(0.0, (z_star, u_star))
    field = max(float(dz.abs().max()), float(du.abs().max()))
    obj_gap = float(vars_ode.lasso_objective(P, ref, x, lam, convention="eq22")
                    - vars_ode.lasso_objective(P, ref, x, 2 * lam))
    assert e_same < 1e-12 and e_ref < 1e-8 and field < 1e-9 and abs(obj_gap) < 1e-12
    return report("conventions eq10 / eq22", eq22_vs_eq10_2lam=e_same, eq22_vs_sklearn=e_ref,
                  eq22_field_at_lasso=field)


def check_eq23(d, m, seed=0):
    """Along Eq. 20, dE/dt = -sum_{|u_i| > theta} (du_i/dt)^2 (Eq. 23 with the threshold theta in place
    of '1' and a minus sign on its last expression)."""
    P, x, lam = random_problem(d, m, seed)
    f = ReducedVARSDynamics(P, x, lam)
    theta = float(f.threshold)
    g = torch.Generator().manual_seed(seed + 2)
    u = 1.5 * torch.randn(m, generator=g, dtype=DTYPE)
    du = f(0.0, u)
    h = 1e-6
    dE = float((f.energy(u + h * du) - f.energy(u - h * du)) / (2 * h))   # central difference, no kink crossed
    right = -float((du[u.abs() > theta] ** 2).sum())
    literal_one = -float((du[u.abs() > 1.0] ** 2).sum())
    assert abs(dE - right) < 1e-6 * max(1.0, abs(right)), (dE, right)
    assert abs(dE - literal_one) > 1e-2 and dE < 0
    return report("Eq. 23 with threshold and minus sign", dE_dt=dE, formula_threshold=right,
                  formula_literal_one=literal_one, theta=theta)


def main(size: str = "small") -> dict:
    cfg = SIZES[size]
    d, m = cfg["d"], cfg["m"]
    print(f"theory/derivation.md checks (size={size}, d={d}, m={m}, float64)")
    out = {}
    out.update(check_psd_factorisation(d))
    out.update(check_encoder_decoder(d, m))
    out.update(check_equilibrium_is_lasso(d, m, cfg["horizon"]))
    out.update(check_general_condition(d, m))
    out.update(check_unit_parameters_diverge(d, m))
    out.update(check_ista_is_euler(d, m))
    out.update(check_conventions(d, m))
    out.update(check_eq23(d, m))
    print("all derivation checks passed")
    return out


if __name__ == "__main__":
    cli(main, SIZES, __doc__)
