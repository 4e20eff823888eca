"""How often a native adaptive integration to a steady state stalls near its tolerance, with and without the
library's remedy (``vars_ode.solvers.ode.STALL_TIGHTEN``), and what the remedy costs.

The problems are those of ``tests/test_native.py::test_adaptive_native_solves_the_lasso``: ``P`` of ``d x m``
Gaussian entries over ``sqrt(d)``, ``--signals`` Gaussian signals, ``lam`` uniform in ``[0.02, 0.4]``, ``tol`` 1e-7,
each draw's seed from a generator seeded by ``--seed``; ``--also`` adds named draws (``seed:lam``). Every draw is solved
by each method twice in one process: as the library does (the remedy on) and with ``ode.STALL_TIGHTEN = 1`` (off).
Prints, per method, the signals that did not converge either way and the evaluations in all, then the draws on which
the two differ.

    python benchmarks/steady_stalls_cpu.py [--draws 1000] [--seed 11] [--methods bosh3,dopri5] [--also 1294:0.0625]
        [--dtype float32 --tol 1e-5]

1,000 draws of bosh3 and dopri5 took about 14 minutes on two cores.
"""
from __future__ import annotations

import argparse
import time

import torch

import vars_ode as vo
from vars_ode.solvers import ode


def problem(seed: int, d: int, m: int, signals: int, dtype=torch.float64):
    """The test's problem: ``(P, X)`` drawn in float64 from a generator seeded by ``seed``, in ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    P = torch.randn(d, m, generator=g, dtype=torch.float64) / d ** 0.5
    return P.to(dtype), torch.randn(signals, d, generator=g, dtype=torch.float64).to(dtype)


def solve(P, X, lam, method, tol, max_iter, remedy: bool):
    saved = ode.STALL_TIGHTEN
    ode.STALL_TIGHTEN = saved if remedy else 1.0
    try:
        sol = vo.solve(P, X, lam, method, tol=tol, integrator="native", max_iter=max_iter)
    finally:
        ode.STALL_TIGHTEN = saved
    return int((~sol.stats.converged).sum()), int(sol.stats.iterations.sum()), sol.stats


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--draws", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--methods", default="bosh3,dopri5")
    ap.add_argument("--also", default="", help="named draws, seed:lam,seed:lam")
    ap.add_argument("--d", type=int, default=24)
    ap.add_argument("--m", type=int, default=10)
    ap.add_argument("--signals", type=int, default=7)
    ap.add_argument("--tol", type=float, default=1e-7)
    ap.add_argument("--max-iter", type=int, default=20000)
    ap.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    args = ap.parse_args(argv)
    methods = args.methods.split(",")
    g = torch.Generator().manual_seed(args.seed)
    draws = []
    for _ in range(args.draws):
        seed = int(torch.randint(0, 10 ** 6, (1,), generator=g))
        draws.append((seed, 0.02 + 0.38 * float(torch.rand(1, generator=g))))
    draws += [(int(s), float(lam)) for s, lam in (item.split(":") for item in args.also.split(",") if item)]

    start = time.perf_counter()
    totals = {(m, r): [0, 0] for m in methods for r in (False, True)}
    differ = []
    for seed, lam in draws:
        P, X = problem(seed, args.d, args.m, args.signals, getattr(torch, args.dtype))
        for method in methods:
            runs = {}
            for remedy in (False, True):
                bad, evaluations, stats = solve(P, X, lam, method, args.tol, args.max_iter, remedy)
                totals[(method, remedy)][0] += bad
                totals[(method, remedy)][1] += evaluations
                runs[remedy] = (bad, evaluations, stats)
            if runs[False][:2] != runs[True][:2]:
                differ.append((seed, lam, method, runs[False], runs[True]))
    seconds = time.perf_counter() - start

    n = len(draws) * args.signals
    print(f"{len(draws)} draws of P {args.d} x {args.m} ({args.dtype}), {args.signals} signals each, tol {args.tol:g}, "
          f"max_iter {args.max_iter}, {torch.get_num_threads()} threads, {seconds:.0f} s\n")
    print("| method | signals | unconverged without the remedy | with it | evaluations without | with | ratio |")
    print("|---|---|---|---|---|---|---|")
    for method in methods:
        (b0, e0), (b1, e1) = totals[(method, False)], totals[(method, True)]
        print(f"| {method} | {n} | {b0} | {b1} | {e0} | {e1} | {e1 / e0:.4f} |")
    print("\ndraws on which the remedy changed the count of unconverged signals or the evaluations:\n")
    for seed, lam, method, off, on in differ:
        print(f"- seed {seed}, lam {lam:.4f}, {method}: without: {off[0]} unconverged, {off[1]} evaluations "
              f"(residual max {float(off[2].residual.max()):.2e}); with: {on[0]} unconverged, {on[1]} evaluations "
              f"(residual max {float(on[2].residual.max()):.2e})")
    if not differ:
        print("- none")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
