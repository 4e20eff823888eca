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
# # 06 - The attractor in two dimensions
#
# With two atoms the state `u` of the encoding neurons lives in a plane, and everything about the VARS
# dynamics can be seen at once (`vars_ode.plot.phase_portrait`). Four questions:
#
# 1. Under which leaks and inhibition `alpha, beta, gamma` is the equilibrium the LASSO minimiser, and where
#    does it go otherwise?
# 2. Why is the raw flow stiff, and what does rescaling the problem by its Lipschitz constant `L` change?
# 3. What do the level sets of the coupled Lyapunov energy `E_H` look like, and how does a trajectory of
#    Eq. 8-9 cross them?
# 4. Does the flow end at the same point from every initial code (the basin of the attractor)?

# %% tags=["parameters"]
# Parameters: "small" runs in seconds (the test suite uses it); "large" for closer study.
SIZE = "small"

# %%
CFG = {"small": dict(grid=21, t_max=15.0, basin=9, scales=(1.0, 3.0)),
       "large": dict(grid=41, t_max=40.0, basin=25, scales=(1.0, 2.0, 4.0, 8.0))}
import math
import warnings

warnings.filterwarnings("ignore", message="IProgress not found")   # tqdm.auto outside a widget frontend

import matplotlib.pyplot as plt
import numpy as np
import torch
from torchdiffeq import odeint

import vars_ode
import vars_ode.plot as vp

torch.set_num_threads(1)   # small problems: a second thread only adds synchronisation
DT = torch.float64
assert SIZE in CFG, f"SIZE must be one of {list(CFG)}"
cfg = CFG[SIZE]
print("SIZE =", SIZE, cfg)

g = torch.Generator().manual_seed(3)
P = torch.randn(3, 2, generator=g, dtype=DT)
x = torch.randn(3, generator=g, dtype=DT)
lam = 0.4 * float((P.T @ x).abs().max())
theta = lam / 2                                      # the threshold of g, half the L1 weight (Eq. 8-9)
lasso = vars_ode.solve(P, x, lam, "fista", tol=1e-12, max_iter=100_000).code
L = float(torch.linalg.eigvalsh(P.T @ P)[-1])
print(f"P: 3x2, L = {L:.3f}, lam = {lam:.3f}, LASSO minimiser {lasso.tolist()}")

# %% [markdown]
# ## 1. alpha, beta, gamma: where the equilibrium stays the LASSO
#
# The equilibrium is the LASSO minimiser when `beta = gamma = 2 / alpha` and the threshold is `w / (alpha beta)`
# (`VARSDynamics.is_lasso_equivalent`; the threshold stays `lam / 2` here). The paper's `(1, 2, 2)` and
# `(2, 1, 1)` keep it; `(1, 1, 1)` and `(1, 2, 1)` do not. The red set is `{u : g(u) = LASSO minimiser}`; white
# dots are where the trajectories end.

# %% tags=["figure:phase_portraits"]
SETTINGS = [(1.0, 2.0, 2.0), (2.0, 1.0, 1.0), (1.0, 1.0, 1.0), (1.0, 2.0, 1.0)]
starts = torch.tensor([[-1.0, 0.9], [1.0, -0.9], [0.9, 1.0]], dtype=DT)
fig, axs = plt.subplots(1, 4, figsize=(21, 5.4))
ends = {}
for (a, b, c), ax in zip(SETTINGS, axs):
    vp.phase_portrait(P, x, lam, alpha=a, beta=b, gamma=c, solvers=(), flows=("reduced",), starts=starts,
                      t_max=cfg["t_max"], grid=cfg["grid"], lim=1.1, legend=ax is axs[0], ax=ax)
    equivalent = vars_ode.ReducedVARSDynamics(P, x, lam, a, b, c).is_lasso_equivalent
    ax.set_title(f"alpha {a:g}, beta {b:g}, gamma {c:g}: " + ("LASSO" if equivalent else "not the LASSO"))
    ends[(a, b, c)] = (equivalent, ax.vars_data["equilibria"]["reduced"])
