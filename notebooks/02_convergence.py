# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 02 - Convergence of the solvers
#
# How fast does each solver drive the KKT residual of Eq. 10 down, counted in iterations or vector-field evaluations (one product with `K` each; an ADMM iteration is one product with the inverse of `K + rho I`, two near the tolerance and at the checks of the residual, with `K` too; an `implicit_euler` step is one Cholesky factorisation of the support of `K`; an `rkc` step of `s` stages is `s` evaluations) and in wall time, at several tolerances; and how do the costs move with `lam` and with the conditioning of `P`? ODE solvers integrate the coupled dynamics rescaled by `L` (one time unit ~ one ISTA step).

# %% tags=["parameters"]
# Parameters: "small" runs in seconds (the test suite uses it); "large" for closer study.
SIZE = "small"

# %%
CFG = {"small": dict(d=20, m=40, tols=(1e-2, 1e-4), max_work=10_000, sweep_tol=1e-3,
                     conds=(1, 30), ratios=(0.5, 2), lams=(0.1, 0.6)),
       "large": dict(d=100, m=200, tols=(1e-2, 1e-4, 1e-6, 1e-8), max_work=400_000, sweep_tol=1e-6,
                     conds=(1, 10, 100, 1000), ratios=(0.5, 1, 2, 4, 8), lams=(0.02, 0.05, 0.1, 0.2, 0.4, 0.8))}
import math
import time
import warnings

warnings.filterwarnings("ignore", message="IProgress not found")   # tqdm.auto outside a widget frontend

import matplotlib.pyplot as plt
import numpy as np
import torch

import vars_ode
import vars_ode.plot as vp

torch.set_num_threads(1)   # small problems: a second thread only adds synchronisation
DT = torch.float64
assert SIZE in CFG, f"SIZE must be one of {list(CFG)}"
cfg = CFG[SIZE]
print("SIZE =", SIZE, cfg)
SOLVERS = ["ista", "fista", "admm", "euler", "rk4", "dopri5", "implicit_euler", "rkc"]
# explicit ODE solvers check convergence between integration windows: short constant windows give a fine trace
# (implicit_euler and rkc check after every step)
ODE_OPTS = dict(window=2.0, max_window=2.0)

def run(P, x, lam, solver, tol, **kw):
    opts = ODE_OPTS if solver in vars_ode.ODE_SOLVERS and solver not in ("implicit_euler", "rkc") else {}
    trace = []
    t0 = time.perf_counter()
    sol = vars_ode.solve(P, x, lam, solver, tol=tol, max_iter=cfg["max_work"], trace=trace, **opts, **kw)
    return sol, trace, time.perf_counter() - t0

def problem(d, m, seed=0, lam_ratio=0.2, cond=None):
    g = torch.Generator().manual_seed(seed)
    P = torch.randn(d, m, generator=g, dtype=DT) / d**0.5
    if cond is not None:   # prescribe the singular values: geometric from 1 down to 1/cond
        U, _, Vh = torch.linalg.svd(P, full_matrices=False)
        P = U @ torch.diag(torch.logspace(0, -math.log10(cond), min(d, m), dtype=DT)) @ Vh
    x = torch.randn(d, generator=g, dtype=DT)
    return P, x, lam_ratio * float((P.T @ x).abs().max())

vars_ode.solve(*problem(8, 8), "ista", tol=1e-3)   # warm-up, so that timings do not include it

# %% [markdown]
# ## Residual against work and wall time
#
# One instance, every solver run to the tightest tolerance with `trace=[]` (pairs of work done and largest residual).

# %%
P, x, lam = problem(cfg["d"], cfg["m"])
tight = min(cfg["tols"])
traces, seconds, work = {}, {}, {}
for s in SOLVERS:
    sol, tr, sec = run(P, x, lam, s, tight)
    traces[s], seconds[s], work[s] = tr, sec, int(sol.stats.iterations)
fig, ax = plt.subplots(1, 2, figsize=(13, 4))
# vars_ode.plot.convergence: one line per solver; in seconds, each trace point gets the run's time in
# proportion to the work done (work is uniform in cost)
vp.convergence(traces, tols=cfg["tols"], ax=ax[0], title="against work")
vp.convergence({s: dict(trace=traces[s], seconds=seconds[s]) for s in SOLVERS}, x="seconds", tols=cfg["tols"],
               ax=ax[1], title="against wall time")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Work and time to reach each tolerance

