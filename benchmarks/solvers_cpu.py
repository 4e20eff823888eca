"""Work, time and host reads for every solver to reach a KKT residual (CPU, float64).

    python benchmarks/solvers_cpu.py [--d 64 --m 48 --lam 0.1 --tols 1e-4,1e-6 --problems 1 --atoms gaussian]
                                     [--max-iter 1000000] [--threads N]

ISTA / FISTA / active_set count iterations (one product with K each); ODE solvers count
evaluations of the coupled field (Eq. 8-9, one product with K each), so the columns compare.
``name@integrator`` picks the ODE integrator (``torchdiffeq`` or ``native``, see
vars_ode.solvers.native); a bare ODE name uses the default (``auto``); ``name:metric=none`` takes ista's, fista's
or active_set's scalar steps ``1 / L`` where ``K`` offers a rank-one step metric (``--atoms positive``: entries
uniform in [0, 1), unit columns, a dominant mean direction; ``gaussian``, the default, offers none).
``--problems k`` solves k problems sharing P at once (work is the largest over them). Host reads are the points
where the host waits for a tensor's value (a device synchronisation on a GPU), counted by vars_ode.sync in a
second, untimed run. Times are relative to FISTA's at the same tolerance, measured in this run.
"""
from __future__ import annotations

import argparse
import time
import warnings

import torch
from sklearn.linear_model import Lasso

import vars_ode as vo
from vars_ode.sync import count_host_syncs

DEFAULT = ("ista,fista,active_set,euler,midpoint,rk4,rk4@torchdiffeq,bosh3,bosh3@native,dopri5,dopri5@native,dopri8,"
           "adaptive_heun,fehlberg2,implicit_adams,scipy_solver")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--m", type=int, default=48)
    ap.add_argument("--lam", type=float, default=0.1)
    ap.add_argument("--tols", default="1e-4,1e-6")
    ap.add_argument("--solvers", default=DEFAULT)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--problems", type=int, default=1, help="problems sharing P, solved at once")
    ap.add_argument("--atoms", choices=("gaussian", "positive"), default="gaussian",
                    help="positive: entries uniform in [0, 1), unit columns")
    ap.add_argument("--max-iter", type=int, default=1_000_000,
                    help="each solver's budget (iterations, evaluations, steps, sweeps); a row whose KKT residual "
                         "is above tol ran out of it")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads for the run (default: torch's own, the cores)")
    args = ap.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"--threads must be a positive integer, got {args.threads}")
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(args.seed)
    if args.atoms == "gaussian":
        P = torch.randn(args.d, args.m, generator=g, dtype=torch.float64) / args.d**0.5
    else:
        P = torch.rand(args.d, args.m, generator=g, dtype=torch.float64)
        P = P / P.norm(dim=0)
    x = torch.randn(args.problems, args.d, generator=g, dtype=torch.float64)
    ref = torch.stack([torch.from_numpy(Lasso(alpha=args.lam / args.d, fit_intercept=False, tol=1e-14, max_iter=10**6)
                                        .fit(P.numpy(), xi.numpy()).coef_) for xi in x])
    K = P.T @ P
    ev = torch.linalg.eigvalsh(K)
    print(f"P {args.d}x{args.m} {args.atoms} (seed {args.seed}), {args.problems} problem(s), lam {args.lam}, "
          f"L {ev[-1]:.2f}, second eigenvalue {ev[-2]:.2f}, condition number of K {ev[-1] / ev[0]:.1f}, float64, "
          f"{torch.get_num_threads()} threads\n")
    print("| tol | solver | work | unit | KKT residual | max abs diff from scikit-learn | host reads | seconds | time / FISTA |")
    print("|---|---|---|---|---|---|---|---|---|")
    for tol in (float(t) for t in args.tols.split(",")):
        rows = []
        for spec in args.solvers.split(","):
            name, _, metric = spec.partition(":metric=")
            name, _, integrator = name.partition("@")
            kw = dict(integrator=integrator) if integrator else {}
            if metric:
                kw["metric"] = metric
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                t0 = time.perf_counter()
                sol = vo.solve(P, x, args.lam, name, tol=tol, max_iter=args.max_iter, **kw)
                dt = time.perf_counter() - t0
                with count_host_syncs() as syncs:
                    vo.solve(P, x, args.lam, name, tol=tol, max_iter=args.max_iter, **kw)
            rows.append((spec, sol, dt, syncs.count))
        t_fista = next(dt for n, _, dt, _ in rows if n == "fista")
        for spec, sol, dt, reads in rows:
            s = sol.stats
            print(f"| {tol:g} | {spec} | {int(s.iterations.max())} | {s.unit} | {float(s.residual.max()):.1e} | "
                  f"{(sol.code - ref).abs().max().item():.1e} | {reads} | {dt:.3f} | {dt / t_fista:.1f}x |")


if __name__ == "__main__":
    main()
