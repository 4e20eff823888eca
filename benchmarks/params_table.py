"""Parameters and GFLOPs of every host x attention at 224 px / 1000 classes, against the paper's Table 2.

    python benchmarks/params_table.py [--no-flops] [--compat paper|official] [--static conv|dense]

Prints a Markdown table. Parameters are the trainable ones (``requires_grad``), as the official
``main.py`` counts them; frozen random projections are buffers or frozen and not counted. GFLOPs come
from ``torch.utils.flop_counter.FlopCounterMode`` on one 1 x 3 x 224 x 224 image and are reported in the
convention of the paper's table (fvcore: one multiply-add = one FLOP, i.e. FlopCounterMode's count / 2).
FlopCounterMode counts matrix products and convolutions only (no FFTs, exponentials or normalisations),
so FFT-based mixers (GFNet's filter, FFT-domain static dictionaries) are undercounted.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import timm  # noqa: E402

import vars_ode.models  # noqa: E402,F401  (registers the entrypoints)

#: Paper Table 2: (GFLOPs, parameters in M); "self" rows of the table are the original (non-starred)
#: models, listed for reference.
PAPER_TABLE2 = {
    ("vars_deit_tiny", "self"): (1.3, 5.7),        # DeiT
    ("vars_deit_tiny", "performer"): (1.3, 5.7),   # DeiT*
    ("vars_deit_tiny", "vars_s"): (1.0, 6.8),
    ("vars_deit_tiny", "vars_d"): (1.4, 5.4),
    ("vars_deit_tiny", "vars_sd"): (1.4, 5.8),
    ("vars_gfnet_tiny", "gfnet"): (1.3, 7.5),      # GFNet-Ti*
    ("vars_gfnet_tiny", "vars_s"): (1.3, 7.5),
    ("vars_gfnet_tiny", "vars_d"): (1.9, 9.8),
    ("vars_gfnet_tiny", "vars_sd"): (1.9, 10.4),
    ("vars_rvt_tiny", "self"): (1.3, 8.6),         # RVT
    ("vars_rvt_tiny", "performer"): (1.3, 8.6),    # RVT*
    ("vars_rvt_tiny", "vars_s"): (1.0, 9.2),
    ("vars_rvt_tiny", "vars_d"): (1.2, 8.0),
    ("vars_rvt_tiny", "vars_sd"): (1.5, 9.2),
}
HOST_ATTENTIONS = {
    "vars_deit_tiny": ("self", "performer", "vars_s", "vars_d", "vars_sd"),
    "vars_gfnet_tiny": ("gfnet", "self", "performer", "vars_s", "vars_d", "vars_sd"),
    "vars_rvt_tiny": ("self", "performer", "vars_s", "vars_d", "vars_sd"),
}
VARS = ("vars_s", "vars_d", "vars_sd")


def count_parameters(model: torch.nn.Module) -> int:
    """Trainable parameters (as the official main.py reports them)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def build(name: str, attention: str, *, device="cpu", **layer_kwargs):
    kwargs = dict(layer_kwargs) if attention in VARS else {}
    with torch.device(device):
        return timm.create_model(name, attention=attention, num_classes=1000, img_size=224, **kwargs)


def gflops(model: torch.nn.Module, img_size: int = 224) -> float:
    """Multiply-adds (fvcore's "FLOPs") of one forward pass on a 1 x 3 x img x img input, in G."""
    from torch.utils.flop_counter import FlopCounterMode

    model.eval()
    x = torch.randn(1, 3, img_size, img_size)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    return counter.get_total_flops() / 2 / 1e9


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--no-flops", action="store_true", help="count parameters only (meta device, fast)")
    ap.add_argument("--compat", default=None, help="VARSLayer compat mode for the VARS rows (default: the layer's)")
    ap.add_argument("--static", default=None, choices=("conv", "dense"),
                    help="static atoms of the VARS-S / VARS-SD rows (default: the layer's, 'conv')")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads (1 is steadiest on a shared CPU)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    layer_kwargs = {} if args.compat is None else {"compat": args.compat}
    if args.static is not None:
        layer_kwargs["static"] = args.static

    print("| host | attention | params (M) | paper (M) | ratio | GFLOPs | paper GFLOPs | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for name, attentions in HOST_ATTENTIONS.items():
        for att in attentions:
            try:
                model = build(name, att, device="meta" if args.no_flops else "cpu", **layer_kwargs)
            except Exception as e:  # report and go on: one failing layer must not hide the table
                print(f"| {name} | {att} | error: {type(e).__name__}: {e} | | | | | |")
                continue
            p = count_parameters(model) / 1e6
            ref = PAPER_TABLE2.get((name, att))
            f = None if args.no_flops else gflops(model)
            cells = [name, att, f"{p:.2f}"]
            cells += [f"{ref[1]:.1f}", f"{p / ref[1]:.2f}"] if ref else ["-", "-"]
            cells += [f"{f:.2f}" if f is not None else "-"]
            cells += [f"{ref[0]:.1f}", f"{f / ref[0]:.2f}"] if (ref and f is not None) else ["-", "-"]
            print("| " + " | ".join(cells) + " |", flush=True)
            del model
    print("\nPaper rows: DeiT*/RVT* = performer, GFNet-Ti* = gfnet; 'self' rows compare with the original "
          "DeiT/RVT (softmax attention). GFLOPs: multiply-adds of matrix products and convolutions only.")


if __name__ == "__main__":
    main()