# %%
rows = []
for tol in cfg["tols"]:
    for s in SOLVERS:
        sol, _, sec = run(P, x, lam, s, tol)
        rows.append(dict(tol=tol, solver=s, work=int(sol.stats.iterations), seconds=sec,
                         residual=float(sol.stats.residual), converged=bool(sol.stats.converged)))
print(f"{'tol':>8} {'solver':>14} {'work':>8} {'residual':>10} conv     (wall times: the right-hand figure)")
for r in rows:
    print(f"{r['tol']:8.0e} {r['solver']:>14} {r['work']:8d} {r['residual']:10.1e} {r['converged']}")
fig, ax = plt.subplots(1, 2, figsize=(12, 3.8))
for s in SOLVERS:
    rs = [r for r in rows if r["solver"] == s]
    ax[0].loglog([r["tol"] for r in rs], [r["work"] for r in rs], "o-", label=s)
    ax[1].loglog([r["tol"] for r in rs], [r["seconds"] for r in rs], "o-", label=s)
ax[0].set(xlabel="tolerance", ylabel="work", title="work to converge")
ax[1].set(xlabel="tolerance", ylabel="seconds", title="wall time to converge")
for a in ax:
    a.invert_xaxis()
    a.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Against lam, the number of atoms and the conditioning of P
#
# Tolerance `cfg["sweep_tol"]`; `cond` prescribes the singular values of `P` (geometric from 1 to 1/cond).

# %%
tol = cfg["sweep_tol"]
sweep_solvers = ["ista", "fista", "admm", "dopri5", "implicit_euler", "rkc"]
def sweep(problems):
    out = {s: [] for s in sweep_solvers}
    nnz = []
    for (Pk, xk, lk) in problems:
        for s in sweep_solvers:
            sol, _, _ = run(Pk, xk, lk, s, tol)
            out[s].append(int(sol.stats.iterations) if bool(sol.stats.converged) else np.nan)
        nnz.append(int(sol.stats.nnz))
    return out, nnz
by_lam, nnz_lam = sweep([problem(cfg["d"], cfg["m"], lam_ratio=r) for r in cfg["lams"]])
by_ratio, nnz_ratio = sweep([problem(cfg["d"], int(r * cfg["d"])) for r in cfg["ratios"]])
by_cond, nnz_cond = sweep([problem(cfg["d"], cfg["m"], cond=c) for c in cfg["conds"]])
fig, ax = plt.subplots(1, 3, figsize=(15, 3.8))
for s in sweep_solvers:
    ax[0].semilogy(cfg["lams"], by_lam[s], "o-", label=s)
    ax[1].semilogy(cfg["ratios"], by_ratio[s], "o-", label=s)
    ax[2].loglog(cfg["conds"], by_cond[s], "o-", label=s)
ax[0].set(xlabel="lam / ||P^T x||_inf", ylabel="work to tol", title="against lam")
ax[1].set(xlabel="m / d (atoms per dimension)", title="against overcompleteness")
ax[2].set(xlabel="condition number of P", title="against conditioning")
for a in ax:
    a.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# ## A dominant direction: ISTA's and FISTA's steps in a rank-one metric
#
# Atoms that share a direction (here positive entries: every atom leans towards the mean) make one eigenvalue of `K` stand far above the rest, and a step of `1 / L` is then as short as that one direction needs. To a tolerance, `ista`, `fista` and `active_set` step in the metric `H = lambda_2 I + (lambda_1 - lambda_2) v v^T >= K` wherever `lambda_1 >= 4 lambda_2` (`vars_ode.lasso.GramOperator.metric`; `metric="none"` keeps `1 / L`). The same minimiser; the work is what changes.

# %%
g = torch.Generator().manual_seed(1)
P_pos = torch.rand(cfg["d"], cfg["m"], generator=g, dtype=DT)
P_pos = P_pos / P_pos.norm(dim=0)
x_pos = P_pos @ (torch.rand(cfg["m"], generator=g, dtype=DT) * (torch.rand(cfg["m"], generator=g) < 0.2)) \
    + 0.1 * torch.randn(cfg["d"], generator=g, dtype=DT)
lam_pos = 0.2 * float((P_pos.T @ x_pos).abs().max())
ev_pos = torch.linalg.eigvalsh(P_pos.T @ P_pos)
print(f"positive atoms: lambda_1 {float(ev_pos[-1]):.2f}, lambda_2 {float(ev_pos[-2]):.2f}; "
      f"metric offered: {vars_ode.lasso.GramOperator(P_pos.T @ P_pos).metric() is not None}")
