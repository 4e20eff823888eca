"""How a budget of attempts (``solver_options={"options": {"fixed_attempts": n}}``) binds in trained models: notebook
07's two models (as in ``ode_tail_cpu.py``) with every attention layer on dopri5 (or bosh3) over a horizon, first
with the adaptive loop (no budget), then with each budget in ``--budgets``. Printed per model and budget: the
evaluations each layer spent, the fraction of each layer's problems whose last step the tolerance rejected
(``LayerStats.forced``), the largest difference of the logits from the loop's relative to their largest entry,
and the accuracy on the images. With ``--calibrate SPARES`` it also runs ``vars_ode.calibrate_budget`` on the first
``--batch`` images with each spare, then the other batches of ``--images`` with those budgets, against the loop on
the same batches: the budgets per layer, the largest forced fraction per batch and the logits' largest difference.

    python benchmarks/ode_budget_cpu.py [--images 512] [--budgets 4,5,6,7,8] [--method dopri5] [--horizon 3]
        [--calibrate 0,1 --batch 128]

Needs the Debian package ``dataset-fashion-mnist`` (or ``--fmnist PATH``).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
from pathlib import Path

import torch

import vars_ode
from vars_ode.robustness import FASHION_MNIST_MEAN, FASHION_MNIST_STD, load_fashion_mnist
from vars_ode.solvers import native

_here = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("ode_tail_cpu", os.path.join(_here, "ode_tail_cpu.py"))
ode_tail_cpu = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ode_tail_cpu)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--budgets", default="4,5,6,7,8", help="comma-separated numbers of attempts")
    ap.add_argument("--method", choices=sorted(native.ADAPTIVE_TABLEAUX), default="dopri5")
    ap.add_argument("--horizon", type=float, default=3.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", default=",".join(ode_tail_cpu.MODELS))
    ap.add_argument("--checkpoints", type=Path, default=ode_tail_cpu.ROOT / "notebooks" / "checkpoints")
    ap.add_argument("--fmnist", default=None, help="folder of the Fashion-MNIST files (default: the Debian package)")
    ap.add_argument("--calibrate", default="", help="comma-separated spares for vars_ode.calibrate_budget")
    ap.add_argument("--batch", type=int, default=128, help="images per batch of the calibration table")
    args = ap.parse_args(argv)
    budgets = [int(b) for b in args.budgets.split(",")] if args.budgets else []
    if any(b < 1 for b in budgets):
        raise SystemExit(f"--budgets must be positive integers, got {args.budgets!r}")
    spares = [int(b) for b in args.calibrate.split(",")] if args.calibrate else []
    if any(b < 0 for b in spares) or (spares and not 0 < args.batch < args.images):
        raise SystemExit("--calibrate takes non-negative integers, and --batch must be below --images")
    torch.set_num_threads(args.threads)
    imgs, labels = load_fashion_mnist("test", args.fmnist)
    x = torch.from_numpy(imgs[:args.images]).float().div(255).unsqueeze(1)
    x = (x - FASHION_MNIST_MEAN[0]) / FASHION_MNIST_STD[0]
    t = torch.from_numpy(labels[:args.images]).long()
    print(f"{args.images} test images, {args.method} over a horizon of {args.horizon}, float32, no gradient")
    _header("model", "budget", "evaluations per layer", "forced, per layer", "logits from the loop's", "accuracy")
    rows = []
    for kind in args.models.split(","):
        model, layers = _load(kind, args)
        loop = None
        for budget in [None] + budgets:
            options = {} if budget is None else {"options": {"fixed_attempts": budget}}
            for m in layers:
                m.set_solver(args.method, steps=args.horizon, solver_options=options)
            with torch.no_grad():
                y = model(x)
            loop = y if loop is None else loop
            forced = [None if m.last_stats.forced is None else float((m.last_stats.forced > 0).float().mean())
                      for m in layers]
            row = dict(model=kind, budget=budget, evaluations=[int(m.last_stats.iterations.max()) for m in layers],
                       forced=forced, diff=float((y - loop).abs().max() / loop.abs().max()),
                       accuracy=float((y.argmax(-1) == t).float().mean()))
            rows.append(row)
            shown = "-" if budget is None else ", ".join(f"{100 * f:.2f}%" for f in forced)
            print(f"| {kind} | {'loop' if budget is None else budget} | {', '.join(map(str, row['evaluations']))} | "
                  f"{shown} | {row['diff']:.1e} | {100 * row['accuracy']:.1f}% |")
    if spares:
        rows += calibration_table(args, x, spares)
    return rows


def _load(kind, args):
    # a trained model (ode_tail_cpu.MODELS) with every VARS layer on the method over the horizon, and those layers
    model = ode_tail_cpu.load_model(kind, args.checkpoints)
    layers = [m for m in model.modules() if isinstance(m, vars_ode.VARSLayer)]
    for m in layers:
        m.set_solver(args.method, steps=args.horizon)
    return model, layers


def _header(*columns):
    print()
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))


def calibration_table(args, x, spares):
    """Rows of the calibration table (module docstring)."""
    batches = [x[i:i + args.batch] for i in range(args.batch, len(x), args.batch)]
    print()
    print(f"calibrated on the first {args.batch} images, then {len(batches)} other batches")
    _header("model", "spare", "budgets per layer", "largest forced fraction per batch", "logits from the loop's")
    rows = []
    for kind in args.models.split(","):
        for spare in spares:
            model, layers = _load(kind, args)
            with torch.no_grad():
                loop = [model(b) for b in batches]
            set_to = vars_ode.calibrate_budget(model, x[:args.batch], spare=spare)
            forced, diff = [], 0.0
            with torch.no_grad():
                for b, ref in zip(batches, loop):
                    y = model(b)
                    forced.append(max(float((m.last_stats.forced > 0).float().mean()) for m in layers))
                    diff = max(diff, float((y - ref).abs().max() / ref.abs().max()))
            rows.append(dict(model=kind, spare=spare, budgets=list(set_to.values()), forced=forced, diff=diff))
            print(f"| {kind} | {spare} | {', '.join(map(str, set_to.values()))} | "
                  f"{', '.join(f'{100 * f:.2f}%' for f in forced)} | {diff:.1e} |")
    return rows


if __name__ == "__main__":
    main()
