"""CPU speed of VARSLayer against timm's Attention, forward + backward, measured in one process.

DeiT-Ti width: dim 192, 3 heads, batch 16, 197 tokens (14 x 14 grid + CLS), fp32. Prints the median of
``--repeats`` interleaved runs per layer, its ratio to timm's ``Attention`` (fused SDPA where torch offers it)
and the median of the per-turn ratios ("paired").

    python benchmarks/layer_cpu.py [--repeats 10] [--threads 2] [--compile]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from timm.layers import Attention

from vars_ode import VARSLayer


def fwd_bwd(layer, x):
    x.grad = None
    layer.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    layer(x).sum().backward()
    return time.perf_counter() - t0


def layer_kwargs(name: str) -> dict:
    """VARSLayer options of a variant name: ``d``, ``sd``, ``s`` (convolutional static atoms) or with
    ``-dense`` (``static="dense"``), and ``:k`` for ``num_static_atoms=k``; ISTA, 3 steps."""
    name, _, atoms = name.partition(":")
    kind, _, static = name.partition("-")
    kw = dict(dictionary=kind, solver="ista", steps=3, qkv_bias=True)
    if static:
        kw["static"] = static
    if atoms:
        kw["num_static_atoms"] = int(atoms)
    return kw


def turn_order(names, i):
    """The order of turn ``i``: rotated by one each turn, and reversed every other turn, so that no layer
    always runs first, or always right after the same other one (the position in a turn biases a time
    by a few per cent on a 2-core machine)."""
    names = list(names)
    k = i % len(names)
    names = names[k:] + names[:k]
    return names[::-1] if (i // len(names)) % 2 else names


def interleaved(layers, x, repeats, warmup=2):
    """Seconds per layer and run; the layers take turns, so drifts of the machine hit all alike."""
    times = {name: [] for name in layers}
    for i in range(warmup + repeats):
        for name in turn_order(layers, i):
            layer = layers[name]
            t = fwd_bwd(layer, x)
            if i >= warmup:
                times[name].append(t)
    return times


def add_shape_args(ap, batch: int):
    """``--dim``, ``--heads``, ``--batch``, ``--tokens``: the layer and input of the CPU layer benchmarks (DeiT-Ti's
    width, heads and 197 tokens by default)."""
    ap.add_argument("--dim", type=int, default=192)
    ap.add_argument("--heads", type=int, default=3)
    ap.add_argument("--batch", type=int, default=batch)
    ap.add_argument("--tokens", type=int, default=197)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_args(ap, batch=16)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", default="d,sd,sd-dense",
                    help="comma-separated VARS variants to time: s, d, sd (convolutional templates), s-dense, "
                         "sd-dense (dense static atoms, static='dense'); sd-dense:32 sets num_static_atoms")
    ap.add_argument("--unfused", action="store_true", help="also time VARS-D with fused=False (the generic path)")
    ap.add_argument("--kernel-size", type=int, default=None, help="static template size (default: the layer's)")
    ap.add_argument("--compile", action="store_true",
                    help="also time every layer (timm's included) through torch.compile(fullgraph=True); "
                         "the first, warm-up turns include the compilation")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.tokens, args.dim, requires_grad=True)
    layers = {"timm Attention": Attention(args.dim, num_heads=args.heads, qkv_bias=True)}
    for name in args.layers.split(","):
        kw = layer_kwargs(name)
        if args.kernel_size is not None:
            kw["kernel_size"] = args.kernel_size
        d, static = kw["dictionary"], kw.get("static", "")
        if "num_static_atoms" in kw:
            static += f" m_s={kw['num_static_atoms']}"
        layers[f"VARS-{d.upper()}{' ' + static if static else ''} ista 3"] = VARSLayer(args.dim, args.heads, **kw)
        if d == "d" and args.unfused:
            layers["VARS-D ista 3 unfused"] = VARSLayer(args.dim, args.heads, dictionary=d, solver="ista", steps=3,
                                                        qkv_bias=True, fused=False)
    if args.compile:
        for name, layer in list(layers.items()):
            layers[name + " compiled"] = torch.compile(layer, fullgraph=True)
    print(f"CPU fwd+bwd, fp32, dim {args.dim}, {args.heads} heads, batch {args.batch}, {args.tokens} tokens, "
          f"{args.threads} threads, median of {args.repeats} interleaved runs")
    times = interleaved(layers, x, args.repeats)
    res = {name: statistics.median(ts) for name, ts in times.items()}
    base = res["timm Attention"]
    # paired: the median over runs of the layer's time over timm's in the same turn (steadier when the
    # machine's speed drifts within a run)
    width = max(30, 2 + max(map(len, res)))
    print(f"{'layer':<{width}}{'ms':>10}{'ratio':>10}{'paired':>10}")
    for name, sec in res.items():
        paired = statistics.median(t / b for t, b in zip(times[name], times["timm Attention"]))
        print(f"{name:<{width}}{1e3 * sec:>10.1f}{sec / base:>10.2f}{paired:>10.2f}")
    return res


if __name__ == "__main__":
    main()
