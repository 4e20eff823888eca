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
# # 03 - Ablations: number of steps k and lam (paper Figure 6), at small scale
#
# The paper trains with k = 3 ISTA steps and `lam = 0.3`. Without training, we study the LASSO problem of a VARS-D-like head in isolation: N tokens, positive random features of random L2-normalised queries as the dictionary (atoms normalised over tokens), one problem per value channel. How far are k steps from the equilibrium, and how do sparsity and reconstruction move with `lam`?

# %% tags=["parameters"]
# Parameters: "small" runs in seconds (the test suite uses it); "large" for closer study.
SIZE = "small"

# %%
CFG = {"small": dict(N=64, h=16, m=32, C=16, steps=(0, 1, 2, 3, 5, 10, 30, 100, 300),
                     lams=(0.03, 0.3, 3.0)),
       "large": dict(N=196, h=64, m=128, C=64, steps=(0, 1, 2, 3, 5, 7, 10, 20, 50, 100, 300, 1000, 3000),
                     lams=(0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0))}
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

from _vars_d_head import ista_path, vars_d_problem  # notebooks/_vars_d_head.py


# %%
Phi, X = vars_d_problem(cfg["N"], cfg["h"], cfg["m"], cfg["C"])
K = Phi.T @ Phi
ev = torch.linalg.eigvalsh(K)
L = float(ev[-1])
print(f"K = Phi^T Phi: L = {L:.2f}, condition number {float(ev[-1] / ev[0]):.2e}")

def equilibrium(lam):
    sol = vars_ode.solve_gram(K, Phi.T @ X, lam, "fista", tol=1e-10, max_iter=200_000)
    return sol.code, sol.stats

def metrics(U, U_star, lam):
    Z, Z_star = Phi @ U + X, Phi @ U_star + X
    return dict(code_dist=float((U - U_star).norm() / U_star.norm().clamp_min(1e-300)),
                out_dist=float((Z - Z_star).norm() / Z_star.norm()),
                kkt=float(vars_ode.kkt_residual_gram(K, Phi.T @ X, U, lam).max()),
                nnz=float((U != 0).double().mean()),
                recon=float((Phi @ U - X).norm() / X.norm()))


# %% [markdown]
# ## Number of steps k (Figure 6, left)
#
# ISTA from the paper's initialisation `u = P^T x` (`init="encode"`) and from zero, at `lam = 0.3`.

# %%
LAM = 0.3
U_star, st = equilibrium(LAM)
print("equilibrium:", st.summary())
ks = cfg["steps"]
res = {}
for init in ("encode", "zeros"):
    path = ista_path(Phi, X, LAM, max(ks), init=init)
    res[init] = [metrics(path[k], U_star, LAM) for k in ks]
fig, ax = plt.subplots(1, 3, figsize=(15, 3.8))
for init, style in (("encode", "o-"), ("zeros", "s--")):
    kk = [max(k, 0.5) for k in ks]
    ax[0].loglog(kk, [r["code_dist"] for r in res[init]], style, label=f"init {init}")
    ax[1].loglog(kk, [r["out_dist"] for r in res[init]], style, label=f"init {init}")
    ax[2].semilogx(kk, [r["nnz"] for r in res[init]], style, label=f"init {init}")
ax[2].axhline(float((U_star != 0).double().mean()), color="k", ls=":", label="equilibrium")
for a, t in zip(ax, ("||U_k - U*|| / ||U*||", "||Z_k - Z*|| / ||Z*||", "fraction of non-zero codes")):
    a.axvline(3, color="grey", lw=0.5)
    a.set(xlabel="ISTA steps k (0 plotted at 0.5)", title=t)
    a.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# ### The same ablation on `vars_ode.VARSLayer`
#
# A randomly initialised dynamic-dictionary layer (VARS-D) on random tokens. One layer, its solver swapped with
# `layer.set_solver`: its output after k ISTA steps against its output at the equilibrium (FISTA to KKT 1e-8),
# and the sparsity and active-set size of its codes after each k (`vars_ode.plot.code_statistics` on
# `layer.last_stats`).

# %%
layer_ks = [k for k in ks if k >= 1]
tokens = torch.randn(2, cfg["N"], 4 * cfg["h"], generator=torch.Generator().manual_seed(5), dtype=DT)
torch.manual_seed(1)
layer = vars_ode.VARSLayer(4 * cfg["h"], 4, dictionary="d", lam=LAM, init="encode", dtype=DT)

def layer_out(solver, **kw):
    layer.set_solver(solver, **kw)
    with torch.no_grad():
        return layer(tokens), layer.last_stats

