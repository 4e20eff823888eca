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
# # 01 - Equilibrium of the VARS dynamics
#
# Does the coupled network of Eq. 8-9 (`vars_ode.VARSDynamics`, integrated with torchdiffeq) settle at the LASSO minimiser of Eq. 10, with `z* = P u* + x` (Eq. 11)? What does its flow look like with two atoms, and which energies decrease along it? Derivations: `theory/derivation.md`, `theory/energy_and_stability.md`.

# %% tags=["parameters"]
# Parameters: "small" runs in seconds (the test suite uses it); "large" for closer study.
SIZE = "small"

# %%
CFG = {"small": dict(d=20, m=30, T=80.0, samples=201, rtol=1e-8, energy_samples=201),
       "large": dict(d=60, m=90, T=300.0, samples=1001, rtol=1e-10, energy_samples=1001)}
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
from sklearn.linear_model import Lasso
from torchdiffeq import odeint

# %% [markdown]
# ## Trajectories of z and u reach the LASSO solution
#
# A random instance, `lam = 0.3 ||P^T x||_inf`; reference: scikit-learn's `Lasso(alpha=lam/d, fit_intercept=False)`, which minimises `||x - P u||^2/(2d) + alpha ||u||_1`.

# %%
d, m = cfg["d"], cfg["m"]
g = torch.Generator().manual_seed(0)
P = torch.randn(d, m, generator=g, dtype=DT) / d**0.5
x = torch.randn(d, generator=g, dtype=DT)
lam = 0.3 * float((P.T @ x).abs().max())
ref = torch.from_numpy(Lasso(alpha=lam / d, fit_intercept=False, tol=1e-14, max_iter=10**6)
                       .fit(P.numpy(), x.numpy()).coef_)

f = vars_ode.VARSDynamics(P, x, lam)
ts = torch.linspace(0, cfg["T"], cfg["samples"], dtype=DT)
z, u = odeint(f, f.initial_state(), ts, rtol=cfg["rtol"], atol=cfg["rtol"] * 1e-2)
codes = f.code((z, u))
code_err = (codes - ref).abs().amax(-1)
eq11_err = (z - (P @ ref + x)).abs().amax(-1)
kkt = vars_ode.kkt_residual(P, codes, x, lam)

active = torch.nonzero(ref).squeeze(1)[:4]
fig, ax = plt.subplots(1, 3, figsize=(15, 3.6))
for i in range(4):
    ax[0].plot(ts, z[:, i], color=f"C{i}")
    ax[0].axhline(float((P @ ref + x)[i]), color=f"C{i}", ls=":")
ax[0].set(title="z_i(t) (dotted: (P u* + x)_i, Eq. 11)", xlabel="t")
for j, i in enumerate(active.tolist() + [int(torch.nonzero(ref == 0)[0])]):
    ax[1].plot(ts, u[:, i], color=f"C{j}", label=f"u_{i}" + (" (inactive)" if ref[i] == 0 else ""))
ax[1].axhspan(-lam / 2, lam / 2, color="grey", alpha=0.2, label="|u| <= lam/2: g(u) = 0")
ax[1].set(title="u_i(t)", xlabel="t")
ax[1].legend(fontsize=7)
ax[2].semilogy(ts, code_err, label="max |g(u(t)) - u*_sklearn|")
ax[2].semilogy(ts, eq11_err, label="max |z(t) - (P u* + x)|")
ax[2].semilogy(ts, kkt, label="KKT residual of g(u(t))")
ax[2].set(title="distance to the LASSO equilibrium", xlabel="t")
ax[2].legend(fontsize=7)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Phase portrait with two atoms
#
# With `m = 2` the reduced dynamics (Eq. 20, `vars_ode.ReducedVARSDynamics`) is a planar field, drawn by
# `vars_ode.plot.phase_portrait`: the grey bands mark `|u_i| <= lam/2`, where atom `i` is off; contours are
# Eq. 22 at `g(u)`; the red set is where `g(u)` equals the LASSO minimiser. Solid lines follow Eq. 20, dashed
# ones Eq. 8-9 projected on `u`; the ISTA and FISTA iterates are lifted into the plane by `u = a + (lam/2) sign(a)`.
# Notebook 06 varies alpha, beta and gamma.