plt.tight_layout()
plt.show()
for key, (equivalent, e) in ends.items():
    code = vars_ode.soft_threshold(e, theta)
    print(f"alpha, beta, gamma = {key}: lasso-equivalent {equivalent}; g(end) = {code[0].numpy().round(4).tolist()}, "
          f"distance to the LASSO minimiser {float((code - lasso).abs().max()):.1e}; "
          f"spread of the ends {float((e - e[0]).abs().max()):.1e}")

# %% [markdown]
# ## 2. Stiffness, and the rescaling by L
#
# On the active set `S` the coupled Jacobian of Eq. 8-9 is `[[-I, P_S], [P_S^T, -2 P_S^T P_S]]` (paper's
# `alpha, beta, gamma`). Scale the dictionary by `s` (and `lam` by `s`, so that the minimiser is `a* / s`):
# the coupling rates grow like `s^2 L` but the leak of `z` stays 1, so the ratio of the fastest to the
# slowest rate (the stiffness an explicit solver pays for) grows with `L`. Rescaling
# `P -> P / sqrt(L)`, `x -> x / sqrt(L)`, `lam -> lam / L` (what `vars_ode.solve` integrates) leaves the
# minimiser unchanged and bounds the spectrum whatever the scale. Below: the rates, and the dopri5
# evaluations (rtol 1e-6) until the code is within 1e-4 of the minimiser, raw and rescaled.

# %%
class Counted(torch.nn.Module):
    """A vector field that counts its evaluations."""
    def __init__(self, f):
        super().__init__()
        self.f, self.nfe = f, 0

    def forward(self, t, state):
        self.nfe += 1
        return self.f(t, state)


def rates(Pk, active):
    PS = Pk[:, active]
    d = Pk.shape[0]
    J = torch.cat([torch.cat([-torch.eye(d, dtype=DT), PS], 1), torch.cat([PS.T, -2 * PS.T @ PS], 1)])
    r = -torch.linalg.eigvalsh(J)
    return float(r.max()), float(r.min())


def dopri5_to(Pk, xk, lamk, target, t_max=80.0, rtol=1e-6):
    """Error curve on [0, t_max], first time within 1e-4, and the evaluations needed to get there."""
    f = vars_ode.VARSDynamics(Pk, xk, lamk)
    ts = torch.linspace(0, t_max, 400, dtype=DT)
    z, u = odeint(f, f.initial_state(), ts, rtol=rtol, atol=rtol * 1e-2)
    err = (f.code((z, u)) - target).abs().amax(-1)
    hit = float(ts[torch.nonzero(err < 1e-4)[0]])
    counted = Counted(f)
    odeint(counted, f.initial_state(), torch.tensor([0.0, hit], dtype=DT), rtol=rtol, atol=rtol * 1e-2)
    return ts, err, hit, counted.nfe


rows, curves = [], {}
for s in cfg["scales"]:
    Ps, lams = s * P, s * lam
    Ls = float(torch.linalg.eigvalsh(Ps.T @ Ps)[-1])
    target = vars_ode.solve(Ps, x, lams, "fista", tol=1e-12, max_iter=100_000).code
    active = target != 0
    ts_raw, err_raw, t_raw, nfe_raw = dopri5_to(Ps, x, lams, target)
    Pr, xr, lamr = Ps / Ls**0.5, x / Ls**0.5, lams / Ls
    ts_r, err_r, t_r, nfe_r = dopri5_to(Pr, xr, lamr, target)
    rows.append(dict(s=s, L=Ls, raw=rates(Ps, active), resc=rates(Pr, active), t_raw=t_raw, nfe_raw=nfe_raw,
                     t_resc=t_r, nfe_resc=nfe_r))
    curves[s] = (ts_raw, err_raw, ts_r, err_r)
