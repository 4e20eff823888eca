"""Fixed-seed outputs and gradients of every solver x dictionary x gradient mode, in float64.

``python tests/reference_cases.py`` writes ``tests/data/solver_reference.npz`` (plain arrays, loaded with
``allow_pickle=False``); ``tests/test_reference.py`` recomputes every case and compares. A refactor of the
solver stack keeps these to 1e-6 unless a change is intended, and then the case says so (``CHANGED``).
"""
from __future__ import annotations

import os
import sys

import numpy as np
import torch

import vars_ode as vo

PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "solver_reference.npz")

CORE_SOLVERS = ("ista", "fista", "active_set", "euler", "rk4", "dopri5", "bosh3")
LAYER_SOLVERS = ("ista", "fista", "euler", "rk4", "dopri5")
DICTS = ("d", "sd", "s", "sd-dense", "s-dense")


def _core_problem():
    g = torch.Generator().manual_seed(0)
    P = torch.randn(12, 8, generator=g, dtype=torch.float64) / 3
    x = torch.randn(5, 12, generator=g, dtype=torch.float64)
    R = torch.randn(5, 12, generator=g, dtype=torch.float64)
    return P, x, R


def core_case(solver, grad, budget):
    """``vo.solve`` on a 12 x 8 dictionary and 5 signals; returns code, output, dP, dx."""
    P, x, R = _core_problem()
    P.requires_grad_(True)
    x.requires_grad_(True)
    kw = dict(tol=1e-8 if solver in vo.ODE_SOLVERS else 1e-10, max_iter=50_000 if solver in vo.ODE_SOLVERS else 5000) if budget == "tol" else dict(tol=0.0)
    if budget == "steps":
        if solver in vo.ODE_SOLVERS:
            kw.update(t_end=3.0, max_iter=10_000)
            if solver in ("euler", "rk4"):
                kw["options"] = {"step_size": 0.25}
        else:
            kw["max_iter"] = 3
    sol = vo.solve(P, x, 0.1, solver, grad=grad, **kw)
    loss = (sol.output * R).sum()
    dP, dx = torch.autograd.grad(loss, (P, x))
    return {"code": sol.code, "output": sol.output, "dP": dP, "dx": dx}


def core_cases():
    out = {}
    for s in CORE_SOLVERS:
        is_ode = s in vo.ODE_SOLVERS
        for budget in ("steps", "tol"):
            grads = ("unroll",) if budget == "steps" else ("unroll", "implicit")
            if is_ode and budget == "steps":
                grads = ("unroll", "adjoint")
            if s == "active_set" and budget == "steps":
                continue
            for grad in grads:
                if is_ode and budget == "tol" and grad == "unroll":
                    continue  # unrolled through thousands of evaluations: covered by implicit at the same point
                out[f"core/{s}/{budget}/{grad}"] = (core_case, (s, grad, budget))
    return out


def _layer(dname, dtype=torch.float64):
    kind, _, static = dname.partition("-")
    torch.manual_seed(0)
    kw = dict(dictionary=kind, qkv_bias=True, dtype=dtype, image_size=3, rand_feat_dim_ratio=2, lam=0.1)
    if static:
        kw.update(static=static, num_static_atoms=3)
    else:
        kw.update(kernel_size=3, atoms_per_channel=2)
    return vo.VARSLayer(8, 2, **kw)


def layer_case(dname, solver, grad, budget):
    """A float64 VARSLayer(8, 2) on 2 images of 1 + 3 x 3 tokens; returns output, dx and every parameter's gradient."""
    layer = _layer(dname)
    if budget == "steps":
        opts = {"options": {"step_size": 0.25}} if solver in ("euler", "rk4") else {}
        if solver == "dopri5":
            opts = {"rtol": 1e-6, "atol": 1e-8} if grad == "unroll" else {"rtol": 1e-4, "atol": 1e-6}
        layer.set_solver(solver, steps=3 if solver in ("ista", "fista") else 3.0, grad=grad, solver_options=opts)
    else:
        layer.set_solver(solver, steps=None, tol=1e-9, grad=grad)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 10, 8, generator=g, dtype=torch.float64, requires_grad=True)
    R = torch.randn(2, 10, 8, generator=g, dtype=torch.float64)
    y = layer(x)
    names = [n for n, p in layer.named_parameters() if p.requires_grad]
    params = [p for n, p in layer.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad((y * R).sum(), [x, *params], allow_unused=True)
    out = {"output": y, "dx": grads[0]}
    for n, gp in zip(names, grads[1:]):
        if gp is not None:
            out["d." + n] = gp
    return out


def layer_cases():
    out = {}
    for d in DICTS:
        gram_form = d == "d" or d.endswith("dense")
        for s in LAYER_SOLVERS:
            is_ode = s in vo.ODE_SOLVERS
            for grad in ("unroll", "adjoint") if is_ode else ("unroll",):
                if grad == "adjoint" and s != "dopri5":
                    continue
                out[f"layer/{d}/{s}/steps/{grad}"] = (layer_case, (d, s, grad, "steps"))
        out[f"layer/{d}/fista/tol/unroll"] = (layer_case, (d, "fista", "unroll", "tol"))
        if gram_form:
            out[f"layer/{d}/fista/tol/implicit"] = (layer_case, (d, "fista", "implicit", "tol"))
    return out


def all_cases():
    return {**core_cases(), **layer_cases()}


def compute(name, case):
    fn, args = case
    return {f"{name}:{k}": v.detach().numpy() for k, v in fn(*args).items()}


def main(argv=None):
    torch.set_num_threads(1)
    arrays = {}
    for name, case in all_cases().items():
        arrays.update(compute(name, case))
        print(name, file=sys.stderr)
    os.makedirs(os.path.dirname(PATH), exist_ok=True)
    np.savez_compressed(PATH, **arrays)
    print(f"{len(arrays)} arrays -> {PATH}")


if __name__ == "__main__":
    main()