# %%
g2 = torch.Generator().manual_seed(3)
P2 = torch.randn(3, 2, generator=g2, dtype=DT)
x2 = torch.randn(3, generator=g2, dtype=DT)
lam2 = 0.4 * float((P2.T @ x2).abs().max())
f2 = vars_ode.ReducedVARSDynamics(P2, x2, lam2)
ref2 = torch.from_numpy(Lasso(alpha=lam2 / 3, fit_intercept=False, tol=1e-14, max_iter=10**6)
                        .fit(P2.numpy(), x2.numpy()).coef_)
u_star2 = ref2 + (P2.T @ x2 - P2.T @ P2 @ ref2) / 2        # the equilibrium predicted in theory/derivation.md
fig, ax = vp.phase_portrait(P2, x2, lam2, solvers=("ista", "fista"), steps=8, t_max=15.0)
plt.show()
ends2 = ax.vars_data["equilibria"]["reduced"]
phase_err = float((f2.code(ends2) - ref2).abs().max())
phase_field = float(f2(0.0, u_star2).abs().max())

# %% [markdown]
# ## Energies
#
# Eq. 22 (the LASSO objective at `g(u)`) along the reduced flow; the coupled Lyapunov energy `E_H`
# (`VARSDynamics.energy`) along Eq. 8-9; and both along Eq. 8-9 started with `z` away from `P g(u) + x`,
# where Eq. 22 can rise (`vars_ode.plot.energy`; the labels give each curve's largest rise).

# %%
fr = vars_ode.ReducedVARSDynamics(P, x, lam)
te = torch.linspace(0, 20, cfg["energy_samples"], dtype=DT)
opts = dict(rtol=cfg["rtol"], atol=cfg["rtol"] * 1e-2)
ur = odeint(fr, fr.initial_state(), te, **opts)
zc, uc = odeint(f, f.initial_state(), te, **opts)
z0 = x + 2.0 * torch.randn(d, generator=torch.Generator().manual_seed(7), dtype=DT)
zb, ub = odeint(f, (z0, torch.zeros(m, dtype=DT)), te, **opts)
lasso_min = float(vars_ode.lasso_objective(P, ref, x, lam))

fig, ax = plt.subplots(1, 3, figsize=(16, 3.8))
vp.energy(fr, ur, te, minimum=lasso_min, ax=ax[0], title="reduced flow (Eq. 20) from u = 0")
vp.energy(f, (zc, uc), te, minimum=lasso_min, ax=ax[1], title="coupled flow (Eq. 8-9) from (x, 0)")
vp.energy(f, (zb, ub), te, ax=ax[2], title="Eq. 8-9 from z0 = x + 2 xi: Eq. 22 rises")
plt.tight_layout()
plt.show()
E22_reduced, EH = fr.energy(ur), f.energy((zc, uc))
E22_coupled, EH_b = f.lasso_energy((zb, ub)), f.energy((zb, ub))

# %% [markdown]
# ## Conclusions (computed)

# %%
print(f"1. From (x, 0), Eq. 8-9 reached the scikit-learn LASSO solution to {float(code_err[-1]):.1e} "
      f"(KKT residual {float(kkt[-1]):.1e}) and z* = P u* + x to {float(eq11_err[-1]):.1e} by t = {cfg['T']:g} "
      f"(dopri5, rtol {cfg['rtol']:g}); the code was within 1e-3 of it from t = "
      f"{float(ts[int(torch.nonzero(code_err < 1e-3)[0])]):.1f} on.")
print(f"2. Two atoms: the {len(ends2)} trajectories of Eq. 20 end within {phase_err:.1e} from the LASSO minimiser; the field at the predicted "
      f"u* = a* + P^T(x - P a*)/2 is {phase_field:.1e}.")
print(f"3. Largest increase of Eq. 22 along the reduced flow: {float(E22_reduced.diff().max()):.1e}; of E_H along "
      f"Eq. 8-9: {float(EH.diff().max()):.1e} (both non-increasing up to integration error).")
print(f"4. Along Eq. 8-9 started off the z-equilibrium, Eq. 22 rose by {float(E22_coupled.diff().max()):.3f} between "
      f"two samples (total rise {float(E22_coupled.max() - E22_coupled[0]):.3f}), while E_H's largest step was "
      f"{float(EH_b.diff().max()):.1e}: Eq. 22 is not a Lyapunov function of the coupled system; E_H is.")
