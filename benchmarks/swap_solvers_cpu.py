"""Every registered solver swapped into notebook 07's trained models at test time (``layer.set_solver``).

The two small vision transformers of notebook 07 (VARS-D and VARS-SD, trained on Fashion-MNIST with 3 ISTA steps,
loaded from ``notebooks/checkpoints/``) are evaluated under ``torch.no_grad()`` with each solver of ``--solvers``
in every VARS layer: over a horizon of ``--horizon`` (ISTA-step units; iterations for the solvers that are not
ODEs) and to the equilibrium at each of ``--tols``. Accuracy on the first ``--images`` test images, clean and
under gaussian noise (0.3, as the notebook), the mean work per layer and pass (iterations, sweeps or evaluations),
the fraction of problems at or below ``tol`` and the largest KKT residual (on the clean images), and, for the
equilibria, on how many images the prediction agrees with FISTA's to ``--reference-tol`` (1e-6). A solver that refuses
the swap says why in its row. ``--out`` keeps the rows as JSON lines and a rerun skips those it holds (the
explicit methods' equilibria take minutes: their step is bound by the stiffness). Work, accuracy and agreement are
deterministic; times are not (run alone: two torch processes on two cores slow each other by up to 45x).

    python benchmarks/swap_solvers_cpu.py [--solvers ista,cd,dopri5] [--tols 1e-2] [--images 64] [--out rows.jsonl]
"""
from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from timm.models.vision_transformer import VisionTransformer

import vars_ode
from vars_ode.robustness import FASHION_MNIST_MEAN, FASHION_MNIST_STD, load_fashion_mnist

ROOT = Path(__file__).resolve().parents[1]
#: notebook 07's two models at its "small" size (dim 64, depth 4, 4 heads, lam 0.3, 3 ISTA steps from P^T v)
KINDS = {"VARS-D": dict(dictionary="d"), "VARS-SD": dict(dictionary="sd", static="dense", grid_size=(7, 7))}


def load_model(kind: str, checkpoints: Path) -> torch.nn.Module:
    layer = vars_ode.VARSLayer.configure(lam=0.3, steps=3, solver="ista", init="encode", **KINDS[kind])
    model = VisionTransformer(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=64, depth=4,
                              num_heads=4, mlp_ratio=2.0, attn_layer=layer)
    path = checkpoints / f"fmnist_{kind.lower().replace('-', '_')}_small.pt"
    state = torch.load(path, weights_only=True)["state"]  # tensors, numbers, strings: nothing in the file runs
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return model.eval()


def test_sets(images: int) -> tuple[dict, torch.Tensor]:
    imgs, labels = load_fashion_mnist("test")
    X = torch.from_numpy(imgs[:images]).float().div(255).unsqueeze(1)
    noisy = (X + torch.randn(X.shape, generator=torch.Generator().manual_seed(1)) * 0.3).clamp(0, 1)
    norm = lambda x: (x - FASHION_MNIST_MEAN[0]) / FASHION_MNIST_STD[0]  # noqa: E731
    return {"clean": norm(X), "noisy": norm(noisy)}, torch.from_numpy(labels[:images])


def vars_layers(model) -> list:
    return [m for m in model.modules() if isinstance(m, vars_ode.VARSLayer)]


@torch.no_grad()
def evaluate(model, sets: dict, labels: torch.Tensor, solver: str, kw: dict) -> dict:
    """One row: the swap, then each set through the model; a refused swap gives its error."""
    row = dict(solver=solver, steps=kw["steps"], tol=kw.get("tol"))
    start = time.perf_counter()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for layer in vars_layers(model):
                layer.set_solver(solver, solver_options={}, **kw)
            for name, X in sets.items():
                pred = model(X).argmax(-1)
                row[name] = float((pred == labels).double().mean())
                row[f"{name}_pred"] = pred.tolist()
                if name == "clean":
                    stats = [layer.last_stats for layer in vars_layers(model)]
                    row["work"] = float(np.mean([float(s.iterations.double().mean()) for s in stats]))
                    row["residual"] = max(float(s.residual.double().max()) for s in stats)
                    if kw.get("tol"):
                        row["reached"] = float(np.mean([float((s.residual <= kw["tol"]).double().mean())
                                                        for s in stats]))
        row["warnings"] = sorted({str(w.message)[:120] for w in caught})
    except (ValueError, RuntimeError) as e:
        row["error"] = f"{type(e).__name__}: {e}"
    row["seconds"] = round(time.perf_counter() - start, 2)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--solvers", default=",".join(vars_ode.SOLVERS))
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--horizon", type=float, default=3.0)
    ap.add_argument("--tols", default="1e-2")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--reference-tol", type=float, default=1e-6, help="FISTA's tol for the predictions compared with")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--checkpoints", type=Path, default=ROOT / "notebooks" / "checkpoints")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    solvers = [s for s in args.solvers.split(",") if s]
    kinds = [k for k in args.kinds.split(",") if k]
    for name, values, choices in (("--solvers", solvers, vars_ode.SOLVERS), ("--kinds", kinds, KINDS)):
        if unknown := [v for v in values if v not in choices]:
            raise ValueError(f"{name}: unknown {unknown}; choose from {list(choices)}")
    tols = [float(t) for t in args.tols.split(",") if t]
    torch.set_num_threads(args.threads)  # small models: a second thread only adds synchronisation
    sets, labels = test_sets(args.images)
    kept = {}
    if args.out is not None and args.out.exists():
        for line in args.out.read_text().splitlines():
            r = json.loads(line)
            kept[(r["kind"], r["solver"], r["steps"], r["tol"], r["images"])] = r
    print(f"{args.images} test images, clean and noisy; horizon {args.horizon:g}; equilibria to {args.tols}")
    print("| model | solver | steps | tol | clean | noisy | work | reached tol | largest residual | agrees with FISTA "
          f"{args.reference_tol:g} | time (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for kind in kinds:
        model = load_model(kind, args.checkpoints)
        reference = evaluate(model, sets, labels, "fista", dict(steps=None, tol=args.reference_tol))["clean_pred"]
        for solver in solvers:
            horizon = args.horizon if vars_ode.SOLVERS[solver].ode else max(1, round(args.horizon))
            for kw in [dict(steps=horizon)] + [dict(steps=None, tol=t) for t in tols]:
                key = (kind, solver, kw["steps"], kw.get("tol"), args.images)
                row = kept.get(key)
                if row is None:
                    row = dict(kind=kind, images=args.images, **evaluate(model, sets, labels, solver, kw))
                    if args.out is not None:
                        with args.out.open("a") as f:
                            f.write(json.dumps(row) + "\n")
                if "error" in row:
                    print(f"| {kind} | {solver} | {row['steps']} | {row['tol']} | {row['error']} | | | | | | "
                          f"{row['seconds']} |")
                    continue
                agree = (f"{sum(a == b for a, b in zip(row['clean_pred'], reference))} of {args.images}"
                         if row["tol"] else "")
                reached = f"{row['reached']:.4f}" if row["tol"] else ""
                print(f"| {kind} | {solver} | {row['steps']} | {row['tol'] or ''} | {row['clean']:.3f} | "
                      f"{row['noisy']:.3f} | {row['work']:.1f} | {reached} | {row['residual']:.3g} | {agree} | "
                      f"{row['seconds']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