y_star, eq_stats = layer_out("fista", steps=None, tol=1e-8)
layer_runs = [layer_out("ista", steps=k) for k in layer_ks]
layer_dist = [float((y - y_star).norm() / y_star.norm()) for y, _ in layer_runs]
fig, ax = plt.subplots(1, 3, figsize=(16, 3.6))
ax[0].loglog(layer_ks, layer_dist, "o-")
ax[0].axvline(3, color="grey", lw=0.5)
ax[0].set(xlabel="steps k", ylabel="||y_k - y*|| / ||y*||", title="VARSLayer (dictionary 'd'): k steps vs equilibrium")
vp.code_statistics({"ista, k steps": [st for _, st in layer_runs]}, steps=layer_ks, ax=ax[1:])
for a in ax[1:]:
    a.set_xscale("log")
ax[1].axhline(float(eq_stats.sparsity), color="k", ls=":", label="equilibrium")
ax[2].axhline(float(eq_stats.nnz.double().mean()), color="k", ls=":", label="equilibrium")
for a in ax[1:]:
    a.legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Strength of the sparse constraint lam (Figure 6, right)
#
# At the equilibrium and after the paper's k = 3 steps.

# %%
lams = cfg["lams"]
at_eq, at_3 = [], []
for lam in lams:
    U_s, _ = equilibrium(lam)
    at_eq.append(metrics(U_s, U_s, lam))
    at_3.append(metrics(ista_path(Phi, X, lam, 3)[-1], U_s, lam))
fig, ax = plt.subplots(1, 3, figsize=(15, 3.8))
for rows_, name, style in ((at_eq, "equilibrium", "o-"), (at_3, "k = 3", "s--")):
    ax[0].semilogx(lams, [r["nnz"] for r in rows_], style, label=name)
    ax[1].semilogx(lams, [r["recon"] for r in rows_], style, label=name)
ax[2].loglog(lams, [r["out_dist"] for r in at_3], "s--", label="k = 3 vs equilibrium")
for a, t in zip(ax, ("fraction of non-zero codes", "||Phi U - X|| / ||X||", "output distance ||Z_3 - Z*|| / ||Z*||")):
    a.axvline(0.3, color="grey", lw=0.5)
    a.set(xlabel="lam", title=t)
    a.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Conclusions (computed)

# %%
enc = dict(zip(ks, res["encode"]))
zer = dict(zip(ks, res["zeros"]))
def steps_to(rows_, key, level):
    hit = [k for k, r in zip(ks, rows_) if r[key] <= level]
    return hit[0] if hit else f">{max(ks)}"
print(f"1. Dictionary: L = {L:.1f}, cond(K) = {float(ev[-1] / ev[0]):.1e} (positive random features are coherent).")
print(f"2. lam = {LAM}: after k = 3 steps from P^T x the code is {enc[3]['code_dist']:.2f} (relative) from U* and the "
      f"output {enc[3]['out_dist']:.3f} from Z*; from zero: {zer[3]['code_dist']:.2f} and {zer[3]['out_dist']:.3f}.")
print(f"3. Steps to get the code within 10% of U*: {steps_to(res['encode'], 'code_dist', 0.1)} (init P^T x), "
      f"{steps_to(res['zeros'], 'code_dist', 0.1)} (init 0); output within 1%: "
      f"{steps_to(res['encode'], 'out_dist', 0.01)} and {steps_to(res['zeros'], 'out_dist', 0.01)}.")
print(f"4. Non-zero fraction at k = 0, 3, {max(ks)} (init P^T x): {enc[0]['nnz']:.2f}, {enc[3]['nnz']:.2f}, "
      f"{enc[max(ks)]['nnz']:.2f}; at the equilibrium {float((U_star != 0).double().mean()):.2f}.")
print("5. Against lam " + str(list(lams)) + ": equilibrium non-zero fraction "
      + str([round(r['nnz'], 2) for r in at_eq]) + ", relative reconstruction error "
      + str([round(r['recon'], 3) for r in at_eq]) + "; after 3 steps: non-zero "
      + str([round(r['nnz'], 2) for r in at_3]) + ", output distance to the equilibrium "
      + str([round(r['out_dist'], 3) for r in at_3]) + ".")
ld = dict(zip(layer_ks, layer_dist))
print(f"6. vars_ode.VARSLayer (random weights, lam = {LAM}): output distance to its equilibrium after k = 1, 3, "
      f"{max(layer_ks)} steps: {ld[1]:.3f}, {ld[3]:.3f}, {ld[max(layer_ks)]:.3f}; sparsity of its code "
      f"{float(layer_runs[layer_ks.index(3)][1].sparsity):.2f} after 3 steps, {float(eq_stats.sparsity):.2f} at the equilibrium.")
