"""Steady states in float32: how many problems each native adaptive method brings below ``tol`` within its budget, and
in how many evaluations, at its default ``rtol`` and at the ``rtol`` given by ``--rtols``.

The dictionaries are the thirty-fourth session's five (benchmarks/RESULTS.md): Gaussian 30 x 20 (entries over
``sqrt(d)``), the Quick start's 64 x 48 (over 8), underdetermined 20 x 40, positive 64 x 48 (uniform entries, unit
columns) and unnormalised 40 x 30 (standard normal entries), and the forty-seventh session's 24 x 32 (over
``sqrt(24)``); ``--seeds`` draws of each, ``--signals`` Gaussian signals per draw, ``lam`` 0.1. Each is solved in
float32 with ``vo.solve(P, X, 0.1, method, tol=tol, rtol=r, max_iter=--max-iter)``; ``default`` is ``rtol=None``.
Prints one row per (method, tol, rtol): problems converged of all and per dictionary (in the order above), the
evaluations summed over the draws where every row of that (method, tol) converged all problems, and the time.
Evaluations are deterministic; times are not.

    python benchmarks/float32_rtol_cpu.py [--methods dopri8] [--tols 1e-4,1e-5,1e-6] [--rtols default,1e-5,3e-5]
        [--seeds 3] [--signals 12] [--dtype float32]
"""
from __future__ import annotations

import argparse
import time

import torch

import vars_ode as vo

DICTIONARIES = ("gaussian", "quickstart", "underdetermined", "positive", "unnormalised", "wide")


def dictionary(kind: str, seed: int) -> torch.Tensor:
    """One draw of ``kind`` in float64."""
    g = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        return torch.randn(30, 20, generator=g, dtype=torch.float64) / 30 ** 0.5
    if kind == "quickstart":
        return torch.randn(64, 48, generator=g, dtype=torch.float64) / 8
    if kind == "underdetermined":
        return torch.randn(20, 40, generator=g, dtype=torch.float64) / 20 ** 0.5
    if kind == "positive":
        P = torch.rand(64, 48, generator=g, dtype=torch.float64)
        return P / P.norm(dim=0)
    if kind == "unnormalised":
        return torch.randn(40, 30, generator=g, dtype=torch.float64)
    if kind == "wide":
        return torch.randn(24, 32, generator=g, dtype=torch.float64) / 24 ** 0.5
    raise ValueError(f"kind must be one of {DICTIONARIES}, got {kind!r}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", default="dopri8")
    ap.add_argument("--tols", default="1e-4,1e-5,1e-6")
    ap.add_argument("--rtols", default="default,1e-5,3e-5")
    ap.add_argument("--dictionaries", default=",".join(DICTIONARIES))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--signals", type=int, default=12)
    ap.add_argument("--max-iter", type=int, default=20000)
    ap.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    kinds = args.dictionaries.split(",")
    for kind in kinds:
        dictionary(kind, 0)
    problems = [(kind, s) for kind in kinds for s in range(args.seeds)]
    print(f"{len(problems)} draws x {args.signals} signals, {args.dtype}, max_iter {args.max_iter}")
    print(f"| method | tol | rtol | converged | per dictionary ({', '.join(kinds)}) | evaluations (draws all rows "
          "converged) | time (s) |")
    print("|---|---|---|---|---|---|---|")
    for method in args.methods.split(","):
        for tol in (float(t) for t in args.tols.split(",")):
            rows = {}
            for rt in args.rtols.split(","):
                rtol = None if rt == "default" else float(rt)
                per, conv, secs, by = [], 0, 0.0, dict.fromkeys(kinds, 0)
                for kind, seed in problems:
                    P = dictionary(kind, seed)
                    g = torch.Generator().manual_seed(1000 + seed)
                    X = torch.randn(args.signals, P.shape[0], generator=g, dtype=torch.float64)
                    t0 = time.perf_counter()
                    sol = vo.solve(P.to(dtype), X.to(dtype), 0.1, method, tol=tol, rtol=rtol, max_iter=args.max_iter)
                    secs += time.perf_counter() - t0
                    ok = sol.stats.converged
                    conv += int(ok.sum())
                    by[kind] += int(ok.sum())
                    per.append((bool(ok.all()), int(sol.stats.iterations.sum())))
                rows[rt] = (per, conv, secs, by)
            every = [all(rows[rt][0][i][0] for rt in rows) for i in range(len(problems))]
            for rt, (per, conv, secs, by) in rows.items():
                ev = sum(e for (_, e), a in zip(per, every) if a)
                print(f"| {method} | {tol:g} | {rt} | {conv} of {len(problems) * args.signals} | "
                      f"{', '.join(str(v) for v in by.values())} | {ev:,} "
                      f"({sum(every)} draws) | {secs:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
