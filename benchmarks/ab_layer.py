"""A/B of VARSLayer against the whole library at another git revision, in one process.

``benchmarks/ab_fused.py`` swaps one module (the fused node); this script takes every module of the other revision:
``git archive <rev> vars_ode`` is unpacked into a temporary folder as the package ``vars_ode_other`` and imported
beside the installed ``vars_ode`` (the library's imports are relative). For each dictionary and row (the rows of
``layer_solvers_cpu.py``: ``ista``, ``dopri5``, ``fista-eq``, ...) both layers get the same weights and take turns
on the same input (forward + backward, fp32; the order rotates each turn). Prints the median times, the median of the
paired ratios other / current (above 1: the current version is faster) and the largest difference of the outputs
and of the input gradients (0: the same values bit for bit). Each process draws a machine's drift on both versions
alike, where two runs one after the other do not (this machine's times drift by 10-20% between runs).

    python benchmarks/ab_layer.py --rev HEAD~1 --dicts sd,s --rows ista,fista-eq --repeats 3

Only the other revision's ``vars_ode.layer`` and what it imports are loaded (not its host models, which would register
timm entrypoints over the installed ones).
"""
from __future__ import annotations

import argparse
import atexit
import importlib.machinery
import importlib.util
import io
import pathlib
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile

import torch

from vars_ode import VARSLayer

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from layer_cpu import add_shape_args, fwd_bwd, turn_order  # noqa: E402
from layer_solvers_cpu import dict_kwargs, row_kwargs  # noqa: E402

OTHER = "vars_ode_other"


def load_other(rev: str):
    """The module ``vars_ode.layer`` of git revision ``rev`` (with what it imports), as ``vars_ode_other.layer``;
    afresh (a revision loaded before in this process is dropped first). The other package's ``__init__`` does not
    run, so its host models do not register timm entrypoints over the installed ones."""
    for name in [m for m in sys.modules if m == OTHER or m.startswith(OTHER + ".")]:
        del sys.modules[name]
    archive = subprocess.run(["git", "archive", rev, "vars_ode"], cwd=ROOT, check=True, capture_output=True).stdout
    folder = pathlib.Path(tempfile.mkdtemp(prefix="ab_layer_"))
    atexit.register(shutil.rmtree, folder, True)  # (at exit: the other package imports lazily from it)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    package = importlib.util.module_from_spec(importlib.machinery.ModuleSpec(OTHER, None, is_package=True))
    package.__path__ = [str(folder / "vars_ode")]
    sys.modules[OTHER] = package
    return importlib.import_module(OTHER + ".layer")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_args(ap, batch=8)
    ap.add_argument("--rev", required=True, help="the other git revision (HEAD~1, a commit, a branch)")
    ap.add_argument("--dicts", default="sd", help="comma-separated: d, sd, s, sd-dense, s-dense")
    ap.add_argument("--rows", default="ista", help="comma-separated rows of layer_solvers_cpu.py (ista, dopri5, "
                                                   "fista-eq, admm-eq, rk4, ...)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--horizon", type=float, default=3.0)
    ap.add_argument("--tol", type=float, default=1e-4)
    args = ap.parse_args(argv)
    if args.repeats < 1:
        raise SystemExit(f"--repeats must be at least 1, got {args.repeats}")
    torch.set_num_threads(args.threads)
    other = load_other(args.rev)
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.tokens, args.dim, requires_grad=True)
    print(f"CPU fwd+bwd, fp32, dim {args.dim}, {args.heads} heads, batch {args.batch}, {args.tokens} tokens, "
          f"{args.threads} threads; the current tree against {args.rev}, median of {args.repeats} turns after one")
    print()
    print("| dictionary | row | current ms | other ms | paired other / current | output diff | input grad diff |")
    print("|---|---|---|---|---|---|---|")
    results = {}
    for dname in args.dicts.split(","):
        for row in args.rows.split(","):
            kw = row_kwargs(row, args.horizon, args.tol)
            torch.manual_seed(1)
            try:
                cur = VARSLayer(args.dim, args.heads, qkv_bias=True, **dict_kwargs(dname), **kw)
                oth = other.VARSLayer(args.dim, args.heads, qkv_bias=True, **dict_kwargs(dname), **kw)
            except (ValueError, NotImplementedError) as err:  # a row that a dictionary (or a version) does not offer
                print(f"| {dname} | {row} | - | - | - | - | {type(err).__name__}: {str(err)[:80]} |")
                continue
            oth.load_state_dict(cur.state_dict())
            layers = {"current": cur, "other": oth}
            outs = {}
            for name, layer in layers.items():
                x.grad = None
                y = layer(x)
                y.sum().backward()
                outs[name] = (y.detach(), x.grad.clone())
            diff = [float((a - b).abs().max()) for a, b in zip(outs["current"], outs["other"])]
            times = {name: [] for name in layers}
            for i in range(args.repeats):
                for name in turn_order(layers, i):
                    times[name].append(fwd_bwd(layers[name], x))
            med = {name: statistics.median(t) for name, t in times.items()}
            paired = statistics.median(o / c for o, c in zip(times["other"], times["current"]))
            results[(dname, row)] = dict(current=med["current"], other=med["other"], paired=paired, diff=diff)
            print(f"| {dname} | {row} | {1e3 * med['current']:.1f} | {1e3 * med['other']:.1f} | {paired:.3f} | "
                  f"{diff[0]:.1e} | {diff[1]:.1e} |", flush=True)
    return results


if __name__ == "__main__":
    main()
