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
# # 05 - Self-attention as the single-step special case
#
# One Euler step of Eq. 15 from `Z = X` with step 1 is `Phi Phi^T X + X` (Eq. 14, Performer-style self-attention; derivation in `theory/attention_and_dictionaries.md`). What changes between that single step and the VARS equilibrium as the number of steps grows and as `lam` varies: sparsity, reconstruction error, output distance? And what happens if one keeps integrating Eq. 15 itself, without inhibition?

# %% tags=["parameters"]
# Parameters: "small" runs in seconds (the test suite uses it); "large" for closer study.
SIZE = "small"

# %%
CFG = {"small": dict(N=64, h=16, m=32, C=16, steps=(0, 1, 2, 3, 5, 10, 30, 100, 300),
                     lams=(0.0, 0.1, 0.3, 1.0), eq_tol=1e-8, eq_iter=20_000),
       "large": dict(N=196, h=64, m=128, C=64, steps=(0, 1, 2, 3, 5, 10, 30, 100, 300, 1000, 3000),
                     lams=(0.0, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0), eq_tol=1e-10, eq_iter=300_000)}
import time
import warnings

warnings.filterwarnings("ignore", message="IProgress not found")   # tqdm.auto outside a widget frontend

import matplotlib.pyplot as plt
import numpy as np
import torch

import vars_ode

torch.set_num_threads(1)   # small problems: a second thread only adds synchronisation
DT = torch.float64
assert SIZE in CFG, f"SIZE must be one of {list(CFG)}"
cfg = CFG[SIZE]
print("SIZE =", SIZE, cfg)

from _vars_d_head import ista_path, vars_d_problem  # notebooks/_vars_d_head.py
from torchdiffeq import odeint

Phi, X = vars_d_problem(cfg["N"], cfg["h"], cfg["m"], cfg["C"])
K, B = Phi.T @ Phi, Phi.T @ X
L = float(torch.linalg.eigvalsh(K)[-1])
print(f"L = lambda_max(Phi^T Phi) = {L:.2f}")

# %% [markdown]
# ## One Euler step of Eq. 15 is Eq. 14

# %%
eq14 = Phi @ (Phi.T @ X) + X
eq15 = lambda t, Z: -Z + Phi @ (Phi.T @ Z) + X
Z1 = odeint(eq15, X.clone(), torch.tensor([0.0, 1.0], dtype=DT), method="euler", options={"step_size": 1.0})[-1]
euler_err = float((Z1 - eq14).abs().max())
vars0 = Phi @ ista_path(Phi, X, 0.0, 0)[0] + X          # VARS, zero iterations from u = Phi^T x, no threshold
vars0_err = float((vars0 - eq14).abs().max())
print(f"max |Euler step - Eq. 14| = {euler_err:.1e}; max |VARS(0 steps, lam = 0) - Eq. 14| = {vars0_err:.1e}")

# Keep integrating Eq. 15 (no inhibition): Euler steps of size 1, and the exact flow
ts = torch.arange(0, 11, dtype=DT)
Z_euler = odeint(eq15, X.clone(), ts, method="euler", options={"step_size": 1.0})
# the exact flow of the linear system dZ/dt = M Z + X (M = Phi Phi^T - I): exp(t [[M, X], [0, 0]]) [X; I]
N_, C_ = X.shape
aug = torch.zeros(N_ + C_, N_ + C_, dtype=DT)
aug[:N_, :N_], aug[:N_, N_:] = Phi @ Phi.T - torch.eye(N_, dtype=DT), X
start = torch.cat([X, torch.eye(C_, dtype=DT)])
Z_exact = torch.stack([(torch.linalg.matrix_exp(float(t) * aug) @ start)[:N_] for t in ts])
grow_euler = (Z_euler.flatten(1).norm(dim=1) / X.norm()).numpy()
grow_exact = (Z_exact.flatten(1).norm(dim=1) / X.norm()).numpy()
fig, ax = plt.subplots(figsize=(6, 3.5))
ax.semilogy(ts, grow_euler, "o-", label="Euler, step 1")
ax.semilogy(ts, grow_exact, "s--", label="exact flow")
ax.axvline(1, color="grey", lw=0.5)
ax.set(xlabel="t", ylabel="||Z(t)|| / ||X||", title=f"Eq. 15 beyond one step (lambda_max(Phi Phi^T) = {L:.1f})")
ax.legend()
plt.show()

