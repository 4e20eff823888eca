"""Batched LASSO on the CPU against a loop over scikit-learn's Lasso, measured in one process.

    python benchmarks/lasso_cpu.py [--problems 300 --d 196 --m 128 --lam 0.1 --repeats 3] [--per-problem]
        [--lipschitz eigvalsh|power|official] [--atoms gaussian|positive] [--dtype float64|float32]

``--per-problem``: every problem has its own dictionary (``P`` of shape ``(problems, d, m)``, the layer's case:
one dictionary per image and head); scikit-learn then fits each pair in turn. ``--lipschitz``: how ``vo.solve``
computes ``L`` (its default ``eigvalsh``; ``power`` is 50 power-iteration steps, a lower bound, cheaper for many
dictionaries). ``--atoms positive``: entries uniform in [0, 1), unit columns (one dominant direction, where ista,
fista and active_set step in a rank-one metric, ``vars_ode.lasso.GramOperator.metric``); the table then has rows
with the scalar steps (``metric none``) beside them. ``--dtype float32``: ``vo.solve`` in float32, to a tolerance of
1e-5 instead of 1e-9 (scikit-learn in float64 as always).

Every solver's answer is compared with scikit-learn's (solved to tol 1e-12) before any timing
is trusted; the table prints seconds, the speed-up over the scikit-learn loop and the largest
difference from its codes.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from sklearn.linear_model import Lasso

import vars_ode as vo


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", type=int, default=300)
    ap.add_argument("--d", type=int, default=196)
    ap.add_argument("--m", type=int, default=128)
    ap.add_argument("--lam", type=float, default=0.1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--per-problem", action="store_true", help="one dictionary per problem")
    ap.add_argument("--lipschitz", default="eigvalsh", choices=["eigvalsh", "power", "official"],
                    help="how vo.solve computes L")
    ap.add_argument("--atoms", choices=("gaussian", "positive"), default="gaussian")
    ap.add_argument("--dtype", choices=("float64", "float32"), default="float64",
                    help="vo.solve's precision (float32: tolerance 1e-5; scikit-learn stays in float64)")
    args = ap.parse_args(argv)
    g = torch.Generator().manual_seed(args.seed)
    shape = (args.problems, args.d, args.m) if args.per_problem else (args.d, args.m)
    if args.atoms == "gaussian":
        P = torch.randn(*shape, generator=g, dtype=torch.float64) / args.d**0.5
    else:
        P = torch.rand(*shape, generator=g, dtype=torch.float64)
        P = P / P.norm(dim=-2, keepdim=True)
    X = torch.randn(args.problems, args.d, generator=g, dtype=torch.float64)
    Pn, Xn = P.numpy(), X.numpy()

    def sklearn_loop(tol):
        model = Lasso(alpha=args.lam / args.d, fit_intercept=False, tol=tol, max_iter=100_000)
        if args.per_problem:
            return np.stack([model.fit(Pi, xi).coef_.copy() for Pi, xi in zip(Pn, Xn)])
        return np.stack([model.fit(Pn, xi).coef_.copy() for xi in Xn])

    def best_of(fn):
        times, out = [], None
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t0)
        return min(times), out

    ref = torch.from_numpy(sklearn_loop(1e-12))
    dtype = getattr(torch, args.dtype)
    P, X = P.to(dtype), X.to(dtype)  # vo.solve's inputs; scikit-learn keeps the float64 arrays
    tight = 1e-9 if dtype == torch.float64 else 1e-5
    rows = []
    t_base, base = best_of(lambda: sklearn_loop(1e-8))
    rows.append(("scikit-learn Lasso loop (tol 1e-8)", t_base, (torch.from_numpy(base) - ref).abs().max().item(), "-"))
    # check_every None: the solver's default ("auto" for ista / fista)
    runs = [("fista", tight, None), ("fista", tight, 10), ("fista", tight, 1), ("active_set", tight, None),
            ("cd", tight, None), ("admm", tight, None), ("ista", tight, None), ("ista", tight, 1)]
    if args.atoms == "positive":
        runs = [r for s in ("fista", "active_set", "ista") for r in ((s, tight, None), (s, tight, "none"))] + [
            ("cd", tight, None), ("admm", tight, None)]
    for solver, tol, every in runs:
        kw = {} if every is None else {"metric": every} if every == "none" else {"check_every": every}
        t, sol = best_of(lambda: vo.solve(P, X, args.lam, solver, tol=tol, max_iter=200_000,
                                          lipschitz=args.lipschitz, **kw))
        err = (sol.code.double() - ref).abs().max().item()
        default = {"active_set": "", "cd": ""}.get(solver, ", default check_every 'auto'")
        extra = default if every is None else ", metric none" if every == "none" else f", check_every {every}"
        label = f"vars_ode {solver} (tol {tol:g}" + extra + ")"
        rows.append((label, t, err, f"{int(sol.stats.iterations.max())}"))
    print(f"{args.problems} LASSO problems, P {args.d}x{args.m} {args.atoms}"
          + (" per problem" if args.per_problem else "") + f", lam {args.lam}, {args.dtype}, L by {args.lipschitz}, "
          f"{torch.get_num_threads()} threads, best of {args.repeats}\n")
    print("| solver | seconds | speed-up vs scikit-learn loop | max abs diff from scikit-learn (tol 1e-12) | max iterations |")
    print("|---|---|---|---|---|")
    for name, t, err, it in rows:
        print(f"| {name} | {t:.3f} | {t_base / t:.2f}x | {err:.1e} | {it} |")


if __name__ == "__main__":
    main()
