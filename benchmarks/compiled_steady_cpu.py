"""The steady state's attempts compiled (``vo.solve(..., options={"compile": True})``) against the same solve run
eagerly and against FISTA, on the Quick start's problem (P 64 x 48, ``--signals`` signals, lam 0.1, float64).

Every row is timed in the same process, the rows taking turns (``--repeats`` rounds, the median of each row); the
compiled rows' first call, which compiles the attempt (once per method, shape, dtype and setting in a process;
less when Inductor's cache on disk holds it from an earlier process), is timed on its own. The table gives the
evaluations of the slowest problem, the largest KKT residual, the largest difference from the eager solve's code
and the time against FISTA's.

    python benchmarks/compiled_steady_cpu.py [--signals 100] [--tols 1e-4,1e-6] [--methods dopri5,bosh3]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import vars_ode as vo


def problem(signals):
    torch.manual_seed(0)
    P = torch.randn(64, 48, dtype=torch.float64) / 8
    x = torch.randn(100, 64, dtype=torch.float64)[:signals]
    return P, x


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--signals", type=int, default=100)
    ap.add_argument("--tols", default="1e-4,1e-6")
    ap.add_argument("--methods", default="dopri5,bosh3")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--backend", default="inductor", help="the torch.compile backend of the compiled rows")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    P, x = problem(args.signals)
    tols = [float(t) for t in args.tols.split(",")]
    methods = args.methods.split(",")
    print(f"P 64 x 48 (Quick start), {args.signals} signals, lam 0.1, float64, {args.threads} threads, "
          f"backend {args.backend!r}, medians of {args.repeats} rounds\n")
    print("| tol | solver | first call s | evaluations | KKT residual | max abs diff from eager | seconds | "
          "time / FISTA |")
    print("|---|---|---|---|---|---|---|---|")
    for tol in tols:
        rows = {"fista": ("fista", None)}
        for m in methods:
            rows[m] = (m, None)
            rows[m + "+compile"] = (m, {"compile": args.backend})
        first = {}
        for name, (solver, options) in rows.items():  # compiles each compiled row once, outside the timings
            start = time.perf_counter()
            vo.solve(P, x, 0.1, solver, tol=tol, **({} if options is None else {"options": options}))
            first[name] = time.perf_counter() - start
        times, sols = {name: [] for name in rows}, {}
        for _ in range(args.repeats):
            for name, (solver, options) in rows.items():
                start = time.perf_counter()
                sols[name] = vo.solve(P, x, 0.1, solver, tol=tol, **({} if options is None else {"options": options}))
                times[name].append(time.perf_counter() - start)
        fista = statistics.median(times["fista"])
        for name, (solver, options) in rows.items():
            sol, sec = sols[name], statistics.median(times[name])
            eager = sols.get(solver) if options is not None else None
            diff = "-" if eager is None else f"{float((sol.code - eager.code).abs().max()):.1e}"
            print(f"| {tol:g} | {name} | {first[name]:.1f} | {int(sol.stats.iterations.max())} | "
                  f"{float(sol.stats.residual.max()):.1e} | {diff} | {sec:.3f} | {sec / fista:.1f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