fig, ax = plt.subplots(1, 2, figsize=(13, 3.8))
for i, (s, (tr, er, tq, eq)) in enumerate(curves.items()):
    ax[0].semilogy(tr, er.clamp_min(1e-16), color=f"C{i}", label=f"P scaled by {s:g} (L = {rows[i]['L']:.1f})")
    ax[1].semilogy(tq, eq.clamp_min(1e-16), color=f"C{i}", label=f"P scaled by {s:g}, then by 1/sqrt(L)")
ax[0].set(xlabel="t", ylabel="max |g(u(t)) - a*|", title="raw flow", xlim=(0, 20))
ax[1].set(xlabel="t (rescaled: one unit ~ one ISTA step)", ylabel="max |g(u(t)) - a*|", title="rescaled flow")
for a in ax:
    a.axhline(1e-4, color="grey", lw=0.5, ls=":")
    a.legend(fontsize=8)
plt.tight_layout()
plt.show()
print(f"{'scale':>5} {'L':>8} | {'raw: rates':>16} {'t to 1e-4':>9} {'evals':>6} | {'rescaled: rates':>16} {'t to 1e-4':>9} {'evals':>6}")
for r in rows:
    print(f"{r['s']:5g} {r['L']:8.2f} | {r['raw'][0]:7.2f} .. {r['raw'][1]:5.3f} {r['t_raw']:9.2f} {r['nfe_raw']:6d} | "
          f"{r['resc'][0]:7.2f} .. {r['resc'][1]:5.3f} {r['t_resc']:9.2f} {r['nfe_resc']:6d}")

# %% [markdown]
# ## 3. Level sets of the coupled energy
#
# `E_H(z, u)` (`VARSDynamics.energy`) is the Lyapunov function of Eq. 8-9. In the `u` plane, with `z` held at
# its starting value `x` (left) and at its equilibrium `z* = P a* + x` (right; there the level sets are those
# of Eq. 22 shifted by `||x||^2`). A trajectory of the coupled flow from `(x, u0)` crosses the left-hand level
# sets while `z` moves, and settles on the right-hand minimum.

# %%
f = vars_ode.VARSDynamics(P, x, lam)
lim = 1.1
grid = torch.linspace(-lim, lim, 4 * cfg["grid"], dtype=DT)
U1, U2 = torch.meshgrid(grid, grid, indexing="xy")
UU = torch.stack([U1, U2], -1)
z_star = P @ lasso + x
u0 = torch.tensor([-1.0, 0.9], dtype=DT)
ts = torch.linspace(0, cfg["t_max"], 300, dtype=DT)
zt, ut = odeint(f, (x.clone(), u0), ts, rtol=1e-8, atol=1e-10)
EH = f.energy((zt, ut))
fig, ax = plt.subplots(1, 3, figsize=(17, 4.8))
for a, zz, name in ((ax[0], x, "z = x (start)"), (ax[1], z_star, "z = z* (equilibrium)")):
    E = f.energy((zz.expand(*UU.shape[:-1], 3), UU))
    cs = a.contourf(U1.numpy(), U2.numpy(), E.numpy(), levels=25, cmap="viridis")
    fig.colorbar(cs, ax=a, fraction=0.046)
    a.plot(ut[:, 0], ut[:, 1], "w-", lw=1.5, label="u(t) of Eq. 8-9")
    a.plot(*ut[-1].tolist(), "wo", mec="k")
    a.axvspan(-theta, theta, color="white", alpha=0.12)
    a.axhspan(-theta, theta, color="white", alpha=0.12)
    a.set(xlabel="u_1", ylabel="u_2", title=f"E_H(z, u), {name}", aspect="equal")
    a.legend(fontsize=8, loc="lower left")
vp.energy(f, (zt, ut), ts, ax=ax[2], title="along the trajectory")
plt.tight_layout()
plt.show()
E_on_traj_x = f.energy((x.expand(len(ts), 3), ut))   # E_H with z frozen at x, along u(t)
print(f"E_H along Eq. 8-9: largest rise {float(EH.diff().max()):.1e} (non-increasing); E_H(x, u(t)) with z frozen "
      f"rises by {float(E_on_traj_x.diff().max()):.3f}: the decrease needs z to move with u.")