metric_traces, metric_work, metric_codes, metric_objective = {}, {}, {}, {}
for s in ("ista", "fista", "active_set"):
    for name, metric in ((f"{s}, metric", "auto"), (f"{s}, 1/L", "none")):
        sol, tr, _ = run(P_pos, x_pos, lam_pos, s, tight, metric=metric)
        metric_traces[name], metric_work[name], metric_codes[name] = tr, int(sol.stats.iterations), sol.code
        metric_objective[name] = float(sol.stats.objective)
fig, ax = plt.subplots(figsize=(7, 4))
vp.convergence(metric_traces, tols=cfg["tols"], ax=ax, title="positive atoms: the metric against 1 / L")
plt.tight_layout()
plt.show()
spread = max(float((c - metric_codes["fista, metric"]).abs().max()) for c in metric_codes.values())
obj_spread = (max(metric_objective.values()) - min(metric_objective.values())) / abs(metric_objective["fista, metric"])


# %% [markdown]
# ## Conclusions (computed)

# %%
def first_below(tr, t):
    hits = [w for w, r in tr if r <= t]
    return hits[0] if hits else None
print(f"1. To KKT residual {tight:g} on a {cfg['d']}x{cfg['m']} problem: " + ", ".join(
    f"{s} {work[s]} {vars_ode.SOLVERS[s].unit}" for s in SOLVERS) + ".")
print(f"2. FISTA needed {work['ista'] / max(work['fista'], 1):.1f}x fewer iterations than ISTA, ADMM "
      f"{work['fista'] / max(work['admm'], 1):.1f}x fewer than FISTA (one product with an m x m matrix each, "
      f"the inverse of K + rho I, formed once per rho; two near the tolerance, with K too); dopri5 spent {work['dopri5'] / max(work['ista'], 1):.1f} "
      f"evaluations per ISTA iteration; implicit_euler, whose step is not bound by the stiffness, took "
      f"{work['implicit_euler']} steps, and rkc, whose steps grow with their stages, "
      f"{work['rkc'] / max(work['ista'], 1):.1f} evaluations per ISTA iteration.")
loose = max(cfg["tols"])
print(f"3. Per tolerance (work): " + "; ".join(
    f"tol {t:g}: " + ", ".join(f"{r['solver']} {r['work']}" for r in rows if r["tol"] == t) for t in cfg["tols"]))
print(f"4. Work to KKT {tol:g} against lam ratios {list(cfg['lams'])}: nnz {nnz_lam}; ista work {by_lam['ista']}, fista {by_lam['fista']}, "
      f"admm {by_lam['admm']}, dopri5 {by_lam['dopri5']}, implicit_euler {by_lam['implicit_euler']}, rkc {by_lam['rkc']}.")
print(f"5. Against m/d {list(cfg['ratios'])}: ista work {by_ratio['ista']}, fista {by_ratio['fista']}, admm {by_ratio['admm']}, "
      f"dopri5 {by_ratio['dopri5']}, implicit_euler {by_ratio['implicit_euler']}, rkc {by_ratio['rkc']}.")
print(f"6. Against cond(P) {list(cfg['conds'])}: ista work {by_cond['ista']}, fista {by_cond['fista']}, "
      f"admm {by_cond['admm']}, dopri5 {by_cond['dopri5']}, implicit_euler {by_cond['implicit_euler']}, rkc {by_cond['rkc']} "
      f"(nan: not converged within {cfg['max_work']}).")
print(f"7. On positive atoms (lambda_1 / lambda_2 = {float(ev_pos[-1] / ev_pos[-2]):.0f}), to KKT {tight:g}: " + ", ".join(
    f"{s} {metric_work[s + ', metric']} iterations in the metric against {metric_work[s + ', 1/L']} with 1 / L"
    for s in ("ista", "fista", "active_set")) + f"; the six objectives agree to {obj_spread:.0e} (relative), the "
    f"codes to {spread:.0e} (the objective is nearly flat near the minimiser: a KKT residual of {tight:g} fixes "
    f"it far more tightly than the code).")

# %% [markdown]
# Wall times (they change from run to run and from machine to machine):

# %% tags=["volatile"]
print("Seconds to KKT residual", tight, "-", ", ".join(f"{s} {seconds[s]:.3f}" for s in SOLVERS))
print("Fastest in wall time:", min(SOLVERS, key=lambda s: seconds[s]))
