"""Memory a VARS layer keeps for its backward pass, per ODE solver and gradient mode, in one process.

After one forward pass with gradients, every tensor alive that was not alive before it is what the graph keeps
until the backward pass: autograd's saved tensors (``saved_tensors_hooks``) and what a node holds on its own,
such as the Runge-Kutta tape of ``vars_ode.solvers.gram_ode`` (tensors the garbage collector sees); storages
are counted once, the input and the parameters (alive before) not at all. The rows with ``integrator=torchdiffeq`` run
the same method through autograd step by step (``torchdiffeq-unroll``) or through torchdiffeq's continuous
adjoint (``adjoint-torchdiffeq``).

    python benchmarks/ode_memory_cpu.py [--batch 8] [--tokens 197] [--dim 192] [--heads 3] [--dictionary d|sd|s]
        [--rows "ista 3,eq 1e-2 implicit,eq 1e-3 implicit"]
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import os
import warnings

import torch

import vars_ode as vo

_here = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("layer_cpu", os.path.join(_here, "layer_cpu.py"))
layer_cpu = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(layer_cpu)

ROWS = {
    "ista 3": dict(solver="ista", steps=3),
    "euler": dict(solver="euler", steps=3.0),
    "rk4": dict(solver="rk4", steps=3.0),
    "rk4 torchdiffeq-unroll": dict(solver="rk4", steps=3.0, solver_options={"integrator": "torchdiffeq"}),
    "dopri5": dict(solver="dopri5", steps=3.0),
    "dopri5 adjoint": dict(solver="dopri5", steps=3.0, grad="adjoint"),
    "dopri5 adjoint-torchdiffeq": dict(solver="dopri5", steps=3.0, grad="adjoint",
                                                         solver_options={"integrator": "torchdiffeq"}),
    # the equilibrium layer at two tolerances: the implicit gradient keeps the same whatever the iterations,
    # unrolled FISTA keeps every iteration
    "eq 1e-2 implicit": dict(solver="fista", steps=None, tol=1e-2, grad="implicit"),
    "eq 1e-3 implicit": dict(solver="fista", steps=None, tol=1e-3, grad="implicit"),
    # the dictionary built again in the backward pass (recompute=True, the default on CUDA): q, v and the code kept
    "eq 1e-3 implicit recompute": dict(solver="fista", steps=None, tol=1e-3, grad="implicit", recompute=True),
    "eq 1e-2 unroll": dict(solver="fista", steps=None, tol=1e-2, grad="unroll"),
    "eq 1e-3 unroll": dict(solver="fista", steps=None, tol=1e-3, grad="unroll"),
    "admm eq 1e-2 implicit": dict(solver="admm", steps=None, tol=1e-2, grad="implicit"),
    "admm eq 1e-4 implicit": dict(solver="admm", steps=None, tol=1e-4, grad="implicit"),
    "admm eq 1e-4 implicit recompute": dict(solver="admm", steps=None, tol=1e-4, grad="implicit", recompute=True),
    "admm eq 1e-4 unroll": dict(solver="admm", steps=None, tol=1e-4, grad="unroll"),
}


def live_bytes() -> dict:
    """Storage pointer -> bytes of every tensor the garbage collector can see."""
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # gc.get_objects() holds deprecated torch objects too
        for obj in gc.get_objects():
            try:
                if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
                    st = obj.untyped_storage()
                    out[st.data_ptr()] = st.nbytes()
            except Exception:  # noqa: BLE001 (objects that only look like tensors)
                continue
    return out


def kept_bytes(layer, x) -> int:
    gc.collect()
    before = live_bytes()
    saved = {}

    def pack(t):  # autograd's saved tensors live in C++, out of the garbage collector's sight
        st = t.untyped_storage()
        saved[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    gc.collect()
    after = {**live_bytes(), **saved}
    after.pop(y.untyped_storage().data_ptr(), None)
    kept = sum(b for p, b in after.items() if p not in before)
    y.sum().backward()
    return kept


def main(argv=None, with_work=False):
    """Prints the table; returns ``{row: bytes kept}`` (and ``{row: iterations or evaluations}`` with
    ``with_work``)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    layer_cpu.add_shape_args(ap, batch=8)
    ap.add_argument("--dictionary", default="d")
    ap.add_argument("--rows", default=",".join(ROWS), help="comma-separated row names")
    args = ap.parse_args(argv)
    # the objects alive now (the interpreter's, the libraries', a test runner's: hundreds of thousands) go to the
    # collector's permanent generation, which gc.collect and gc.get_objects skip: every tensor of the table, the
    # input included, is made after this point, so the counts are the same, and the scans take a fraction of the time
    gc.collect()
    gc.freeze()
    try:
        return _table(args, with_work)
    finally:
        gc.unfreeze()


def _table(args, with_work):
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.tokens, args.dim, requires_grad=True)
    print(f"VARS-{args.dictionary.upper()} layer, dim {args.dim}, {args.heads} heads, batch {args.batch}, "
          f"{args.tokens} tokens, fp32: bytes kept from the forward pass for the backward pass\n")
    print("| row | MB kept | vs first row | iterations / evaluations |")
    print("|---|---|---|---|")
    names = args.rows.split(",")
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        raise SystemExit(f"--rows: unknown row(s) {unknown}; rows: {list(ROWS)}")
    base, out, work = None, {}, {}
    for name in names:
        torch.manual_seed(1)
        layer = vo.VARSLayer(args.dim, args.heads, dictionary=args.dictionary, **ROWS[name])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an equilibrium row's problems that stop short of tol (said in the table)
            kept_bytes(layer, x)  # warm-up (scratch buffers, lazily built state)
            out[name] = b = kept_bytes(layer, x)
        work[name] = int(layer.last_stats.iterations.max())
        base = b if base is None else base
        print(f"| {name} | {b / 2**20:.1f} | {b / base:.2f}x | {work[name]} |", flush=True)
    return (out, work) if with_work else out


if __name__ == "__main__":
    main()
