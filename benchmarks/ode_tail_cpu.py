"""Trained models with every attention layer switched to dopri5 (or bosh3): the adaptive loop with its tail taken
on the groups still integrating (``vars_ode.solvers.native.TAIL_FRACTION``, the default) against the same loop over
the whole batch to the end (``TAIL_FRACTION = 0``), in one process, the two taking turns.

The models are notebook 07's (``notebooks/checkpoints/fmnist_vars_d_small.pt`` and ``fmnist_vars_sd_small.pt``:
ViTs for 28 x 28 Fashion-MNIST images, width 64, depth 4, 4 heads, trained with 3 ISTA steps), run on the first
``--images`` test images: a forward pass without a gradient, or with ``--backward`` a training step's forward and
backward passes (cross-entropy against the labels). Printed per model: the evaluations each layer spent (the
largest over its problems: the same both ways), the largest difference between the two outputs (and, with
``--backward``, between the two weights' gradients), and the median seconds.

    python benchmarks/ode_tail_cpu.py [--images 256] [--repeats 3] [--dtype float32] [--method dopri5] [--horizon 3]
        [--backward]

Needs the Debian package ``dataset-fashion-mnist`` (or ``--fmnist PATH``).
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from timm.models.vision_transformer import VisionTransformer

import vars_ode
from vars_ode.robustness import FASHION_MNIST_MEAN, FASHION_MNIST_STD, load_fashion_mnist
from vars_ode.solvers import native

ROOT = Path(__file__).resolve().parents[1]
#: notebook 07's "small" models: the layer each was trained with and its checkpoint
MODELS = {"VARS-D": (dict(dictionary="d"), "fmnist_vars_d_small.pt"),
          "VARS-SD": (dict(dictionary="sd", static="dense", grid_size=(7, 7)), "fmnist_vars_sd_small.pt")}


def load_model(kind: str, checkpoints: Path) -> torch.nn.Module:
    kwargs, name = MODELS[kind]
    layer = vars_ode.VARSLayer.configure(lam=0.3, steps=3, solver="ista", init="encode", **kwargs)
    model = VisionTransformer(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=64, depth=4,
                              num_heads=4, mlp_ratio=2.0, attn_layer=layer)
    state = torch.load(checkpoints / name, weights_only=True)["state"]
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return model.eval()


def run(model, x, fraction: float, labels=None):
    """``(outputs, seconds, evaluations per layer)`` of one forward pass with ``TAIL_FRACTION = fraction``, without a
    gradient; with ``labels``, of a forward and backward pass of the cross-entropy, ``outputs`` the logits and the
    weights' gradients flattened."""
    old, native.TAIL_FRACTION = native.TAIL_FRACTION, fraction
    try:
        model.zero_grad(set_to_none=True)
        with torch.set_grad_enabled(labels is not None):
            t0 = time.perf_counter()
            y = model(x)
            if labels is not None:
                torch.nn.functional.cross_entropy(y, labels).backward()
            seconds = time.perf_counter() - t0
    finally:
        native.TAIL_FRACTION = old
    if labels is not None:
        y = torch.cat([y.detach().flatten()] + [p.grad.flatten() for p in model.parameters() if p.grad is not None])
    layers = [m for m in model.modules() if isinstance(m, vars_ode.VARSLayer)]
    return y, seconds, [int(m.last_stats.iterations.max()) for m in layers]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    ap.add_argument("--method", choices=sorted(native.ADAPTIVE_TABLEAUX), default="dopri5")
    ap.add_argument("--horizon", type=float, default=3.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--backward", action="store_true", help="time a forward and backward pass (a training step)")
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {list(MODELS)}")
    ap.add_argument("--checkpoints", type=Path, default=ROOT / "notebooks" / "checkpoints")
    ap.add_argument("--fmnist", default=None, help="folder of the Fashion-MNIST files (default: the Debian package)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    imgs, labels = load_fashion_mnist("test", args.fmnist)
    t = torch.from_numpy(labels[:args.images]) if args.backward else None
    x = torch.from_numpy(imgs[:args.images]).to(dtype).div(255).unsqueeze(1)
    x = (x - FASHION_MNIST_MEAN[0]) / FASHION_MNIST_STD[0]
    print(f"{args.images} test images, {'forward and backward' if args.backward else 'forward, no gradient'}, "
          f"{args.dtype}, {args.method} over a horizon of {args.horizon}, "
          f"{args.threads} threads, median of {args.repeats} turns (tail, whole batch)")
    print()
    print("| model | evaluations per layer | max abs difference | s, tail | s, whole batch | speed-up |")
    print("|---|---|---|---|---|---|")
    rows = []
    for kind in args.models.split(","):
        model = load_model(kind, args.checkpoints).to(dtype)
        for m in model.modules():
            if isinstance(m, vars_ode.VARSLayer):
                m.set_solver(args.method, steps=args.horizon)
        run(model, x, native.TAIL_FRACTION, t)  # warm-up
        times = {"tail": [], "whole": []}
        for _ in range(args.repeats):
            y, s, ev = run(model, x, native.TAIL_FRACTION, t)
            times["tail"].append(s)
            y0, s0, ev0 = run(model, x, 0.0, t)
            times["whole"].append(s0)
        if ev != ev0:
            raise AssertionError(f"{kind}: evaluations differ, {ev} with the tail against {ev0}")
        diff = float((y - y0).abs().max())
        tail, whole = statistics.median(times["tail"]), statistics.median(times["whole"])
        rows.append(dict(model=kind, evaluations=ev, diff=diff, tail=tail, whole=whole))
        print(f"| {kind} | {', '.join(map(str, ev))} | {diff:.1e} | {tail:.3f} | {whole:.3f} | {whole / tail:.2f}x |")
    return rows


if __name__ == "__main__":
    main()
