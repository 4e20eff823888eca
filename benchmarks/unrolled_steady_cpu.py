"""Gradients through the steps of an adaptive integration to a steady state, against a step cap.

Two tables (CPU, float64):

* a convolutional VARS-SD layer (``VARSLayer(dim, heads)``, its default dictionary) with ``steps=None``,
  ``tol=1e-4`` and ``grad="unroll"``, stopped at each ``--max-iters``: the evaluations, the KKT residual reached and
  the largest entry of the input's gradient (of a fixed linear function of the output), with dopri5's step capped at
  each of ``--caps`` (``none``: no cap, the step at its own size) and with bosh3 uncapped;
* ``vo.solve`` on the Quick start's problem (P 64 x 48, ``--signals`` signals, lam 0.1) with ``P`` requiring a
  gradient, unrolled through dopri5's steps to each of ``--tols``: the evaluations and the relative largest
  difference between that gradient and the equilibrium's (``grad="implicit"``), with and without the default cap
  (``vars_ode.solvers.ode.UNROLLED_MAX_STEP``).

    python benchmarks/unrolled_steady_cpu.py [--max-iters 5000,10000] [--caps none,1.2,1.0] [--tols 1e-4,1e-6]

The full run took 13-17 minutes on two cores (a layer at 10,000 evaluations 1.5-2 minutes, at 20,000 about 4 alone).
"""
from __future__ import annotations

import argparse
import time

import torch

import vars_ode as vo
from vars_ode.solvers.ode import UNROLLED_MAX_STEP

NO_CAP = 1e9  # a cap no step reaches


def layer_row(dim, heads, tokens, method, cap, max_iter):
    """(evaluations, KKT residual, largest input gradient, seconds) of one differentiated steady state of a layer."""
    torch.manual_seed(0)
    x = torch.randn(2, tokens, dim, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(1)
    options = {"options": {"max_step": NO_CAP if cap is None else cap}}
    layer = vo.VARSLayer(dim, heads, solver=method, steps=None, tol=1e-4, grad="unroll", max_iter=max_iter,
                         solver_options=options).double()
    start = time.perf_counter()
    y = layer(x)
    weights = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)
    (g,) = torch.autograd.grad((y * weights).sum(), x)
    stats = layer.last_stats
    return (int(stats.iterations.max()), float(stats.residual.max()), float(g.abs().max()),
            time.perf_counter() - start)


def solve_row(signals, tol, cap):
    """(evaluations, relative distance of the unrolled gradient from the equilibrium's) on the Quick start's problem."""
    torch.manual_seed(0)
    P = torch.randn(64, 48, dtype=torch.float64) / 8
    x = torch.randn(100, 64, dtype=torch.float64)[:signals]
    w = torch.linspace(-1, 1, 48, dtype=torch.float64)
    grads, evaluations = {}, None
    for grad in ("unroll", "implicit"):
        Pg = P.clone().requires_grad_(True)
        options = {"max_step": cap} if grad == "unroll" and cap is not None else None
        sol = vo.solve(Pg, x, 0.1, "dopri5", tol=tol, grad=grad, options=options)
        (grads[grad],) = torch.autograd.grad((sol.code * w).sum(), Pg)
        if grad == "unroll":
            evaluations = int(sol.stats.iterations.max())
    distance = float((grads["unroll"] - grads["implicit"]).abs().max() / grads["implicit"].abs().max())
    return evaluations, distance


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dim", type=int, default=16)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=17, help="a square grid and one prefix token")
    ap.add_argument("--max-iters", default="5000,10000")
    ap.add_argument("--caps", default="none,1.2,1.0", help="dopri5's step caps for the layer ('none': no cap)")
    ap.add_argument("--signals", type=int, default=100)
    ap.add_argument("--tols", default="1e-4,1e-6")
    args = ap.parse_args(argv)
    caps = [None if c == "none" else float(c) for c in args.caps.split(",")]

    print(f"convolutional VARS-SD layer: dim {args.dim}, {args.heads} heads, {args.tokens} tokens, batch 2, float64, "
          f"steps=None, tol 1e-4, grad='unroll', {torch.get_num_threads()} threads\n")
    print("| method | step cap | max_iter | evaluations | KKT residual | input gradient, max | seconds |")
    print("|---|---|---|---|---|---|---|")
    for max_iter in (int(m) for m in args.max_iters.split(",")):
        for method, cap in [("dopri5", c) for c in caps] + [("bosh3", None)]:
            ev, res, g, sec = layer_row(args.dim, args.heads, args.tokens, method, cap, max_iter)
            print(f"| {method} | {'none' if cap is None else cap} | {max_iter} | {ev} | {res:.1e} | {g:.3g} | "
                  f"{sec:.0f} |", flush=True)

    default = UNROLLED_MAX_STEP.get("dopri5")
    print(f"\nvo.solve, P 64 x 48 (Quick start), {args.signals} signals, lam 0.1, dopri5 unrolled, against "
          f"grad='implicit'\n")
    print(f"| tol | default cap ({default}): evaluations | distance from the equilibrium's gradient | no cap: "
          "evaluations | distance |")
    print("|---|---|---|---|---|")
    for tol in (float(t) for t in args.tols.split(",")):
        capped = solve_row(args.signals, tol, None)
        free = solve_row(args.signals, tol, NO_CAP)
        print(f"| {tol:g} | {capped[0]} | {capped[1]:.1e} | {free[0]} | {free[1]:.1e} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