# %% [markdown]
# ## From one step to the equilibrium
#
# ISTA (Eq. 12) from `u = Phi^T x` for every `lam`; step 0 with `lam = 0` is self-attention. Distances are relative to the Eq. 14 output and to the VARS equilibrium at the same `lam` (FISTA to KKT `cfg["eq_tol"]`).

# %%
ks, lams = cfg["steps"], cfg["lams"]
table = {}
for lam in lams:
    star = vars_ode.solve_gram(K, B, lam, "fista", tol=cfg["eq_tol"], max_iter=cfg["eq_iter"]).code
    Z_star = Phi @ star + X
    path = ista_path(Phi, X, lam, max(ks))
    table[lam] = dict(
        nnz=[float((path[k] != 0).double().mean()) for k in ks],
        recon=[float((Phi @ path[k] - X).norm() / X.norm()) for k in ks],
        from_sa=[float((Phi @ path[k] + X - eq14).norm() / eq14.norm()) for k in ks],
        to_eq=[float((Phi @ path[k] + X - Z_star).norm() / Z_star.norm()) for k in ks],
        eq_nnz=float((star != 0).double().mean()), eq_recon=float((Phi @ star - X).norm() / X.norm()),
        eq_from_sa=float((Z_star - eq14).norm() / eq14.norm()))
kk = [max(k, 0.5) for k in ks]
fig, ax = plt.subplots(1, 4, figsize=(18, 3.8))
for i, lam in enumerate(lams):
    r = table[lam]
    ax[0].semilogx(kk, r["nnz"], "o-", color=f"C{i}", label=f"lam {lam:g}")
    ax[1].semilogx(kk, r["recon"], "o-", color=f"C{i}", label=f"lam {lam:g}")
    ax[2].semilogx(kk, r["from_sa"], "o-", color=f"C{i}", label=f"lam {lam:g}")
    ax[3].loglog(kk, np.maximum(r["to_eq"], 1e-16), "o-", color=f"C{i}", label=f"lam {lam:g}")
for a, t in zip(ax, ("fraction of non-zero codes", "||Phi U_k - X|| / ||X||", "distance to self-attention output",
                     "distance to the VARS equilibrium")):
    a.set(xlabel="steps k (0 plotted at 0.5)", title=t)
    a.legend(fontsize=7)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Conclusions (computed)

# %%
i3 = list(ks).index(3)
print(f"1. One Euler step of Eq. 15 equals Eq. 14 to {euler_err:.1e}; VARS with 0 steps and lam = 0 equals it to {vars0_err:.1e}.")
print(f"2. Continuing Eq. 15 without inhibition: ||Z(10)|| / ||X|| = {grow_euler[-1]:.2e} (Euler) and {grow_exact[-1]:.2e} "
      f"(exact); lambda_max(Phi Phi^T) = {L:.2f} {'> 1: Eq. 15 has no stable equilibrium' if L > 1 else '< 1: Eq. 15 converges'}, "
      "so self-attention is meaningful only as a single step; the inhibition -gamma(K - I) of VARS is what makes more steps converge.")
for lam in lams:
    r = table[lam]
    print(f"3. lam = {lam:g}: non-zero fraction {r['nnz'][0]:.2f} (step 0) -> {r['nnz'][i3]:.2f} (step 3) -> {r['eq_nnz']:.2f} "
          f"(equilibrium); reconstruction error {r['recon'][0]:.3f} -> {r['recon'][i3]:.3f} -> {r['eq_recon']:.3f}; "
          f"distance of the output from self-attention {r['from_sa'][i3]:.3f} (step 3) and {r['eq_from_sa']:.3f} (equilibrium); "
          f"distance to the equilibrium at step 3: {r['to_eq'][i3]:.3f}.")
