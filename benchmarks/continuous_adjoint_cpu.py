"""How far torchdiffeq's continuous adjoint is from the gradient of the computed trajectory over a horizon, and how far
its backward pass misses the start (what ``vars_ode.solvers.ode.ADJOINT_MISS`` refuses).

The continuous adjoint (``grad="adjoint"`` with ``integrator="torchdiffeq"``, or a method without a native integration
such as the Adams family) integrates the state back from ``t_end`` to 0 in its backward pass; the field contracts
forwards, so that integration expands. For each method and horizon this prints the miss (the state integrated back to
0, against the start, over the state's largest entry) and the gradient's distance from the unrolled one (the exact
gradient of the forward trajectory, which both share), relative to the unrolled one's largest entry. The gradient is
taken with the refusal switched off (``ode.ADJOINT_MISS = inf``), so that every row has one.

The problem: ``P`` 16 x 10 of Gaussian entries over 4, 3 Gaussian signals, ``lam`` 0.1, float64, seed ``--seed``; the
loss ``sum_i i sin(u_i)``.

    python benchmarks/continuous_adjoint_cpu.py [--methods dopri5,rk4,bosh3,explicit_adams] [--horizons 2,3,4,5,6,8]

About 20 s on two cores with the defaults.
"""
from __future__ import annotations

import argparse
import math

import torch

import vars_ode as vo
from vars_ode.solvers import native, ode


def gradients(P, X, method, T, grad):
    Pg = P.clone().requires_grad_(True)
    integrator = "torchdiffeq" if grad == "adjoint" and method in native.NATIVE_METHODS else "auto"
    sol = vo.solve(Pg, X, 0.1, method, grad=grad, tol=0.0, t_end=T, integrator=integrator)
    loss = (sol.code.sin() * torch.arange(P.shape[1], dtype=P.dtype)).sum()
    return torch.autograd.grad(loss, Pg)[0]


def miss(P, X, method, T):
    """The refusal's own measure, read from its message (None where it passes)."""
    try:
        gradients(P, X, method, T, "adjoint")
    except ValueError as e:
        text = str(e)
        if "misses the start by" not in text:
            raise
        return float(text.split("misses the start by ")[1].split(" ")[0])
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", default="dopri5,rk4,bosh3,explicit_adams")
    ap.add_argument("--horizons", default="2,3,4,5,6,8")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    g = torch.Generator().manual_seed(a.seed)
    P = torch.randn(16, 10, generator=g, dtype=torch.float64) / 4
    X = torch.randn(3, 16, generator=g, dtype=torch.float64)
    print(f"| method | t_end | miss (times the state's largest entry) | refused (ADJOINT_MISS {ode.ADJOINT_MISS:g}) | "
          "gradient from the unrolled one (relative) |")
    print("|---|---|---|---|---|")
    for method in a.methods.split(","):
        for T in (float(t) for t in a.horizons.split(",")):
            saved = ode.ADJOINT_MISS
            ode.ADJOINT_MISS = 0.0  # every miss is reported (by the refusal's message)
            try:
                m = miss(P, X, method, T)
            finally:
                ode.ADJOINT_MISS = saved
            ode.ADJOINT_MISS = math.inf
            try:
                adj = gradients(P, X, method, T, "adjoint")
            finally:
                ode.ADJOINT_MISS = saved
            ref = gradients(P, X, method, T, "unroll")
            err = float((adj - ref).abs().max() / ref.abs().max())
            refused = "yes" if m is not None and m > saved else "no"
            print(f"| {method} | {T:g} | {m or 0.0:.3g} | {refused} | {err:.3g} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
