"""Offline demo: one LASSO solved by ISTA, FISTA, dopri5, implicit_euler and rkc (the coupled ODE of Eq. 8-9: explicit,
implicit, and explicit with Runge-Kutta-Chebyshev steps),
compared with each other and, when scikit-learn is installed, with its ``Lasso``.

Run ``python -m vars_ode --help`` for the options.
"""
from __future__ import annotations

import argparse
import time

import torch

from . import solve


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m vars_ode", description=__doc__)
    ap.add_argument("--d", type=int, default=64, help="signal dimension (rows of P)")
    ap.add_argument("--m", type=int, default=48, help="number of atoms (columns of P)")
    ap.add_argument("--lam", type=float, default=0.1, help="L1 weight (Eq. 10 convention)")
    ap.add_argument("--tol", type=float, default=1e-8, help="KKT residual to stop at")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--solvers", default="ista,fista,dopri5,implicit_euler,rkc", help="comma-separated names from vars_ode.SOLVERS")
    args = ap.parse_args(argv)

    g = torch.Generator().manual_seed(args.seed)
    P = torch.randn(args.d, args.m, generator=g, dtype=torch.float64) / args.d**0.5
    x = torch.randn(args.d, generator=g, dtype=torch.float64)
    print(f"LASSO 0.5||P u - x||^2 + {args.lam}||u||_1 with P {args.d}x{args.m} (float64), tol {args.tol:g}\n")
    codes = {}
    print(f"{'solver':<16}{'work':>10} {'unit':<22}{'KKT residual':>14}{'objective':>14}{'nnz':>6}{'seconds':>9}")
    for name in args.solvers.split(","):
        t0 = time.perf_counter()
        sol = solve(P, x, args.lam, name, tol=args.tol, max_iter=1_000_000)
        dt = time.perf_counter() - t0
        s = sol.stats
        codes[name] = sol.code
        print(f"{name:<16}{int(s.iterations):>10} {s.unit:<22}{float(s.residual):>14.2e}{float(s.objective):>14.8f}"
              f"{int(s.nnz):>6}{dt:>9.3f}")
    names = list(codes)
    print("\nlargest difference between codes:")
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            print(f"  {a} vs {b}: {(codes[a] - codes[b]).abs().max().item():.2e}")
    try:
        from sklearn.linear_model import Lasso
    except ImportError:
        return
    ref = Lasso(alpha=args.lam / args.d, fit_intercept=False, tol=1e-12, max_iter=1_000_000)
    ref = torch.from_numpy(ref.fit(P.numpy(), x.numpy()).coef_)
    for name in names:
        print(f"  {name} vs scikit-learn Lasso: {(codes[name] - ref).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
