"""CPU cost of VARSLayer's solvers against ISTA with 3 steps of the same dictionary, in one process.

Every row is a ``VARSLayer(dim, heads, ...)`` of one dictionary with the same weights; forward + backward,
fp32, the layers take turns (``layer_cpu.interleaved``). The ratio is the median time over that of
``ista 3`` of the same dictionary; ``timm`` rows compare ISTA with timm's ``Attention``. The ODE rows also
give the vector-field evaluations of one forward, the equilibrium rows the KKT residual reached, and every
row the host reads of one forward (``vars_ode.sync.count_host_syncs``).

    python benchmarks/layer_solvers_cpu.py [--dicts d,sd,sd-dense,s] [--rows ...] [--repeats 3]

Row names: ``ista`` (3 steps; ``ista<N>``: N steps, for the cost of one more operator application: ``ista19``
against ``ista`` bounds what any method of 19 evaluations can reach, since an evaluation applies ``K`` once, as an
ISTA step does), ``euler``, ``rk4``, ``dopri5``, ``bosh3``, ``dopri5-adjoint``, ``fista-eq`` (``steps=None``,
``tol=1e-4``, ``grad="implicit"``; ``admm-eq`` the same with ADMM, any ``<solver>-eq``), ``fista-eq-unroll``, ``timm`` (timm's Attention, for the ISTA ratio).
A row name may end in solver options, ``admm-eq:form=correction`` (``key=value`` pairs separated by ``;``; a key
``options.NAME`` sets an integrator option, ``dopri5:options.fixed_attempts=6``; ``true`` and ``false`` are booleans:
``dopri5:options.fixed_attempts=5;options.compile=true``, the fused node's integration compiled, its compilation
before the timing), to compare settings of one solver in one process, and in ``+compile``: the layer through
``torch.compile(fullgraph=True)`` (Inductor; minutes of compilation on two cores before the timing, not counted in it).
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import statistics

import torch
from timm.layers import Attention

from vars_ode import VARSLayer
from vars_ode.sync import count_host_syncs

_here = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("layer_cpu", os.path.join(_here, "layer_cpu.py"))
layer_cpu = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(layer_cpu)

ROWS = ("ista", "euler", "rk4", "dopri5", "dopri5-adjoint", "fista-eq", "admm-eq", "timm")


def _option_value(text: str):
    if text in ("true", "false"):
        return text == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def row_kwargs(row: str, horizon: float, tol: float) -> dict:
    """The solver arguments of a row name; ``name:key=value;key=value`` adds solver options (numbers parsed)."""
    row, _, opts = row.partition(":")
    kwargs = _row_solver(row, horizon, tol)
    if opts:
        pairs = [item.partition("=") for item in opts.split(";")]
        bad = [k for k, eq, _ in pairs if not k or not eq]
        if bad:
            raise SystemExit(f"--rows: options of a row are key=value pairs separated by ';', got {opts!r}")
        opts = {}
        for k, _, v in pairs:
            outer, dot, inner = k.partition(".")
            if dot:
                opts.setdefault(outer, {})[inner] = _option_value(v)
            else:
                opts[k] = _option_value(v)
        kwargs["solver_options"] = opts
    return kwargs


def _row_solver(row: str, horizon: float, tol: float) -> dict:
    if row == "ista":
        return dict(solver="ista", steps=3)
    if row.startswith("ista") and row[4:].isdigit() and int(row[4:]) >= 1:
        return dict(solver="ista", steps=int(row[4:]))
    if row.endswith("-adjoint"):
        return dict(solver=row[:-len("-adjoint")], steps=horizon, grad="adjoint")
    if "-eq" in row:  # "<solver>-eq" (implicit gradient) or "<solver>-eq-unroll"
        return dict(solver=row.split("-eq")[0], steps=None, tol=tol, grad="unroll" if row.endswith("unroll") else "implicit")
    return dict(solver=row, steps=horizon)


def dict_kwargs(name: str) -> dict:
    kind, _, static = name.partition("-")
    return dict(dictionary=kind, **({"static": static} if static else {}))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    layer_cpu.add_shape_args(ap, batch=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--horizon", type=float, default=3.0)
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--dicts", default="d,sd", help="comma-separated: d, sd, s, sd-dense, s-dense")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated rows of {ROWS} (or bosh3, midpoint, ...)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.tokens, args.dim, requires_grad=True)
    rows = args.rows.split(",")
    print(f"CPU fwd+bwd, fp32, dim {args.dim}, {args.heads} heads, batch {args.batch}, {args.tokens} tokens, "
          f"{args.threads} threads, horizon {args.horizon}, equilibrium tol {args.tol}, median of {args.repeats} "
          "interleaved runs after warm-up")
    print()
    print("| dictionary | row | ms | vs ista 3 | evaluations / iterations | KKT residual max | host reads (fwd) |")
    print("|---|---|---|---|---|---|---|")
    results = {}
    for dname in args.dicts.split(","):
        torch.manual_seed(1)
        base = VARSLayer(args.dim, args.heads, qkv_bias=True, **dict_kwargs(dname), solver="ista", steps=3)
        layers, info = {}, {}
        for row in rows:
            if row == "timm":
                layers[row] = Attention(args.dim, num_heads=args.heads, qkv_bias=True)
                continue
            try:
                name, compiled, _ = row.partition("+compile")
                layer = copy.deepcopy(base).set_solver(**row_kwargs(name, args.horizon, args.tol))
                with count_host_syncs() as reads:
                    layer(x).sum().backward()
                stats_of = layer
                if compiled:
                    layer = torch.compile(layer, fullgraph=True)
                    layer(x).sum().backward()  # compiles the forward and backward graphs
            except (ValueError, NotImplementedError) as err:
                print(f"| {dname} | {row} | - | - | - | - | {type(err).__name__}: {str(err)[:80]} |")
                continue
            st = stats_of.last_stats
            info[row] = (int(st.iterations.max()), float(st.residual.max()), reads.count)
            layers[row] = layer
        times = layer_cpu.interleaved(layers, x, args.repeats, warmup=1)
        med = {name: statistics.median(ts) for name, ts in times.items()}
        ref = med["ista"] if "ista" in med else None
        for row in (r for r in rows if r in med):
            ratio = med[row] / ref if ref else float("nan")
            if row == "timm":
                label = f"ista 3 / timm Attention: {ref / med[row]:.2f}x" if ref else "-"
                print(f"| {dname} | timm Attention | {1e3 * med[row]:.1f} | {label} | - | - | - |")
                continue
            it, res, reads = info[row]
            print(f"| {dname} | {row} | {1e3 * med[row]:.1f} | {ratio:.2f}x | {it} | {res:.1e} | {reads} |")
            results[(dname, row)] = dict(ms=1e3 * med[row], ratio=ratio, work=it, residual=res, reads=reads)
        if "timm" in med and ref:
            results[(dname, "timm")] = dict(ms=1e3 * med["timm"], ratio=ref / med["timm"])
    return results


if __name__ == "__main__":
    main()