# %% [markdown]
# ## 4. The basin: initial codes on a grid
#
# The reduced flow from a grid of initial `u`, for this problem (convex, unique minimiser) and for a
# dictionary with two identical atoms, where the LASSO minimisers form a segment (`a_1 + a_2` is fixed, the
# split is not): there the end point depends on the start. Colour: `g(u)_1` at the end.

# %%
nb_ = cfg["basin"]
side = torch.linspace(-1.0, 1.0, nb_, dtype=DT)
S1, S2 = torch.meshgrid(side, side, indexing="xy")
U0 = torch.stack([S1, S2], -1).reshape(-1, 2)
P_dup = torch.stack([P[:, 1], P[:, 1]], 1)   # the active atom, twice
basin = {}
for name, Pb in (("distinct atoms", P), ("two identical atoms", P_dup)):
    fr = vars_ode.ReducedVARSDynamics(Pb, x, lam)
    end = odeint(fr, U0.clone(), torch.tensor([0.0, 3 * cfg["t_max"]], dtype=DT), rtol=1e-8, atol=1e-10)[-1]
    basin[name] = fr.code(end)
fig, ax = plt.subplots(1, 2, figsize=(11, 4.6))
for a, (name, code) in zip(ax, basin.items()):
    sc = a.scatter(U0[:, 0], U0[:, 1], c=code[:, 0].numpy(), cmap="coolwarm", s=60, edgecolors="k", linewidths=0.3)
    fig.colorbar(sc, ax=a, fraction=0.046, label="g(u_end)_1")
    a.set(xlabel="u_1(0)", ylabel="u_2(0)", title=name, aspect="equal")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Conclusions (computed)

# %%
for key, (equivalent, e) in ends.items():
    code = vars_ode.soft_threshold(e, theta)
    dist = float((code - lasso).abs().max())
    print(f"1. alpha, beta, gamma = {tuple(round(v, 3) for v in key)}: "
          + (f"the flow ends at the LASSO minimiser (to {dist:.0e}) from all {len(e)} starts" if dist < 1e-4 else
             f"the flow ends {dist:.3f} away from the LASSO minimiser at t = {cfg['t_max']:g}, the {len(e)} ends "
             f"{'agree' if float((e - e[0]).abs().max()) < 1e-4 else 'still spread (no equilibrium: u drifts without bound)'}")
          + f"; equivalence predicted: {equivalent}.")
r0, r1 = rows[0], rows[-1]
print(f"2. Scaling P by {r1['s']:g} multiplies L by {r1['L'] / r0['L']:.0f} and the stiffness ratio of the raw flow "
      f"(fastest / slowest rate) from {r0['raw'][0] / r0['raw'][1]:.1f} to {r1['raw'][0] / r1['raw'][1]:.1f}; dopri5 "
      f"needed {r0['nfe_raw']} then {r1['nfe_raw']} evaluations to reach 1e-4. Rescaled by L the ratio is "
      f"{r0['resc'][0] / r0['resc'][1]:.1f} then {r1['resc'][0] / r1['resc'][1]:.1f}, and dopri5 needed "
      f"{r0['nfe_resc']} then {r1['nfe_resc']} evaluations.")
print(f"3. E_H never rose along Eq. 8-9 (largest step {float(EH.diff().max()):.1e}); with z frozen at x it would "
      f"have risen by {float(E_on_traj_x.diff().max()):.3f}.")
for name, code in basin.items():
    spread = float((code - code.mean(0)).abs().max())
    print(f"4. {name}: the ends of {len(code)} starts spread by {spread:.1e}"
          + (f"; a_1 + a_2 = {float(code.sum(1).mean()):.4f} for all (max deviation "
             f"{float((code.sum(1) - code.sum(1).mean()).abs().max()):.0e}, the integration's tolerance)" if name.startswith("two") else "") + ".")
